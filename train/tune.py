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
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from gru4rec.data import Keys, check_same_id_types, fingerprint, read_events
from gru4rec.errors import EXIT_INTERRUPTED, UserError
from gru4rec.train.space import SearchSpace, load_space, parse_fixed_pairs

METRICS = ("mrr@20", "recall@20")
PRUNERS = ("median", "hyperband", "none")
HEARTBEAT_S = 20  # Optuna heartbeat of a running trial (RDB storages)
GRACE_S = 120  # a RUNNING trial without a heartbeat for this long belongs to a dead process
DIVERGED = "training diverged"  # the trainer's message for a NaN/inf loss
IDENTITY_KEY = "gru4rec_tune"  # study user attribute: what the study searches, on which data
HOST = socket.gethostname()
DEFAULT_STORAGE = "study.db in --out"


@dataclass
class TuneOptions:
    train: Path
    out: Path
    valid: Path | None = None
    space: str = "xe"
    preset: str | None = None
    params: list[str] = field(default_factory=list)
    n_trials: int = 100
    timeout: float | None = None
    metric: str = "mrr@20"
    storage: str | None = None
    study: str | None = None
    pruner: str = "median"
    device: str = "auto"
    seed: int = 42
    n_jobs: int = 1
    threads: int | None = None
    final_test: Path | None = None
    valid_days: float = 1.0
    keys: Keys = field(default_factory=Keys)
    progress: bool = True


@dataclass
class Job:
    """What a worker needs to run trials (picklable: handed to spawned worker processes)."""

    storage_url: str
    study_name: str
    space: SearchSpace
    base: dict[str, Any]
    metric: str
    seed: int
    n_trials: int
    n_at_start: int  # trials in the study when this command started: seeds this start's samplers
    deadline: float | None  # time.time() after which no trial starts
    pruner: str
    n_epochs: int
    devices: list[str]
    threads: int | None
    n_jobs: int
    progress: bool
    train_events: pl.DataFrame
    valid_events: pl.DataFrame


