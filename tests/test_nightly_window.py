"""Nightly on a live log: rolling windows cut from a hive-partitioned multi-day log, backfill, re-runs.

The log is synthetic: sessions spread over 8 days, written as Parquet files under date=YYYY-MM-DD
folders (one per day, each event in the folder of its own date, as a click log is partitioned). The references are plain
Python filters over the whole log, followed by `data split`'s function, which the window must equal.
"""

from __future__ import annotations

import datetime as dt

import polars as pl
import pytest

from gru4rec.errors import UserError
from gru4rec.eval.nightly import load_config, run
from gru4rec.prepare import DAY, SplitConfig, split_with_report

DAY0 = dt.date(2026, 3, 1)
N_DAYS = 8


def epoch(day: dt.date) -> int:
    return int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp())


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    """(log folder, whole log frame, an exported random-weight model over the log's items)."""
    import numpy as np
    from test_replay import make_model
    from test_score import export_model

    from gru4rec.items import ItemMap
    from gru4rec.synth import generate

    root = tmp_path_factory.mktemp("log")
    train, test = generate(n_sessions=2400, n_items=60, seed=4)
    events = pl.concat([train, test]).sort("session_id", "time")
    # rescale the 30 synthetic days onto N_DAYS days starting at DAY0 (order kept)
    t0, t1 = events["time"].min(), events["time"].max()
    events = events.with_columns(
        time=(epoch(DAY0) + (pl.col("time") - t0) * (N_DAYS * 86400 - 3600) // (t1 - t0)).cast(pl.Int64)
    )
    events = events.with_columns(day=pl.from_epoch("time", time_unit="s").dt.date())
    for (day,), part in events.group_by(["day"]):
        folder = root / "log" / f"date={day.isoformat()}"
        folder.mkdir(parents=True)
        part.drop("day").write_parquet(folder / "part-0.parquet")
    # a partition far outside every window, which must never be opened
    bad = root / "log" / "date=2020-01-01"
    bad.mkdir()
    (bad / "part-0.parquet").write_bytes(b"PAR1 not parquet")
    # the window tests need a model to score, not a good one: random weights over the log's items
    ids = np.sort(events["item_id"].unique().to_numpy())
    onnx = export_model(make_model(len(ids), seed=3), ItemMap(ids), root, 20)
    return root, events.drop("day"), onnx


def config(tmp_path, root, onnx, extra: str = "") -> str:
    path = tmp_path / "nightly.toml"
    path.write_text(
        f'[nightly]\nhistory = "{tmp_path / "h.parquet"}"\nout = "{tmp_path / "out"}"\nmodel = "{onnx}"\n'
        f'batch_size = 4\n[nightly.window]\nevents = "{root / "log"}/**/*.parquet"\ntrain_days = 3\n'
        f"test_days = 1\n{extra}\n[nightly.tolerances]\nmin_latency_steps = 5\n"
    )
    return str(path)


def reference(events: pl.DataFrame, as_of: dt.date) -> dict[str, pl.DataFrame]:
    """The window by a plain filter over the whole log, then `data split`'s function with the test
    cut at the end of the as_of day minus one day."""
    end = epoch(as_of + dt.timedelta(days=1))
    window = events.filter((pl.col("time") >= end - 4 * 86400) & (pl.col("time") < end))
    return split_with_report(window.sort("session_id", "time", maintain_order=True),
                             SplitConfig(test_days=1.0, valid=False), boundary=end - DAY)[0]  # fmt: skip


def test_backfill_three_days_then_rerun_replaces_one_row(tmp_path, log):
    root, events, onnx = log
    cfg = load_config(config(tmp_path, root, onnx))
    last = DAY0 + dt.timedelta(days=N_DAYS - 1)
    days = [last - dt.timedelta(days=i) for i in (2, 1, 0)]
    stamp = dt.datetime(2026, 4, 1, 2, 30, tzinfo=dt.UTC)
    for i, day in enumerate(days):
        summary = run(cfg, now=stamp + dt.timedelta(minutes=i), as_of=day.isoformat())
        w = summary["window"]
        ref = reference(events, day)
        assert w["as_of"] == day.isoformat()
        assert w["window_end"] == f"{(day + dt.timedelta(days=1)).isoformat()}T00:00:00+00:00"
        assert w["window_start"] == f"{(day - dt.timedelta(days=3)).isoformat()}T00:00:00+00:00"
        assert (w["n_train_events"], w["n_window_test_events"]) == (
            ref["train_full"].height,
            ref["test"].height,
        )
        assert w["n_files_read"] == 4  # the window's four date= partitions, nothing else
        window_test = pl.read_parquet(tmp_path / "out" / "window" / "test.parquet")
        # the same events (row order is the reader's: sessions by first appearance across files)
        assert window_test.sort("session_id", "time", maintain_order=True).equals(ref["test"])
        # the split boundary: the test day is the as_of calendar day
        assert dt.datetime.fromisoformat(w["window_boundary"]).timestamp() == epoch(day)
    hist = pl.read_parquet(tmp_path / "h.parquet")
    assert hist["as_of"].to_list() == [d.isoformat() for d in days]
    assert hist["run_id"].to_list() == ["20260401T023000Z", "20260401T023100Z", "20260401T023200Z"]
    assert set(hist["test_days"].to_list()) == {1} and set(hist["train_days"].to_list()) == {3}
    # the second day again (a re-run): its row is replaced, not duplicated, and the order stays
    summary = run(cfg, now=stamp + dt.timedelta(hours=5), as_of=days[1].isoformat())
    hist2 = pl.read_parquet(tmp_path / "h.parquet")
    assert hist2.height == 3 and hist2["as_of"].to_list() == [d.isoformat() for d in days]
    assert hist2["run_id"].to_list() == ["20260401T023000Z", "20260401T073000Z", "20260401T023200Z"]
    assert hist2.row(1, named=True)["recall@20"] == pytest.approx(hist.row(1, named=True)["recall@20"])
    # compared with the earlier day only (not with itself, not with a later day)
    assert summary["n_comparable"] == 1
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Window" in report and f"As of {days[1].isoformat()}" in report


def test_latest_is_the_logs_last_day_and_config_checks(tmp_path, log, run):
    root, events, onnx = log
    path = config(tmp_path, root, onnx)
    code, out, err = run("eval", "nightly", "--config", path)
    assert code == 0, err
    hist = pl.read_parquet(tmp_path / "h.parquet")
    assert hist["as_of"].to_list() == [(DAY0 + dt.timedelta(days=N_DAYS - 1)).isoformat()]
    code, _, err = run("eval", "nightly", "--config", path, "--as-of", "2026-13-01")
    assert code == 2 and "--as-of must be latest, today or a date YYYY-MM-DD" in err
    code, _, err = run("eval", "nightly", "--config", path, "--as-of", "2019-01-01")
    assert code == 2 and "no file left after partition pruning (window 2018-12-29 .. 2019-01-01)" in err
    bad = tmp_path / "bad.toml"
    bad.write_text(
        open(path).read().replace("[nightly.window]", f'test = "{root / "m.onnx"}"\n[nightly.window]')
    )
    with pytest.raises(UserError, match="test / metrics_json and \\[nightly.window\\] exclude each other"):
        load_config(bad)
