"""IndexedAdagradM and RowAdam against updates computed by hand (spec §6)."""

from __future__ import annotations

import math

import pytest
import torch

from gru4rec.train.optim import IndexedAdagradM, RowAdam


def test_adagrad_momentum_two_steps_by_hand():
    lr, mu, eps = 0.1, 0.5, 1e-6
    w = torch.tensor([1.0, -2.0], dtype=torch.float64)
    table = torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0], [6.0, 7.0]], dtype=torch.float64)
    opt = IndexedAdagradM([w], [table], lr=lr, momentum=mu, eps=eps)

    # step 1: dense grad g; rows 1, 3, 1 (row 1 twice: its gradient rows must be summed first)
    opt.step(
        [torch.tensor([0.5, -1.0], dtype=torch.float64)],
        [(torch.tensor([1, 3, 1]), torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 0.0]], dtype=torch.float64))],
    )
    # dense by hand: a = g^2, d = -lr g / sqrt(a + eps), v = d, w += v
    a0, a1 = 0.25, 1.0
    v0, v1 = -lr * 0.5 / math.sqrt(a0 + eps), -lr * -1.0 / math.sqrt(a1 + eps)
    assert w.tolist() == pytest.approx([1.0 + v0, -2.0 + v1], rel=1e-12)
    # row 1: coalesced grad (1.5, 2.0); row 3: (3, -1); rows 0 and 2 untouched
    r1 = [-lr * 1.5 / math.sqrt(1.5**2 + eps), -lr * 2.0 / math.sqrt(4.0 + eps)]
    r3 = [-lr * 3.0 / math.sqrt(9.0 + eps), -lr * -1.0 / math.sqrt(1.0 + eps)]
    exp = [[0.0, 1.0], [2.0 + r1[0], 3.0 + r1[1]], [4.0, 5.0], [6.0 + r3[0], 7.0 + r3[1]]]
    assert table.flatten().tolist() == pytest.approx(sum(exp, []), rel=1e-12)
    assert opt.tacc[0].flatten().tolist() == pytest.approx([0, 0, 2.25, 4.0, 0, 0, 9.0, 1.0])

    # step 2: only row 3 touched; row 1 keeps its velocity frozen (no decay, no movement)
    opt.step(
        [torch.tensor([0.5, 0.0], dtype=torch.float64)],
        [(torch.tensor([3]), torch.tensor([[1.0, 1.0]], dtype=torch.float64))],
    )
    d0 = -lr * 0.5 / math.sqrt(0.5 + eps)
    v0 = mu * v0 + d0
    v1 = mu * v1 + 0.0
    w_exp0 = 1.0 + (-lr * 0.5 / math.sqrt(a0 + eps)) + v0
    w_exp1 = -2.0 + (-lr * -1.0 / math.sqrt(a1 + eps)) + v1
    assert w.tolist() == pytest.approx([w_exp0, w_exp1], rel=1e-12)
    r3_v = [mu * r3[0] + -lr * 1.0 / math.sqrt(10.0 + eps), mu * r3[1] + -lr * 1.0 / math.sqrt(2.0 + eps)]
    exp[3] = [exp[3][0] + r3_v[0], exp[3][1] + r3_v[1]]
    assert table.flatten().tolist() == pytest.approx(sum(exp, []), rel=1e-12)
    assert opt.tvel[0][1].tolist() == pytest.approx(r1, rel=1e-12)  # untouched: velocity frozen
    assert opt.tvel[0][0].tolist() == [0.0, 0.0]


def test_adagrad_without_momentum_eps_inside_sqrt():
    lr, eps = 0.05, 1e-6
    w = torch.tensor([3.0], dtype=torch.float64)
    opt = IndexedAdagradM([w], [], lr=lr, momentum=0.0, eps=eps)
    assert opt.vel == []
    g = 1e-4  # tiny gradient: eps inside the sqrt dominates (outside it would give ~ -lr)
    opt.step([torch.tensor([g], dtype=torch.float64)], [])
    assert w.item() == pytest.approx(3.0 - lr * g / math.sqrt(g * g + eps), rel=1e-12)


def test_row_adam_by_hand():
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-8
    w = torch.tensor([1.0], dtype=torch.float64)
    table = torch.zeros(3, 1, dtype=torch.float64)
    opt = RowAdam([w], [table], lr=lr, betas=(b1, b2), eps=eps)
    opt.t = opt.t.double()
    for gw, idx, grows in [(0.5, [2, 2], [[1.0], [1.0]]), (-0.25, [0], [[3.0]])]:
        opt.step(
            [torch.tensor([gw], dtype=torch.float64)],
            [(torch.tensor(idx), torch.tensor(grows, dtype=torch.float64))],
        )
    # dense: standard Adam, two steps
    m = v = 0.0
    wx = 1.0
    for t, g in ((1, 0.5), (2, -0.25)):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        wx -= lr / (1 - b1**t) * m / (math.sqrt(v) / math.sqrt(1 - b2**t) + eps)
    assert w.item() == pytest.approx(wx, rel=1e-10)
    # row 2 touched at step 1 with coalesced grad 2.0; row 0 at step 2 (lazy: fresh moments, t = 2)
    m2, v2 = (1 - b1) * 2.0, (1 - b2) * 4.0
    r2 = -lr / (1 - b1) * m2 / (math.sqrt(v2) / math.sqrt(1 - b2) + eps)
    m0, v0 = (1 - b1) * 3.0, (1 - b2) * 9.0
    r0 = -lr / (1 - b1**2) * m0 / (math.sqrt(v0) / math.sqrt(1 - b2**2) + eps)
    assert table[:, 0].tolist() == pytest.approx([r0, 0.0, r2], rel=1e-10)