# ------------------------------------------------------------------------------------ the command
def run_tune(o: TuneOptions, console=None) -> dict:
    """Check everything, open (or resume) the study, run trials, write the outputs; returns a summary."""
    from rich.console import Console

    from gru4rec.io import check_output_dir, check_output_file
    from gru4rec.train.presets import PRESETS
    from gru4rec.train.tune_report import OUTPUT_FILES

    console = console or Console(stderr=True, quiet=not o.progress, soft_wrap=True, highlight=False)
    _check_options(o)
    space = load_space(o.space)
    if o.params:
        space = space.with_fixed(parse_fixed_pairs(o.params))
    base: dict[str, Any] = {}
    if o.preset is not None:
        name = o.preset.strip().lower()
        if name not in PRESETS:
            raise UserError(f"unknown preset {o.preset!r}; available: {', '.join(PRESETS)}")
        base = dict(PRESETS[name])
    space.check(base)
    n_epochs = _n_epochs(space, base)
    devices = _devices(o.device, o.n_jobs)
    with _removed_on_failure(Path(o.out)):  # a run that fails before its first trial leaves no folder
        out = check_output_dir(o.out)
        for name in OUTPUT_FILES:
            check_output_file(out / name, inputs=(o.train, o.valid, o.final_test))
        study_name = o.study or space.name
        url = o.storage or f"sqlite:///{(out / 'study.db').resolve()}"
        train_events, search_train, valid_events, valid_note = _read_data(o)
        notes = space.notes() + unseen_notes(search_train, valid_events, "validation")
        storage = open_storage(url)  # a bad URL is said first
        check_one_study(out, study_name, storage, o.storage)
        identity = _identity(space, o, base, search_train, valid_events)
        study, created = open_study(storage, study_name, identity, url)
    failed = fail_dead_trials(study, storage)
    n_at_start = len(storage.get_all_trials(storage.get_study_id_from_name(study_name), deepcopy=False))

    _say_header(console, o, space, base, valid_note, search_train, study, created, url, failed, notes)
    job = Job(
        storage_url=url,
        study_name=study_name,
        space=space,
        base=base,
        metric=o.metric,
        seed=o.seed,
        n_trials=o.n_trials,
        n_at_start=n_at_start,
        deadline=time.time() + o.timeout if o.timeout else None,
        pruner=o.pruner,
        n_epochs=n_epochs,
        devices=devices,
        threads=o.threads or (max(1, (os.cpu_count() or 1) // o.n_jobs) if o.n_jobs > 1 else None),
        n_jobs=o.n_jobs,
        progress=o.progress,
        train_events=search_train,
        valid_events=valid_events,
    )
    import torch

    threads_before = torch.get_num_threads()
    if job.threads is not None:  # for this process's trials and the final test; restored at the end
        torch.set_num_threads(job.threads)
    try:
        return _search_and_report(
            o, job, storage, study, space, url, train_events, devices, valid_note, notes, console
        )
    finally:
        torch.set_num_threads(threads_before)


def _search_and_report(
    o, job, storage, study, space, url, train_events, devices, valid_note, notes, console
) -> dict:
    t0 = time.perf_counter()
    interrupted = False
    try:
        run_workers(job, console, storage)
    except KeyboardInterrupt:
        interrupted = True
        console.print("interrupted: the running trial is marked failed; re-run the command to resume")
    from gru4rec.train.tune_report import ReportInfo, write_outputs

    info = ReportInfo(
        study_name=job.study_name,
        storage=redact(url),
        storage_key=storage_key(o.storage),
        space=space,
        base_preset=o.preset,
        metric=o.metric,
        seed=o.seed,
        n_trials=o.n_trials,
        pruner=o.pruner,
        valid_note=valid_note,
        train_path=str(o.train),
        wall_s=time.perf_counter() - t0,
        notes=notes,
    )
    out = Path(o.out)
    summary = write_outputs(study, out, info, console)
    if interrupted:
        summary["interrupted"] = True
        return summary
    if o.final_test is not None and summary.get("best") is not None:
        from gru4rec.train.tune_final import final_test

        try:
            summary["final"] = final_test(
                train_events, o.final_test, summary["best"]["config"], o.preset, o.seed, devices[0], out,
                console, o.keys, o.progress,
            )  # fmt: skip
        except KeyboardInterrupt:
            _remove_if_empty(out / "final")
            console.print(
                "interrupted during the --final-test retrain: the study, best.toml and report.md are "
                "complete; final/ is not (re-run the command with --final-test to redo it)"
            )
            summary["interrupted"] = True
    elif o.final_test is not None:
        console.print("--final-test skipped: the study has no completed trial yet")
    return summary


@contextlib.contextmanager
def _removed_on_failure(folder: Path) -> Iterator[None]:
    """Remove `folder` (and the parents made for it) when the block fails and the folder did not
    exist before it: everything in it then is the failed run's."""
    first_new = None
    for p in [folder, *folder.parents]:
        if p.exists():
            break
        first_new = p
    try:
        yield
    except BaseException:
        if first_new is not None and first_new.is_dir():
            shutil.rmtree(first_new, ignore_errors=True)
        raise


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not empty, or not there: nothing to tidy
        folder.rmdir()


def _read_data(o: TuneOptions) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame, str]:
    """(all of TRAIN, the trials' training part, validation, a note on where validation comes from)."""
    train_events = read_events(o.train, o.keys)
    if o.valid is not None:
        valid_events = read_events(o.valid, o.keys)
        check_same_id_types(train_events, valid_events, str(o.train), str(o.valid))
        search_train, valid_note = train_events, f"validation set {o.valid}"
    else:
        search_train, valid_events, valid_note = split_validation(train_events, o.valid_days)
    if o.final_test is not None:
        check_same_id_types(train_events, read_events(o.final_test, o.keys), str(o.train), str(o.final_test))
    return train_events, search_train, valid_events, valid_note


def unseen_notes(train_events: pl.DataFrame, events: pl.DataFrame, what: str) -> list[str]:
    """What evaluating `events` on a model of `train_events` drops, in `train`'s and `score`'s words:
    events of items not in the training data, then sessions left with fewer than 2 events."""
    from gru4rec.data import ITEM, SESSION
    from gru4rec.items import drop_short_sessions

    known = events.filter(pl.col(ITEM).is_in(train_events[ITEM].unique().implode()))
    lines = []
    if known.height < events.height:
        lines.append(
            f"{what}: dropped {events.height - known.height:,} event(s) of items not in the training data"
        )
    n_short = events[SESSION].n_unique() - drop_short_sessions(known)[SESSION].n_unique()  # as `score` counts
    if n_short:
        lines.append(f"{what}: skipped {n_short:,} session(s) with fewer than 2 known events")
    return lines


def storage_key(storage: str | None) -> str:
    """The storage as the folder's marker names it: the default one by its place, so that a folder
    moved elsewhere is still the same study's."""
    return redact(storage) if storage is not None else DEFAULT_STORAGE


def check_one_study(out: Path, study_name: str, opened, storage: str | None) -> None:
    """One study per --out: its outputs (best.toml, report.md, trials.parquet) are the study's, and
    another study's run would replace them."""
    import json

    from gru4rec.train.tune_report import STUDY_MARKER

    marker = out / STUDY_MARKER
    if marker.is_file():
        try:
            had = json.loads(marker.read_text())
        except (OSError, ValueError):
            had = {}
        if had.get("study") != study_name or had.get("storage") != storage_key(storage):
            raise UserError(
                f"{out} holds the outputs of study {had.get('study')!r} in {had.get('storage')}; one study per "
                "--out: use another --out (or that study's --space/--study/--storage to resume it)"
            )
    db = out / "study.db"
    if storage is None and db.is_file():  # a folder written before the marker existed
        others = [s.study_name for s in opened.get_all_studies() if s.study_name != study_name]
        if others:
            raise UserError(
                f"{out} holds the outputs of study {others[0]!r} in {db}; one study per --out: use another "
                "--out (or that study's --space/--study to resume it)"
            )


def _check_options(o: TuneOptions) -> None:
    if o.metric not in METRICS:
        raise UserError(f"--metric must be one of {', '.join(METRICS)}, got {o.metric!r}")
    if o.pruner not in PRUNERS:
        raise UserError(f"--pruner must be one of {', '.join(PRUNERS)}, got {o.pruner!r}")
    if o.n_trials < 1:
        raise UserError(f"--n-trials must be >= 1, got {o.n_trials}")
    if o.n_jobs < 1:
        raise UserError(f"--n-jobs must be >= 1, got {o.n_jobs}")
    if o.timeout is not None and not o.timeout > 0:
        raise UserError(f"--timeout must be > 0 seconds, got {o.timeout}")
    if not o.valid_days > 0:
        raise UserError(f"--valid-days must be > 0, got {o.valid_days}")
    if o.storage is not None and o.n_jobs > 1 and ":memory:" in o.storage:
        raise UserError("--n-jobs > 1 needs a storage the worker processes can share, not an in-memory one")


def _n_epochs(space: SearchSpace, base: dict) -> int:
    from gru4rec.train.params import from_dict

    return from_dict(space.params({d.name: d.corners()[0] for d in space.dims}, base)).n_epochs


def _devices(device: str, n_jobs: int) -> list[str]:
    """The devices trials run on, one per worker in turn: every GPU for auto/cuda, else the one named."""
    import torch

    from gru4rec.train.trainer import resolve_device

    dev = resolve_device(device)
    if dev.type == "cuda" and str(device) in ("auto", "cuda"):
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return [str(dev)]


def split_validation(events: pl.DataFrame, days: float) -> tuple[pl.DataFrame, pl.DataFrame, str]:
    """train_tr / train_valid as `data split` cuts them: whole sessions ending in the last `days` days
    are validation; their events of items absent from train_tr go, then sessions left shorter than 2."""
    from gru4rec.data import TIME
    from gru4rec.prepare import DAY, keep_seen_items, split_whole_sessions

    boundary = events[TIME].max() - days * DAY
    train_tr, valid = split_whole_sessions(events, boundary)
    valid = keep_seen_items(valid, train_tr, 2)
    if train_tr.height == 0 or valid.height == 0:
        empty = "training" if train_tr.height == 0 else "validation"
        raise UserError(
            f"splitting TRAIN by time left the {empty} part empty (validation = sessions ending in the last "
            f"{days:g} day(s)); change --valid-days or give --valid"
        )
    note = (
        f"last {days:g} day(s) of TRAIN (sessions ending at or after t={boundary:.0f}), cut as `data split` "
        f"cuts train_tr/train_valid: {train_tr.height:,} training and {valid.height:,} validation events"
    )
    return train_tr, valid, note


# ------------------------------------------------------------------------------------ storage, study
def open_storage(url: str):
    """An Optuna RDB storage with heartbeats; a URL that cannot be opened is a UserError."""
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # one line per trial is ours
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        engine_kwargs["connect_args"] = {"timeout": 60}  # several processes write one file
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat: stable in use
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S
            )
    except Exception as e:  # SQLAlchemy (bad URL, unreachable server, not a database), missing driver
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--storage {redact(url)}: cannot be opened ({msg[:200]})") from None


