"""`gru4rec-cli tune` proposes a new configuration on every start: top-ups, timeouts, Ctrl-C and
parallel runs never train a configuration the study already has (see test_tune.py)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from optuna.trial import TrialState
from tune_util import (
    BAD_LR,
    GOOD_LR,
    REPO,
    WIDE,
    assert_no_repeats,
    finished_configs,
    load,
    signal_when,
    space_file,
    trials_in,
    tune_args,
)

# ------------------------------------------------------------------------------------------------ new configurations


def test_top_up_never_repeats_and_the_same_commands_give_the_same_trials(tune_data, tmp_path, run):
    space = space_file(tmp_path, n_epochs=1, search=WIDE)

    def sequence(out: Path) -> list[tuple]:
        for n in (2, 4, 6):  # a study topped up twice (--n-trials raised)
            code, _, err = run(*tune_args(tune_data, out, space, n, "--pruner", "none"))
            assert code == 0, err
        assert len(finished_configs(out)) == 6
        trials = load(out).get_trials(deepcopy=False)
        return [(t.number, t.state.name, tuple(sorted(t.params.items()))) for t in trials]

    first = sequence(tmp_path / "a")
    assert_no_repeats(tmp_path / "a")
    assert sequence(tmp_path / "b") == first  # reproducible: same commands, same trials


def test_timeout_chunks_never_repeat(tune_data, tmp_path, run):
    space = space_file(tmp_path, n_epochs=1, search=WIDE)
    out = tmp_path / "out"
    starts = 0
    while starts < 3 or len(finished_configs(out)) < 6:  # at least 3 starts, however fast each is
        starts += 1
        assert starts <= 15, "15 chunks of 1 s each should have finished 6 trials"
        code, _, err = run(*tune_args(tune_data, out, space, 100, "--timeout", "1", "--pruner", "none"))
        assert code == 0, err
    assert_no_repeats(out)


def test_resume_after_ctrl_c_never_repeats(tune_data, tmp_path, run):
    space = space_file(tmp_path, n_epochs=3, search=WIDE)
    out = tmp_path / "out"
    args = tune_args(tune_data, out, space, 6, "--pruner", "none")

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
def test_an_exact_repeat_is_skipped_and_said_and_an_exhausted_space_stops(tune_data, tmp_path, run):
    """2 x 2 configurations, 5 wanted: the sampler repeats itself; every repeat is a failed trial naming
    its twin, the 4 configurations each finish once, and the run stops when nothing new comes."""
    small = {
        "learning_rate": {"type": "categorical", "choices": [BAD_LR, GOOD_LR]},
        "dropout_p_hidden": {"type": "categorical", "choices": [0.0, 0.2]},
    }
    space = space_file(tmp_path, n_epochs=1, search=small)
    out = tmp_path / "out"
    code, _, err = run(*tune_args(tune_data, out, space, 5, "--pruner", "none"))
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
def test_a_new_n_jobs_2_run_on_a_study_never_repeats(tune_data, tmp_path, run):
    space = space_file(tmp_path, n_epochs=1, search=WIDE)
    out = tmp_path / "out"
    code, _, err = run(*tune_args(tune_data, out, space, 3, "--pruner", "none"))
    assert code == 0, err
    code, _, err = run(*tune_args(tune_data, out, space, 8, "--pruner", "none", "--n-jobs", "2"))
    assert code == 0, err
    assert len(assert_no_repeats(out)) >= 8
