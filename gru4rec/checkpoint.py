"""The model file: one torch file holding weights, item map, hyperparameters and provenance.

Written atomically; loaded with `weights_only=True` (plain containers and tensors only), so a
checkpoint can never run code. Training state for `--resume` rides along under "train_state".
"""

from __future__ import annotations

import pickle
import platform
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import gru4rec
from gru4rec.errors import UserError
from gru4rec.io import atomic_path
from gru4rec.items import ItemMap
from gru4rec.model import GRU4Rec, ModelConfig

FORMAT = "gru4rec-checkpoint"
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    model: GRU4Rec
    items: ItemMap
    params: dict[str, Any] = field(default_factory=dict)  # training hyperparameters
    data_fingerprint: str = ""
    train_state: dict[str, Any] | None = None  # optimiser/rng/epoch for --resume
    info: dict[str, Any] = field(default_factory=dict)  # versions, timings, metrics


def versions() -> dict[str, str]:
    return {
        "gru4rec": str(gru4rec.__version__),
        "torch": str(torch.__version__),
        "python": platform.python_version(),
    }


def save(ckpt: Checkpoint, path: str | Path) -> None:
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_config": ckpt.model.cfg.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in ckpt.model.state_dict().items()},
        "item_ids": _pack_ids(ckpt.items),
        "params": ckpt.params,
        "data_fingerprint": ckpt.data_fingerprint,
        "train_state": ckpt.train_state,
        "info": {**ckpt.info, "versions": versions()},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> Checkpoint:
    """`mmap`: tensors stay in the file until read (the model's weights become views of it; an
    optimiser state nobody reads costs no memory), for read-only uses such as export."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: model file not found")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is not ours
        raise UserError(f"{path}: not a gru4rec checkpoint (not a PyTorch file, or truncated)")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise UserError(f"{path}: not a gru4rec checkpoint (holds objects other than plain data)") from None
    except Exception as e:
        raise UserError(
            f"{path}: not a readable gru4rec checkpoint ({str(e).splitlines()[0][:160]})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path}: not a gru4rec checkpoint")
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(f"{path}: checkpoint format {payload['format_version']} is newer than this gru4rec")
    try:
        cfg = ModelConfig(**payload["model_config"])
        model = GRU4Rec(cfg, seed=None)
        model.load_state_dict(payload["state_dict"], assign=mmap)
        items = _unpack_ids(payload["item_ids"])
        if len(items) != cfg.n_items:
            raise ValueError(f"item map has {len(items)} items, model {cfg.n_items}")
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{path}: corrupt checkpoint ({str(e).splitlines()[0][:160]})") from None
    model.eval()
    return Checkpoint(
        model=model.to(map_location),
        items=items,
        params=payload.get("params") or {},
        data_fingerprint=payload.get("data_fingerprint", ""),
        train_state=payload.get("train_state"),
        info=payload.get("info") or {},
    )


def _pack_ids(items: ItemMap):
    """int ids as an int64 tensor (as before); string ids as a plain list of str (weights_only-safe)."""
    if items.kind == "str":
        return [str(x) for x in items.ids]
    return torch.from_numpy(np.ascontiguousarray(items.ids, dtype=np.int64))


def _unpack_ids(packed) -> ItemMap:
    if isinstance(packed, list):
        if not all(isinstance(x, str) for x in packed):
            raise ValueError("item ids are neither an int64 tensor nor a list of strings")
        return ItemMap(np.array(packed, dtype=object))
    return ItemMap(packed.numpy().astype(np.int64))
