"""The served model: an exported bundle's serving graph on ONNX Runtime, one batched step per call.

The bundle is read and cross-checked by `gru4rec.bundle.load_bundle` (serving graph, evaluation
graph and item-map sidecar from one export), the session is made by the scorer's own
`make_session`, and ids map to indices through the bundle's `ItemMap`: the same files, checks and
item map that `score` uses, so the server cannot disagree with it about which item is which.
Only `hidden_out`, `topk_scores` and `topk_idx` are fetched; the [B, N] score matrix stays inside ORT.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gru4rec.bundle import ModelBundle, companion_paths, load_bundle
from gru4rec.score.ort_backend import make_session, resolve_provider

OUTPUTS = ["hidden_out", "topk_scores", "topk_idx"]


@dataclass
class StepResult:
    hidden: np.ndarray  # float32 [L, B, H]
    topk_scores: np.ndarray  # float32 [B, K]
    topk_idx: np.ndarray  # int64 [B, K]


@dataclass
class ServedModel:
    bundle: ModelBundle
    session: object  # onnxruntime.InferenceSession of the serving graph
    provider: str  # 'cpu' | 'cuda'
    fingerprint: tuple = field(default=())  # bundle_fingerprint() of the files it was loaded from

    @property
    def export_id(self) -> str:
        return str(self.bundle.meta["export_id"])

    @property
    def top_k(self) -> int:
        return self.bundle.top_k

    @property
    def state_shape(self) -> tuple[int, int]:
        """(L, H): one session's hidden state."""
        return self.bundle.n_layers, self.bundle.hidden_size

    @property
    def id_kind(self) -> str:
        """'int' or 'str': the item id type the model was trained on."""
        return self.bundle.items.kind

    def lookup(self, item_id: int | str) -> int | None:
        """Index of an item id, None when the model does not know it (score drops such events)."""
        return self.bundle.items.index.get(item_id)

    def item_ids(self, idx: np.ndarray) -> list:
        """Indices -> the user's ids (Python ints or strs, ready for JSON)."""
        return self.bundle.items.ids[idx].tolist()

    def step(self, item_idx: np.ndarray, hidden: np.ndarray) -> StepResult:
        """One step for B sessions: item_idx int64 [B], hidden float32 [L, B, H] (zeros = a new session)."""
        out = self.session.run(OUTPUTS, {"item_idx": item_idx, "hidden": hidden})
        return StepResult(*out)


def bundle_fingerprint(onnx_path: str | Path) -> tuple:
    """(inode, mtime, size) of the bundle's three files; changes when a promotion renames any of them.
    A missing file gives None in its place (a promotion between two renames)."""
    fp = []
    for p in (Path(onnx_path), *companion_paths(onnx_path)):
        try:
            st = os.stat(p)
            fp.append((st.st_ino, st.st_mtime_ns, st.st_size))
        except OSError:
            fp.append(None)
    return tuple(fp)


def load_model(onnx_path: str | Path, provider: str = "cpu", threads: int = 0) -> ServedModel:
    """Load and check the bundle at `onnx_path`; UserError when it is missing, partial or mismatched."""
    # Fingerprint first: if the files change while loading, the next poll sees a difference and reloads.
    fingerprint = bundle_fingerprint(onnx_path)
    bundle = load_bundle(onnx_path)
    kind = resolve_provider(provider)
    session = make_session(bundle.onnx_path, bundle.onnx_path, kind, threads)
    bundle.items.index  # noqa: B018 -- build the id -> index dict now, not on the first request
    return ServedModel(bundle=bundle, session=session, provider=kind, fingerprint=fingerprint)
