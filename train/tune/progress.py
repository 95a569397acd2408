"""What `tune` says on stderr: the header of a run and one line per trial."""

from __future__ import annotations

import time
from typing import Any

from gru4rec.train.tune.options import Job
from gru4rec.train.tune.study import count_trials, redact


def say_header(console, o, space, base, valid_note, train_ev, study, created, url, failed, notes) -> None:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    done = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    console.print(
        f"study {study.study_name!r} in {redact(url)}: "
        + ("new" if created else f"resumed with {done} finished trial(s) of {len(trials)}")
        + f"; target {o.n_trials} finished trials",
        markup=False,
    )
    if failed:
        console.print(
            f"marked interrupted trial(s) {', '.join(f'#{n}' for n in failed)} as failed (their process is gone)"
        )
    console.print(f"space: {space.source}; searching {'; '.join(space.describe())}", markup=False)
    fixed = ", ".join(f"{k}={v}" for k, v in space.fixed.items())
    console.print(
        f"fixed: {fixed}" + (f"; other parameters from preset {o.preset}" if base else ""), markup=False
    )
    console.print(f"training: {train_ev.height:,} events; validation: {valid_note}", markup=False)
    for line in notes:
        console.print(line, markup=False)
    console.print(f"metric {o.metric} (maximised), pruner {o.pruner}, seed {o.seed}, n_jobs {o.n_jobs}")


def trial_line(trial, study, storage, job: Job, durations: list[float]) -> str:
    """trial 12 pruned after epoch 2: mrr@20 0.2101 | best 0.3501 (#7) | 12/30 done, ETA 9m | params"""
    from optuna.trial import TrialState

    hist = trial.user_attrs.get("history", [])
    value = hist[-1][job.metric] if hist else None
    state = trial.state.name.lower()
    if trial.state == TrialState.PRUNED:
        state = "diverged" if "diverged" in trial.user_attrs else f"pruned after epoch {len(hist)}"
    elif trial.state == TrialState.COMPLETE:
        state = f"complete ({len(hist)} epochs)"
    head = f"trial {trial.number} {state}"
    if value is not None:
        head += f": {job.metric} {value:.4f}"
    if trial.duration is not None:
        head += f" in {_hms(trial.duration.total_seconds())}"
    try:
        best = study.best_trial
        head += f" | best {best.value:.4f} (#{best.number})"
    except ValueError:
        head += " | best -"
    done, running = count_trials(storage, job.study_name)
    left = max(job.n_trials - done - running, 0)
    eta = (sum(durations) / len(durations)) * (left + running) / job.n_jobs if durations else 0.0
    if job.deadline is not None:
        eta = min(eta, max(job.deadline - time.time(), 0.0))
    head += f" | {done}/{job.n_trials} done, ETA {_hms(eta)}"
    params = " ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
    return f"{head} | {params}"


def repeat_line(trial) -> str:
    params = " ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
    return f"trial {trial.number} skipped: the same parameters as trial #{trial.user_attrs['repeat_of']} | {params}"


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _hms(s: float) -> str:
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
