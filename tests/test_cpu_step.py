"""The CPU step (hand-written backward, distinct sampled columns) against the autograd step.

The reference is the trainer's autograd step (`fast_cpu=False`, the GPU's maths run eagerly on the
CPU). Both run the same schedule, sample store and dropout masks (same seeds); in float64 any
difference is rounding, so whole epochs must agree to ~1e-9 on every weight and optimiser state.
"""

from __future__ import annotations

import pytest
import torch

from gru4rec.items import ItemMap
from gru4rec.model import GRU4Rec
from gru4rec.synth import generate
from gru4rec.train.losses import row_loss_sum
from gru4rec.train.params import from_dict
from gru4rec.train.trainer import Trainer, model_config, prepare, train

BASE = dict(
    layers=[12],
    batch_size=8,
    n_sample=24,
    learning_rate=0.1,
    momentum=0.2,
    sample_alpha=0.75,  # popular items drawn several times per step: duplicate columns get exercised
    sample_store_size=24 * 7,  # the store is redrawn mid-epoch
    n_epochs=1,
)
LOSSES = {
    "xe+logq": {"loss": "cross-entropy", "logq": 1.0},
    "xe": {"loss": "cross-entropy", "logq": 0.0},
    "bpr-max": {"loss": "bpr-max", "logq": 0.0, "elu_param": 0.5, "bpreg": 0.9},
    "top1-max": {"loss": "top1-max", "logq": 0.0, "elu_param": 1.0},
    "bpr": {"loss": "bpr", "logq": 0.0, "elu_param": 0.0},
    "top1": {"loss": "top1", "logq": 0.0, "elu_param": 0.0},
}
MODES = {
    "shared": {},
    "separate": {"constrained_embedding": False, "embedding": 10},
    "onehot-2layers": {"constrained_embedding": False, "layers": [12, 10]},
    "shared-2layers": {"layers": [12, 10]},
}
DROPOUT = {"off": {}, "on": {"dropout_p_embed": 0.25, "dropout_p_hidden": 0.3}}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny():
    return generate(150, 40, 5)[0]


def _run_epoch(events, params: dict, fast: bool, dtype=torch.float64, seed: int = 3) -> Trainer:
    cfg = from_dict(params)
    items = ItemMap.from_events(events)
    sched, supp = prepare(events, items, cfg)
    model = GRU4Rec(model_config(cfg, len(items)), seed=seed).to(dtype)
    tr = Trainer(model, cfg, sched, supp, "cpu", seed, fast_cpu=fast)
    assert (tr.cpu_step is not None) == fast
    tr.hidden = [h.to(dtype) for h in tr.hidden]
    torch.manual_seed(seed)  # dropout masks come from the global generator, in forward order
    tr.stats = tr.run_epoch()
    return tr


def _assert_same_state(a: Trainer, b: Trainer, rtol: float, atol: float) -> None:
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
    sa, sb = a.opt.state_dict(), b.opt.state_dict()
    for key in sa:
        va, vb = sa[key], sb[key]
        for x, y in zip(va if isinstance(va, list) else [va], vb if isinstance(vb, list) else [vb]):
            torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=lambda m, k=key: f"optimiser {k}: {m}")


# every loss with dropout off and on (shared mode, the presets' mode); every other input mode and
# two layers with dropout on for one softmax and one ranking loss
CASES = [(loss, "shared", drop) for loss in LOSSES for drop in DROPOUT] + [
    (loss, mode, "on") for mode in MODES if mode != "shared" for loss in ("xe+logq", "bpr-max")
]


@pytest.mark.parametrize("loss,mode,drop", CASES)
def test_cpu_step_equals_autograd_step_float64(tiny, loss, mode, drop):
    p = {**BASE, **LOSSES[loss], **MODES[mode], **DROPOUT[drop]}
    ref = _run_epoch(tiny, p, fast=False)
    fast = _run_epoch(tiny, p, fast=True)
    assert ref.stats.steps == fast.stats.steps > 40  # full steps, the shrinking tail and a redraw
    assert fast.stats.loss == pytest.approx(ref.stats.loss, rel=1e-10)
    _assert_same_state(fast, ref, rtol=1e-9, atol=1e-11)
    # the run did move the weights (an update that does nothing would also "agree")
    init = GRU4Rec(model_config(from_dict(p), fast.model.cfg.n_items), seed=3).double()
    assert not torch.allclose(init.Wy, fast.model.Wy) and not torch.allclose(
        init.W_ih[-1], fast.model.W_ih[-1]
    )


