"""gru4rec.evaluate (session-parallel replay) against a one-session-at-a-time brute-force loop."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from gru4rec.evaluate import evaluate
from gru4rec.items import ItemMap
from gru4rec.model import GRU4Rec, ModelConfig


def _events(n_sessions: int, n_items: int, seed: int) -> pl.DataFrame:
    g = np.random.default_rng(seed)
    rows = []
    for s in range(n_sessions):
        start = int(g.integers(0, 1000))
        for p in range(int(g.integers(1, 9))):
            rows.append(
                (s * 7 + 1, int(g.integers(0, n_items + 5)) * 10, start + p)
            )  # ids >= n_items*10 unknown
    return pl.DataFrame(rows, schema=["session_id", "item_id", "time"], orient="row")


def _brute_force(model: GRU4Rec, items: ItemMap, events: pl.DataFrame):
    """Sessions one by one from a zero state; unknown events removed; rank = 1 + #(score > target)."""
    pos = {int(i): k for k, i in enumerate(items.ids)}
    ranks, dropped = [], 0
    model.eval()
    with torch.no_grad():
        for _, sess in events.sort(["session_id", "time"]).group_by("session_id", maintain_order=True):
            seq = [pos[i] for i in sess["item_id"].to_list() if i in pos]
            dropped += sess.height - len(seq)
            hidden = [torch.zeros(1, h) for h in model.cfg.layers]
            for a, b in zip(seq[:-1], seq[1:]):
                scores, hidden = model(torch.tensor([a]), hidden)
                s = scores[0].numpy().astype(np.float64)
                ranks.append(1 + int((s > s[b]).sum()))
    return np.array(ranks, dtype=np.float64), dropped


@pytest.mark.parametrize(
    "mode_cfg",
    [
        dict(layers=[16]),
        dict(layers=[12, 8], constrained_embedding=False, embedding=6),
        dict(layers=[10], constrained_embedding=False, embedding=0),
    ],
)
@pytest.mark.parametrize("batch", [4, 512])
def test_replay_matches_one_session_at_a_time(mode_cfg, batch):
    n_items = 40
    items = ItemMap(np.arange(n_items, dtype=np.int64) * 10)
    model = GRU4Rec(ModelConfig(n_items=n_items, **mode_cfg), seed=3)
    with torch.no_grad():  # make the model non-trivial (init alone gives near-equal scores)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    events = _events(60, n_items, seed=batch)
    got = evaluate(model, items, events, batch_size=batch, cutoffs=(1, 5, 20))
    ranks, dropped = _brute_force(model, items, events)
    assert got["n"] == len(ranks) > 50
    assert got["n_unknown_dropped"] == dropped > 0
    for k in (1, 5, 20):
        assert got[f"recall@{k}"] == pytest.approx(float(np.mean(ranks <= k)), abs=1e-12)
        assert got[f"mrr@{k}"] == pytest.approx(float(np.mean((ranks <= k) / ranks)), abs=1e-12)


def test_tie_modes_and_training_flag_restored():
    n_items = 30
    items = ItemMap(np.arange(n_items, dtype=np.int64))
    model = GRU4Rec(ModelConfig(n_items=n_items, layers=[8]), seed=1)
    with torch.no_grad():
        model.Wy.zero_()  # every score equal: standard rank 1, conservative rank N
    model.train()
    events = pl.DataFrame(
        {"session_id": [1, 1, 1, 2, 2], "item_id": [3, 4, 5, 6, 7], "time": [1, 2, 3, 1, 2]}
    )
    std = evaluate(model, items, events, cutoffs=(1, 30))
    cons = evaluate(model, items, events, cutoffs=(1, 30), mode="conservative")
    assert std["recall@1"] == 1.0 and std["n"] == 3
    assert cons["recall@1"] == 0.0 and cons["mrr@30"] == pytest.approx(1 / 30)
    assert model.training