def redact(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def _identity(space: SearchSpace, o: TuneOptions, base: dict, train_ev, valid_ev) -> dict:
    import json

    ident = {
        "space": space.identity(),
        "preset": (o.preset or "").strip().lower() or None,
        "base": base,
        "metric": o.metric,
        "seed": o.seed,
        "data": {"train": fingerprint(train_ev), "valid": fingerprint(valid_ev)},
    }
    return json.loads(json.dumps(ident))  # as the storage gives it back (tuples become lists)


def open_study(storage, name: str, identity: dict, url: str):
    """Load the study `name` when it exists (it must search the same space on the same data), else
    create it. Nothing is written to an existing study before the check passes."""
    import optuna

    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        study_id = None
    if study_id is not None:
        _same_search(storage.get_study_user_attrs(study_id).get(IDENTITY_KEY), identity, name, url)
        directions = storage.get_study_directions(study_id)
        if directions != [optuna.study.StudyDirection.MAXIMIZE]:
            raise UserError(
                f"study {name!r} in {redact(url)} does not maximise one metric; use another --study"
            )
        return optuna.load_study(study_name=name, storage=storage), False
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize", load_if_exists=True)
    stored = study.user_attrs.get(IDENTITY_KEY)
    if stored is None:
        study.set_user_attr(IDENTITY_KEY, identity)
    else:  # another process created it a moment ago
        _same_search(stored, identity, name, url)
    return study, True


def _same_search(stored: dict | None, now: dict, name: str, url: str) -> None:
    where = f"study {name!r} in {redact(url)}"
    if stored is None:
        raise UserError(f"{where} was not made by gru4rec-cli tune; use another --study")
    if stored == now:
        return
    what = {
        "space": "another search space",
        "preset": "another --preset",
        "base": "another --preset",
        "metric": "another --metric",
        "seed": "another --seed",
        "data": "other data",
    }
    key = next(k for k in list(what) + sorted(set(stored) | set(now)) if stored.get(k) != now.get(k))
    detail = _first_difference(stored.get(key), now.get(key), key)
    raise UserError(
        f"{where} holds trials of {what.get(key, 'another setup')} ({detail}); use another --study or --out"
    )


def _first_difference(a: Any, b: Any, path: str) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{path}.{k}")
    return f"{path}: {a!r} in the study, {b!r} now"


def fail_dead_trials(study, storage) -> list[int]:
    """Mark FAIL the RUNNING trials that this machine's processes left behind when they died."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    study_id = storage.get_study_id_from_name(study.study_name)
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = t.user_attrs
        if attrs.get("host") != HOST or "pid" not in attrs:
            continue  # another machine's: Optuna's heartbeat check fails it once it is stale
        if process_alive(int(attrs["pid"]), attrs.get("proc_start")):
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        try:
            storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
            failed.append(t.number)
        except UpdateFinishedTrialError:
            pass  # another process got there first
    return failed


def process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the name in (...) may hold spaces


def process_alive(pid: int, start: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, another user's
    now = process_start(pid)
    return start is None or now is None or now == start


# ------------------------------------------------------------------------------------ the trials
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
        done, running = _count(storage, job.study_name)
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


MAX_REPEATS = 50


@contextlib.contextmanager
def ctrl_c_noted() -> Iterator[list[bool]]:
    """Ctrl-C raises KeyboardInterrupt wherever the main thread is; inside a garbage-collector
    callback (Optuna collects after every trial) Python prints and drops it. The handler also notes
    it, so the trial loop stops after the trial at the latest."""
    noted: list[bool] = []
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield noted  # signals are not ours to handle here, or Ctrl-C is ignored on purpose
        return

    def handler(signum, frame) -> None:
        noted.append(True)
        previous(signum, frame)

    def unraisable(u) -> None:  # the dropped Ctrl-C is acted on: no traceback for it
        if not isinstance(u.exc_value, KeyboardInterrupt):
            hook(u)

    hook = sys.unraisablehook
    signal.signal(signal.SIGINT, handler)
    sys.unraisablehook = unraisable
    try:
        yield noted
    finally:
        signal.signal(signal.SIGINT, previous)
        sys.unraisablehook = hook


class RepeatedConfig(Exception):
    """A proposal equal to a trial the study already ran or runs: the trial is failed (it never
    counts towards --n-trials) and the sampler, its random state moved on, proposes again."""


def repeat_line(trial) -> str:
    params = " ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
    return f"trial {trial.number} skipped: the same parameters as trial #{trial.user_attrs['repeat_of']} | {params}"


def twin_of(trial) -> int | None:
    """The number of a finished or running trial with exactly `trial`'s parameters, if any."""
    from optuna.trial import TrialState

    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    for t in trial.study.get_trials(deepcopy=False, states=states):
        if t.number != trial.number and t.params == trial.params:
            return t.number
    return None


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


def _count(storage, study_name: str) -> tuple[int, int]:
    """(finished = complete + pruned, running) trials of the study, as the storage has them now."""
    from optuna.trial import TrialState

    study_id = storage.get_study_id_from_name(study_name)
    trials = storage.get_all_trials(study_id, deepcopy=False)
    done = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    return done, sum(t.state == TrialState.RUNNING for t in trials)


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


def rss_mb() -> float | None:
    """Resident set size of this process now (Linux /proc), in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


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
    done, running = _count(storage, job.study_name)
    left = max(job.n_trials - done - running, 0)
    eta = (sum(durations) / len(durations)) * (left + running) / job.n_jobs if durations else 0.0
    if job.deadline is not None:
        eta = min(eta, max(job.deadline - time.time(), 0.0))
    head += f" | {done}/{job.n_trials} done, ETA {_hms(eta)}"
    params = " ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
    return f"{head} | {params}"


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _hms(s: float) -> str:
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _say_header(console, o, space, base, valid_note, train_ev, study, created, url, failed, notes) -> None:
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
