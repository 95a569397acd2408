"""NDCG@k, coverage@k and popularity@k against brute-force loops over every score of every prediction.

The reference scores come from the PyTorch model one session at a time (test_replay.brute_force_counts);
the metrics under test come from the ONNX scorer's streamed top-k lists and exact ranks.
"""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest
from test_replay import brute_force_counts, make_model, random_events
from test_score import export_model

from gru4rec.items import ItemMap
from gru4rec.metrics import metrics_from_ranks
from gru4rec.score.scorer import ScoreConfig, score

N_ITEMS, TOP_K = 40, 10
IDS = np.arange(5000, 5000 + N_ITEMS, dtype=np.int64)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("beyond")
    model = make_model(N_ITEMS, seed=5)  # no tied items: every top-k list is unambiguous
    onnx = export_model(model, ItemMap(IDS), root, TOP_K)
    events = random_events(120, N_ITEMS, seed=6).with_columns(pl.col("item_id") - 1000 + 5000)
    events.write_parquet(root / "test.parquet")
    # training events: item popularity skewed, some items never seen (popularity 0)
    rng = np.random.default_rng(1)
    train_items = IDS[np.minimum(rng.zipf(1.5, 3000) - 1, N_ITEMS - 6)]
    pl.DataFrame(
        {"session_id": np.arange(3000) // 3, "item_id": train_items, "time": np.arange(3000)}
    ).write_parquet(root / "train.parquet")
    return root, model, onnx, events, train_items


def loop_ndcg(ranks, k):
    return sum(1 / math.log2(r + 1) for r in ranks if r <= k) / len(ranks)


@pytest.mark.parametrize("mode", ["standard", "conservative", "median"])
def test_ndcg_matches_loop_on_tied_ranks(mode):
    rng = np.random.default_rng(3)
    g, e = rng.integers(0, 30, 500), rng.integers(1, 6, 500)
    ranks = {"standard": g + 1, "conservative": g + e, "median": g + 1 + (e - 1) / 2}[mode].astype(float)
    got = metrics_from_ranks(ranks, cutoffs=(1, 5, 20))
    for k in (1, 5, 20):
        assert got[f"ndcg@{k}"] == pytest.approx(loop_ndcg(list(ranks), k), abs=1e-12)
    assert got["ndcg@1"] == got["recall@1"]  # rank 1 counts 1/log2(2) = 1


def test_scorer_ndcg_coverage_popularity_match_brute_force(setup, tmp_path):
    root, model, onnx, events, train_items = setup
    ref = brute_force_counts(model, IDS, events)
    cutoffs = (1, 5, 10, 20)
    report = score(onnx, root / "test.parquet", config=ScoreConfig(cutoffs=cutoffs, batch_size=16,
                   beyond_accuracy=True), provider="cpu", train=root / "train.parquet")  # fmt: skip
    m = report["metrics"]
    ranks = [g + 1 for g, *_ in ref.values()]
    counts = {int(i): 0 for i in IDS}
    for i in train_items:
        counts[int(i)] += 1
    top = max(counts.values())
    for k in cutoffs:
        assert m[f"ndcg@{k}"] == pytest.approx(loop_ndcg(ranks, k), abs=1e-9)
    for k in (1, 5, 10):  # beyond accuracy: cut-offs up to the model's top-k only
        recommended, pops = set(), []
        for *_, scores in ref.values():
            best = sorted(range(N_ITEMS), key=lambda j: -scores[j])[:k]
            recommended.update(best)
            pops.append(sum(counts[int(IDS[j])] / top for j in best) / k)
        assert m[f"coverage@{k}"] == pytest.approx(len(recommended) / N_ITEMS, abs=1e-12)
        assert m[f"popularity@{k}"] == pytest.approx(sum(pops) / len(pops), abs=1e-9)
    assert "coverage@20" not in m and 0 < m["coverage@1"] < m["coverage@10"] <= 1


def test_cli_beyond_accuracy_ranks_only_path(setup, tmp_path, run):
    """Without --out (the ranks-only path) --beyond-accuracy still produces the top-k lists it needs."""
    root, *_ = setup
    out = tmp_path / "m.json"
    code, stdout, err = run("score", "--model", root / "m.onnx", "--sessions", root / "test.parquet",
                            "--metrics", out, "--beyond-accuracy", "--provider", "cpu")  # fmt: skip
    assert code == 0, err
    doc = json.loads(out.read_text())["metrics"]
    assert {"coverage@1", "coverage@5", "coverage@10"} <= set(doc) and "popularity@10" not in doc
    assert "Coverage" in stdout
    code, _, err = run("score", "--model", root / "m.onnx", "--sessions", root / "test.parquet",
                       "--train", root / "train.parquet")  # fmt: skip
    assert code == 2 and "add --beyond-accuracy" in err
