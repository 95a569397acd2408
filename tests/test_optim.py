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


def _adagrad_by_loop(w, acc, vel, idx, g, lr, mu, eps):
    """The official update, one python float at a time (duplicates summed first)."""
    summed: dict[int, list[float]] = {}
    for r, row in zip(idx.tolist(), g.tolist()):
        summed[r] = [a + b for a, b in zip(summed.get(r, [0.0] * len(row)), row)]
    for r, grow in summed.items():
        for j, gj in enumerate(grow):
            acc[r][j] += gj * gj
            d = -lr * gj / math.sqrt(acc[r][j] + eps)
            vel[r][j] = mu * vel[r][j] + d if mu > 0 else d
            w[r][j] += vel[r][j]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mu", [0.0, 0.3])
def test_step_parts_equals_the_update_by_loop(dtype, mu):
    """The CPU step's entry (numba loops): parts with duplicates within and across them, several
    steps, dense parameters of 1, 2 and 3 dimensions; against the update in python floats."""
    lr, eps = 0.1, 1e-6
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(9, 3, generator=gen, dtype=dtype)
    bias = torch.randn(9, 1, generator=gen, dtype=dtype)
    dense = [torch.randn(s, generator=gen, dtype=dtype) for s in ((4,), (3, 5), (2, 2, 3))]
    opt = IndexedAdagradM(dense, [table, bias], lr=lr, momentum=mu, eps=eps)
    ref_t, ref_b = table.double().tolist(), bias.double().tolist()
    ref_d = [p.double().reshape(1, -1).tolist() for p in dense]
    st = {k: [[0.0] * len(r) for r in v] for k, v in (("t", ref_t), ("b", ref_b))}
    sv = {k: [[0.0] * len(r) for r in v] for k, v in (("t", ref_t), ("b", ref_b))}
    da = [[[0.0] * len(r[0])] for r in ref_d]
    dv = [[[0.0] * len(r[0])] for r in ref_d]
    for step in range(4):
        ia, ib = torch.tensor([2, 5, 2, 7]) + step % 2, torch.tensor([5, 0, 8])
        ga, gb = (torch.randn(len(i), 3, generator=gen, dtype=dtype) for i in (ia, ib))
        gbias = torch.randn(len(ia), 1, generator=gen, dtype=dtype)
        gd = [torch.randn(p.shape, generator=gen, dtype=dtype) for p in dense]
        opt.step_parts(gd, [[(ia, ga), (ib, gb)], [(ia, gbias)]])
        _adagrad_by_loop(
            ref_t, st["t"], sv["t"], torch.cat([ia, ib]), torch.cat([ga, gb]).double(), lr, mu, eps
        )
        _adagrad_by_loop(ref_b, st["b"], sv["b"], ia, gbias.double(), lr, mu, eps)
        for k, g in enumerate(gd):
            _adagrad_by_loop(
                ref_d[k], da[k], dv[k], torch.tensor([0]), g.double().reshape(1, -1), lr, mu, eps
            )
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=2e-6, atol=2e-7)
    torch.testing.assert_close(table.double(), torch.tensor(ref_t, dtype=torch.float64), **tol)
    torch.testing.assert_close(bias.double(), torch.tensor(ref_b, dtype=torch.float64), **tol)
    torch.testing.assert_close(opt.tacc[0].double(), torch.tensor(st["t"], dtype=torch.float64), **tol)
    if mu > 0:
        torch.testing.assert_close(opt.tvel[0].double(), torch.tensor(sv["t"], dtype=torch.float64), **tol)
    for k, p in enumerate(dense):
        torch.testing.assert_close(
            p.double().reshape(1, -1), torch.tensor(ref_d[k], dtype=torch.float64), **tol
        )
        torch.testing.assert_close(
            opt.acc[k].double().reshape(1, -1), torch.tensor(da[k], dtype=torch.float64), **tol
        )
    # the work buffers are left clean for the next step
    assert (opt._loops.tables[0][3].slot == -1).all()
