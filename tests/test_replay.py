"""Replay mechanics (score/replay.py, score/source.py) and the PyTorch step backend.

References are written here, independently of the code under test: a per-session loop that
resets the state, runs the model one event at a time and ranks the target by direct comparison.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from gru4rec.batching import Sessions
from gru4rec.items import ItemMap
from gru4rec.model import GRU4Rec, ModelConfig
from gru4rec.score.replay import StepOutput, longest_first, plan_chunk, replay
from gru4rec.score.scorer import ScoreConfig, score_source
from gru4rec.score.source import SessionSource
from gru4rec.score.torch_backend import TorchBackend

CUTOFFS = (1, 5, 10, 20)


# ---------------------------------------------------------------------------------------------- helpers
def random_events(n_sessions: int, n_items: int, seed: int, max_len: int = 9) -> pl.DataFrame:
    """Sessions of 1..max_len events over item ids 1000 + 0..n_items-1, rows shuffled."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_len + 1, n_sessions)
    sid = np.repeat(rng.permutation(n_sessions) * 7 + 3, lengths)
    pos = np.concatenate([np.arange(n) for n in lengths])
    start = np.repeat(rng.integers(0, 10_000, n_sessions), lengths)
    items = 1000 + rng.integers(0, n_items, len(sid))
    df = pl.DataFrame({"session_id": sid, "item_id": items, "time": start + 10 * pos})
    return df.sample(fraction=1.0, shuffle=True, seed=seed)


