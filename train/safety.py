"""What `train` does before it may replace a checkpoint, and what Ctrl-C leaves behind.

- The output is probed before any data is read (a real temporary file is created beside it), so
  an unwritable destination fails in seconds, not after the first epoch.
- An existing file at `--out` is never replaced silently: without `--resume` (continue it) or
  `--overwrite` (replace it) `train` refuses and says what the file holds: epochs done of those
  asked, and whether data, parameters or seed differ from this run (then `--resume` cannot
  continue it). With `--overwrite` the old file stays intact until the first epoch of the new run
  is saved over it (atomic rename).
- Ctrl-C (SIGINT) stops training with `TrainingInterrupted`: the checkpoint in `--out` is the one
  written after the last completed epoch (a save in progress finishes first: SIGINT is deferred
  while it runs), and the exception says which epoch that is.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

from gru4rec import checkpoint as ckpt_io
from gru4rec.errors import UserError
from gru4rec.io import probe_output_file

RUNTIME_KEYS = ("n_epochs", "eval_batch_size", "cuda_graph", "tf32")  # may change on --resume


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training. A KeyboardInterrupt, so callers that stop on Ctrl-C still do.

    `saved_epochs`: epochs held by the checkpoint at `out` from this run or the one it resumed
    (0: this run saved nothing, `out` is as it was before); `epoch`: the 1-based epoch that was
    running; `n_epochs`: epochs asked for."""

    def __init__(self, out: Path | None, saved_epochs: int, epoch: int, n_epochs: int):
        super().__init__(f"interrupted in epoch {epoch}/{n_epochs}")
        self.out, self.saved_epochs, self.epoch, self.n_epochs = out, saved_epochs, epoch, n_epochs


def check_train_output(out: str | Path, resume: bool, overwrite: bool, inputs: tuple = ()) -> Path:
    """Before any data is read: the flags agree, and `out` can really be written atomically."""
    if resume and overwrite:
        raise UserError("--resume continues the run saved in --out, --overwrite replaces it: pass one")
    return probe_output_file(out, inputs=inputs)


def incompatibility(ck: ckpt_io.Checkpoint, params: dict, data_fp: str, seed: int) -> str | None:
    """Why `ck` cannot be continued by a run of `params` on data `data_fp` with `seed`, or None."""
    if ck.data_fingerprint != data_fp:
        return f"trained on different data (fingerprint {ck.data_fingerprint} != {data_fp})"
    saved = dict(ck.params)
    diff = [k for k in params if k not in RUNTIME_KEYS and saved.get(k) != params[k]]
    if diff:
        k = diff[0]
        return f"parameter {k} differs from the checkpoint ({saved.get(k)!r} vs {params[k]!r})"
    if ck.info.get("seed") != seed:
        return f"trained with --seed {ck.info.get('seed')}, not {seed}"
    if ck.train_state is None:
        return "holds no training state to resume from"
    return None


def epochs_done(ck: ckpt_io.Checkpoint) -> int:
    if ck.train_state is not None and "epoch" in ck.train_state:
        return int(ck.train_state["epoch"])
    return len(ck.info.get("history", []))


def resumable(out: Path, params: dict, data_fp: str, seed: int) -> ckpt_io.Checkpoint | None:
    """The checkpoint at `out` that `--resume` continues (None: no file yet); one of another run is refused."""
    if not out.exists():
        return None
    ck = ckpt_io.load(out, map_location="cpu")
    why = incompatibility(ck, params, data_fp, seed)
    if why is not None:
        raise UserError(f"{out}: cannot resume: {why}; pass --overwrite instead to replace it")
    return ck


def refuse_existing(out: Path, params: dict, data_fp: str, seed: int) -> None:
    """`out` exists and neither --resume nor --overwrite was given: one line saying what is there."""
    try:
        ck = ckpt_io.load(out, map_location="cpu")
    except UserError as e:
        raise UserError(
            f"{e}; refusing to replace it: pass --overwrite to replace it, or choose another --out"
        ) from None
    done, asked = epochs_done(ck), int(params["n_epochs"])
    why = incompatibility(ck, params, data_fp, seed)
    state = "a finished run" if done >= asked else "an unfinished run"
    if why is None and done < asked:
        raise UserError(
            f"{out}: already holds {state} ({done} of {asked} epochs done, same data and parameters); "
            "pass --resume to continue it, or --overwrite to start over"
        )
    if why is None:
        raise UserError(
            f"{out}: already holds {state} ({done} of {asked} epochs done, same data and parameters); "
            "pass --overwrite to train it again, or choose another --out (--resume has nothing left to do)"
        )
    raise UserError(
        f"{out}: already holds {state} of another training ({done} of {asked} epochs done; {why}), "
        "which --resume cannot continue; pass --overwrite to replace it, or choose another --out"
    )


@contextlib.contextmanager
def sigint_deferred() -> Iterator[None]:
    """Hold a Ctrl-C that arrives inside the block until the block is done, then raise it.

    Wraps the checkpoint save, so "saved after epoch k" is exact. Only where Python's default
    handler is installed and only on the main thread (signal handlers live there)."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    caught: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if caught:
        raise KeyboardInterrupt
