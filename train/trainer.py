"""Session-parallel GRU4Rec training (spec §3-§6), built for speed on the GPU.

Per epoch the schedule (gru4rec.batching.make_schedule; identical every epoch, so it moves to the
device once) splits into full steps (every slot active: fixed shapes) and the shrinking tail.
A full step reads its rows, reset flags and sample row through device counters, so it needs no
host work at all: eagerly it is one call, on CUDA it is captured once as a CUDA graph and replayed.
The tail runs the same `_step` eagerly on the active slots. Nothing syncs with the host except the
progress update every `SYNC_EVERY` steps (loss summed on the device) and the end of the epoch.

Item tables are updated row-wise: the step gathers the rows it touches (input rows, target and
sample output rows; in shared mode input and output rows in ONE lookup of W_y) as leaf tensors,
differentiates with respect to them and the dense weights, and hands both to the optimiser.

On the CPU the step is `gru4rec.train.cpu_step.CpuStep` (same maths, written out without autograd,
distinct sampled columns); `fast_cpu=False` keeps the autograd step there (the tests' reference).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from gru4rec import checkpoint as ckpt_io
from gru4rec.batching import Schedule, Sessions, make_schedule
from gru4rec.data import SESSION, fingerprint, validate_events
from gru4rec.errors import UserError
from gru4rec.items import INDEX, ItemMap
from gru4rec.model import GRU4Rec, ModelConfig
from gru4rec.train.dwell import boost
from gru4rec.train.losses import row_loss_sum
from gru4rec.train.memory import check_fits
from gru4rec.train.optim import make_optimizer
from gru4rec.train.params import TrainConfig, from_dict
from gru4rec.train.safety import (
    RUNTIME_KEYS,  # noqa: F401  (its home was here; other code may import it from the trainer)
    TrainingInterrupted,
    check_train_output,
    refuse_existing,
    resumable,
    sigint_deferred,
)
from gru4rec.train.sampler import SampleStore

SYNC_EVERY = 100  # steps between host syncs for the progress bar / NaN check
WARMUP_STEPS = 3  # eager steps on a side stream before CUDA-graph capture (they are real steps)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"unsupported device {device!r} (use auto, cuda or cpu)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but no CUDA GPU is available (use --device cpu or auto)")
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"unsupported device {device!r} (use auto, cuda or cpu)")
    return dev


def describe_device(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(dev)})"
    return f"cpu ({torch.get_num_threads()} threads)"


@dataclass
class EpochStats:
    loss: float
    seconds: float
    pairs: int
    steps: int

    @property
    def events_per_s(self) -> float:
        return self.pairs / self.seconds if self.seconds > 0 else float("nan")


class Trainer:
    """Owns the device-side state of a run: model, optimiser, sample store, schedule, counters."""

    def __init__(
        self,
        model: GRU4Rec,
        cfg: TrainConfig,
        sched: Schedule,
        supp: np.ndarray,
        device,
        seed: int,
        fast_cpu: bool = True,
    ):
        self.model, self.cfg, self.sched, self.dev = model.train(), cfg, sched, torch.device(device)
        dev, B, S = self.dev, sched.n_slots, cfg.n_sample
        self.tables = model.sparse_parameters()
        table_ids = {id(t) for t in self.tables}
        self.dense = [p for p in model.parameters() if id(p) not in table_ids]
        fast_cpu = self.dev.type == "cpu" and fast_cpu
        if fast_cpu:
            from gru4rec.train.cpu_step import CpuStep, column_major_  # numba: for CPU training only

            column_major_(model)
        self.opt = make_optimizer(cfg.optimizer, self.dense, self.tables, cfg.learning_rate, cfg.momentum)
        supp_t = torch.from_numpy(supp.astype(np.float64))
        self.store = SampleStore(supp_t, S, cfg.sample_alpha, cfg.sample_store_size, dev, seed + 1)
        log_supp = torch.log(supp_t.clamp(min=1)).to(torch.float32)  # raw counts, never normalised
        self.log_q_in = log_supp.to(dev)
        self.log_q_smp = (cfg.sample_alpha * log_supp).to(dev)

        # the epoch schedule on the device: flat arrays for the tail, [n_full, B] views for full steps
        to = lambda a, dt=torch.int64: torch.from_numpy(np.ascontiguousarray(a)).to(dev, dt)  # noqa: E731
        self.inputs, self.targets, self.slots = to(sched.inputs), to(sched.targets), to(sched.slot)
        self.keep = to(~sched.reset, torch.float32).unsqueeze(1)
        self.n_full = sched.n_full_steps()
        nf = self.n_full * B
        self.full_in = self.inputs[:nf].view(self.n_full, B)
        self.full_tgt = self.targets[:nf].view(self.n_full, B)
        self.full_keep = self.keep[:nf].view(self.n_full, B, 1)
        self.hidden = model.init_hidden(B, dev)
        self.t_dev = torch.zeros((), dtype=torch.int64, device=dev)  # full-step counter
        self.pos_dev = torch.zeros((), dtype=torch.int64, device=dev)  # sample store row
        self.loss_acc = torch.zeros((), dtype=torch.float32, device=dev)  # sum of row losses
        self.use_graph = dev.type == "cuda" and cfg.cuda_graph and self.n_full > WARMUP_STEPS
        self.graph = None
        self.cpu_step = None
        if fast_cpu:
            self.cpu_step = CpuStep(model, cfg, self.opt, self.dense, self.log_q_in, self.log_q_smp)

    # -- one step --------------------------------------------------------------------------------
    def _step(self, inp, tgt, keep, smp, hidden):
        """Forward, loss, backward and optimiser update for R rows; returns (row-loss sum, new states)."""
        if self.cpu_step is not None:
            return self.cpu_step(inp, tgt, keep, smp, hidden)
        return self._reference_step(inp, tgt, keep, smp, hidden)

    def _reference_step(self, inp, tgt, keep, smp, hidden):
        """The autograd step (GPU, CUDA graph body): gathered rows as leaves, then the optimiser."""
        cfg, model = self.cfg, self.model
        R = inp.shape[0]
        out_idx = tgt if smp is None else torch.cat([tgt, smp])
        leaf = lambda table, idx: table.detach().index_select(0, idx).requires_grad_()  # noqa: E731
        mode = model.cfg.mode
        if mode == "shared":  # one lookup: an item's row gets input and output gradient summed
            wy_idx = torch.cat([inp, out_idx])
            wy_rows = leaf(model.Wy, wy_idx)
            x_rows, o_rows = wy_rows[:R], wy_rows[R:]
            rows = {id(model.Wy): (wy_idx, wy_rows)}
        else:
            in_table = model.E if mode == "separate" else model.Wx0
            x_rows, o_rows = leaf(in_table, inp), leaf(model.Wy, out_idx)
            rows = {id(in_table): (inp, x_rows), id(model.Wy): (out_idx, o_rows)}
        by_rows = leaf(model.By, out_idx)
        rows[id(model.By)] = (out_idx, by_rows)

        out, new_hidden = model.gru(x_rows, [h * keep for h in hidden])
        scores = model.score_rows(out, o_rows, by_rows)
        logq_cols = None
        if cfg.loss == "cross-entropy" and cfg.logq > 0:
            q = self.log_q_in[tgt] if smp is None else torch.cat([self.log_q_in[tgt], self.log_q_smp[smp]])
            logq_cols = cfg.logq * q
        loss_rows = row_loss_sum(
            cfg.loss, scores, logq_cols=logq_cols, bpreg=cfg.bpreg, elu_param=cfg.elu_param
        )
        leaves = [rows[id(t)][1] for t in self.tables if id(t) in rows]
        grads = torch.autograd.grad(loss_rows / cfg.batch_size, self.dense + leaves)
        nd = len(self.dense)
        row_updates = []
        for t in self.tables:
            if id(t) in rows:
                row_updates.append((rows[id(t)][0], grads[nd + len(row_updates)]))
            else:  # a table with no touched rows this step cannot happen in these modes
                raise AssertionError("untouched item table")
        self.opt.step(list(grads[:nd]), row_updates)
        return loss_rows.detach(), [h.detach() for h in new_hidden]

    def _full_step(self) -> None:
        """A full-batch step driven entirely by device counters (the CUDA-graph body)."""
        if self.cpu_step is not None:  # nothing to capture on the CPU: plain row views, no gathers
            row = lambda a, i: a[int(i)]  # noqa: E731
        else:  # index_select, not a[i]: indexing with a 0-d device tensor calls .item() (a host
            # sync, which would also break CUDA-graph capture)
            row = lambda a, i: a.index_select(0, i.view(1)).squeeze(0)  # noqa: E731
        t = self.t_dev
        smp = row(self.store.store, self.pos_dev) if self.cfg.n_sample > 0 else None
        loss_rows, new_hidden = self._step(
            row(self.full_in, t), row(self.full_tgt, t), row(self.full_keep, t), smp, self.hidden
        )
        with torch.no_grad():
            for h, n in zip(self.hidden, new_hidden):
                h.copy_(n)
            self.loss_acc.add_(loss_rows)
            self.t_dev.add_(1)
            self.pos_dev.add_(1)

    def _before_full_step(self) -> None:
        if self.cfg.n_sample > 0:
            if self.store.pos >= self.store.n_rows:
                self.store.redraw()  # in place: same buffer the graph reads
                self.pos_dev.zero_()
            self.store.pos += 1

    def _capture(self, n_done: int) -> int:
        """Run WARMUP_STEPS real steps on a side stream, then capture `_full_step`; returns steps run."""
        side = torch.cuda.Stream(self.dev)
        side.wait_stream(torch.cuda.current_stream(self.dev))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self._before_full_step()
                self._full_step()
        torch.cuda.current_stream(self.dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # records only: the counters do not advance here
            self._full_step()
        return n_done + WARMUP_STEPS

    # -- one epoch -------------------------------------------------------------------------------
    def run_epoch(self, on_progress=None) -> EpochStats:
        sched, B = self.sched, self.sched.n_slots
        t0 = time.perf_counter()
        with torch.no_grad():
            for h in self.hidden:
                h.zero_()
            self.t_dev.zero_()
            self.pos_dev.fill_(self.store.pos)
            self.loss_acc.zero_()
        pairs_done, step = 0, 0
        sizes = sched.step_sizes()
        n_steps = self._n_steps()

        def report(step: int, pairs: int) -> None:
            loss = float(self.loss_acc) / max(pairs, 1)  # the only host sync
            if not math.isfinite(loss):
                raise UserError(
                    f"training diverged: loss is {loss} after {step} steps; lower learning_rate or check the data"
                )
            if on_progress is not None:
                on_progress(step, n_steps, loss, pairs / max(time.perf_counter() - t0, 1e-9))

        next_report = SYNC_EVERY
        while step < self.n_full:
            if self.use_graph and self.graph is None and self.n_full - step > WARMUP_STEPS:
                step = self._capture(step)
            else:
                self._before_full_step()
                if self.graph is not None:
                    self.graph.replay()
                else:
                    self._full_step()
                step += 1
            if step >= next_report:
                report(step, step * B)
                next_report += SYNC_EVERY
        pairs_done = self.n_full * B

        # shrinking tail: the same step on the active slots, eagerly
        bounds = sched.step_offsets
        for t in range(self.n_full, n_steps):
            a, b = int(bounds[t]), int(bounds[t + 1])
            slot = self.slots[a:b]
            smp = self.store.next_row() if self.cfg.n_sample > 0 else None
            h = [hl.index_select(0, slot) for hl in self.hidden]
            loss_rows, new_h = self._step(self.inputs[a:b], self.targets[a:b], self.keep[a:b], smp, h)
            with torch.no_grad():
                for hl, nh in zip(self.hidden, new_h):
                    hl.index_copy_(0, slot, nh)
                self.loss_acc.add_(loss_rows)
            pairs_done += int(sizes[t])
        report(n_steps, pairs_done)
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
        seconds = time.perf_counter() - t0
        return EpochStats(float(self.loss_acc) / max(pairs_done, 1), seconds, pairs_done, n_steps)

    def _n_steps(self) -> int:
        """Steps of an epoch; with n_sample=0 it ends once fewer than 2 rows remain (spec §3)."""
        sizes = self.sched.step_sizes()
        if self.cfg.n_sample == 0:
            short = np.flatnonzero(sizes < 2)
            return int(short[0]) if len(short) else len(sizes)
        return len(sizes)

    # -- resume ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {
            "optimizer": self.opt.state_dict(),
            "sampler": self.store.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "device_type": self.dev.type,
        }
        if self.dev.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.dev)
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("device_type") != self.dev.type:
            raise UserError(
                f"the checkpoint was trained on {state.get('device_type')}; resume it with --device {state.get('device_type')}"
            )
        self.opt.load_state_dict(state["optimizer"])
        self.store.load_state_dict(state["sampler"])
        torch.set_rng_state(state["rng_cpu"].cpu())
        if "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"].cpu(), self.dev)


# ------------------------------------------------------------------------------------------------
def prepare(events: pl.DataFrame, items: ItemMap, cfg: TrainConfig) -> tuple[Schedule, np.ndarray]:
    """Training frame -> (epoch schedule, supp counts per item index) after dwell boosting."""
    boosted = boost(events, cfg.dwell_boost, cfg.dwell_cap)
    known, _ = items.translate(boosted)
    sched = make_schedule(Sessions.from_events(known), cfg.batch_size)
    if sched.n_slots == 0:
        raise UserError("training data has no session with at least 2 events")
    if cfg.n_sample == 0 and sched.n_slots < 2:
        raise UserError("training data has a single usable session; n_sample=0 needs at least 2")
    supp = np.bincount(known[INDEX].to_numpy(), minlength=len(items)).astype(np.float64)
    return sched, supp


def model_config(cfg: TrainConfig, n_items: int) -> ModelConfig:
    return ModelConfig(
        n_items=n_items,
        layers=list(cfg.layers),
        embedding=cfg.embedding,
        constrained_embedding=cfg.constrained_embedding,
        dropout_p_embed=cfg.dropout_p_embed,
        dropout_p_hidden=cfg.dropout_p_hidden,
    )


def train(
    train_events: pl.DataFrame,
    params: dict | TrainConfig,
    valid_events: pl.DataFrame | None = None,
    device: str = "auto",
    seed: int = 42,
    progress: bool = True,
    out: str | Path | None = None,
    resume: bool = False,
    console=None,
    overwrite: bool = False,
    on_epoch: Callable[[int, dict], None] | None = None,
) -> ckpt_io.Checkpoint:
    """Train GRU4Rec; checkpoint to `out` after every epoch; `resume` continues from `out`.

    An existing `out` needs `resume` or `overwrite` (train/safety.py); Ctrl-C raises
    `TrainingInterrupted` saying which epoch `out` holds. `on_epoch(epoch, row)` is called after
    every epoch with that epoch's history row (loss, and the validation metrics when `valid_events`
    is given); tuning reports the metric to its trial there, and an exception it raises (a pruned
    trial) ends the run."""
    cfg = from_dict(params)
    if out is not None:
        out = check_train_output(out, resume, overwrite)
    dev = resolve_device(device)
    if console is None:
        from rich.console import Console

        console = Console(stderr=True, quiet=not progress, soft_wrap=True)
    events = validate_events(train_events, "training data")
    data_fp = fingerprint(events)
    if out is not None and out.exists() and not (resume or overwrite):
        refuse_existing(out, cfg.to_dict(), data_fp, seed)
    items = ItemMap.from_events(events)
    need = check_fits(cfg, len(items), dev, valid_events is not None)  # before any work
    sched, supp = prepare(events, items, cfg)
    if valid_events is not None:
        _check_validation(valid_events, items, console)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32
    torch.manual_seed(seed)
    model = GRU4Rec(model_config(cfg, len(items)), seed=seed).to(dev)
    trainer = Trainer(model, cfg, sched, supp, dev, seed)

    prev = resumable(Path(out), cfg.to_dict(), data_fp, seed) if (resume and out is not None) else None
    history, start = _restore(prev, model, trainer, out, cfg, console) if prev is not None else ([], 0)
    if prev is None and resume:
        console.print(f"--resume: {out} does not exist yet, starting from scratch")

    t_start = time.perf_counter()
    ck = ckpt_io.Checkpoint(model=model, items=items, params=cfg.to_dict(), data_fingerprint=data_fp)
    saved, epoch = start, start  # epochs held by `out` (this run's or the resumed one's)
    try:  # from the first line a user sees, Ctrl-C is an interrupted epoch: the message names what `out` holds
        console.print(
            f"device: {describe_device(dev)}  |  items {len(items)}  sessions {int(np.unique(sched.session).size)}  "
            f"pairs/epoch {len(sched.inputs)}  loss {cfg.loss}  layers {cfg.layers}  batch {cfg.batch_size}  "
            f"memory ~{need.total / 2**30:.1f} GiB" + ("  cuda_graph on" if trainer.use_graph else "")
        )
        for epoch in range(start, cfg.n_epochs):
            stats = _run_with_bar(trainer, epoch, cfg.n_epochs, console, progress)
            row, line = _epoch_row(stats, epoch, cfg, model, items, valid_events, dev)
            history.append(row)
            console.print(line)
            ck.train_state = {"epoch": epoch + 1, **trainer.state_dict()}
            ck.info = {"history": history, "seed": seed, "device": describe_device(dev)}
            if out is not None:
                with sigint_deferred():  # a Ctrl-C during the save lands after it: `saved` stays exact
                    ckpt_io.save(ck, out)
                    saved = epoch + 1
            if on_epoch is not None:
                on_epoch(epoch + 1, row)
    except KeyboardInterrupt:
        raise TrainingInterrupted(out, saved, epoch + 1, cfg.n_epochs) from None
    model.eval()
    console.print(_done_line(history, start, time.perf_counter() - t_start, out))
    ck.info = {"history": history, "seed": seed, "device": describe_device(dev)}
    return ck


def _restore(
    prev: ckpt_io.Checkpoint, model, trainer, out, cfg: TrainConfig, console
) -> tuple[list[dict], int]:
    """Load a resumed checkpoint into the model and trainer: (its history, the epochs it holds)."""
    with torch.no_grad():
        model.load_state_dict(prev.model.state_dict())
    trainer.load_state_dict(prev.train_state)
    start = int(prev.train_state["epoch"])
    if start >= cfg.n_epochs:
        console.print(f"nothing to do: {out} already has {start} of {cfg.n_epochs} epochs")
    else:
        console.print(f"resuming {out} after epoch {start}")
    return list(prev.info.get("history", [])), start


def _epoch_row(stats, epoch: int, cfg: TrainConfig, model, items, valid_events, dev) -> tuple[dict, str]:
    """The epoch's history row (with the validation metrics when there are validation events) and its line."""
    from gru4rec.evaluate import evaluate

    row = {
        "epoch": epoch + 1,
        "loss": stats.loss,
        "seconds": stats.seconds,
        "events_per_s": stats.events_per_s,
    }
    line = f"epoch {epoch + 1}/{cfg.n_epochs}  loss {stats.loss:.4f}  {stats.seconds:.1f}s  {stats.events_per_s:,.0f} events/s"
    if valid_events is not None:
        m = evaluate(model, items, valid_events, batch_size=cfg.eval_batch_size, cutoffs=(20,), device=dev)
        row.update({"recall@20": m["recall@20"], "mrr@20": m["mrr@20"]})
        line += f"  valid Recall@20 {m['recall@20']:.4f}  MRR@20 {m['mrr@20']:.4f}"
    return row, line


