"""`tune` from options to outputs: check, read, open (or resume) the study, run the workers, write
the report and, with --final-test, the final test."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gru4rec.errors import UserError
from gru4rec.train.tune.events import read_data, unseen_notes
from gru4rec.train.tune.loop import run_workers
from gru4rec.train.tune.options import Job, TuneOptions, check_options
from gru4rec.train.tune.progress import say_header
from gru4rec.train.tune.space import SearchSpace, load_space, parse_fixed_pairs
from gru4rec.train.tune.study import (
    check_one_study,
    fail_dead_trials,
    open_storage,
    open_study,
    redact,
    storage_key,
    study_identity,
)


def run_tune(o: TuneOptions, console=None) -> dict:
    """Check everything, open (or resume) the study, run trials, write the outputs; returns a summary."""
    from rich.console import Console

    from gru4rec.io import check_output_dir, check_output_file
    from gru4rec.train.presets import PRESETS
    from gru4rec.train.tune.report import OUTPUT_FILES

    console = console or Console(stderr=True, quiet=not o.progress, soft_wrap=True, highlight=False)
    check_options(o)
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
        train_events, search_train, valid_events, valid_note = read_data(o)
        notes = space.notes() + unseen_notes(search_train, valid_events, "validation")
        storage = open_storage(url)  # a bad URL is said first
        check_one_study(out, study_name, storage, o.storage)
        identity = study_identity(space, o, base, search_train, valid_events)
        study, created = open_study(storage, study_name, identity, url)
    failed = fail_dead_trials(study, storage)
    n_at_start = len(storage.get_all_trials(storage.get_study_id_from_name(study_name), deepcopy=False))

    say_header(console, o, space, base, valid_note, search_train, study, created, url, failed, notes)
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
    from gru4rec.train.tune.report import ReportInfo, write_outputs

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
        from gru4rec.train.tune.final import final_test

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
