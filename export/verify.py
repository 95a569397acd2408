"""Export verification: replay random sessions through PyTorch (`GRU4Rec.forward`) and ONNX Runtime.

Several steps per batch, with random per-row hidden resets (zeroed rows, as the scorer does when a
slot takes a new session), each side carrying its own state forward so errors can accumulate as in
a real replay. Checked, at batch 1 and at a larger batch:
  scores      max |ORT - torch| <= 1e-4 (serving graph; eval graph's top-k scores too)
  hidden      max |ORT - torch| <= 1e-5 (both graphs)
  top-k       ORT indices == torch.topk indices, except where the two items' PyTorch scores are
              tied (within TIE_TOL): an exact tie has no defined order, and the difference between
              the two runtimes' rounding is far below any real score gap
  counts      eval graph's n_greater / n_equal inside the bounds that the PyTorch scores allow
              given the score tolerance (items within 2 x 1e-4 of the target may go either way)
fp16 graphs are reported (error, top-k overlap) but never fail: half precision cannot meet the fp32
tolerances and is a speed/accuracy trade the user chose.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SCORE_TOL = 1e-4
HIDDEN_TOL = 1e-5
TIE_TOL = 2 * SCORE_TOL


class VerificationFailed(Exception):
    """The exported graphs disagree with PyTorch beyond tolerance (CLI: exit 1)."""

    def __init__(self, report: VerifyReport):
        super().__init__("; ".join(report.failures()))
        self.report = report


@dataclass
class VerifyReport:
    fp16: bool = False
    max_score_diff: float = 0.0
    max_hidden_diff: float = 0.0
    topk_rows: int = 0
    topk_identical: int = 0
    topk_tie_only: int = 0
    topk_overlap_sum: float = 0.0  # sum over rows of |ORT top-k ∩ torch top-k| / K
    count_rows: int = 0
    count_ok: int = 0
    batches: list[int] = field(default_factory=list)
    steps: int = 0

    @property
    def topk_other(self) -> int:
        return self.topk_rows - self.topk_identical - self.topk_tie_only

    @property
    def topk_overlap(self) -> float:
        return self.topk_overlap_sum / max(self.topk_rows, 1)

    def failures(self) -> list[str]:
        if self.fp16:
            return []
        out = []
        if not self.max_score_diff <= SCORE_TOL:  # `not <=` also catches NaN
            out.append(f"max |score diff| {self.max_score_diff:.3g} > {SCORE_TOL:g}")
        if not self.max_hidden_diff <= HIDDEN_TOL:
            out.append(f"max |hidden diff| {self.max_hidden_diff:.3g} > {HIDDEN_TOL:g}")
        if self.topk_other:
            out.append(f"top-k differs beyond ties in {self.topk_other} of {self.topk_rows} rows")
        if self.count_ok != self.count_rows:
            out.append(f"eval n_greater/n_equal out of bounds in {self.count_rows - self.count_ok} rows")
        return out

    @property
    def passed(self) -> bool:
        return not self.failures()

    def lines(self) -> list[str]:
        enforce = "reported only (fp16)" if self.fp16 else None

        def verdict(ok: bool) -> str:
            return enforce or ("ok" if ok else "FAILED")

        return [
            f"replayed {self.steps} steps at batch {' and '.join(map(str, self.batches))}, random hidden resets",
            f"max |score diff|   {self.max_score_diff:.3e}  (tol {SCORE_TOL:g})  {verdict(self.max_score_diff <= SCORE_TOL)}",
            f"max |hidden diff|  {self.max_hidden_diff:.3e}  (tol {HIDDEN_TOL:g})  {verdict(self.max_hidden_diff <= HIDDEN_TOL)}",
            f"top-k agreement    {self.topk_identical}/{self.topk_rows} rows identical, {self.topk_tie_only} differ "
            f"only by ties, {self.topk_other} otherwise; overlap {self.topk_overlap:.4f}  {verdict(self.topk_other == 0)}",
            f"eval tie counts    {self.count_ok}/{self.count_rows} rows within bounds  "
            f"{verdict(self.count_ok == self.count_rows)}",
        ]


def ort_session(path: str | Path, providers: list[str] | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # ORT's idle threads spin between runs; here torch runs in between on the same cores.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # no pre-packed copy of each Gemm's weights: with two sessions alive that copy is two more item
    # matrices (the results are the same at every batch the check uses but 1, which it compares to
    # PyTorch within tolerance anyway)
    opts.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])


def _classify_topk(report: VerifyReport, ort_idx: np.ndarray, ref_scores: np.ndarray, k: int) -> None:
    """Compare ORT top-k indices with torch.topk on the PyTorch scores, row by row."""
    import torch

    ref_val, ref_idx = (t.numpy() for t in torch.topk(torch.from_numpy(ref_scores), k, dim=1))
    for b in range(len(ort_idx)):
        report.topk_rows += 1
        report.topk_overlap_sum += len(np.intersect1d(ort_idx[b], ref_idx[b])) / k
        if np.array_equal(ort_idx[b], ref_idx[b]):
            report.topk_identical += 1
        elif np.all(np.abs(ref_scores[b, ort_idx[b]] - ref_val[b]) <= TIE_TOL):
            report.topk_tie_only += 1


def _check_counts(report: VerifyReport, n_greater, n_equal, ref_scores, targets, tol: float) -> None:
    target = ref_scores[np.arange(len(targets)), targets][:, None]
    delta = ref_scores - target
    lo_g, hi_g = (delta > 2 * tol).sum(1), (delta >= -2 * tol).sum(1) - 1  # -1: the target itself
    hi_e = (np.abs(delta) <= 2 * tol).sum(1)
    ok = (n_greater >= lo_g) & (n_greater <= hi_g) & (n_equal >= 1) & (n_equal <= hi_e)
    report.count_rows += len(ok)
    report.count_ok += int(ok.sum())


VERIFY_CELLS = 1 << 24  # scores per verification step: a large catalog verifies fewer rows, same checks


def verify_graphs(
    model,
    serving_path: str | Path,
    eval_path: str | Path,
    top_k: int,
    fp16: bool = False,
    batches: tuple[int, ...] = (1, 64),
    steps: int = 6,
    reset_p: float = 0.25,
    seed: int = 0,
    providers: list[str] | None = None,
) -> VerifyReport:
    """Replay random multi-step sessions through `model` (torch, fp32) and both ONNX graphs."""
    import torch

    from gru4rec.bundle import pad_layers

    model = model.cpu().eval()
    cfg = model.cfg
    n, L, H = cfg.n_items, len(cfg.layers), max(cfg.layers)  # H: the padded state width (bundle.py)
    serving, evaluation = ort_session(serving_path, providers), ort_session(eval_path, providers)
    rng = np.random.default_rng(seed)
    # at most VERIFY_CELLS scores per step: the float64 reference and its comparisons are [B, N]
    batches = tuple(sorted({max(1, min(B, VERIFY_CELLS // n)) for B in batches}))
    report = VerifyReport(fp16=fp16, batches=list(batches), steps=steps)
    for B in batches:
        h_ref = model.init_hidden(B, "cpu")
        h_srv = np.zeros((L, B, H), np.float32)
        h_evl = np.zeros((L, B, H), np.float32)
        for _ in range(steps):
            x = rng.integers(0, n, B)
            targets = rng.integers(0, n, B)
            keep = rng.random(B) >= reset_p
            h_ref = [h * torch.from_numpy(keep[:, None].astype(np.float32)) for h in h_ref]
            h_srv, h_evl = h_srv * keep[None, :, None], h_evl * keep[None, :, None]
            with torch.no_grad():
                ref, h_ref = model(torch.from_numpy(x), h_ref)
            ref_np, ref_h = ref.numpy().astype(np.float64), pad_layers(h_ref, H)
            scores, h_srv, top_s, top_i = serving.run(None, {"item_idx": x, "hidden": h_srv})
            h_evl, etop_s, etop_i, n_greater, n_equal = evaluation.run(
                None, {"item_idx": x, "hidden": h_evl, "target_idx": targets}
            )
            rows = np.arange(B)[:, None]
            report.max_score_diff = max(
                report.max_score_diff,
                float(np.abs(scores - ref_np).max()),
                float(np.abs(top_s - ref_np[rows, top_i]).max()),
                float(np.abs(etop_s - ref_np[rows, etop_i]).max()),
            )
            report.max_hidden_diff = max(
                report.max_hidden_diff, float(np.abs(h_srv - ref_h).max()), float(np.abs(h_evl - ref_h).max())
            )
            _classify_topk(report, top_i, ref_np, top_k)
            _classify_topk(report, etop_i, ref_np, top_k)
            tol = SCORE_TOL if not fp16 else max(report.max_score_diff, SCORE_TOL)
            _check_counts(report, n_greater, n_equal, ref_np, targets, tol)
    return report
