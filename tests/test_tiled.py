"""Scoring in tiles of items (score/tiled.py): the same counts and top-k as a brute-force reference
and as the untiled eval graph, ties and tile boundaries inside tie groups included."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch
from test_replay import assert_metrics_equal, make_model, random_events, reference_metrics
from test_score import IDS, N_ITEMS, TOP_K, export_model

from gru4rec.bundle import load_bundle
from gru4rec.data import read_events
from gru4rec.errors import UserError
from gru4rec.items import ItemMap
from gru4rec.model import GRU4Rec, ModelConfig
from gru4rec.score.ort_backend import OrtBackend, make_session
from gru4rec.score.replay import plan_chunk, replay
from gru4rec.score.scorer import ScoreConfig, score
from gru4rec.score.tiled import (
    CELL_BYTES,
    MIN_TILE,
    TILE_CELLS,
    UNTILED_CELLS,
    TiledOrtBackend,
    parse_bytes,
    plan_memory,
    run_tiles,
    tile_graph,
)


def brute_force_tile_reference(x, W, bias, targets, k):
    """float64 scores (exact: small integers), counts by direct comparison, top-k by (score desc, index asc)."""
    s = x.astype(np.float64) @ W.T.astype(np.float64) + bias
    t = s[np.arange(len(x)), targets][:, None]
    order = np.lexsort((np.broadcast_to(np.arange(W.shape[0]), s.shape), -s), axis=1)[:, :k]
    return (s > t).sum(1), (s == t).sum(1), order, np.take_along_axis(s, order, 1)


@pytest.mark.parametrize("tile", [5, 7, 16, 33, 64, 100])
def test_tile_graph_counts_and_topk_equal_brute_force_with_ties(tile):
    """Integer weights, so every score is exact and many tie; tiles of 7 split the tie groups."""
    rng = np.random.default_rng(tile)
    b, h, n, k = 40, 6, 100, 5
    x = rng.integers(-2, 3, (b, h)).astype(np.float32)
    W = rng.integers(-1, 2, (n, h)).astype(np.float32)
    W[10:30] = W[10]  # a tie group across several tile boundaries
    bias = rng.integers(-1, 2, n).astype(np.float32)
    bias[10:30] = bias[10]
    targets = rng.integers(0, n, b)
    targets[:10] = rng.integers(10, 30, 10)  # targets inside the tie group
    gt, eq, top_i, top_v = brute_force_tile_reference(x, W, bias, targets, k)
    assert (eq > 5).sum() >= 10  # ties are really there

    session = make_session(tile_graph(1, with_topk=True).SerializeToString(), "tile", "cpu")
    out = run_tiles(session, x, targets, W, bias, tile, k, with_topk=True)
    np.testing.assert_array_equal(out.n_greater, gt)
    np.testing.assert_array_equal(out.n_equal, eq)
    np.testing.assert_array_equal(out.topk_idx, top_i)  # ties: the lower item index first
    np.testing.assert_array_equal(out.topk_scores, top_v)


def test_a_wrong_merge_would_be_caught():
    """The reference is not the code under test: a top-k that breaks ties by the higher index differs."""
    x = np.ones((1, 2), np.float32)
    W, bias = np.zeros((12, 2), np.float32), np.zeros(12, np.float32)
    _, _, top_i, _ = brute_force_tile_reference(x, W, bias, np.array([0]), 3)
    assert top_i.tolist() == [[0, 1, 2]]
    session = make_session(tile_graph(1, with_topk=True).SerializeToString(), "tile", "cpu")
    out = run_tiles(session, x, np.array([0]), W, bias, 5, 3, with_topk=True)
    assert out.topk_idx.tolist() == [[0, 1, 2]] and out.n_equal.tolist() == [12]


# ---------------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("mode", ["standard", "conservative", "median"])
def test_tiled_metrics_equal_brute_force_in_every_tie_mode(tiny, tiny_reference, mode):
    cfg = ScoreConfig(
        tie_mode=mode, batch_size=32, tile_items=TOP_K
    )  # tile boundary at item 10, inside 0..11
    report = score(tiny["onnx"], tiny["sessions"], config=cfg, provider="cpu")
    assert report["latency"]["provider"] == "ort-cpu-tiled" and report["memory"]["n_tiles"] == 6
    assert_metrics_equal(report["metrics"], reference_metrics(tiny_reference, mode))


def test_tiled_recommendations_equal_untiled(tiny, tmp_path):
    runs = {}
    for tile in (0, TOP_K, 23):
        out = tmp_path / f"recs{tile}.parquet"
        score(tiny["onnx"], tiny["sessions"], out=out, config=ScoreConfig(batch_size=16, tile_items=tile),
              provider="cpu")  # fmt: skip
        runs[tile] = pl.read_parquet(out)
    assert runs[0].height > 500
    for tile in (TOP_K, 23):
        assert runs[tile].equals(runs[0]), tile


def replay_both(onnx_path: str, events: pl.DataFrame, tile: int, batch: int = 24):
    bundle = load_bundle(onnx_path)
    known, _ = bundle.items.translate(events)
    plan = plan_chunk(known, batch)
    results = []
    for backend in (OrtBackend.from_bundle(bundle, "cpu"), TiledOrtBackend.from_bundle(bundle, tile, "cpu")):
        backend.start(batch)
        results.append(replay(backend, plan, fetch_topk=True))
    return results


def model_variant(kind: str, n_items: int) -> GRU4Rec:
    layers = {"unequal": [12, 8]}.get(kind, [16])
    embedding = {"separate": {"embedding": 8, "constrained_embedding": False},
                 "onehot": {"embedding": 0, "constrained_embedding": False}}.get(kind, {})  # fmt: skip
    model = GRU4Rec(ModelConfig(n_items=n_items, layers=layers, **embedding), seed=3)
    assert model.cfg.mode == (kind if kind in ("separate", "onehot") else "shared")
    with torch.no_grad():
        model.Wy.mul_(4)
        model.By.uniform_(-1, 1, generator=torch.Generator().manual_seed(1))
    return model.eval()


@pytest.mark.parametrize(
    "kind, export",
    [
        ("shared", {}),
        ("separate", {}),
        ("onehot", {}),
        ("unequal", {}),
        ("shared", {"fp16": True}),
        ("shared", {"count_block": 16, "topk_chunks": 4}),
    ],  # fmt: skip
)
def test_tiled_backend_is_bit_identical_to_the_eval_graph(kind, export, tmp_path):
    model = model_variant(kind, N_ITEMS)
    onnx_path = export_model(model, ItemMap(IDS), tmp_path, TOP_K, **export)
    base, tiled = replay_both(onnx_path, random_events(80, N_ITEMS, seed=4), tile=13)
    for name in ("n_greater", "n_equal"):  # the ranks: to the last bit
        np.testing.assert_array_equal(getattr(tiled, name), getattr(base, name), err_msg=name)
    if export.get("fp16"):
        # The untiled graph on the CPU EP ranks its top-k by unrounded float32 scores (ONNX Runtime
        # drops the float16 cast pair around TopK); the tiles rank the float16 scores the counts use.
        np.testing.assert_allclose(tiled.topk_scores, base.topk_scores, rtol=2e-3, atol=2e-3)
        same = [len(set(a) & set(b)) for a, b in zip(tiled.topk_idx, base.topk_idx)]
        assert np.mean(same) / TOP_K > 0.98
        assert np.array_equal(tiled.topk_scores, tiled.topk_scores.astype(np.float16).astype(np.float32))
    else:
        np.testing.assert_array_equal(tiled.topk_idx, base.topk_idx)
        np.testing.assert_array_equal(tiled.topk_scores, base.topk_scores)


@pytest.mark.parametrize("dataset", ["rsc15_100k", "diginetica"])
def test_tiled_ranks_identical_on_shared_data(shared_data, tmp_path, dataset):
    train = read_events(shared_data / dataset / "train.parquet")
    test_path = shared_data / dataset / "test.parquet"
    items = ItemMap.from_events(train)
    model = make_model(len(items), hidden=32, seed=11)
    onnx_path = export_model(model, items, tmp_path, top_k=20)
    recs = {}
    for tile in (0, 1000):
        out = tmp_path / f"recs{tile}.parquet"
        report = score(onnx_path, test_path, out=out, config=ScoreConfig(batch_size=256, tile_items=tile),
                       provider="cpu")  # fmt: skip
        recs[tile] = pl.read_parquet(out)
    assert report["memory"]["n_tiles"] == -(-len(items) // 1000) > 1
    assert recs[0].height > 5000 and recs[1000]["rank"].equals(recs[0]["rank"])
    assert recs[1000].equals(recs[0])


# ---------------------------------------------------------------------------------------------- the budget
def test_plan_untiled_when_the_matrix_fits_else_tiles_else_smaller_batch():
    n, k = 1_000_000, 20
    fits = UNTILED_CELLS // 1024  # items of the widest matrix still scored in one pass at batch 1,024
    assert not plan_memory(fits, k, 1024, fits * 1024 * CELL_BYTES).tiled
    assert plan_memory(fits, k, 1024, fits * 1024 * CELL_BYTES - 1).tiled  # the budget is one byte short
    wide = plan_memory(fits + 1, k, 1024, 1 << 40)  # fits any budget, but past UNTILED_CELLS: tiles
    assert wide.tiled and wide.tile == TILE_CELLS // 1024 and wide.n_tiles == 3
    assert not plan_memory(fits + 1, k, 256, 1 << 40).tiled  # a narrower batch: the same cells in one pass
    assert not plan_memory(fits + 1, k, 1024, 1 << 40, tile_items=fits + 1).tiled  # asked for one pass
    plan = plan_memory(n, k, 1024, 1 << 30)
    assert plan.tiled and plan.batch == 1024 and plan.tile == TILE_CELLS // 1024  # cache-sized
    assert plan_memory(n, k, 64, 1 << 30).tile == TILE_CELLS // 64  # wider tiles for a narrower batch
    tight = plan_memory(n, k, 64, 10_000 * 64 * CELL_BYTES)
    assert tight.tile == 10_000 < TILE_CELLS // 64  # never wider than the budget allows
    small = plan_memory(n, k, 1024, 64 << 20)
    assert (
        small.tile == MIN_TILE
        and small.batch * MIN_TILE * CELL_BYTES <= 64 << 20 < 1024 * MIN_TILE * CELL_BYTES
    )
    assert plan_memory(n, k, 1024, 1 << 30, tile_items=5000).tile == 5000
    with pytest.raises(UserError, match="at least the model's top-k"):
        plan_memory(n, k, 1024, 1 << 30, tile_items=10)


def test_cuda_plan_is_untiled_with_the_batch_the_budget_allows():
    n, k = 1_000_000, 20
    row = n * CELL_BYTES
    plan = plan_memory(n, k, 1024, 40 * row + row // 2, kind="cuda")
    assert not plan.tiled and plan.tile == n and plan.batch == 40  # rows that fit, rounded down
    assert plan_memory(n, k, 16, 40 * row, kind="cuda").batch == 16  # never more than asked for
    assert "batch 40, all 1,000,000 items in one pass" in plan.describe()
    with pytest.raises(UserError, match="one row of scores over 1,000,000 items needs 23 MiB"):
        plan_memory(n, k, 1024, row - 1, kind="cuda")
    with pytest.raises(UserError, match="--tile-items: tiles run on the CPU"):
        plan_memory(n, k, 1024, 40 * row, tile_items=5000, kind="cuda")


@pytest.mark.gpu
def test_gpu_free_memory_agrees_with_cuda():
    from gru4rec.allocator import gpu_free_memory

    free, total = torch.cuda.mem_get_info(0)  # made after ours: torch's own context is in neither
    ours = gpu_free_memory()
    assert ours is not None and 0 < ours <= total and abs(ours - free) < 0.05 * total


@pytest.mark.gpu
def test_cuda_batch_from_the_budget_matches_the_reference(tiny, tiny_reference):
    budget = 3 * N_ITEMS * CELL_BYTES  # three rows of scores at a time
    report = score(tiny["onnx"], tiny["sessions"], provider="cuda",
                   config=ScoreConfig(batch_size=256, memory_budget=budget))  # fmt: skip
    assert report["memory"]["batch"] == 3 and report["memory"]["n_tiles"] == 1
    assert_metrics_equal(report["metrics"], reference_metrics(tiny_reference, "standard"))


@pytest.mark.parametrize(
    "text, value", [("512MB", 512e6), ("2GiB", 2**31), ("1.5G", 1.5e9), ("3000000", 3e6)]
)
def test_parse_bytes(text, value):
    assert parse_bytes(text) == int(value)


@pytest.mark.parametrize("text", ["lots", "12XB", "-1GB", "10KB", ""])
def test_bad_budget_is_one_clear_line(cli, tiny, text):
    res = cli("score", "--model", tiny["onnx"], "--sessions", tiny["sessions"], "--memory-budget", text)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "--memory-budget" in res.stderr, res.stderr