def _done_line(history: list[dict], start: int, seconds: float, out) -> str:
    last = history[-1] if history else {}
    valid = (
        f", final valid Recall@20 {last['recall@20']:.4f} MRR@20 {last['mrr@20']:.4f}"
        if "recall@20" in last
        else ""
    )
    saved = f", model saved to {out}" if out is not None and len(history) > start else ""
    return f"done: {len(history)} epochs, {seconds:.1f}s this run{valid}{saved}"


def _check_validation(valid_events: pl.DataFrame, items: ItemMap, console) -> None:
    """Refuse, before training, a validation set with nothing to predict (its metrics would be NaN)."""
    known, n_dropped = items.translate(valid_events)
    n_pred = int((known.group_by(SESSION).len()["len"] - 1).sum()) if known.height else 0
    if n_pred == 0:
        raise UserError(
            f"validation data has no event to predict: after dropping {n_dropped} event(s) of items not in "
            "the training data, no session has 2 or more events"
        )
    if n_dropped:
        console.print(f"validation: dropped {n_dropped:,} event(s) of items not in the training data")


def _run_with_bar(trainer: Trainer, epoch: int, n_epochs: int, console, progress: bool) -> EpochStats:
    if not progress or not console.is_terminal:  # in logs the per-epoch line says it all
        return trainer.run_epoch()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn(f"epoch {epoch + 1}/{n_epochs}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[eps]:,.0f} events/s"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("train", total=trainer._n_steps(), loss=float("nan"), eps=0.0)

        def on_progress(step, total, loss, eps):
            bar.update(task, completed=step, loss=loss, eps=eps)

        return trainer.run_epoch(on_progress)
