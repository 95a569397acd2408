"""bench/score_variants.py on the CPU EP with a tiny model: every variant runs and the exact ones agree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ours

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "score_variants.py"


def run_tiny(provider: str, out: Path, timeout: int) -> subprocess.CompletedProcess:
    """bench/score_variants.py on the tiny random model, a few steps per run."""
    args = ["--provider", provider, "--tiny", "--steps", "3", "--warmup", "1", "--check-steps", "2"]
    cmd = [sys.executable, str(SCRIPT), *args, "--out", str(out)]
    scratch = out / "tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TMPDIR": str(scratch)}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert ours(scratch) == []  # every variant's graph is removed with its working folder
    return res


def test_score_variants_cpu_tiny(tmp_path):
    res = run_tiny("cpu", tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads((tmp_path / "score_variants.json").read_text())
    runs = {r["variant"]: r for r in out["runs"]}
    assert not out["failed"] and {"base", "chunks4", "block64", "block64+chunks8", "fp16"} <= set(runs)
    for r in out["runs"]:
        a = r["agreement_vs_base_fp32"]
        assert a["rows"] == 2 * 64 and r["events_per_s"] > 0
        if r["exact_by_construction"]:  # float32 variants: same counts and top-k sets as the base graph
            assert a["counts_exact"] == 1.0 and a["topk_overlap"] == 1.0, r["label"]
    assert "events/s" in res.stdout and "block64+chunks4 b64" in res.stdout  # the summary table


def _module():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import score_variants
    finally:
        sys.path.pop(0)
    return score_variants


def test_torch_split_runs_on_cpu():
    """The GPU-only breakdown's code path, on CPU and tiny shapes (the lead runs it on the GPU)."""
    split = _module().torch_split(300, 16, 8, 5, 64, 4, dev="cpu")
    assert {"gemm_fp32", "topk", "topk_two_stage_4", "counts_fp16_blocks_64"} <= set(split)
    assert all(v > 0 for v in split.values())


def test_agreement_is_measured_not_assumed():
    """agreement() against an independent count: a planted difference must show up."""
    agreement = _module().agreement
    rng = np.random.default_rng(0)
    scores = torch.from_numpy(rng.standard_normal((8, 50)))
    target = scores[:, :1]
    g, e = (scores > target).sum(1).numpy(), (scores == target).sum(1).numpy()
    top = torch.topk(scores, 5, dim=1).indices.numpy()
    ref = [(g, e, top)]
    g2, top2 = g.copy(), top.copy()
    g2[3] += 1
    top2[0, 0] = 49 if 49 not in top[0] else 48
    a = agreement([(g2, e, top2)], ref, top_k=5)
    assert a["counts_exact"] == 7 / 8 and a["n_greater_max_abs_diff"] == 1
    assert a["topk_overlap"] == (7 + 4 / 5) / 8 and a["topk_rows_identical"] == 7 / 8


@pytest.mark.gpu
def test_score_variants_cuda_tiny(tmp_path):
    """On a GPU: every variant builds and runs on the CUDA EP; exact variants agree with the base graph."""
    res = run_tiny("cuda", tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads((tmp_path / "score_variants.json").read_text())
    for r in out["runs"]:
        a = r["agreement_vs_base_fp32"]
        if r["exact_by_construction"] and not r["tf32"]:
            # Counts are exact for the graph's own scores; cuBLAS may sum a padded (wider) GEMM in
            # another order, moving a score by an ulp, so a rare near-tie may flip between graphs.
            assert a["counts_exact"] >= 0.99 and a["topk_overlap"] >= 0.99, r["label"]
