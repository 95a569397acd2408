"""`gru4rec-cli tune` on bad input: one error line, and the study and the outputs untouched
(see test_tune.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import tomli_w
from tune_util import (
    TINY_FIXED,
    popen,
    space_file,
    tune_args,
)


# ------------------------------------------------------------------------------------------------ bad input
@pytest.fixture(scope="module")
def study_dir(tune_data, tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """A study with one finished trial, which the bad-input tests must leave exactly as it is."""
    folder = tmp_path_factory.mktemp("tune-study")
    space = space_file(folder, n_epochs=1)
    out = folder / "out"
    args = tune_args(tune_data, out, space, 1, "--pruner", "none")
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
def test_bad_space_is_one_error_line_and_the_study_is_untouched(case, study_dir, tune_data, tmp_path, run):
    out, _, _ = study_dir
    before = _digest(out / "study.db")
    search, needle = BAD_SPACES[case]
    bad = tmp_path / "bad.toml"
    fixed = {k: v for k, v in {**TINY_FIXED, "n_epochs": 1}.items() if k not in search}
    bad.write_text(tomli_w.dumps({"fixed": fixed, "search": search}))
    code, _, err = run(*tune_args(tune_data, out, bad, 1, "--study", "tiny"))
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], err
    assert _digest(out / "study.db") == before


def test_another_space_under_the_same_study_name_is_refused(study_dir, tune_data, tmp_path, run):
    out, _, _ = study_dir
    before = _digest(out / "study.db")
    (tmp_path / "o").mkdir()
    search = {"learning_rate": {"type": "float", "low": 0.01, "high": 0.2}}
    other = space_file(tmp_path / "o", n_epochs=1, search=search)
    code, _, err = run(*tune_args(tune_data, out, other, 2))
    assert code == 2 and err.startswith("error:") and "another search space" in err, err
    assert len(err.strip().splitlines()) == 1
    assert _digest(out / "study.db") == before
    # a -p that fixes a searched parameter is another space too
    code, _, err = run(*tune_args(tune_data, out, study_dir[1], 2, "-p", "learning_rate=0.1"))
    assert code == 2 and "another search space" in err, err
    assert _digest(out / "study.db") == before


def test_another_space_on_the_same_out_is_refused_and_the_outputs_are_untouched(
    study_dir, tune_data, tmp_path, run
):
    out, _, _ = study_dir
    before = {p.name: _digest(p) for p in out.iterdir() if p.is_file()}
    assert {"best.toml", "report.md", "trials.parquet", "study.db"} <= set(before)
    other = space_file(tmp_path, n_epochs=1, name="other")  # another study name: its own study
    code, _, err = run(*tune_args(tune_data, out, other, 1))
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
    extra, needle, study_dir, tune_data, tmp_path, run
):
    _, space, _ = study_dir
    out = tmp_path / "new" / "out"
    code, _, err = run(*tune_args(tune_data, out, space, 1), *extra)
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
def test_bad_options(extra, needle, study_dir, tune_data, run):
    out, space, _ = study_dir
    before = _digest(out / "study.db")
    args = tune_args(tune_data, out, space, 1)
    if "--space" in extra:
        args = args[: args.index("--space")] + args[args.index("--space") + 2 :]
    code, _, err = run(*args, *extra)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], err
    assert _digest(out / "study.db") == before
