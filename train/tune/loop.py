"""The workers and their trial loop: this process and --n-jobs - 1 spawned ones on one study,
each with its own sampler stream, until the study reaches its target."""

from __future__ import annotations

import hashlib
import multiprocessing
import sys
import time

from gru4rec.errors import EXIT_INTERRUPTED, UserError
from gru4rec.train.tune.ctrl_c import ctrl_c_noted
from gru4rec.train.tune.objective import Objective, RepeatedConfig
from gru4rec.train.tune.options import Job
from gru4rec.train.tune.progress import repeat_line, trial_line
from gru4rec.train.tune.study import count_trials, open_storage

MAX_REPEATS = 50  # proposals in a row that repeat a trial of the study: the space counts as exhausted


def run_workers(job: Job, console, storage=None) -> None:
    """This process is worker 0; --n-jobs K adds K-1 spawned worker processes on the same study."""
    if job.n_jobs == 1:
        run_worker(job, 0, console, storage)
        return
    ctx = multiprocessing.get_context("spawn")  # never fork a process that holds torch threads / CUDA
    procs = [ctx.Process(target=_worker_process, args=(job, i), daemon=False) for i in range(1, job.n_jobs)]
    for p in procs:
        p.start()
    try:
        run_worker(job, 0, console, storage)
    finally:
        for p in procs:
            p.join()
    bad = [(i + 1, p.exitcode) for i, p in enumerate(procs) if p.exitcode not in (0, None)]
    if bad:
        raise UserError("worker process(es) failed: " + ", ".join(f"#{i} exit code {c}" for i, c in bad))


def _worker_process(job: Job, worker: int) -> None:
    from rich.console import Console

    console = Console(stderr=True, quiet=not job.progress, soft_wrap=True, highlight=False)
    try:
        run_worker(job, worker, console)
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)
    except UserError as e:
        print(f"error: worker {worker}: {e}", file=sys.stderr)
        sys.exit(2)


def run_worker(job: Job, worker: int, console, storage=None) -> None:
    import optuna
    import torch

    if job.threads is not None and worker > 0:  # a spawned worker; run_tune sets this process's
        torch.set_num_threads(job.threads)
    storage = storage or open_storage(job.storage_url)  # a spawned worker opens its own
    study = optuna.load_study(
        study_name=job.study_name,
        storage=storage,
        sampler=make_sampler(job.seed, worker, job.n_at_start),
        pruner=make_pruner(job.pruner, job.n_epochs),
    )
    objective = Objective(job, job.devices[worker % len(job.devices)], worker, console)
    with ctrl_c_noted() as ctrl_c:
        _trial_loop(job, worker, console, storage, study, objective, ctrl_c)


def _trial_loop(job: Job, worker: int, console, storage, study, objective, ctrl_c: list[bool]) -> None:
    study_id = storage.get_study_id_from_name(job.study_name)
    tag = f"[w{worker}] " if job.n_jobs > 1 else ""
    durations: list[float] = []
    repeats = 0  # proposals in a row that repeated a trial the study already has
    while True:
        if job.deadline is not None and time.time() >= job.deadline:
            console.print(f"{tag}--timeout reached: no new trial")
            break
        done, running = count_trials(storage, job.study_name)
        if done + running >= job.n_trials:
            if not durations and worker == 0:
                console.print(
                    f"nothing to run: {done} finished and {running} running trial(s) reach the target {job.n_trials}"
                )
            break
        if repeats >= MAX_REPEATS:
            console.print(
                f"{tag}stopping: the sampler proposed {repeats} configurations in a row that the study "
                "already has (the space may be exhausted)"
            )
            break
        t0 = time.perf_counter()
        objective.number = None
        study.optimize(objective, n_trials=1, catch=(RepeatedConfig,), gc_after_trial=True)
        if ctrl_c:  # a Ctrl-C that Python dropped (it hit a garbage-collector callback) still stops
            raise KeyboardInterrupt
        if objective.number is None:
            continue
        trial = storage.get_trial(storage.get_trial_id_from_study_id_trial_number(study_id, objective.number))
        if "repeat_of" in trial.user_attrs:
            repeats += 1
            console.print(f"{tag}{repeat_line(trial)}", markup=False)
            continue
        repeats = 0
        durations.append(time.perf_counter() - t0)
        console.print(tag + trial_line(trial, study, storage, job, durations), markup=False)


def sampler_seed(seed: int, worker: int, n_at_start: int) -> int:
    """--seed for the first start of a study's first worker; every other start (a resume, a top-up,
    another worker or machine) continues with its own stream, derived from the seed, the worker and
    the study's trial count, so it neither replays an earlier start's proposals nor depends on
    chance: the same command sequence gives the same trials."""
    if worker == 0 and n_at_start == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"{seed}/{worker}/{n_at_start}".encode()).digest()[:4], "little")


def make_sampler(seed: int, worker: int, n_at_start: int):
    """TPE (constant liar: parallel workers see the running trials as bad ones, not as free points)."""
    import optuna

    return optuna.samplers.TPESampler(seed=sampler_seed(seed, worker, n_at_start), constant_liar=True)


def make_pruner(name: str, n_epochs: int):
    """Pruning on the per-epoch validation metric, from the first epoch on: GRU4Rec's ranking of
    configurations after one epoch rarely changes much, and epochs are the whole cost of a trial."""
    import optuna

    if name == "median":  # below the median of the completed trials at the same epoch (after 5 of them)
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=n_epochs, reduction_factor=3)
    return optuna.pruners.NopPruner()
