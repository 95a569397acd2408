"""One trial: sample, skip a repeated configuration, train with per-epoch reporting and pruning."""

from __future__ import annotations

import gc
import os

from gru4rec.errors import UserError
from gru4rec.train.tune.options import Job
from gru4rec.train.tune.process import HOST, process_start, rss_mb

DIVERGED = "training diverged"  # the trainer's message for a NaN/inf loss


class RepeatedConfig(Exception):
    """A proposal equal to a trial the study already ran or runs: the trial is failed (it never
    counts towards --n-trials) and the sampler, its random state moved on, proposes again."""


def twin_of(trial) -> int | None:
    """The number of a finished or running trial with exactly `trial`'s parameters, if any."""
    from optuna.trial import TrialState

    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    for t in trial.study.get_trials(deepcopy=False, states=states):
        if t.number != trial.number and t.params == trial.params:
            return t.number
    return None


class Objective:
    """One trial: sample, train with per-epoch reporting, return the last epoch's metric."""

    def __init__(self, job: Job, device: str, worker: int, console):
        self.job, self.device, self.worker, self.console = job, device, worker, console
        self.number: int | None = None
        self.pid, self.proc_start = os.getpid(), process_start(os.getpid())

    def __call__(self, trial) -> float:
        import optuna
        import torch

        from gru4rec.train.params import from_dict
        from gru4rec.train.trainer import train

        job = self.job
        self.number = trial.number
        for key, value in (
            ("host", HOST),
            ("pid", self.pid),
            ("proc_start", self.proc_start),
            ("worker", self.worker),
        ):
            trial.set_user_attr(key, value)  # first: lets the next run tell that this trial's process died
        gc.collect()  # memory at the start of a trial: flat across trials unless something leaks
        trial.set_user_attr("rss_mb_start", rss_mb())
        cuda = self.device.startswith("cuda")
        if cuda:
            trial.set_user_attr("gpu_mb_start", torch.cuda.memory_allocated(self.device) / 2**20)
            torch.cuda.reset_peak_memory_stats(self.device)
        sampled = {d.name: d.suggest(trial) for d in job.space.dims}
        twin = twin_of(trial)
        if twin is not None:
            trial.set_user_attr("repeat_of", twin)
            raise RepeatedConfig(f"the same parameters as trial #{twin}")
        cfg = from_dict(job.space.params(sampled, job.base))
        trial.set_user_attr("config", cfg.to_dict())
        history: list[dict] = []
        status = self._status(trial.number, cfg.n_epochs)

        def on_epoch(epoch: int, row: dict) -> None:
            history.append({k: float(v) for k, v in row.items()})
            trial.set_user_attr("history", history)
            value = row[job.metric]
            trial.report(value, epoch)
            if status is not None:
                status.update(f"trial {trial.number}: epoch {epoch}/{cfg.n_epochs}  {job.metric} {value:.4f}")
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch}")

        try:
            train(
                job.train_events, cfg, job.valid_events, device=self.device, seed=job.seed, progress=False,
                on_epoch=on_epoch,
            )  # fmt: skip
        except UserError as e:
            if not str(e).startswith(DIVERGED):
                raise
            trial.set_user_attr("diverged", str(e))
            raise optuna.TrialPruned("diverged") from None
        finally:
            if status is not None:
                status.stop()
            if cuda:
                trial.set_user_attr("gpu_peak_mb", torch.cuda.max_memory_allocated(self.device) / 2**20)
        return history[-1][job.metric]

    def _status(self, number: int, n_epochs: int):
        if self.job.n_jobs > 1 or not self.console.is_terminal or self.console.quiet:
            return None
        status = self.console.status(f"trial {number}: epoch 0/{n_epochs}")
        status.start()
        return status
