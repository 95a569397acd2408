"""The synthetic generator: the cross-team contract, its realism, and that session intent matters."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from gru4rec.data import read_events, validate_events
from gru4rec.synth import DAY, SynthConfig, generate


@pytest.fixture(scope="module")
def demo_size():
    """The demo's default size (its speed is the demo's business, not an assertion's)."""
    return generate(20000, 2000, 7)


def test_contract(demo_size):
    train, test = demo_size
    for df in (train, test):
        assert df.schema == pl.Schema({"session_id": pl.Int64, "item_id": pl.Int64, "time": pl.Int64})
        assert df.rows() == validate_events(df).rows()  # canonical: validated and sorted already
        lengths = df.group_by("session_id").len()["len"]
        assert lengths.min() >= 2
        # Strictly increasing times inside each session.
        same = df["session_id"].to_numpy()[1:] == df["session_id"].to_numpy()[:-1]
        assert (np.diff(df["time"].to_numpy())[same] > 0).all()
    assert set(test["item_id"].to_list()) <= set(train["item_id"].to_list())
    assert not set(test["session_id"].to_list()) & set(train["session_id"].to_list())
    # Test = sessions starting in the last 2 of ~30 days.
    starts = lambda df: df.group_by("session_id").agg(pl.col("time").min())["time"]  # noqa: E731
    t_end = max(train["time"].max(), test["time"].max())
    t_begin = train["time"].min()
    assert 29 * DAY < t_end - t_begin <= 30 * DAY
    assert starts(train).max() < starts(test).min() and starts(test).min() >= t_end - 2 * DAY - 3600
    n_sessions = train["session_id"].n_unique() + test["session_id"].n_unique()
    assert 0.9 * 20000 < n_sessions <= 20000 and test["session_id"].n_unique() > 0.04 * 20000
    assert train["item_id"].n_unique() > 0.9 * 2000


def test_seeded():
    a, b = generate(500, 100, 3), generate(500, 100, 3)
    assert a[0].equals(b[0]) and a[1].equals(b[1])
    assert not generate(500, 100, 4)[0].equals(a[0])


def test_zipf_popularity_lognormal_lengths_and_gaps(demo_size):
    train, _ = demo_size
    counts = np.sort(train["item_id"].value_counts()["count"].to_numpy())[::-1]
    ranks = np.arange(1, 101)
    slope = np.polyfit(np.log(ranks), np.log(counts[:100]), 1)[0]
    assert -1.3 < slope < -0.6, slope  # a power law at the head
    assert counts[0] > 20 * np.median(counts)
    lengths = train.group_by("session_id").len()["len"].to_numpy()
    assert 3 <= np.median(lengths) <= 5 and lengths.max() <= 50 and np.quantile(lengths, 0.99) >= 12
    log_len = np.log(lengths[lengths > 2])  # the log is roughly symmetric above the floor of 2
    assert abs(np.mean(log_len) - np.median(log_len)) < 0.25
    t = train["time"].to_numpy()
    same = train["session_id"].to_numpy()[1:] == train["session_id"].to_numpy()[:-1]
    gaps = np.diff(t)[same]
    assert 20 <= np.median(gaps) <= 100 and np.quantile(gaps, 0.99) < 3600


def next_item_recall(train: pl.DataFrame, test: pl.DataFrame, k: int = 20) -> tuple[float, float]:
    """Recall@k of two co-occurrence predictors: last item only vs the whole session so far.

    C[i, j] = number of training sessions holding both i and j, rows normalised to P(j | i);
    last-item score = C[last]; session score = sum of C[h] over every item h seen so far.
    """
    ids = np.unique(train["item_id"].to_numpy())
    idx = {int(v): n for n, v in enumerate(ids)}
    n = len(ids)
    cooc = np.zeros((n, n))
    for items in train.group_by("session_id").agg("item_id")["item_id"].to_list():
        u = np.unique([idx[i] for i in items])
        cooc[np.ix_(u, u)] += 1
    np.fill_diagonal(cooc, 0)
    cooc /= np.maximum(cooc.sum(1, keepdims=True), 1)
    hits_last = hits_session = total = 0
    for items in test.group_by("session_id").agg("item_id")["item_id"].to_list():
        seq = [idx[i] for i in items]
        session = np.zeros(n)
        for t in range(1, len(seq)):
            last = cooc[seq[t - 1]]
            session += last
            hits_last += (last > last[seq[t]]).sum() < k
            hits_session += (session > session[seq[t]]).sum() < k
            total += 1
    return hits_last / total, hits_session / total


def test_session_intent_beats_last_item():
    """Reading the whole session must pay off on this data, and must not without the intent."""
    last, session = next_item_recall(*generate(6000, 600, 11))
    assert session > last + 0.02, (last, session)
    assert last > 0.3  # transitions are learnable too
    # Control: the same generator with no intent (transitions + noise only) reverses the ranking,
    # so this statistic can tell structure from its absence.
    control = SynthConfig(p_intent=0.0, p_transition=0.85)
    last_c, session_c = next_item_recall(*generate(6000, 600, 11, control))
    assert session_c < last_c, (last_c, session_c)


def test_cli_synth_writes_generate_output(tmp_path, cli):
    out = tmp_path / "data"
    proc = cli("data", "synth", out, "--sessions", "300", "--items", "50", "--seed", "5")
    assert proc.returncode == 0, proc.stderr
    train, test = generate(300, 50, 5)
    assert read_events(out / "train.parquet").equals(train) and read_events(out / "test.parquet").equals(test)
    assert (out / "stats.json").exists()
    proc = cli("data", "synth", out, "--sessions", "0")
    assert (
        proc.returncode == 2 and proc.stderr == "error: --sessions must be between 10 and 10,000,000, got 0\n"
    )
    for args in (["--items", str(10**10)], ["--seed", "-1"]):  # refused up front: no memory blow-up
        proc = cli("data", "synth", out, *args)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and args[0] in proc.stderr, proc.stderr