def make_model(n_items: int, hidden: int = 16, seed: int = 0, tied: int = 0) -> GRU4Rec:
    """A random model; the first `tied` items get a zero output row and bias, so they tie exactly at 0."""
    model = GRU4Rec(ModelConfig(n_items=n_items, layers=[hidden]), seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.Wy.mul_(4)
        model.By.uniform_(-1, 1, generator=g)
        model.Wy[:tied] = 0
        model.By[:tied] = 0
    return model.eval()


def brute_force_counts(model: GRU4Rec, item_ids: np.ndarray, events: pl.DataFrame) -> dict:
    """{(session_id, position): (n_greater, n_equal, input id, target id, scores)} by a per-session loop.

    Unknown items are dropped as events; positions count the remaining events; state is zero at
    every session start; the target's score is compared with all N scores directly.
    """
    index = {int(i): k for k, i in enumerate(item_ids)}
    ev = events.sort(["session_id", "time"], maintain_order=True)
    out = {}
    with torch.no_grad():
        for (sid,), group in ev.group_by(["session_id"], maintain_order=True):
            seq = [index[i] for i in group["item_id"].to_list() if i in index]
            hidden = model.init_hidden(1)
            for p in range(len(seq) - 1):
                scores, hidden = model(torch.tensor([seq[p]]), hidden)
                s = scores[0]
                st = s[seq[p + 1]]
                out[(int(sid), p)] = (
                    int((s > st).sum()),
                    int((s == st).sum()),
                    seq[p],
                    seq[p + 1],
                    s.numpy().copy(),
                )
    return out


def reference_metrics(counts: dict, mode: str, cutoffs=CUTOFFS) -> dict:
    g = np.array([c[0] for c in counts.values()], dtype=np.float64)
    e = np.array([c[1] for c in counts.values()], dtype=np.float64)
    rank = {"standard": g + 1, "conservative": g + e, "median": g + 1 + (e - 1) / 2}[mode]
    res = {}
    for k in cutoffs:
        res[f"recall@{k}"] = float(np.mean(rank <= k))
        res[f"mrr@{k}"] = float(np.mean(np.where(rank <= k, 1.0 / rank, 0.0)))
    res["n"] = len(rank)
    return res


def assert_metrics_equal(got: dict, want: dict, tol: float = 1e-6) -> None:
    assert got["n"] == want["n"]
    for key, value in want.items():
        assert abs(got[key] - value) <= tol, (key, got[key], value)


def write(df: pl.DataFrame, path) -> str:
    df.write_parquet(path)
    return str(path)


# ---------------------------------------------------------------------------------------------- planning
def test_longest_first_keeps_every_session_intact():
    sessions = Sessions(
        items=np.array([1, 2, 3, 4, 5, 6, 7, 8]),
        offsets=np.array([0, 2, 3, 7, 8]),
        session_ids=np.array([10, 11, 12, 13]),
    )
    lf = longest_first(sessions)
    assert lf.session_ids.tolist() == [12, 10, 11, 13]  # by length, ties in their original order
    assert lf.offsets.tolist() == [0, 4, 6, 7, 8]
    assert lf.items.tolist() == [4, 5, 6, 7, 1, 2, 3, 8]


def active_cells(plan):
    """(step, row) of every real pair: the first n_active rows of each step, in schedule order."""
    t = np.repeat(np.arange(len(plan.width)), plan.n_active)
    return t, np.arange(len(t)) - plan.schedule.step_offsets[t]


@pytest.mark.parametrize("batch", [1, 3, 8, 100])
def test_plan_covers_every_pair_once_with_bucketed_widths(batch):
    events = random_events(40, 30, seed=1).with_columns(item_idx=pl.col("item_id") - 1000)
    plan = plan_chunk(events, batch)
    assert plan.inputs.shape[1] == batch
    want = []
    for (sid,), g in events.sort(["session_id", "time"]).group_by(["session_id"], maintain_order=True):
        seq = g["item_idx"].to_list()
        want += [(sid, p, seq[p], seq[p + 1]) for p in range(len(seq) - 1)]
    sched = plan.schedule
    t, r = active_cells(plan)
    got = list(
        zip(
            plan.sessions.session_ids[sched.session].tolist(),
            sched.position.tolist(),
            plan.inputs[t, r].tolist(),
            plan.targets[t, r].tolist(),
            strict=True,
        )
    )
    assert sorted(got) == sorted(want)  # every (input, target) pair of every session exactly once
    # widths: a power-of-two fraction of the batch (rounded up), never below the active rows
    assert (plan.width >= plan.n_active).all() and (plan.width <= batch).all()
    assert set(plan.width.tolist()) <= {-(-batch // 2**j) for j in range(12)}
    assert (plan.width < 2 * plan.n_active).all() or batch == 1
    # rows after the active ones are reset padding
    pad = np.arange(batch)[None, :] >= plan.n_active[:, None]
    assert plan.reset[pad].all()


def test_plan_is_none_when_no_session_has_two_events():
    events = pl.DataFrame({"session_id": [1, 2], "item_id": [5, 6], "time": [0, 0], "item_idx": [0, 1]})
    assert plan_chunk(events, 4) is None


# ---------------------------------------------------------------------------------------------- state handling
class PrefixHashBackend:
    """Fake backend whose state is a hash of the items seen since the last reset; n_greater returns it.

    Any mistake in state resets, slot bookkeeping or result order shows up as a wrong hash.
    """

    name, device, n_items, top_k = "fake", "cpu", 1000, 3

    def start(self, batch_size: int) -> None:
        self.h = np.zeros(1, dtype=np.int64)

    def step(self, item_idx, target_idx, src_rows, reset_mask, fetch_topk):
        self.h = np.where(reset_mask, 0, self.h[src_rows])
        self.h = (self.h * 1_000_003 + item_idx + 1) % (2**31 - 1)
        topk = np.stack([item_idx, target_idx, self.h], 1) if fetch_topk else None
        return StepOutput(self.h.copy(), target_idx.copy(), topk, topk)


def prefix_hash(seq) -> int:
    h = 0
    for i in seq:
        h = (h * 1_000_003 + i + 1) % (2**31 - 1)
    return h


@pytest.mark.parametrize("batch", [1, 2, 7, 64])
def test_replay_resets_state_per_session(batch):
    events = random_events(60, 50, seed=2).with_columns(item_idx=pl.col("item_id") - 1000)
    plan = plan_chunk(events, batch)
    backend = PrefixHashBackend()
    backend.start(batch)
    res = replay(backend, plan, fetch_topk=True)
    seqs = {
        sid: g["item_idx"].to_list()
        for (sid,), g in events.sort(["session_id", "time"]).group_by(["session_id"], maintain_order=True)
    }
    sched = plan.schedule
    sids = plan.sessions.session_ids[sched.session]
    for j, (sid, p) in enumerate(zip(sids.tolist(), sched.position.tolist(), strict=True)):
        seq = seqs[sid]
        assert res.n_greater[j] == prefix_hash(seq[: p + 1])
        assert res.n_equal[j] == seq[p + 1]  # the target of that pair
        assert res.topk_idx[j].tolist() == [seq[p], seq[p + 1], res.n_greater[j]]
    assert len(res.step_seconds) == len(plan.inputs)


def test_shrinking_batch_moves_state_to_new_rows():
    # Batch 2, lengths 4, 3, 3: slot 0 runs A (3 pairs); slot 1 runs B then C. At the last step only
    # slot 1 is left, at row 0: its state must come from row 1 of the step before.
    events = pl.DataFrame(
        {"session_id": [1] * 4 + [2] * 3 + [3] * 3, "item_idx": [5, 6, 7, 8, 1, 2, 3, 9, 9, 4]}
    ).with_columns(time=pl.int_range(pl.len()), item_id=pl.col("item_idx") + 1000)
    plan = plan_chunk(events, 2)
    assert plan.width.tolist() == [2, 2, 2, 1] and plan.src_rows[3, 0] == 1 and not plan.reset[3, 0]
    backend = PrefixHashBackend()
    backend.start(2)
    res = replay(backend, plan, fetch_topk=False)
    sched = plan.schedule
    seqs = {1: [5, 6, 7, 8], 2: [1, 2, 3], 3: [9, 9, 4]}
    sids = plan.sessions.session_ids[sched.session]
    want = [
        prefix_hash(seqs[s][: p + 1]) for s, p in zip(sids.tolist(), sched.position.tolist(), strict=True)
    ]
    assert res.n_greater.tolist() == want


def test_chunked_source_gives_the_same_result_as_one_chunk(tmp_path):
    df = random_events(80, 40, seed=3)
    path = write(df, tmp_path / "s.parquet")
    items = ItemMap(np.arange(1000, 1040, dtype=np.int64))
    model = make_model(40, seed=3)
    results = []
    for chunk_events in (10**6, 40, 7):
        source = SessionSource(path, chunk_events=chunk_events)
        assert len(source.ranges) == (1 if chunk_events == 10**6 else len(source.ranges))
        results.append(score_source(TorchBackend(model, 5), items, source, ScoreConfig(k=5, batch_size=6)))
    assert len(SessionSource(path, chunk_events=1).ranges) == df["session_id"].n_unique()
    for r in results[1:]:
        assert r["metrics"] == pytest.approx(results[0]["metrics"], abs=1e-12)
        assert r["n_events"] == df.height


# ---------------------------------------------------------------------------------------------- torch backend
@pytest.mark.parametrize("mode", ["standard", "conservative", "median"])
def test_torch_backend_matches_brute_force_with_ties(tmp_path, mode):
    n_items = 60
    events = random_events(150, n_items, seed=4)
    model = make_model(n_items, seed=4, tied=12)  # items 0..11 all score exactly 0
    items = ItemMap(np.arange(1000, 1000 + n_items, dtype=np.int64))
    want_counts = brute_force_counts(model, items.ids, events)
    ties = [c for c in want_counts.values() if c[1] > 1]
    assert len(ties) > 20  # the tie modes really differ on this data
    source = SessionSource(write(events, tmp_path / "s.parquet"))
    for batch in (1, 16, 1024):
        report = score_source(
            TorchBackend(model, 10), items, source, ScoreConfig(k=10, tie_mode=mode, batch_size=batch)
        )
        assert_metrics_equal(report["metrics"], reference_metrics(want_counts, mode))
        assert report["n_unknown_dropped"] == 0
        assert report["latency"]["batch_size"] == min(batch, source.stats.n_multi_sessions)


def test_unknown_items_are_dropped_as_events_and_counted(tmp_path):
    n_items = 40
    events = random_events(120, n_items + 15, seed=5)  # ids 1040..1054 are unknown to the model
    model = make_model(n_items, seed=5)
    items = ItemMap(np.arange(1000, 1000 + n_items, dtype=np.int64))
    n_unknown = int((events["item_id"] >= 1000 + n_items).sum())
    assert n_unknown > 0
    want = brute_force_counts(model, items.ids, events)
    report = score_source(
        TorchBackend(model, 5),
        items,
        SessionSource(write(events, tmp_path / "s.parquet")),
        ScoreConfig(k=5, batch_size=8),
    )
    assert report["n_unknown_dropped"] == n_unknown
    assert_metrics_equal(report["metrics"], reference_metrics(want, "standard"))
    assert report["n_scored_sessions"] == len({sid for sid, _ in want})


def test_online_mode_replays_one_session_at_a_time(tmp_path):
    events = random_events(30, 25, seed=6)
    model = make_model(25, seed=6)
    items = ItemMap(np.arange(1000, 1025, dtype=np.int64))
    want = brute_force_counts(model, items.ids, events)
    report = score_source(
        TorchBackend(model, 5),
        items,
        SessionSource(write(events, tmp_path / "s.parquet")),
        ScoreConfig(k=5, latency_mode="online", batch_size=512),
    )
    lat = report["latency"]
    assert lat["mode"] == "online" and lat["batch_size"] == 1
    assert lat["n_steps"] == len(want)  # one step per prediction: batch 1, nothing padded
    assert 0 < lat["step_ms_p50"] <= lat["step_ms_p95"] <= lat["step_ms_p99"]
    assert_metrics_equal(report["metrics"], reference_metrics(want, "standard"))
