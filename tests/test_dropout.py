"""Dropout masks on the CPU (gru4rec/dropout.py): the generator against splitmix64 written with
Python integers, keep rates and independence measured on millions of draws, reproducibility."""

from __future__ import annotations

import math

import pytest
import torch

from gru4rec.dropout import dropout, mask

M64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    z = x & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mask_equals_splitmix64_by_hand(dtype):
    p = 0.3
    torch.manual_seed(11)
    got = mask(torch.empty(50, 40, dtype=dtype), p).flatten().tolist()
    torch.manual_seed(11)
    seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))  # the one draw a mask takes
    keep24 = round((1 - p) * 2**24)
    scale = float(torch.tensor(1 / (1 - p), dtype=dtype))
    want = [scale if _splitmix64(seed + i * 0x9E3779B97F4A7C15) >> 40 < keep24 else 0.0 for i in range(2000)]
    assert got == want


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.75])
def test_keep_rate_values_and_mean(p):
    torch.manual_seed(0)
    m = mask(torch.empty(2000, 1000), p)
    n = m.numel()
    kept = int(torch.count_nonzero(m))
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(kept - n * (1 - p)) < 5 * sigma
    values = torch.unique(m).tolist()
    assert values[0] == 0.0 and values[1] == pytest.approx(1 / (1 - p), rel=1e-7) and len(values) == 2
    assert m.double().mean().item() == pytest.approx(1.0, abs=5 * sigma / n / (1 - p))


def test_masks_have_no_structure():
    """Neighbours, rows, columns and two successive masks are independent (|r| < 5 / sqrt(n))."""
    torch.manual_seed(1)
    a = (mask(torch.empty(512, 512), 0.5) > 0).double()
    b = (mask(torch.empty(512, 512), 0.5) > 0).double()
    n = a.numel()

    def corr(x, y):
        x, y = x.flatten() - x.mean(), y.flatten() - y.mean()
        return (x @ y / (x.norm() * y.norm())).item()

    lim = 5 / math.sqrt(n)
    assert abs(corr(a[:, 1:], a[:, :-1])) < lim  # next element in a row
    assert abs(corr(a[1:], a[:-1])) < lim  # same column, next row
    assert abs(corr(a, b)) < lim  # the next step's mask
    col_rate = a.mean(0)  # 512 columns of 512 draws: each rate ~ N(0.5, 0.022)
    assert (col_rate - 0.5).abs().max().item() < 5 * math.sqrt(0.25 / 512)


def test_reproducible_for_a_seed_and_any_thread_count():
    n = torch.get_num_threads()
    try:
        masks = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            torch.manual_seed(5)
            masks.append([mask(torch.empty(300, 700), 0.4) for _ in range(2)])
    finally:
        torch.set_num_threads(n)
    assert torch.equal(masks[0][0], masks[1][0]) and torch.equal(masks[0][1], masks[1][1])
    assert not torch.equal(masks[0][0], masks[0][1])


def test_dropout_applies_the_mask_and_is_identity_when_off():
    x = torch.randn(64, 32)
    torch.manual_seed(2)
    y = dropout(x, 0.25, True)
    torch.manual_seed(2)
    assert torch.equal(y, x * mask(x, 0.25))
    assert dropout(x, 0.25, False) is x and dropout(x, 0.0, True) is x
    assert mask(x, 0.0) is None


def test_numba_is_loaded_by_cpu_training_only():
    """Scoring, exporting and the model (also on a GPU) never import numba; the CPU step does."""
    import subprocess
    import sys

    code = (
        "import sys, gru4rec.model, gru4rec.train.trainer, gru4rec.export.onnx_export, gru4rec.score.scorer;"
        "print('numba' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
