"""Trainer: learning on synthetic data, determinism, resume, checkpoints, parameters, CLI errors."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch

from gru4rec import checkpoint
from gru4rec.errors import UserError
from gru4rec.evaluate import evaluate
from gru4rec.items import ItemMap
from gru4rec.metrics import metrics_from_ranks, target_ranks
from gru4rec.synth import generate
from gru4rec.train.dwell import boost
from gru4rec.train.params import TrainConfig, parse_pairs, resolve
from gru4rec.train.presets import PRESETS
from gru4rec.train.trainer import train

SMALL = dict(
    layers=[16],
    batch_size=8,
    n_sample=16,
    n_epochs=2,
    learning_rate=0.1,
    momentum=0.1,
    dropout_p_hidden=0.2,
    dropout_p_embed=0.1,
    logq=1.0,
    sample_store_size=100,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny():
    return generate(300, 60, 5)


@pytest.fixture(scope="module")
def synth():
    return generate(3000, 300, 11)


def _baselines(train_df: pl.DataFrame, test_df: pl.DataFrame) -> dict[str, float]:
    """POP and last-item co-occurrence (popularity tie-break), written here independently of the package."""
    items = ItemMap.from_events(train_df)
    trx, _ = items.translate(train_df)
    tex, _ = items.translate(test_df)
    n = len(items)
    pop = np.bincount(trx["item_idx"].to_numpy(), minlength=n).astype(np.float64)
    co = np.zeros((n, n))
    for s in trx.partition_by("session_id"):
        x = s["item_idx"].to_numpy()
        np.add.at(co, (x[:-1], x[1:]), 1.0)
    prev, nxt = [], []
    for s in tex.partition_by("session_id"):
        x = s["item_idx"].to_numpy()
        prev += list(x[:-1])
        nxt += list(x[1:])
    prev, nxt = np.array(prev), torch.tensor(nxt)
    r_pop = target_ranks(torch.tensor(np.tile(pop, (len(nxt), 1))), nxt)
    r_co = target_ranks(torch.tensor(co[prev] + pop / (pop.max() + 1)), nxt)
    return {
        "pop": metrics_from_ranks(r_pop, (20,))["recall@20"],
        "co": metrics_from_ranks(r_co, (20,))["recall@20"],
        "n": len(nxt),
    }


# Parameters of the learning tests (CPU here, CUDA graph with dropout further down).
LEARN = dict(
    layers=[64],
    batch_size=32,
    n_sample=128,
    learning_rate=0.1,
    momentum=0.2,
    logq=1.0,
    dropout_p_hidden=0.2,
    n_epochs=3,
)


def test_learns_beats_pop_and_cooccurrence(synth):
    tr, te = synth
    base = _baselines(tr, te)
    ck = train(tr, LEARN, device="cpu", seed=1, progress=False)
    m = evaluate(ck.model, ck.items, te, cutoffs=(20,))
    assert m["n"] == base["n"] > 500
    assert m["recall@20"] > base["co"] + 0.03, (m, base)
    assert m["recall@20"] > base["pop"] + 0.15, (m, base)
    hist = ck.info["history"]
    assert [h["epoch"] for h in hist] == [1, 2, 3] and hist[-1]["loss"] < hist[0]["loss"]


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"loss": "bpr-max", "logq": 0.0, "elu_param": 0.5, "bpreg": 1.0},
        {"loss": "top1-max", "logq": 0.0},
        {"loss": "bpr", "logq": 0.0, "elu_param": 0.0},
        {"loss": "top1", "logq": 0.0},
        {"constrained_embedding": False, "embedding": 8},
        {"constrained_embedding": False, "layers": [12, 10]},
        {"optimizer": "adam", "momentum": 0.0, "learning_rate": 0.01},
        {"n_sample": 0},
    ],
)
def test_every_option_trains_and_writes_valid_history(tiny, tmp_path, overrides):
    tr, te = tiny
    out = tmp_path / "m.pt"
    ck = train(tr, {**SMALL, **overrides}, valid_events=te, device="cpu", seed=3, progress=False, out=out)
    loaded = checkpoint.load(out)
    assert loaded.params == TrainConfig(**{**SMALL, **overrides}).to_dict()
    assert len(loaded.items) == len(ck.items)
    for h in loaded.info["history"]:
        assert set(h) >= {"epoch", "loss", "seconds", "events_per_s", "recall@20", "mrr@20"}
        assert np.isfinite(h["loss"]) and 0 <= h["recall@20"] <= 1
    for k, v in ck.model.state_dict().items():
        assert torch.equal(v.cpu(), loaded.model.state_dict()[k])


def _weights(ck):
    return {k: v.detach().cpu().clone() for k, v in ck.model.state_dict().items()}


def test_deterministic_on_cpu_and_resume_equals_uninterrupted(tiny, tmp_path):
    tr, _ = tiny
    a = _weights(train(tr, SMALL, device="cpu", seed=7, progress=False, out=tmp_path / "a.pt"))
    b = _weights(train(tr, SMALL, device="cpu", seed=7, progress=False))
    c = _weights(train(tr, SMALL, device="cpu", seed=8, progress=False))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    # interrupted after epoch 1 (store exhausted mid-epoch: store_size 100 / n_sample 16 = 6 rows)
    part = tmp_path / "part.pt"
    train(tr, {**SMALL, "n_epochs": 1}, device="cpu", seed=7, progress=False, out=part)
    assert checkpoint.load(part).train_state["epoch"] == 1
    r = _weights(train(tr, SMALL, device="cpu", seed=7, progress=False, out=part, resume=True))
    assert all(torch.equal(a[k], r[k]) for k in a)
    assert [h["epoch"] for h in checkpoint.load(part).info["history"]] == [1, 2]


def test_resume_refuses_other_data_or_params(tiny, tmp_path):
    tr, _ = tiny
    out = tmp_path / "m.pt"
    train(tr, {**SMALL, "n_epochs": 1}, device="cpu", seed=1, progress=False, out=out)
    with pytest.raises(UserError, match="different data"):
        train(tr.head(1000), SMALL, device="cpu", seed=1, progress=False, out=out, resume=True)
    with pytest.raises(UserError, match="learning_rate differs"):
        train(tr, {**SMALL, "learning_rate": 0.3}, device="cpu", seed=1, progress=False, out=out, resume=True)


def test_nan_loss_aborts_with_clear_error(tiny):
    with pytest.raises(UserError, match="diverged"):
        train(tiny[0], {**SMALL, "learning_rate": 1e30, "n_epochs": 1}, device="cpu", progress=False)


# -- parameters ------------------------------------------------------------------------------------
def test_presets_are_the_official_best_parameters():
    r = resolve("rsc15")
    assert (r.loss, r.layers, r.batch_size, r.dropout_p_embed, r.dropout_p_hidden) == (
        "cross-entropy",
        [100],
        32,
        0.0,
        0.4,
    )
    assert (r.learning_rate, r.momentum, r.sample_alpha, r.logq, r.n_sample, r.n_epochs) == (
        0.2,
        0.2,
        0.5,
        1.0,
        2048,
        10,
    )
    d = resolve("diginetica")
    assert (d.loss, d.layers, d.batch_size, d.dropout_p_embed, d.dropout_p_hidden) == (
        "bpr-max",
        [512],
        128,
        0.5,
        0.3,
    )
    assert (d.learning_rate, d.momentum, d.sample_alpha, d.bpreg, d.elu_param, d.logq) == (
        0.05,
        0.15,
        0.3,
        0.9,
        1.0,
        0.0,
    )
    assert set(PRESETS) >= {"rsc15", "yoochoose", "diginetica", "retailrocket", "rees46", "coveo", "demo"}
    for name in PRESETS:
        resolve(name)  # every preset validates


def test_precedence_preset_toml_pairs(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text("layers = [200, 100]\nlearning_rate = 0.3\nmomentum = 0.1\n")
    cfg = resolve("rsc15", f, ["momentum=0.05", "layers=64,32"], {"n_epochs": 3})
    assert cfg.layers == [64, 32] and cfg.learning_rate == 0.3 and cfg.momentum == 0.05 and cfg.n_epochs == 3
    assert cfg.batch_size == 32  # from the preset
    assert parse_pairs(["constrained_embedding=false", "layers=[8]"]) == {
        "constrained_embedding": False,
        "layers": [8],
    }


@pytest.mark.parametrize(
    "pairs,match",
    [
        (["learnig_rate=0.1"], "unknown parameter 'learnig_rate'"),
        (["batch_size=abc"], "batch_size: expected an integer"),
        (["layers=a,b"], "layers: expected a list"),
        (["constrained_embedding=maybe"], "expected true/false"),
        (["loss=hinge"], "unknown loss"),
        (["dropout_p_hidden=1.0"], "drop probability"),
        (["embedding=32"], "needs constrained_embedding=false"),
        (["loss=bpr-max", "logq=1"], "cross-entropy only"),
        (["optimizer=adam", "momentum=0.5"], "Adagrad option"),
        (["n_sample=0", "batch_size=1"], "must be >= 2"),
        (["novalue"], "expected key=value"),
        (["learning_rate=nan"], "learning_rate: must be a finite number"),
        (["sample_alpha=inf"], "sample_alpha: must be a finite number"),
    ],
)
def test_bad_parameters_are_user_errors(pairs, match):
    with pytest.raises(UserError, match=match):
        resolve(None, None, pairs)


def test_toml_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("batch_size = '64'\n")
    with pytest.raises(UserError, match="bad.toml: parameter batch_size: expected an integer"):
        resolve(None, bad)
    bad.write_text("batch_size = \n")
    with pytest.raises(UserError, match="not valid TOML"):
        resolve(None, bad)
    with pytest.raises(UserError, match="not found"):
        resolve(None, tmp_path / "none.toml")


def test_dwell_boost_repeats_by_dwell_time():
    ev = pl.DataFrame(
        {"session_id": [1, 1, 1, 2, 2], "item_id": [5, 6, 7, 8, 9], "time": [0, 100, 130, 0, 10]}
    )
    out = boost(ev, 30.0, 3)
    # dwell 100 -> 1 + 3 = 4 capped at 3; dwell 30 -> 2; last events and dwell 10 -> 1
    assert out["item_id"].to_list() == [5, 5, 5, 6, 6, 7, 8, 9]
    assert boost(ev, 0.0, 3).equals(ev)


# -- CLI -------------------------------------------------------------------------------------------
def test_cli_trains_and_reports_device(tiny, tmp_path, cli):
    tr, te = tiny
    tr.write_parquet(tmp_path / "tr.parquet")
    te.write_parquet(tmp_path / "te.parquet")
    toml = tmp_path / "p.toml"
    toml.write_text("layers = [16]\nbatch_size = 8\nn_sample = 16\n")
    proc = cli(
        "train",
        tmp_path / "tr.parquet",
        "--valid",
        tmp_path / "te.parquet",
        "--out",
        tmp_path / "m.pt",
        "--params",
        toml,
        "-p",
        "learning_rate=0.1",
        "--epochs",
        "2",
        "--device",
        "cpu",
        "--seed",
        "3",
        "--threads",
        "1",
    )
    assert proc.returncode == 0, proc.stderr
    assert "device: cpu" in proc.stderr and "Recall@20" in proc.stderr and "done: 2 epochs" in proc.stderr
    ck = checkpoint.load(tmp_path / "m.pt")
    assert ck.params["learning_rate"] == 0.1 and ck.params["n_epochs"] == 2 and len(ck.info["history"]) == 2


@pytest.mark.parametrize(
    "args,match",
    [
        (["-p", "bogus=1"], "unknown parameter 'bogus'"),
        (["--preset", "nope"], "unknown preset"),
        (["--device", "cuda"] if not torch.cuda.is_available() else ["-p", "layers=0"], "error:"),
    ],
)
def test_cli_user_errors_are_one_line(tiny, tmp_path, cli, args, match):
    tiny[0].write_parquet(tmp_path / "tr.parquet")
    proc = cli("train", tmp_path / "tr.parquet", "--out", tmp_path / "m.pt", *args)
    assert proc.returncode == 2
    assert (
        proc.stderr.startswith("error:")
        and match in proc.stderr
        and len(proc.stderr.strip().splitlines()) == 1
    )


def test_cli_refusals_come_before_training_and_touch_nothing(tiny, tmp_path, run):
    tr, te = tiny
    train_file = tmp_path / "tr.parquet"
    tr.write_parquet(train_file)
    te.with_columns(pl.col("item_id") + 10**6).write_parquet(tmp_path / "unseen.parquet")
    before = train_file.read_bytes()
    cases = {
        "out is a folder": (["--out", tmp_path], "is a directory"),
        "out is the training file": (["--out", train_file], "overwrite an input"),
        "unknown device": (["--out", tmp_path / "m.pt", "--device", "tpu"], "unsupported device"),
        "seed out of range": (["--out", tmp_path / "m.pt", "--seed", str(2**64)], "--seed"),
        "no threads": (["--out", tmp_path / "m.pt", "--threads", "0"], "--threads"),
        "nothing to validate": (
            ["--out", tmp_path / "m.pt", "--valid", tmp_path / "unseen.parquet"],
            "no event to predict",
        ),
    }
    for case, (args, needle) in cases.items():
        code, _, err = run("train", train_file, "--device", "cpu", "-p", "layers=8", *args)
        assert code == 2 and err.startswith("error:") and needle in err, (case, err)
        assert len(err.strip().splitlines()) == 1, (case, err)
    assert train_file.read_bytes() == before and not (tmp_path / "m.pt").exists()


def test_resume_of_a_finished_run_says_so_and_keeps_the_file(tiny, tmp_path, run):
    tiny[0].write_parquet(tmp_path / "tr.parquet")
    args = ("train", tmp_path / "tr.parquet", "--out", tmp_path / "m.pt", "--device", "cpu", "--epochs", "1")
    assert run(*args, "-p", "layers=8", "-p", "n_sample=16")[0] == 0
    saved = (tmp_path / "m.pt").read_bytes()
    code, _, err = run(*args, "-p", "layers=8", "-p", "n_sample=16", "--resume")
    assert code == 0 and "nothing to do" in err and "model saved" not in err
    assert (tmp_path / "m.pt").read_bytes() == saved


def test_bench_train_refuses_unknown_datasets(tmp_path, run):
    (tmp_path / "a").mkdir()
    code, _, err = run(
        "bench", "train", "--data-dir", tmp_path, "--datasets", "a,typo", "--out", tmp_path / "b.json"
    )
    assert code == 2 and "no a/train.parquet, typo/train.parquet" in err
    assert not (tmp_path / "b.json").exists()


def test_bench_train_preset_runs_and_threads(tiny, tmp_path, run):
    """--preset trains every dataset with one preset; --runs gives one record per seed."""
    tr, te = tiny
    (tmp_path / "d").mkdir()
    tr.write_parquet(tmp_path / "d" / "train.parquet")
    te.write_parquet(tmp_path / "d" / "test.parquet")
    args = ("bench", "train", "--data-dir", tmp_path, "--datasets", "d", "--device", "cpu", "--epochs", "1")
    small = ("-p", "layers=8", "-p", "n_sample=16", "-p", "batch_size=8")
    out = tmp_path / "b.json"
    code, _, err = run(*args, "--preset", "demo", "--runs", "2", "--threads", "1", *small, "--out", out)
    assert code == 0, err
    runs = json.loads(out.read_text())["runs"]
    assert [(r["dataset"], r["preset"], r["seed"]) for r in runs] == [("d", "demo", 42), ("d", "demo", 43)]
    assert runs[0]["params"]["learning_rate"] == PRESETS["demo"]["learning_rate"]
    assert runs[0]["params"]["layers"] == [8] and len(runs[0]["events_per_s"]) == 1
    code, _, err = run(*args, "--preset", "nope", "--out", tmp_path / "c.json")
    assert code == 2 and "unknown preset" in err and not (tmp_path / "c.json").exists()


def test_cli_missing_file(tmp_path, cli):
    proc = cli("train", tmp_path / "none.parquet", "--out", tmp_path / "m.pt")
    assert proc.returncode == 2 and "not found" in proc.stderr


# -- GPU (run on the GPU machine: pytest -m gpu tests/test_train.py) ---------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("loss", ["cross-entropy", "bpr-max"])
def test_cuda_graph_path_equals_eager_path(synth, loss):
    tr, te = synth
    # A short run: atomics (index_add_) sum in varying order on the GPU, and over thousands of
    # steps those last-bit differences grow chaotically; a few hundred steps stay within 1e-4.
    tr = tr.filter(pl.col("session_id").is_in(tr["session_id"].unique().sort().head(600).implode()))
    p = dict(
        layers=[32],
        batch_size=16,
        n_sample=64,
        n_epochs=2,
        learning_rate=0.1,
        momentum=0.2,
        sample_store_size=64 * 50,
    )  # store redrawn mid-epoch, under the graph
    p.update({"loss": loss, "logq": 1.0 if loss == "cross-entropy" else 0.0})
    eager = train(tr, {**p, "cuda_graph": False}, device="cuda", seed=2, progress=False)
    graph = train(tr, {**p, "cuda_graph": True}, device="cuda", seed=2, progress=False)
    for k, v in _weights(eager).items():  # only atomics' summation order may differ
        torch.testing.assert_close(_weights(graph)[k], v, rtol=1e-4, atol=1e-5)
    me = evaluate(eager.model, eager.items, te, cutoffs=(20,))
    mg = evaluate(graph.model, graph.items, te, cutoffs=(20,))
    assert abs(me["recall@20"] - mg["recall@20"]) < 0.01


@pytest.mark.gpu
def test_cuda_graph_with_dropout_learns(synth):
    tr, te = synth
    base = _baselines(tr, te)
    ck = train(tr, {**LEARN, "dropout_p_embed": 0.1}, device="cuda", seed=1, progress=False)
    m = evaluate(ck.model, ck.items, te, cutoffs=(20,))
    assert m["recall@20"] > base["co"] + 0.03, (m, base)
