"""The Optuna storage and study: opened with heartbeats, one study per --out, the same search on
the same data, trials of dead processes failed, trials counted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gru4rec.data import fingerprint
from gru4rec.errors import UserError
from gru4rec.train.tune.options import TuneOptions
from gru4rec.train.tune.process import HOST, process_alive
from gru4rec.train.tune.space import SearchSpace

HEARTBEAT_S = 20  # Optuna heartbeat of a running trial (RDB storages)
GRACE_S = 120  # a RUNNING trial without a heartbeat for this long belongs to a dead process
IDENTITY_KEY = "gru4rec_tune"  # study user attribute: what the study searches, on which data
DEFAULT_STORAGE = "study.db in --out"


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


def storage_key(storage: str | None) -> str:
    """The storage as the folder's marker names it: the default one by its place, so that a folder
    moved elsewhere is still the same study's."""
    return redact(storage) if storage is not None else DEFAULT_STORAGE


def check_one_study(out: Path, study_name: str, opened, storage: str | None) -> None:
    """One study per --out: its outputs (best.toml, report.md, trials.parquet) are the study's, and
    another study's run would replace them."""
    import json

    from gru4rec.train.tune.report import STUDY_MARKER

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


def study_identity(space: SearchSpace, o: TuneOptions, base: dict, train_ev, valid_ev) -> dict:
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


def count_trials(storage, study_name: str) -> tuple[int, int]:
    """(finished = complete + pruned, running) trials of the study, as the storage has them now."""
    from optuna.trial import TrialState

    study_id = storage.get_study_id_from_name(study_name)
    trials = storage.get_all_trials(study_id, deepcopy=False)
    done = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    return done, sum(t.state == TrialState.RUNNING for t in trials)
