"""Each training loss against a float64 reference written out element by element (spec §5)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gru4rec.train.losses import row_loss_sum


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _elu(x: float, a: float) -> float:
    return x if (a == 0 or x >= 0) else a * (math.exp(x) - 1.0)


def _neg_softmax(row: list[float], j: int) -> list[float]:
    # official: diagonal logit zeroed before the max, its weight masked to 0
    z = [0.0 if k == j else v for k, v in enumerate(row)]
    mx = max(z)
    e = [0.0 if k == j else math.exp(v - mx) for k, v in enumerate(z)]
    s = sum(e)
    return [v / s for v in e]


def ref_xe(o, logq_cols):
    total = 0.0
    for j, row in enumerate(o):
        z = [v - q for v, q in zip(row, logq_cols)]
        mx = max(z)
        p = math.exp(z[j] - mx) / sum(math.exp(v - mx) for v in z)
        total += -math.log(p + 1e-24)
    return total


def ref_bpr_max(o, bpreg, elu):
    total = 0.0
    for j, row in enumerate(o):
        row = [_elu(v, elu) for v in row]
        s = _neg_softmax(row, j)
        t = row[j]
        inner = sum(s[k] * _sig(t - row[k]) for k in range(len(row)) if k != j)
        reg = sum(s[k] * row[k] ** 2 for k in range(len(row)) if k != j)
        total += -math.log(inner + 1e-24) + bpreg * reg
    return total


def ref_top1_max(o, elu):
    total = 0.0
    for j, row in enumerate(o):
        row = [_elu(v, elu) for v in row]
        s = _neg_softmax(row, j)
        t = row[j]
        total += sum(s[k] * (_sig(row[k] - t) + _sig(row[k] ** 2)) for k in range(len(row)) if k != j)
    return total


def ref_bpr(o, elu):  # Theano: summed over all columns, diagonal included
    total = 0.0
    for j, row in enumerate(o):
        row = [_elu(v, elu) for v in row]
        total += sum(-math.log(_sig(row[j] - v)) for v in row)
    return total


def ref_top1(o, elu):  # Theano: column mean minus the positive's regulariser / N_S
    total = 0.0
    for j, row in enumerate(o):
        row = [_elu(v, elu) for v in row]
        n = len(row)
        t = row[j]
        total += sum(_sig(v - t) + _sig(v * v) for v in row) / n - _sig(t * t) / n
    return total


@pytest.fixture
def scores():
    g = np.random.default_rng(3)
    return g.normal(0, 1.5, size=(5, 5 + 7))  # 5 rows, 5 in-batch + 7 sampled columns


@pytest.mark.parametrize("elu", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("name", ["bpr-max", "top1-max", "bpr", "top1"])
def test_ranking_losses_match_reference(scores, name, elu):
    bpreg = 0.9
    got = row_loss_sum(name, torch.tensor(scores, dtype=torch.float64), bpreg=bpreg, elu_param=elu).item()
    ref = {
        "bpr-max": lambda: ref_bpr_max(scores.tolist(), bpreg, elu),
        "top1-max": lambda: ref_top1_max(scores.tolist(), elu),
        "bpr": lambda: ref_bpr(scores.tolist(), elu),
        "top1": lambda: ref_top1(scores.tolist(), elu),
    }[name]()
    assert got == pytest.approx(ref, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("logq", [0.0, 1.0, 0.5])
def test_cross_entropy_with_logq_matches_reference(scores, logq):
    g = np.random.default_rng(4)
    supp = g.integers(1, 500, size=scores.shape[1]).astype(np.float64)
    alpha = 0.5
    n_in = scores.shape[0]
    # raw counts for in-batch columns, supp^alpha for sampled ones (spec §4), never normalised
    log_q = np.array([math.log(s) if k < n_in else alpha * math.log(s) for k, s in enumerate(supp)])
    cols = logq * log_q
    got = row_loss_sum("cross-entropy", torch.tensor(scores), logq_cols=torch.tensor(cols)).item()
    assert got == pytest.approx(ref_xe(scores.tolist(), cols.tolist()), rel=1e-10)


def test_float32_losses_close_to_float64(scores):
    for name in ("cross-entropy", "bpr-max", "top1-max", "bpr", "top1"):
        a = row_loss_sum(name, torch.tensor(scores, dtype=torch.float32), bpreg=1.0, elu_param=0.5).item()
        b = row_loss_sum(name, torch.tensor(scores, dtype=torch.float64), bpreg=1.0, elu_param=0.5).item()
        assert a == pytest.approx(b, rel=1e-5), name


def test_bpr_max_gradient_matches_finite_difference(scores):
    x = torch.tensor(scores, dtype=torch.float64, requires_grad=True)
    row_loss_sum("bpr-max", x, bpreg=1.0, elu_param=1.0).backward()
    eps = 1e-6
    for j, k in [(0, 0), (1, 3), (4, 11), (2, 7)]:
        plus, minus = scores.copy(), scores.copy()
        plus[j, k] += eps
        minus[j, k] -= eps
        fd = (ref_bpr_max(plus.tolist(), 1.0, 1.0) - ref_bpr_max(minus.tolist(), 1.0, 1.0)) / (2 * eps)
        assert x.grad[j, k].item() == pytest.approx(fd, rel=1e-5, abs=1e-8)


def test_unknown_loss_rejected(scores):
    with pytest.raises(ValueError, match="unknown loss"):
        row_loss_sum("hinge", torch.tensor(scores))
