"""`gru4rec-cli tune`: Optuna hyperparameter search over the trainer's own API, in the process.

A study lives in an Optuna RDB storage (default: SQLite in the output folder), so re-running the
same command resumes it and several processes (or machines, with a server database) can work on one
study. `--n-trials N` is the study's target of finished (complete + pruned) trials: a run starts a
trial only while finished + running trials are fewer than N, so a resumed run tops the study up to
N and never counts a trial twice. A trial interrupted by a crash or a kill stays RUNNING in the
storage; the next run marks it FAIL — at once when it ran on this machine and its process is gone
(pid and process start time are stored with the trial), otherwise once Optuna's heartbeat has gone
stale. Failed trials do not count towards N.

Every trial trains in this process on data read once (`train(..., on_epoch=...)`), reports the
validation metric after every epoch and may be pruned there. A diverged trial (loss NaN) is pruned,
not failed: it is a legitimate, bad outcome of its parameters. `--n-jobs K` starts K-1 worker
processes beside this one (spawned, each with its own share of the CPU threads or its own GPU);
they share the study through the storage.

The modules, one job each: `options` (what is asked), `events` (the data), `study` (storage and
study), `loop` (workers and their trial loop), `objective` (one trial), `ctrl_c`, `progress` (what
is said), `report` (the outputs), `final` (--final-test), `space` (search spaces; the official ones
in spaces/), `run` (all of it in order) and `cli` (the command line).
"""

from __future__ import annotations

from gru4rec.train.tune.ctrl_c import ctrl_c_noted
from gru4rec.train.tune.options import TuneOptions
from gru4rec.train.tune.run import run_tune

__all__ = ["TuneOptions", "ctrl_c_noted", "run_tune"]
