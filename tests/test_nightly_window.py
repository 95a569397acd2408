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
    # the log's last day is not over as far as the log knows: latest is the day before it
    assert hist["as_of"].to_list() == [(DAY0 + dt.timedelta(days=N_DAYS - 2)).isoformat()]
    assert "the last day the log covers completely" in err
    assert "the last day the log covers completely" in (tmp_path / "out" / "report.md").read_text()
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


def last_day() -> dt.date:
    return DAY0 + dt.timedelta(days=N_DAYS - 1)


def copy_log(root, tmp_path):
    import shutil

    shutil.copytree(root / "log", tmp_path / "log")
    return tmp_path


def test_files_outside_the_window_are_never_opened(tmp_path, log, run):
    """An empty file in another day's partition and a stray file at the dataset root (its events
    long before the window) do not stop the run, nor turn pruning off for the broken partition."""
    root, events, onnx = log
    copy_log(root, tmp_path)
    (tmp_path / "log" / "date=2020-01-02").mkdir()
    (tmp_path / "log" / "date=2020-01-02" / "part-0.parquet").write_bytes(b"")
    events.head(50).with_columns(pl.col("time") - 10**8).write_parquet(tmp_path / "log" / "stray.parquet")
    path = config(tmp_path, tmp_path, onnx)
    code, _, err = run("eval", "nightly", "--config", path, "--as-of", last_day().isoformat())
    assert code == 0, err
    assert pl.read_parquet(tmp_path / "h.parquet")["n_files_read"].to_list() == [5]  # 4 days + the stray


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_failed_run_leaves_out_exactly_as_it_was(tmp_path, log, run):
    root, events, onnx = log
    path = config(tmp_path, root, onnx)
    day = last_day() - dt.timedelta(days=1)
    code, _, err = run("eval", "nightly", "--config", path, "--as-of", day.isoformat())
    assert code == 0, err
    before = snapshot(tmp_path / "out")
    assert (tmp_path / "out" / "window" / "test.parquet").is_file() and (
        tmp_path / "out" / "report.md"
    ).is_file()
    # the next day stops after the cut (the latency gate cannot have enough steps): exit 2
    strict = tmp_path / "strict.toml"
    strict.write_text(open(path).read().replace("min_latency_steps = 5", "min_latency_steps = 100000"))
    code, _, err = run("eval", "nightly", "--config", strict, "--as-of", last_day().isoformat())
    assert code == 2 and "min_latency_steps" in err, err
    assert snapshot(tmp_path / "out") == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no stage left behind


def test_as_of_beyond_the_log_names_the_empty_days_and_a_small_window_is_refused(tmp_path, log, run):
    root, events, onnx = log
    beyond = (last_day() + dt.timedelta(days=2)).isoformat()
    path = config(tmp_path, root, onnx, "min_test_events = 50")
    text = open(path).read().replace("test_days = 1", "test_days = 3")
    (tmp_path / "n.toml").write_text(text)
    code, _, err = run("eval", "nightly", "--config", tmp_path / "n.toml", "--as-of", beyond)
    assert code == 0, err
    empty = [(last_day() + dt.timedelta(days=i)).isoformat() for i in (1, 2)]
    assert f"test day(s) {', '.join(empty)} hold no events" in err
    assert f"Test day(s) without events: {','.join(empty)}" in (tmp_path / "out" / "report.md").read_text()
    # a test window too small to judge: one line with its size, before any training or scoring
    (tmp_path / "n.toml").write_text(text.replace("min_test_events = 50", "min_test_events = 1000000"))
    code, _, err = run("eval", "nightly", "--config", tmp_path / "n.toml", "--as-of", beyond)
    assert code == 2 and err.startswith("error:") and "fewer than min_test_events = 1,000,000" in err, err
    assert "scoring" not in err and err.count("\n") <= 2


def test_window_reads_a_log_with_its_own_column_names(tmp_path, log, run):
    root, events, onnx = log
    folder = tmp_path / "log" / f"date={last_day().isoformat()}"
    for (day,), part in events.with_columns(d=pl.from_epoch("time", time_unit="s").dt.date()).group_by(["d"]):
        folder = tmp_path / "log" / f"date={day.isoformat()}"
        folder.mkdir(parents=True)
        part.drop("d").rename({"session_id": "visit", "item_id": "sku", "time": "ts"}).write_parquet(
            folder / "p.parquet"
        )
    keys = 'session_key = "visit"\nitem_key = "sku"\ntime_key = "ts"\ntime_unit = "s"'
    path = config(tmp_path, tmp_path, onnx, keys)
    code, _, err = run("eval", "nightly", "--config", path, "--as-of", last_day().isoformat())
    assert code == 0, err
    plain = tmp_path / "plain"
    plain.mkdir()
    code, _, err = run(
        "eval", "nightly", "--config", config(plain, root, onnx), "--as-of", last_day().isoformat()
    )
    assert code == 0, err
    a, b = (pl.read_parquet(d / "h.parquet").row(0, named=True) for d in (tmp_path, plain))
    assert a["n_window_test_events"] == b["n_window_test_events"] and a["recall@20"] == b["recall@20"]


def test_consecutive_days_without_a_champion_are_a_trend_not_a_gate(tmp_path, log, run):
    """Each day tests other sessions: with no tolerance at all, a day with lower metrics than the
    day before still exits 0 (the metrics are the trend); the report says so."""
    root, events, onnx = log
    path = config(tmp_path, root, onnx)
    text = (
        open(path)
        .read()
        .replace("[nightly.tolerances]\n", "[nightly.tolerances]\nmetric_drop_abs = 0\nmetric_drop_rel = 0\n")
    )
    (tmp_path / "n.toml").write_text(text)
    days = [last_day() - dt.timedelta(days=i) for i in (3, 2, 1, 0)]
    for day in days:
        code, _, err = run("eval", "nightly", "--config", tmp_path / "n.toml", "--as-of", day.isoformat())
        assert code == 0, err
    hist = pl.read_parquet(tmp_path / "h.parquet")
    recalls = hist["recall@20"].to_list()
    assert any(b < a for a, b in zip(recalls, recalls[1:]))  # a drop the old gate would have failed
    assert set(hist["status"].to_list()) == {"ok"}
    summary = __import__("json").loads((tmp_path / "out" / "summary.json").read_text())
    assert {e["verdict"] for e in summary["table"] if e["name"] in ("recall@20", "mrr@20")} == {"trend"}
