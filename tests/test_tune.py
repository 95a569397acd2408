"""`gru4rec-cli tune` on tiny synthetic tune_data, against a real Optuna SQLite study the tests open themselves.

Each test trains real (tiny) models: 1 CPU thread per process (the shared CI cores are often
oversubscribed, where torch's default thread pool is many times slower)."""

from __future__ import annotations

import json
import signal
from decimal import Decimal
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from optuna.trial import TrialState
from tune_util import (
    BAD_LR,
    FINISHED,
    GOOD_LR,
    WIDE,
    assert_no_repeats,
    load,
    popen,
    signal_when,
    space_file,
    trials_in,
    tune_args,
    wait_for,
)


# ------------------------------------------------------------------------------------------------
def test_finds_the_planted_learning_rate_and_best_toml_retrains_to_it(tune_data, tmp_path, run):
    space = space_file(tmp_path, n_epochs=2)
    out = tmp_path / "out"
    code, _, err = run(*tune_args(tune_data, out, space, 6, "--pruner", "none"))
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
    proc = popen(["train", tune_data["train"], "--valid", tune_data["valid"], "--params", out / "best.toml",
                  "--out", model, "--seed", "5", "--device", "cpu", "--threads", "1", "--quiet"])  # fmt: skip
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    from gru4rec import checkpoint as ckpt_io

    history = ckpt_io.load(model).info["history"]
    assert len(history) == 2
    assert abs(history[-1]["mrr@20"] - best.value) < 1e-6


def test_resume_after_kill_counts_every_trial_once(tune_data, tmp_path, run):
    space = space_file(tmp_path, n_epochs=20)  # each trial runs long enough to be caught mid-way
    out = tmp_path / "out"
    args = tune_args(tune_data, out, space, 4, "--pruner", "none")

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


def test_two_processes_share_one_sqlite_study(tune_data, tmp_path):
    space = space_file(tmp_path, n_epochs=2)
    out = tmp_path / "out"
    args = tune_args(tune_data, out, space, 8, "--pruner", "none")
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


def test_pruning_stops_bad_trials_early(tune_data, tmp_path, run):
    n_epochs, n_trials = 4, 10
    space = space_file(tmp_path, n_epochs=n_epochs)
    out = tmp_path / "out"
    code, _, err = run(*tune_args(tune_data, out, space, n_trials, "--pruner", "median"))
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


# ------------------------------------------------------------------------------------------------ reports
def test_layer_stacks_as_choices_sample_and_report(tune_data, tmp_path, run):
    stacks = {
        "layers": {"type": "categorical", "choices": [[8], [8, 8]]},
        "learning_rate": {"type": "categorical", "choices": [BAD_LR, GOOD_LR]},
        "dropout_p_hidden": {"type": "float", "low": 0.0, "high": 0.3, "step": 0.1},
    }
    space = space_file(tmp_path, n_epochs=1, search=stacks)
    out = tmp_path / "out"
    code, _, err = run(*tune_args(tune_data, out, space, 6, "--pruner", "none"))
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


