"""`gru4rec-cli tune` on tiny synthetic data, against a real Optuna SQLite study the tests open themselves.

Each test trains real (tiny) models: 1 CPU thread per process (the shared CI cores are often
oversubscribed, where torch's default thread pool is many times slower)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import numpy as np
import optuna
import polars as pl
import pytest
import tomli_w
from optuna.trial import TrialState

from gru4rec.synth import generate

REPO = Path(__file__).resolve().parents[1]
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)

# Tiny, fast model; learning rate categorical with one clearly better choice planted.
TINY_FIXED = {
    "loss": "cross-entropy",
    "layers": 8,
    "batch_size": 16,
    "n_sample": 16,
    "sample_store_size": 20_000,
    "eval_batch_size": 64,
    "embedding_mode": "shared",
}
GOOD_LR, BAD_LR = 0.1, 0.0002


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("tune-data")
    train, test = generate(600, 80, seed=3)
    paths = {"train": folder / "train.parquet", "valid": folder / "valid.parquet"}
    train.write_parquet(paths["train"])
    test.write_parquet(paths["valid"])
    return paths


def space_file(folder: Path, n_epochs: int, search: dict | None = None, name: str = "tiny") -> Path:
    search = search or {
        "learning_rate": {"type": "categorical", "choices": [BAD_LR, GOOD_LR]},
        "dropout_p_hidden": {"type": "float", "low": 0.0, "high": 0.3, "step": 0.1},
    }
    path = folder / f"{name}.toml"
    fixed = {k: v for k, v in {**TINY_FIXED, "n_epochs": n_epochs}.items() if k not in search}
    path.write_text(tomli_w.dumps({"fixed": fixed, "search": search}))
    return path


def tune_args(data, out: Path, space: Path, n_trials: int, *extra: str) -> list[str]:
    return ["tune", data["train"], "--valid", data["valid"], "--out", out, "--space", space,
            "--n-trials", str(n_trials), "--device", "cpu", "--threads", "1", "--seed", "5", *extra]  # fmt: skip


def load(out: Path, name: str = "tiny") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'study.db'}")


def popen(args: list) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "gru4rec.cli", *map(str, args)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def wait_for(predicate, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def signal_when(args: list, ready, sig: int, what: str) -> tuple[int, str]:
    """Run `gru4rec-cli ARGS` in a process, send it `sig` once `ready()`; (exit code, stderr).

    The process is stopped (SIGSTOP) while `ready()` looks at it, so what `ready()` saw is still
    true when `sig` arrives: however fast the process runs, the moment cannot slip past."""
    proc = popen(args)

    def frozen_ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"the process ended (exit {proc.returncode}) before {what}")
        proc.send_signal(signal.SIGSTOP)
        if ready():
            return True  # still stopped: `sig` is sent first, then the process continues
        proc.send_signal(signal.SIGCONT)
        return False

    try:
        wait_for(frozen_ready, 240, what)
        proc.send_signal(sig)
        proc.send_signal(signal.SIGCONT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    return proc.returncode, err


def finished_configs(out: Path, name: str = "tiny") -> list[tuple]:
    """Parameter tuples of the finished trials, read from the study DB (the independent reference)."""
    trials = load(out, name).get_trials(deepcopy=False, states=FINISHED)
    return [tuple(sorted(t.params.items())) for t in trials]


def assert_no_repeats(out: Path, name: str = "tiny") -> list[tuple]:
    configs = finished_configs(out, name)
    assert len(configs) == len(set(configs)), f"repeated configurations among finished trials: {configs}"
    return configs


def trials_in(out: Path, name: str = "tiny") -> list:
    try:
        return load(out, name).get_trials(deepcopy=False)
    except Exception:  # the study does not exist yet, or the file is being created
        return []


# ------------------------------------------------------------------------------------------------
def test_finds_the_planted_learning_rate_and_best_toml_retrains_to_it(data, tmp_path, run):
    space = space_file(tmp_path, n_epochs=2)
    out = tmp_path / "out"
    code, _, err = run(*tune_args(data, out, space, 6, "--pruner", "none"))
    assert code == 0, err
    trials = load(out).get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 6
    good = [t.value for t in trials if t.params["learning_rate"] == GOOD_LR]
    bad = [t.value for t in trials if t.params["learning_rate"] == BAD_LR]
    assert good and bad, "the seeded search should have tried both learning rates"
    assert min(good) > max(bad)  # the planted region is real ...
    best = max(trials, key=lambda t: t.value)
    assert best.params["learning_rate"] == GOOD_LR  # ... and the search reports it
    frame = pl.read_parquet(out / "trials.parquet").filter(pl.col("repeat_of").is_null())  # 8 points: repeats
    assert frame.height == 6 and set(frame["state"]) == {"COMPLETE"}
    assert frame.filter(pl.col("number") == best.number)["value"][0] == best.value
    assert "## Best trial" in (out / "report.md").read_text()
    assert (out / "plots" / "history.png").stat().st_size > 0

    # best.toml through the train command (another process) gives the reported metric again
    model = tmp_path / "m.pt"
    proc = popen(["train", data["train"], "--valid", data["valid"], "--params", out / "best.toml",
                  "--out", model, "--seed", "5", "--device", "cpu", "--threads", "1", "--quiet"])  # fmt: skip
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    from gru4rec import checkpoint as ckpt_io

    history = ckpt_io.load(model).info["history"]
    assert len(history) == 2
    assert abs(history[-1]["mrr@20"] - best.value) < 1e-6


def test_resume_after_kill_counts_every_trial_once(data, tmp_path, run):
    space = space_file(tmp_path, n_epochs=20)  # each trial runs long enough to be caught mid-way
    out = tmp_path / "out"
    args = tune_args(data, out, space, 4, "--pruner", "none")

    def mid_trial() -> bool:  # kill -9 here: at least one finished, one running with an epoch done
        t = trials_in(out)
        return any(x.state == TrialState.COMPLETE for x in t) and any(
            x.state == TrialState.RUNNING and len(x.intermediate_values) >= 1 for x in t
        )

    signal_when(args, mid_trial, signal.SIGKILL, "a trial after the first to be running")
    before = load(out).get_trials(deepcopy=False)
    killed = [t.number for t in before if t.state == TrialState.RUNNING]
    assert len(killed) == 1 and 1 <= sum(t.state == TrialState.COMPLETE for t in before) < 4

    code, _, err = run(*args)
    assert code == 0, err
    assert f"#{killed[0]} as failed" in err
    after = load(out).get_trials(deepcopy=False)
    states = {t.number: t.state for t in after}
    assert states[killed[0]] == TrialState.FAIL
    assert sum(s == TrialState.COMPLETE for s in states.values()) == 4  # exactly the target
    assert TrialState.RUNNING not in states.values()
    repeats = [t.number for t in after if "repeat_of" in t.user_attrs]  # skipped on purpose, never run
    assert sorted(states) == list(range(len(after)))
    assert len(after) == 4 + 1 + len(repeats)  # 4 complete + the killed one (+ skipped repeats)
    assert len(assert_no_repeats(out)) == 4

    code, _, err = run(*args)  # a third run has nothing to do and starts no trial
    assert code == 0, err
    assert len(load(out).get_trials(deepcopy=False)) == len(after)


def test_two_processes_share_one_sqlite_study(data, tmp_path):
    space = space_file(tmp_path, n_epochs=2)
    out = tmp_path / "out"
    args = tune_args(data, out, space, 8, "--pruner", "none")
    first = popen(args)
    # the second joins once the first has created the study and started trial 0
    wait_for(lambda: len(trials_in(out)) >= 1, 180, "the first process to start a trial")
    second = popen(args)
    outs = [p.communicate(timeout=300) for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, [e for _, e in outs]
    trials = load(out).get_trials(deepcopy=False)
    numbers = sorted(t.number for t in trials)
    assert numbers == list(range(len(trials)))
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    # the rest: proposals that repeated a trial of the other process, skipped (failed, not counted)
    assert all(
        t.state == TrialState.FAIL and "repeat_of" in t.user_attrs for t in trials if t not in complete
    )
    assert 8 <= len(complete) <= 9  # the target, plus at most one started by both at the same moment
    by_pid: dict[int, set[int]] = {}
    for t in trials:
        by_pid.setdefault(t.user_attrs["pid"], set()).add(t.number)
    assert set(by_pid) == {first.pid, second.pid}  # both worked on it
    # every trial a process reported is in the study, under its pid, and no number was reported twice
    for proc, (_, err) in zip((first, second), outs):
        reported = [int(line.split()[1]) for line in err.splitlines() if line.startswith("trial ")]
        assert sorted(reported) == sorted(by_pid[proc.pid])


def test_pruning_stops_bad_trials_early(data, tmp_path, run):
    n_epochs, n_trials = 4, 10
    space = space_file(tmp_path, n_epochs=n_epochs)
    out = tmp_path / "out"
    code, _, err = run(*tune_args(data, out, space, n_trials, "--pruner", "median"))
    assert code == 0, err
    trials = load(out).get_trials(deepcopy=False)
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert pruned, "some trial should have been pruned"
    frame = pl.read_parquet(out / "trials.parquet")
    epochs = dict(zip(frame["number"], frame["epochs"]))
    for t in pruned:
        last = max(t.intermediate_values)
        assert epochs[t.number] == last < n_epochs  # stopped before the end
        # the median rule, recomputed: its best epoch so far is below the median of the trials
        # completed before it at that epoch (and at least 5 had completed)
        earlier = [u.intermediate_values[last] for u in complete if u.number < t.number]
        assert len(earlier) >= 5
        assert max(t.intermediate_values.values()) < np.percentile(earlier, 50)
    assert all(epochs[t.number] == n_epochs for t in complete)
    assert sum(epochs.values()) < n_trials * n_epochs
    assert sum("pruned after epoch" in line for line in err.splitlines()) == len(pruned)


# ------------------------------------------------------------------------------------------------ new configurations
# 2 x 11 = 22 configurations: room for every test below, few enough that a replayed sampler would
# repeat its earlier proposals exactly
WIDE = {
    "learning_rate": {"type": "categorical", "choices": [BAD_LR, GOOD_LR]},
    "dropout_p_hidden": {"type": "float", "low": 0.0, "high": 0.5, "step": 0.05},
}


def test_top_up_never_repeats_and_the_same_commands_give_the_same_trials(data, tmp_path, run):
    space = space_file(tmp_path, n_epochs=1, search=WIDE)

    def sequence(out: Path) -> list[tuple]:
        for n in (2, 4, 6):  # a study topped up twice (--n-trials raised)
            code, _, err = run(*tune_args(data, out, space, n, "--pruner", "none"))
            assert code == 0, err
        assert len(finished_configs(out)) == 6
        trials = load(out).get_trials(deepcopy=False)
        return [(t.number, t.state.name, tuple(sorted(t.params.items()))) for t in trials]

    first = sequence(tmp_path / "a")
    assert_no_repeats(tmp_path / "a")
    assert sequence(tmp_path / "b") == first  # reproducible: same commands, same trials


def test_timeout_chunks_never_repeat(data, tmp_path, run):
    space = space_file(tmp_path, n_epochs=1, search=WIDE)
    out = tmp_path / "out"
    starts = 0
    while starts < 3 or len(finished_configs(out)) < 6:  # at least 3 starts, however fast each is
        starts += 1
        assert starts <= 15, "15 chunks of 1 s each should have finished 6 trials"
        code, _, err = run(*tune_args(data, out, space, 100, "--timeout", "1", "--pruner", "none"))
        assert code == 0, err
    assert_no_repeats(out)


def test_resume_after_ctrl_c_never_repeats(data, tmp_path, run):
    space = space_file(tmp_path, n_epochs=3, search=WIDE)
    out = tmp_path / "out"
    args = tune_args(data, out, space, 6, "--pruner", "none")

    def in_third_trial() -> bool:
        t = trials_in(out)
        return sum(x.state == TrialState.COMPLETE for x in t) >= 2 and any(
            x.state == TrialState.RUNNING and x.intermediate_values for x in t
        )

    code, err = signal_when(args, in_third_trial, signal.SIGINT, "a trial after the second to be running")
    assert code == 130, err
    assert 2 <= len(finished_configs(out)) < 6
    code, _, err = run(*args)
    assert code == 0, err
    assert len(assert_no_repeats(out)) == 6


DROPPED_CTRL_C = """
import os, signal
from gru4rec.train.tune import ctrl_c_noted