@pytest.mark.parametrize("loss", ["xe+logq", "bpr-max"])
def test_cpu_step_equals_autograd_step_float32_adam_and_no_samples(tiny, loss):
    for extra in ({}, {"optimizer": "adam", "momentum": 0.0, "learning_rate": 0.01}, {"n_sample": 0}):
        p = {**BASE, **LOSSES[loss], **DROPOUT["on"], **extra}
        ref = _run_epoch(tiny, p, fast=False, dtype=torch.float32)
        fast = _run_epoch(tiny, p, fast=True, dtype=torch.float32)
        assert fast.stats.loss == pytest.approx(ref.stats.loss, rel=1e-4), extra
        _assert_same_state(fast, ref, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("loss", ["cross-entropy", "bpr-max", "top1-max", "bpr", "top1"])
def test_weighted_columns_equal_repeated_columns(loss):
    """col_weight k on a column == that column repeated k times (the exact, expanded loss)."""
    g = torch.Generator().manual_seed(0)
    R, U = 4, 6
    s = torch.randn(R, R + U, generator=g, dtype=torch.float64) * 1.5
    counts = torch.tensor([1, 3, 1, 2, 5, 1])
    w = torch.cat([torch.ones(R, dtype=torch.int64), counts]).double()
    expanded = torch.cat([s[:, :R], s[:, R:].repeat_interleave(counts, dim=1)], 1)
    q = torch.randn(R + U, generator=g, dtype=torch.float64)
    q_exp = torch.cat([q[:R], q[R:].repeat_interleave(counts)])
    kw = dict(bpreg=0.9, elu_param=0.5)
    if loss == "cross-entropy":
        got = row_loss_sum(loss, s, logq_cols=q, col_weight=w, **kw)
        ref = row_loss_sum(loss, expanded, logq_cols=q_exp, **kw)
    else:
        got = row_loss_sum(loss, s, col_weight=w, **kw)
        ref = row_loss_sum(loss, expanded, **kw)
    assert got.item() == pytest.approx(ref.item(), rel=1e-12)


def test_cpu_training_is_deterministic_and_learns(tiny):
    p = {**BASE, **LOSSES["xe+logq"], **DROPOUT["on"], "n_epochs": 2}
    a = train(tiny, p, device="cpu", seed=5, progress=False)
    b = train(tiny, p, device="cpu", seed=5, progress=False)
    for (k, v), w in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(v, w), k
    hist = a.info["history"]
    assert hist[1]["loss"] < hist[0]["loss"]


@pytest.mark.parametrize("elu", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("weighted", [False, True, "merged"])
@pytest.mark.parametrize("R", [5, 37])  # the loop takes batch rows in blocks of 16
@pytest.mark.parametrize("far", [False, True])  # a negative 80 above its target: g by sigmoid itself
def test_bpr_max_closed_form_gradient_equals_autograd(elu, weighted, R, far):
    """The CPU step's written-out bpr-max loss and gradient against autograd of losses.bpr_max
    (float64)."""
    from gru4rec.train.cpu_kernels import bpr_max_grad

    g = torch.Generator().manual_seed(1)
    U = 9
    s = torch.randn(R, R + U, generator=g, dtype=torch.float64) * 2.0
    if far:
        s[0, R] = 80.0
    w = torch.cat([torch.ones(R), torch.randint(1, 4, (U,), generator=g)]).double() if weighted else None
    extra = torch.zeros(R, dtype=torch.int64)
    if weighted == "merged":  # targets 0, 2, 3 also drawn as samples: their columns weigh 1 + draws
        extra[[0, 2, 3]] = torch.tensor([1, 3, 2])
        w[:R] += extra
    cfg = from_dict({**BASE, **LOSSES["bpr-max"], "elu_param": elu, "batch_size": R})
    loss, ds_t = bpr_max_grad(s.T.contiguous(), w, cfg.bpreg, elu, 1.0 / R, 1e-24)
    ds = ds_t.T
    x = s.clone().requires_grad_()
    # the reference: merged targets' sampled copies as columns of their own (the loss without merge);
    # autograd sums the copies' gradient into the target column
    copies = extra.nonzero().view(-1)
    x_ref = torch.cat([x, x[:, copies]], 1)
    w_ref = None if w is None else torch.cat([w[:R] - extra, w[R:], extra[copies].double()])
    ref = row_loss_sum("bpr-max", x_ref, bpreg=cfg.bpreg, elu_param=elu, col_weight=w_ref)
    (ref_grad,) = torch.autograd.grad(ref / R, x)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    torch.testing.assert_close(ds, ref_grad, rtol=1e-10, atol=1e-13)


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc mallopt")
def test_keep_freed_memory_is_accepted_by_glibc():
    from gru4rec.allocator import keep_freed_memory

    assert keep_freed_memory() and keep_freed_memory()  # accepted, and idempotent


_SIGNATURES_CHECK = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from gru4rec import jit
from gru4rec.train import cpu_kernels as K
import test_cpu_step as T
torch.set_num_threads(1)
tiny = T.generate(150, 40, 5)[0]
loops = [K._adagrad_rows, K._adagrad_2d, K._gru_cell_backward, K._columns, K._bpr_max_cols, jit.fill_mask]
for dtype in (torch.float32, torch.float64):
    K.warm_up(dtype)
    before = [len(f.signatures) for f in loops]
    for mode in T.MODES:
        T._run_epoch(tiny, {**T.BASE, **T.LOSSES["xe+logq"], **T.MODES[mode], **T.DROPOUT["on"]}, True, dtype)
    T._run_epoch(tiny, {**T.BASE, **T.LOSSES["bpr-max"], "momentum": 0.0}, True, dtype)
    assert [len(f.signatures) for f in loops] == before, (dtype, before, [f.signatures for f in loops])
print("ok")
"""


def test_every_numba_loop_is_compiled_before_the_first_epoch():
    """warm_up (run when the CPU step is built) covers every signature a step uses: nothing is
    compiled inside a timed epoch. Checked in a fresh process (a loop compiled by an earlier test
    would hide a miss), for both dtypes, every input mode, dropout, momentum and the epoch's tail."""
    import subprocess
    import sys
    from pathlib import Path

    here = str(Path(__file__).parent)
    out = subprocess.run([sys.executable, "-c", _SIGNATURES_CHECK, here], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_training_keeps_the_thread_count_it_was_given(tiny):
    """numba's pool shares torch's OpenMP runtime; starting it must not change `--threads`."""
    import numba

    assert torch.get_num_threads() == 1  # the module's fixture
    _run_epoch(tiny, {**BASE, **LOSSES["xe+logq"], **DROPOUT["on"]}, fast=True, dtype=torch.float32)
    assert torch.get_num_threads() == 1 and numba.get_num_threads() == 1


@pytest.mark.parametrize("n_items", [50, 5000])  # count-table scan and sort
@pytest.mark.parametrize("xe", [True, False])
@pytest.mark.parametrize("merge", [False, True])  # merge: ignored for cross-entropy
def test_columns_equal_unique_and_the_bias_formula(n_items, xe, merge):
    from gru4rec.train.cpu_kernels import Columns

    g = torch.Generator().manual_seed(n_items)
    by = torch.randn(n_items, 1, generator=g, dtype=torch.float64)
    q_in, q_smp = torch.rand(n_items, generator=g) * 5, torch.rand(n_items, generator=g) * 3
    tgt = torch.randint(0, n_items, (7,), generator=g)
    smp = torch.randint(0, n_items // 2, (64,), generator=g)  # duplicates, some equal to targets
    tgt[3] = tgt[5] = smp[0]  # a target drawn as a sample, twice among the targets
    cols_fn = Columns(by, q_in, q_smp, 0.7, xe, merge=merge)
    for _ in range(2):  # the count table is left clean for the next step
        cols, w, bias = cols_fn(tgt, smp)
        uniq, counts = torch.unique(smp, return_counts=True)
        w_tgt = torch.ones(7, dtype=torch.float64)
        if merge and not xe:  # brute force: each sampled item's count joins its first target column
            first = {}
            for c, item in enumerate(tgt.tolist()):
                first.setdefault(item, c)
            kept = [k for k, item in enumerate(uniq.tolist()) if item not in first]
            for item, n in zip(uniq.tolist(), counts.tolist()):
                if item in first:
                    w_tgt[first[item]] += n
            uniq, counts = uniq[kept], counts[kept]
            assert w_tgt[3] > 1 and w_tgt[5] == 1
        assert torch.equal(cols, torch.cat([tgt, uniq]))
        assert torch.equal(w, torch.cat([w_tgt, counts.double()]))
        want = by[cols, 0]
        if xe:
            q = torch.cat([q_in[tgt], q_smp[uniq]]).double()
            want = want - 0.7 * q + torch.log(w)
        torch.testing.assert_close(bias, want, rtol=1e-12, atol=1e-12)


def test_bpr_max_float32_stays_close_to_float64():
    """The float32 step's bpr-max gradient against the same maths in float64 on a preset-sized
    [1,556 x 128] score matrix: its sums run in float64 (float32 sums over ~1,500 columns lose two
    digits in the gradient's cancelling terms)."""
    from gru4rec.train.cpu_kernels import bpr_max_grad

    g = torch.Generator().manual_seed(0)
    s = torch.randn(1556, 128, generator=g) * 3.0
    loss32, ds32 = bpr_max_grad(s.clone(), None, 0.9, 1.0, 1.0 / 128, 1e-24)
    loss64, ds64 = bpr_max_grad(s.double(), None, 0.9, 1.0, 1.0 / 128, 1e-24)
    assert abs(loss32.item() - loss64.item()) < 1e-6 * abs(loss64.item())
    assert (ds32.double() - ds64).abs().max().item() < 1e-6 * ds64.abs().max().item()