def test_validation_drops_and_no_effect_parameters_are_said(tune_data, tmp_path, run):
    valid = with_unseen_items(tune_data["valid"], tmp_path)
    search = {"eval_batch_size": {"type": "categorical", "choices": [32, 64]}, **WIDE}
    space = space_file(tmp_path, n_epochs=1, search=search)
    out = tmp_path / "out"
    args = tune_args(tune_data, out, space, 1, "--pruner", "none")
    args[args.index("--valid") + 1] = valid
    code, _, err = run(*args)
    assert code == 0, err
    said = f"validation: dropped {n_unseen(valid, tune_data['train']):,} event(s) of items not in the training data"
    note = "note: searching eval_batch_size cannot change results"
    report = (out / "report.md").read_text()
    assert said in err and said in report
    assert note in err and note in report


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
def test_host_memory_is_flat_across_30_trials(tune_data, tmp_path, run):
    """Same shapes every trial (only dropout searched), so RSS differences would be leaks: a leaked
    sample store alone (1M int64 = 8 MB) would add 200 MB over 25 trials."""
    # 501 values: TPE converging on one region does not run out of new ones before 30 trials
    fixed_shapes = {"dropout_p_hidden": {"type": "float", "low": 0.0, "high": 0.5, "step": 0.001}}
    space = space_file(tmp_path, n_epochs=1, search=fixed_shapes)
    text = space.read_text().replace("sample_store_size = 20000", "sample_store_size = 1000000")
    space.write_text(text)
    out = tmp_path / "out"
    code, _, err = run(*tune_args(tune_data, out, space, 30, "--pruner", "none"))
    assert code == 0, err
    trials = pl.read_parquet(out / "trials.parquet").filter(
        pl.col("repeat_of").is_null()
    )  # repeats never run
    rss = trials.sort("number")["rss_mb_start"].to_list()
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
def test_final_test_scores_through_onnx_like_pytorch(tune_data, tmp_path, run):
    """--final-test: the ONNX-scored test metrics equal a PyTorch evaluation of the saved checkpoints,
    and the test events of unknown items it drops are said, as `score` says them."""
    from gru4rec import checkpoint as ckpt_io
    from gru4rec.data import read_events
    from gru4rec.evaluate import evaluate

    space = space_file(tmp_path, n_epochs=1)
    out = tmp_path / "out"
    test_path = with_unseen_items(tune_data["valid"], tmp_path)
    code, _, err = run(
        *tune_args(
            tune_data, out, space, 2, "--final-test", test_path, "--preset", "demo", "-p", "n_epochs=1"
        )
    )
    assert code == 0, err
    final = json.loads((out / "final" / "final.json").read_text())
    assert [r["model"] for r in final["runs"]] == ["tuned", "preset demo"]
    test = read_events(test_path)
    for r, stem in zip(final["runs"], ("tuned", "preset-demo")):
        ck = ckpt_io.load(out / "final" / f"{stem}.pt")
        ref = evaluate(ck.model, ck.items, test, cutoffs=(20,), device="cpu")
        assert abs(ref["recall@20"] - r["recall@20"]) < 1e-5 and abs(ref["mrr@20"] - r["mrr@20"]) < 1e-5
        assert r["n_unknown_dropped"] == n_unseen(test_path, tune_data["train"]) == ref["n_unknown_dropped"]
    said = f"dropped {n_unseen(test_path, tune_data['train']):,} event(s) of items unknown to the model"
    report = (out / "report.md").read_text()
    assert "## Final test" in report
    assert f"final test tuned: {said}" in err and f"- tuned: {said}" in report


@pytest.mark.slow
def test_ctrl_c_in_the_final_retrain_is_said(tune_data, tmp_path):
    """Ctrl-C while the preset retrains (yoochoose: 480 units, 10 epochs, seconds even on tiny data)."""
    space = space_file(tmp_path, n_epochs=1)
    out = tmp_path / "out"
    args = tune_args(tune_data, out, space, 1, "--final-test", tune_data["valid"], "--preset", "yoochoose")
    exported = (out / "final" / "tuned.onnx").exists
    code, err = signal_when(args, exported, signal.SIGINT, "the tuned model's export")
    assert code == 130, err
    assert "interrupted during the --final-test retrain" in err
    assert (out / "best.toml").is_file() and not (out / "final" / "final.json").exists()


@pytest.mark.slow
def test_n_jobs_runs_worker_processes_on_the_study(tune_data, tmp_path, run):
    space = space_file(tmp_path, n_epochs=1)
    out = tmp_path / "out"
    code, _, err = run(*tune_args(tune_data, out, space, 6, "--n-jobs", "2", "--pruner", "none"))
    assert code == 0, err
    trials = [t for t in load(out).get_trials(deepcopy=False) if "repeat_of" not in t.user_attrs]  # run ones
    assert all(t.state == TrialState.COMPLETE for t in trials) and 6 <= len(trials) <= 7
    assert len({t.user_attrs["pid"] for t in trials}) == 2


def test_tune_logs_to_mlflow_with_the_nightly_keys(tune_data, tmp_path, run):
    """A real MLflow SQLite store, read back with MlflowClient: the best trial's parameters, its
    validation metric under the nightly's key style (mrr@20 -> mrr_at_20), tags and the outputs."""
    from mlflow import MlflowClient

    space = space_file(tmp_path, n_epochs=1)
    out, db = tmp_path / "out", tmp_path / "mlruns.db"
    code, _, err = run(
        *tune_args(tune_data, out, space, 3, "--pruner", "none", "--mlflow-uri", f"sqlite:///{db}")
    )
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