class Dies:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)
        sum(range(100_000))  # bytecodes: the handler runs here, inside __del__

with ctrl_c_noted() as noted:
    Dies()  # collected at once: the interrupt is raised in __del__, and Python drops it
print(noted)
"""


def test_a_ctrl_c_that_python_drops_is_noted_without_a_traceback():
    """As in a garbage-collector callback: the KeyboardInterrupt never reaches the trial loop; the
    handler notes it, and Python's 'Exception ignored ... KeyboardInterrupt' is not printed. In a
    process of its own: pytest replaces the hook that prints it."""
    proc = subprocess.run(
        [sys.executable, "-c", DROPPED_CTRL_C], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[True]"
    assert "KeyboardInterrupt" not in proc.stderr, proc.stderr


@pytest.mark.slow  # 50 skipped proposals in a row before it stops
def test_an_exact_repeat_is_skipped_and_said_and_an_exhausted_space_stops(data, tmp_path, run):
    """2 x 2 configurations, 5 wanted: the sampler repeats itself; every repeat is a failed trial naming
    its twin, the 4 configurations each finish once, and the run stops when nothing new comes."""
    small = {
        "learning_rate": {"type": "categorical", "choices": [BAD_LR, GOOD_LR]},
        "dropout_p_hidden": {"type": "categorical", "choices": [0.0, 0.2]},
    }
    space = space_file(tmp_path, n_epochs=1, search=small)
    out = tmp_path / "out"
    code, _, err = run(*tune_args(data, out, space, 5, "--pruner", "none"))
    assert code == 0, err
    configs = assert_no_repeats(out)
    assert len(configs) == 4
    trials = {t.number: t for t in load(out).get_trials(deepcopy=False)}
    repeats = [t for t in trials.values() if "repeat_of" in t.user_attrs]
    assert repeats and all(t.state == TrialState.FAIL for t in repeats)
    for t in repeats:
        assert t.params == trials[t.user_attrs["repeat_of"]].params
        assert f"trial {t.number} skipped: the same parameters as trial #{t.user_attrs['repeat_of']}" in err
    assert "the space may be exhausted" in err
    frame = pl.read_parquet(out / "trials.parquet")
    assert frame["repeat_of"].drop_nulls().len() == len(repeats)
    assert f"| skipped repeats | {len(repeats)} " in (out / "report.md").read_text()


@pytest.mark.slow
def test_a_new_n_jobs_2_run_on_a_study_never_repeats(data, tmp_path, run):
    space = space_file(tmp_path, n_epochs=1, search=WIDE)
    out = tmp_path / "out"
    code, _, err = run(*tune_args(data, out, space, 3, "--pruner", "none"))
    assert code == 0, err
    code, _, err = run(*tune_args(data, out, space, 8, "--pruner", "none", "--n-jobs", "2"))
    assert code == 0, err
    assert len(assert_no_repeats(out)) >= 8


# ------------------------------------------------------------------------------------------------ reports
def test_layer_stacks_as_choices_sample_and_report(data, tmp_path, run):
    stacks = {
        "layers": {"type": "categorical", "choices": [[8], [8, 8]]},
        "learning_rate": {"type": "categorical", "choices": [BAD_LR, GOOD_LR]},
        "dropout_p_hidden": {"type": "float", "low": 0.0, "high": 0.3, "step": 0.1},
    }
    space = space_file(tmp_path, n_epochs=1, search=stacks)
    out = tmp_path / "out"
    code, _, err = run(*tune_args(data, out, space, 6, "--pruner", "none"))
    assert code == 0, err
    trials = load(out).get_trials(deepcopy=False, states=FINISHED)
    frame = pl.read_parquet(out / "trials.parquet").filter(pl.col("state") != "FAIL").sort("number")
    # the stack a trial trained is the one it sampled, and trials.parquet says which
    for t in trials:
        assert t.user_attrs["config"]["layers"] == [int(x) for x in t.params["layers"].split(",")]
    assert frame["param_layers"].to_list() == [t.params["layers"] for t in trials]
    assert (out / "plots" / "importances.png").stat().st_size > 0
    assert "## Best trial" in (out / "report.md").read_text()


def test_stepped_floats_are_their_decimal_grid_points():
    from gru4rec.train.tune.space import Dim

    dim = Dim("dropout_p_embed", "float", 0.0, 0.5, 0.05)
    grid = [float(Decimal("0.05") * k) for k in range(11)]  # 0.3, not 0.30000000000000004
    binary = [0.0 + k * 0.05 for k in range(11)]  # how Optuna builds the points
    assert binary != grid
    assert [dim.clean(v) for v in binary] == grid


def test_validation_drops_and_no_effect_parameters_are_said(data, tmp_path, run):
    valid = with_unseen_items(data["valid"], tmp_path)
    search = {"eval_batch_size": {"type": "categorical", "choices": [32, 64]}, **WIDE}
    space = space_file(tmp_path, n_epochs=1, search=search)
    out = tmp_path / "out"
    args = tune_args(data, out, space, 1, "--pruner", "none")
    args[args.index("--valid") + 1] = valid
    code, _, err = run(*args)
    assert code == 0, err
    said = (
        f"validation: dropped {n_unseen(valid, data['train']):,} event(s) of items not in the training data"
    )
    note = "note: searching eval_batch_size cannot change results"
    report = (out / "report.md").read_text()
    assert said in err and said in report
    assert note in err and note in report


# ------------------------------------------------------------------------------------------------ bad input
@pytest.fixture(scope="module")
def study_dir(data, tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """A study with one finished trial, which the bad-input tests must leave exactly as it is."""
    folder = tmp_path_factory.mktemp("tune-study")
    space = space_file(folder, n_epochs=1)
    out = folder / "out"
    args = tune_args(data, out, space, 1, "--pruner", "none")
    proc = popen(args)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return out, space, args


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


BAD_SPACES = {
    "unknown parameter": ({"learnin_rate": {"type": "float", "low": 0.01, "high": 0.1}}, "learnin_rate"),
    "empty range": ({"learning_rate": {"type": "float", "low": 0.2, "high": 0.1}}, "empty range"),
    "single value": ({"learning_rate": {"type": "float", "low": 0.1, "high": 0.1}}, "single value"),
    "unknown key": ({"learning_rate": {"type": "float", "low": 0.01, "hihg": 0.1}}, "hihg"),
    "step": (
        {"dropout_p_hidden": {"type": "float", "low": 0.0, "high": 0.5, "step": 0.2}},
        "does not divide",
    ),
    "invalid end": ({"dropout_p_hidden": {"type": "float", "low": 0.0, "high": 1.0}}, "dropout_p_hidden"),
    "type": ({"momentum": {"type": "int", "low": 0, "high": 1}}, "does not fit"),
    "not searchable": ({"n_epochs": {"type": "int", "low": 1, "high": 3}}, "cannot be searched"),
    "empty choices": ({"learning_rate": {"type": "categorical", "choices": []}}, "non-empty"),
    "bad mode": (
        {"embedding_mode": {"type": "categorical", "choices": ["shared", "tied"]}},
        "embedding_mode",
    ),
}


@pytest.mark.parametrize("case", list(BAD_SPACES))
def test_bad_space_is_one_error_line_and_the_study_is_untouched(case, study_dir, data, tmp_path, run):
    out, _, _ = study_dir
    before = _digest(out / "study.db")
    search, needle = BAD_SPACES[case]
    bad = tmp_path / "bad.toml"
    fixed = {k: v for k, v in {**TINY_FIXED, "n_epochs": 1}.items() if k not in search}
    bad.write_text(tomli_w.dumps({"fixed": fixed, "search": search}))
    code, _, err = run(*tune_args(data, out, bad, 1, "--study", "tiny"))
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], err
    assert _digest(out / "study.db") == before


def test_another_space_under_the_same_study_name_is_refused(study_dir, data, tmp_path, run):
    out, _, _ = study_dir
    before = _digest(out / "study.db")
    (tmp_path / "o").mkdir()
    search = {"learning_rate": {"type": "float", "low": 0.01, "high": 0.2}}
    other = space_file(tmp_path / "o", n_epochs=1, search=search)
    code, _, err = run(*tune_args(data, out, other, 2))
    assert code == 2 and err.startswith("error:") and "another search space" in err, err
    assert len(err.strip().splitlines()) == 1
    assert _digest(out / "study.db") == before
    # a -p that fixes a searched parameter is another space too
    code, _, err = run(*tune_args(data, out, study_dir[1], 2, "-p", "learning_rate=0.1"))
    assert code == 2 and "another search space" in err, err
    assert _digest(out / "study.db") == before


def test_another_space_on_the_same_out_is_refused_and_the_outputs_are_untouched(
    study_dir, data, tmp_path, run
):
    out, _, _ = study_dir
    before = {p.name: _digest(p) for p in out.iterdir() if p.is_file()}
    assert {"best.toml", "report.md", "trials.parquet", "study.db"} <= set(before)
    other = space_file(tmp_path, n_epochs=1, name="other")  # another study name: its own study
    code, _, err = run(*tune_args(data, out, other, 1))
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "one study per --out" in lines[0], err
    assert {p.name: _digest(p) for p in out.iterdir() if p.is_file()} == before


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--storage", "nosuchdb://x"], "cannot be opened"),
        (["--valid", "/nonexistent/valid.parquet"], "valid.parquet"),
    ],
)
def test_a_run_that_fails_before_any_trial_leaves_no_out_folder(
    extra, needle, study_dir, data, tmp_path, run
):
    _, space, _ = study_dir
    out = tmp_path / "new" / "out"
    code, _, err = run(*tune_args(data, out, space, 1), *extra)
    assert code == 2 and needle in err, err
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--storage", "sqlite:////nonexistent-dir/sub/x.db"], "cannot be opened"),
        (["--storage", "nosuchdb://x"], "cannot be opened"),
        (["--metric", "ndcg@20"], "--metric"),
        (["--pruner", "sometimes"], "--pruner"),
        (["--space", "no-such-space"], "no-such-space"),
        (["-p", "learning_rate=fast"], "learning_rate"),
        (["--preset", "nope"], "preset"),
    ],
)
def test_bad_options(extra, needle, study_dir, data, run):
    out, space, _ = study_dir
    before = _digest(out / "study.db")
    args = tune_args(data, out, space, 1)
    if "--space" in extra:
        args = args[: args.index("--space")] + args[args.index("--space") + 2 :]
    code, _, err = run(*args, *extra)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], err
    assert _digest(out / "study.db") == before


# ------------------------------------------------------------------------------------------------ spaces
OFFICIAL = {  # paramspaces/gru4rec_{xe,bprmax}_standard_parspace.json of the official repository
    "layers": ("int", 64, 512, 32),
    "batch_size": ("int", 32, 256, 16),
    "learning_rate": ("float", 0.01, 0.25, 0.005),
    "dropout_p_embed": ("float", 0.0, 0.5, 0.05),
    "dropout_p_hidden": ("float", 0.0, 0.7, 0.05),
    "momentum": ("float", 0.0, 0.9, 0.05),
    "sample_alpha": ("float", 0.0, 1.0, 0.1),
}


@pytest.mark.parametrize("name", ["xe", "bpr-max"])
def test_shipped_spaces_are_the_official_ones(name):
    from gru4rec.train.presets import PRESETS
    from gru4rec.train.tune.space import load_space

    space = load_space(name)
    dims = {d.name: d for d in space.dims}
    expected = dict(OFFICIAL)
    if name == "bpr-max":
        expected["bpreg"] = ("float", 0.0, 2.0, 0.05)
    for key, (kind, low, high, step) in expected.items():
        d = dims.pop(key)
        assert (d.kind, d.low, d.high, d.step, d.log) == (kind, low, high, step, False), key
    if name == "bpr-max":
        assert sorted(dims.pop("elu_param").choices) == [0.0, 0.5, 1.0]
    assert not dims
    assert space.fixed["n_sample"] == 2048 and space.fixed["n_epochs"] == 10
    assert space.fixed["logq"] == (1.0 if name == "xe" else 0.0)
    space.check(PRESETS["rsc15"] if name == "xe" else PRESETS["diginetica"])


def test_embedding_mode_maps_to_the_official_modes():
    from gru4rec.train.params import from_dict
    from gru4rec.train.tune.space import parse_space

    space = parse_space(
        {"fixed": {"layers": 32}, "search": {"embedding_mode": {"type": "categorical", "choices": ["shared", "separate", "onehot"]}}},
        name="m", source="m",
    )  # fmt: skip
    got = {m: from_dict(space.params({"embedding_mode": m})) for m in ("shared", "separate", "onehot")}
    assert (got["shared"].constrained_embedding, got["shared"].embedding) == (True, 0)
    assert (got["separate"].constrained_embedding, got["separate"].embedding) == (False, 32)
    assert (got["onehot"].constrained_embedding, got["onehot"].embedding) == (False, 0)


# ------------------------------------------------------------------------------------------------ slow
@pytest.mark.slow
def test_host_memory_is_flat_across_30_trials(data, tmp_path, run):
    """Same shapes every trial (only dropout searched), so RSS differences would be leaks: a leaked
    sample store alone (1M int64 = 8 MB) would add 200 MB over 25 trials."""
    fixed_shapes = {"dropout_p_hidden": {"type": "float", "low": 0.0, "high": 0.5, "step": 0.05}}
    space = space_file(tmp_path, n_epochs=1, search=fixed_shapes)
    text = space.read_text().replace("sample_store_size = 20000", "sample_store_size = 1000000")
    space.write_text(text)
    out = tmp_path / "out"
    code, _, err = run(*tune_args(data, out, space, 30, "--pruner", "none"))
    assert code == 0, err
    rss = pl.read_parquet(out / "trials.parquet").sort("number")["rss_mb_start"].to_list()
    assert len(rss) == 30 and all(r is not None for r in rss)
    growth = rss[-1] - rss[4]
    print(json.dumps({"rss_mb_first": rss[0], "rss_mb_5th": rss[4], "rss_mb_last": rss[-1], "max": max(rss)}))
    assert growth < 15, rss


def with_unseen_items(valid: Path, folder: Path) -> Path:
    """The validation events plus 40 events of items that no training event has."""
    events = pl.read_parquet(valid)
    path = folder / f"{valid.stem}-unseen.parquet"
    pl.concat([events, events.head(40).with_columns(pl.col("item_id") + 10**6)]).write_parquet(path)
    return path


def n_unseen(events: Path, train: Path) -> int:
    return (
        pl.read_parquet(events)
        .join(pl.read_parquet(train).select("item_id"), on="item_id", how="anti")
        .height
    )


@pytest.mark.slow
def test_final_test_scores_through_onnx_like_pytorch(data, tmp_path, run):
    """--final-test: the ONNX-scored test metrics equal a PyTorch evaluation of the saved checkpoints,
    and the test events of unknown items it drops are said, as `score` says them."""
    from gru4rec import checkpoint as ckpt_io
    from gru4rec.data import read_events
    from gru4rec.evaluate import evaluate

    space = space_file(tmp_path, n_epochs=1)
    out = tmp_path / "out"
    test_path = with_unseen_items(data["valid"], tmp_path)
    code, _, err = run(
        *tune_args(data, out, space, 2, "--final-test", test_path, "--preset", "demo", "-p", "n_epochs=1")
    )
    assert code == 0, err
    final = json.loads((out / "final" / "final.json").read_text())
    assert [r["model"] for r in final["runs"]] == ["tuned", "preset demo"]
    test = read_events(test_path)
    for r, stem in zip(final["runs"], ("tuned", "preset-demo")):
        ck = ckpt_io.load(out / "final" / f"{stem}.pt")
        ref = evaluate(ck.model, ck.items, test, cutoffs=(20,), device="cpu")
        assert abs(ref["recall@20"] - r["recall@20"]) < 1e-5 and abs(ref["mrr@20"] - r["mrr@20"]) < 1e-5
        assert r["n_unknown_dropped"] == n_unseen(test_path, data["train"]) == ref["n_unknown_dropped"]
    said = f"dropped {n_unseen(test_path, data['train']):,} event(s) of items unknown to the model"
    report = (out / "report.md").read_text()
    assert "## Final test" in report
    assert f"final test tuned: {said}" in err and f"- tuned: {said}" in report


@pytest.mark.slow
def test_ctrl_c_in_the_final_retrain_is_said(data, tmp_path):
    """Ctrl-C while the preset retrains (yoochoose: 480 units, 10 epochs, seconds even on tiny data)."""
    space = space_file(tmp_path, n_epochs=1)
    out = tmp_path / "out"
    args = tune_args(data, out, space, 1, "--final-test", data["valid"], "--preset", "yoochoose")
    exported = (out / "final" / "tuned.onnx").exists
    code, err = signal_when(args, exported, signal.SIGINT, "the tuned model's export")
    assert code == 130, err
    assert "interrupted during the --final-test retrain" in err
    assert (out / "best.toml").is_file() and not (out / "final" / "final.json").exists()


@pytest.mark.slow
def test_n_jobs_runs_worker_processes_on_the_study(data, tmp_path, run):
    space = space_file(tmp_path, n_epochs=1)
    out = tmp_path / "out"
    code, _, err = run(*tune_args(data, out, space, 6, "--n-jobs", "2", "--pruner", "none"))
    assert code == 0, err
    trials = load(out).get_trials(deepcopy=False)
    assert all(t.state == TrialState.COMPLETE for t in trials) and 6 <= len(trials) <= 7
    assert len({t.user_attrs["pid"] for t in trials}) == 2


def test_tune_logs_to_mlflow_with_the_nightly_keys(data, tmp_path, run):
    """A real MLflow SQLite store, read back with MlflowClient: the best trial's parameters, its
    validation metric under the nightly's key style (mrr@20 -> mrr_at_20), tags and the outputs."""
    from mlflow import MlflowClient

    space = space_file(tmp_path, n_epochs=1)
    out, db = tmp_path / "out", tmp_path / "mlruns.db"
    code, _, err = run(*tune_args(data, out, space, 3, "--pruner", "none", "--mlflow-uri", f"sqlite:///{db}"))
    assert code == 0, err
    best = max(load(out).get_trials(states=(TrialState.COMPLETE,)), key=lambda t: t.value)
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    (mlrun,) = client.search_runs([client.get_experiment_by_name("gru4rec-tune").experiment_id])
    assert mlrun.data.metrics["valid_mrr_at_20"] == pytest.approx(best.value, abs=1e-12)
    assert mlrun.data.metrics["complete"] == 3
    assert float(mlrun.data.params["learning_rate"]) == best.params["learning_rate"]
    assert mlrun.data.tags["gru4rec.kind"] == "tune" and mlrun.data.tags["gru4rec.study"] == "tiny"
    logged = {a.path for a in client.list_artifacts(mlrun.info.run_id)}
    assert {"report.md", "best.toml", "trials.parquet"} <= logged
