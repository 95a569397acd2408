"""Ranks and metrics against brute-force Python loops, with ties, in all three tie modes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gru4rec.metrics import TIE_MODES, RankAccumulator, metrics_from_ranks, ranks_from_counts, target_ranks


def loop_rank(row: list[float], target: int, mode: str) -> float:
    s = row[target]
    greater = sum(1 for v in row if v > s)
    equal = sum(1 for v in row if v == s)  # includes the target
    return {
        "standard": 1 + greater,
        "conservative": greater + equal,
        "median": 1 + greater + (equal - 1) / 2,
    }[mode]


def loop_metrics(ranks: list[float], cutoffs) -> dict:
    out = {}
    for k in cutoffs:
        out[f"recall@{k}"] = sum(1 for r in ranks if r <= k) / len(ranks)
        out[f"mrr@{k}"] = sum(1 / r for r in ranks if r <= k) / len(ranks)
    return out


def tied_scores(seed: int, b: int = 64, n: int = 50):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, (b, n)).astype(np.float32)  # few distinct values: ties everywhere
    scores[: b // 4] = rng.normal(size=(b // 4, n))  # and some rows without ties
    scores[-1] = 1.0  # one row all equal
    targets = rng.integers(0, n, b)
    return scores, targets


@pytest.mark.parametrize("mode", TIE_MODES)
def test_target_ranks_match_loop(mode):
    scores, targets = tied_scores(0)
    got = target_ranks(torch.from_numpy(scores), torch.from_numpy(targets), mode)
    want = [loop_rank(scores[b].tolist(), int(targets[b]), mode) for b in range(len(targets))]
    assert got.dtype == torch.float64 and got.tolist() == want
    assert got[-1].item() == {"standard": 1, "conservative": 50, "median": 25.5}[mode]


@pytest.mark.parametrize("mode", TIE_MODES)
def test_ranks_from_counts_match_loop(mode):
    scores, targets = tied_scores(1)
    n_greater = [sum(v > row[t] for v in row) for row, t in zip(scores.tolist(), targets, strict=True)]
    n_equal = [sum(v == row[t] for v in row) for row, t in zip(scores.tolist(), targets, strict=True)]
    got = ranks_from_counts(np.array(n_greater, dtype=np.int64), np.array(n_equal, dtype=np.int64), mode)
    want = [loop_rank(row, int(t), mode) for row, t in zip(scores.tolist(), targets, strict=True)]
    assert got.tolist() == want


def test_tie_modes_order_and_agree_without_ties():
    scores, targets = tied_scores(2)
    s, t = torch.from_numpy(scores), torch.from_numpy(targets)
    std, med, con = (target_ranks(s, t, m) for m in ("standard", "median", "conservative"))
    assert bool((std <= med).all() and (med <= con).all()) and bool((std < con).any())
    no_ties = slice(0, 16)
    assert std[no_ties].tolist() == con[no_ties].tolist() == med[no_ties].tolist()


def test_unknown_mode():
    with pytest.raises(ValueError, match="unknown tie mode"):
        target_ranks(torch.zeros(1, 3), torch.zeros(1, dtype=torch.long), "optimistic")
    with pytest.raises(ValueError, match="unknown tie mode"):
        ranks_from_counts([0], [1], "optimistic")


@pytest.mark.parametrize("mode", TIE_MODES)
def test_accumulator_streams_to_loop_metrics(mode):
    cutoffs = (1, 3, 5, 20)
    acc = RankAccumulator(cutoffs)
    all_ranks = []
    for seed in range(4):  # several batches, torch and numpy inputs
        scores, targets = tied_scores(seed, b=40, n=30)
        ranks = target_ranks(torch.from_numpy(scores), torch.from_numpy(targets), mode)
        acc.add(ranks if seed % 2 else ranks.numpy())
        all_ranks += [loop_rank(r, int(t), mode) for r, t in zip(scores.tolist(), targets, strict=True)]
    got = acc.result()
    want = loop_metrics(all_ranks, cutoffs)
    assert got["n"] == len(all_ranks) == 160
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
    assert got["recall@1"] == got["mrr@1"]
    assert metrics_from_ranks(all_ranks, cutoffs) == pytest.approx(got)


def test_hand_values_and_empty():
    m = metrics_from_ranks([1, 2, 2.5, 21], cutoffs=(2, 20))
    assert m["recall@2"] == 0.5 and m["mrr@2"] == pytest.approx((1 + 0.5) / 4)
    assert m["recall@20"] == 0.75 and m["mrr@20"] == pytest.approx((1 + 0.5 + 0.4) / 4)
    empty = RankAccumulator((5,)).result()
    assert empty["n"] == 0 and math.isnan(empty["recall@5"])
    assert RankAccumulator((20, 5, 5)).cutoffs == (5, 20)


@pytest.mark.parametrize("mode", TIE_MODES)
def test_merged_accumulators_equal_one_pass_over_everything(mode):
    """Accumulators of disjoint parts, merged (also through their plain-data state), give the loop's
    metrics over the whole: sums are merged, not averages."""
    rng = np.random.default_rng(4)
    g, e = rng.integers(0, 40, 3000), rng.integers(1, 4, 3000)
    ranks = ranks_from_counts(g, e, mode)
    cutoffs = (1, 5, 10, 20)
    cuts = np.sort(rng.choice(np.arange(1, 3000), 6, replace=False))
    parts = []
    for part in np.split(ranks, cuts):
        acc = RankAccumulator(cutoffs)
        acc.add(part)
        parts.append(RankAccumulator.from_state(acc.state()))
    merged = parts[0]
    for acc in parts[1:]:
        merged.merge(acc)
    expected = loop_metrics(ranks.tolist(), cutoffs)
    got = merged.result()
    assert got["n"] == 3000
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12, rel=0), key
    for k in cutoffs:  # NDCG (one relevant item): 1/log2(rank + 1) within the cut-off, by a plain loop
        ndcg = sum(1 / math.log2(r + 1) for r in ranks.tolist() if r <= k) / len(ranks)
        assert got[f"ndcg@{k}"] == pytest.approx(ndcg, abs=1e-12, rel=0), k
    with pytest.raises(ValueError):
        merged.merge(RankAccumulator((1, 5)))
