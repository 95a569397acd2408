"""RSC15 protocol (spec §8.1) and the generic split: hand-counted cases and a brute-force reference."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest

from gru4rec.data import read_events
from gru4rec.prepare import SplitConfig, read_rsc15_clicks, rsc15_protocol, split_events

BASE = datetime(2014, 3, 30, tzinfo=UTC)
A, B, C, R, U, V = 101, 102, 103, 999, 555, 777


def at(day: int, hh: int, mm: int, ss: float = 0.0) -> datetime:
    return BASE + timedelta(days=day, hours=hh, minutes=mm, seconds=ss)


def iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def session(sid: int, start: datetime, items: list[int]) -> list[tuple[int, datetime, int]]:
    return [(sid, start + timedelta(seconds=30 * k), item) for k, item in enumerate(items)]


# Hand-made clicks. Supports after dropping the 1-event session s1: A 10, B 6, C 5, R 4, U 5, V 5.
#  - R has 5 raw clicks but 4 after the first session filter -> dropped (filter order matters);
#  - C has exactly 5 -> kept, and keeps its 5th click's session s3 = [C, R] -> [C] -> dropped: C ends
#    with 4 events, which an iterated filter would drop too (the protocol is one pass);
#  - U occurs only in test sessions -> removed from test; V only from day 1 on -> removed from valid.
HAND = [
    *session(1, at(0, 8, 0), [R]),
    *session(2, at(0, 8, 10), [A, B, R]),
    *session(3, at(0, 8, 20), [C, R]),
    *session(4, at(0, 8, 30), [B, C, R, R]),
    *session(5, at(0, 8, 40), [A, A, B]),  # consecutive repeat: kept by RSC15
    *session(6, at(0, 9, 0), [C, A]),
    *session(7, at(1, 10, 0), [A, V, C]),  # train_full; in train_valid without V
    *session(13, at(1, 11, 58, 29), [V, V, V]),  # ends 1 s before the test boundary: train_full;
    # in train_valid, but V is unseen in train_tr there, so it is dropped
    *session(8, at(1, 11, 59, 45), [A, B]),  # crosses the test boundary: whole session in test
    *session(12, at(1, 11, 59, 30), [C, A]),  # last click exactly at the boundary: test
    *session(9, at(2, 10, 0), [U, U, A]),  # -> [A]: dropped from test
    *session(10, at(2, 11, 0), [U, A, U, B]),
    *session(11, at(2, 11, 58, 30), [U, A, V, B]),  # last click = tmax = day 2 12:00:00
]
# Expected outputs, counted by hand: {file: {session: items}}
EXPECTED = {
    "train_full": {2: [A, B], 4: [B, C], 5: [A, A, B], 6: [C, A], 7: [A, V, C], 13: [V, V, V]},
    "test": {8: [A, B], 10: [A, B], 11: [A, V, B], 12: [C, A]},
    "train_tr": {2: [A, B], 4: [B, C], 5: [A, A, B], 6: [C, A]},
    "train_valid": {7: [A, C]},
}


def write_raw(path, clicks, shuffle_seed: int | None = None) -> None:
    lines = [f"{s},{iso(t)},{i},0" for s, t, i in clicks]
    if shuffle_seed is not None:  # the reader must not rely on file order
        np.random.default_rng(shuffle_seed).shuffle(lines)
    path.write_text("\n".join(lines) + "\n")


def as_dict(df: pl.DataFrame) -> dict[int, list[int]]:
    return {
        s: items for s, items in df.group_by("session_id", maintain_order=True).agg("item_id").iter_rows()
    }


def test_hand_made_rsc15_counts(tmp_path, cli):
    tmax = HAND[-1][1]
    assert tmax == at(2, 12, 0) and HAND[-1][1] - timedelta(days=1) == at(1, 12, 0)  # s12 ends exactly there
    raw = tmp_path / "clicks.dat"
    write_raw(raw, HAND, shuffle_seed=3)
    out = tmp_path / "out"
    proc = cli("data", "prepare-rsc15", raw, out)
    assert proc.returncode == 0, proc.stderr
    for name, expected in EXPECTED.items():
        got = read_events(out / f"{name}.parquet")
        assert as_dict(got) == expected, name
    stats = json.loads((out / "stats.json").read_text())
    counts = {n: (s["sessions"], s["events"], s["items"], s["predictions"]) for n, s in stats.items()}
    assert counts == {
        "train_full": (6, 15, 4, 9),
        "test": (4, 9, 4, 5),
        "train_tr": (4, 9, 3, 5),
        "train_valid": (1, 2, 2, 1),
    }
    assert "| test | 4 | 9 | 4 | 5 |" in (out / "stats.md").read_text()
    # Times survive as float seconds with milliseconds.
    tf = read_events(out / "train_full.parquet")
    assert tf["time"].dtype == pl.Float64 and tf["time"].min() == at(0, 8, 10).timestamp()


# --- an independent, loop-based implementation of the protocol, for the real-data check -----------


def reference_rsc15(clicks: list[tuple[int, float, int]]) -> dict[str, dict[int, list[int]]]:
    sessions: dict[int, list[tuple[float, int]]] = defaultdict(list)
    for s, t, i in clicks:
        sessions[s].append((t, i))
    sessions = {s: sorted(ev, key=lambda e: e[0]) for s, ev in sessions.items() if len(ev) > 1}
    support = Counter(i for ev in sessions.values() for _, i in ev)
    sessions = {s: [(t, i) for t, i in ev if support[i] >= 5] for s, ev in sessions.items()}
    sessions = {s: ev for s, ev in sessions.items() if len(ev) >= 2}

    def last_day(sess):
        tmax = max(t for ev in sess.values() for t, _ in ev)
        train = {s: ev for s, ev in sess.items() if max(t for t, _ in ev) < tmax - 86400}
        seen = {i for ev in train.values() for _, i in ev}
        test = {s: [(t, i) for t, i in ev if i in seen] for s, ev in sess.items() if s not in train}
        return train, {s: ev for s, ev in test.items() if len(ev) >= 2}

    train_full, test = last_day(sessions)
    train_tr, train_valid = last_day(train_full)
    frames = {"train_full": train_full, "test": test, "train_tr": train_tr, "train_valid": train_valid}
    return {n: {s: [i for _, i in ev] for s, ev in sorted(f.items())} for n, f in frames.items()}


def test_rsc15_on_raw_file_from_rsc15_100k(tmp_path, shared_data):
    """Raw clicks rebuilt from the shared RSC15 sample: protocol == loop reference, and close to upstream."""
    src = shared_data / "rsc15_100k"
    upstream = {
        n: read_events(src / f"{f}.parquet")
        for n, f in [
            ("train_full", "train"),
            ("test", "test"),
            ("train_tr", "train_tr"),
            ("train_valid", "train_valid"),
        ]
    }
    union = pl.concat([upstream["train_full"], upstream["test"]])
    ms = (union["time"] * 1000).round().cast(pl.Int64).to_list()
    clicks = []
    lines = []
    for s, i, m in zip(union["session_id"].to_list(), union["item_id"].to_list(), ms, strict=True):
        t = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=m)
        lines.append(f"{s},{iso(t)},{i},0")
        clicks.append((s, m / 1000.0, i))
    # Noise the protocol must remove: single-click sessions and a rare item.
    lines += ["90000001,2014-04-03T10:00:00.000Z,214536502,0", "90000002,2014-04-03T10:00:00.000Z,1,0"]
    clicks += [(90000001, datetime(2014, 4, 3, 10, tzinfo=UTC).timestamp(), 214536502)]
    clicks += [(90000002, datetime(2014, 4, 3, 10, tzinfo=UTC).timestamp(), 1)]
    for k in range(2):
        lines += [
            f"{90000010 + k},2014-04-03T10:00:0{j}.000Z,{7 if j == 0 else 214536502},S" for j in range(2)
        ]
        clicks += [
            (
                90000010 + k,
                datetime(2014, 4, 3, 10, 0, j, tzinfo=UTC).timestamp(),
                7 if j == 0 else 214536502,
            )
            for j in range(2)
        ]
    raw = tmp_path / "yoochoose-clicks.dat"
    raw.write_text("\n".join(lines) + "\n")

    got = rsc15_protocol(read_rsc15_clicks(raw))
    want = reference_rsc15(clicks)
    for name in want:
        assert as_dict(got[name].sort("session_id", maintain_order=True)) == want[name], name
    # Upstream ran the same protocol on the full raw file: re-running it on its output can only
    # remove items that fell under 5 clicks, so every session we keep is an upstream session, and
    # almost all of them are kept.
    for name, ours in got.items():
        ours_s, up_s = set(ours["session_id"].to_list()), set(upstream[name]["session_id"].to_list())
        assert ours_s <= up_s, name
        assert len(ours_s) >= 0.98 * len(up_s), name


# --- bad raw input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, needle",
    [
        ("1,2014-04-07T10:51:09.277Z,214536502\n", "4 comma-separated columns"),
        ("1,yesterday,214536502,0\n", "timestamp 'yesterday'"),
        ("x,2014-04-07T10:51:09.277Z,214536502,0\n", "session 'x'"),
        ("1,2014-04-07T10:51:09.277Z,12.5,0\n", "item '12.5'"),
        ("", "empty"),
    ],
)
def test_prepare_rsc15_bad_raw_input(tmp_path, run, content, needle):
    raw = tmp_path / "clicks.dat"
    raw.write_text(content)
    code, _, err = run("data", "prepare-rsc15", raw, tmp_path / "out")
    assert code == 2
    assert err.startswith("error: ") and needle in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out" / "test.parquet").exists()


def test_prepare_rsc15_missing_file_and_too_short_span(tmp_path, run):
    code, _, err = run("data", "prepare-rsc15", tmp_path / "nope.dat", tmp_path / "out")
    assert code == 2 and "file not found" in err
    raw = tmp_path / "one_day.dat"
    write_raw(raw, [(s, BASE + (t - BASE) / 3, i) for s, t, i in HAND])  # 2.5 days squeezed into < 1
    code, _, err = run("data", "prepare-rsc15", raw, tmp_path / "out")
    assert code == 2 and "'train_full' empty" in err
    assert len(err.strip().splitlines()) == 1


# --- the generic split -----------------------------------------------------------------------------


def reference_split(rows, test_seconds, min_support, min_len, dedup):
    """Loop version: dedup, filter until stable, whole-session split by last event, unseen removal."""
    sessions = defaultdict(list)
    for s, i, t in rows:
        sessions[s].append((t, i))
    sessions = {s: sorted(ev, key=lambda e: e[0]) for s, ev in sessions.items()}
    if dedup:
        sessions = {
            s: [e for k, e in enumerate(ev) if k == 0 or e[1] != ev[k - 1][1]] for s, ev in sessions.items()
        }
    while True:
        support = Counter(i for ev in sessions.values() for _, i in ev)
        kept = {s: [(t, i) for t, i in ev if support[i] >= min_support] for s, ev in sessions.items()}
        kept = {s: ev for s, ev in kept.items() if len(ev) >= min_len}
        if sum(map(len, kept.values())) == sum(map(len, sessions.values())):
            break
        sessions = kept

    def cut(sess):
        tmax = max(t for ev in sess.values() for t, _ in ev)
        train = {s: ev for s, ev in sess.items() if max(t for t, _ in ev) < tmax - test_seconds}
        seen = {i for ev in train.values() for _, i in ev}
        test = {s: [(t, i) for t, i in ev if i in seen] for s, ev in sess.items() if s not in train}
        return train, {s: ev for s, ev in test.items() if len(ev) >= min_len}

    train_full, test = cut(sessions)
    train_tr, train_valid = cut(train_full)
    frames = {"train_full": train_full, "test": test, "train_tr": train_tr, "train_valid": train_valid}
    return {n: {s: [i for _, i in ev] for s, ev in sorted(f.items())} for n, f in frames.items()}


def random_log(seed: int, n_sessions: int = 400, n_items: int = 60) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 8, n_sessions)
    sid = np.repeat(np.arange(n_sessions), lengths)
    items = (rng.zipf(1.5, lengths.sum()) % n_items).astype(np.int64)  # heavy head, many rare items
    items[rng.random(len(items)) < 0.2] = 5  # plenty of consecutive repeats
    start = np.repeat(rng.integers(0, 10 * 86400, n_sessions), lengths)
    time = start + rng.integers(0, 600, len(sid))  # unsorted within sessions on purpose
    return pl.DataFrame({"session_id": sid, "item_id": items, "time": time}).sample(
        fraction=1.0, shuffle=True, seed=seed
    )


@pytest.mark.parametrize("dedup, min_support, min_len, days", [(False, 5, 2, 1.0), (True, 3, 3, 2.5)])
def test_split_matches_loop_reference(tmp_path, dedup, min_support, min_len, days):
    log = random_log(seed=min_support)
    path = tmp_path / "log.parquet"
    log.write_parquet(path)
    events = read_events(path)
    got = split_events(
        events,
        SplitConfig(test_days=days, min_item_support=min_support, min_session_length=min_len, dedup=dedup),
    )
    want = reference_split(events.rows(), days * 86400, min_support, min_len, dedup)
    assert all(len(want[n]) > 5 for n in want)  # the case is not degenerate
    for name in want:
        assert as_dict(got[name]) == want[name], name


def test_split_cli_fraction_keys_and_dedup(tmp_path, run):
    # 3 sessions in a 100 s span; --test-fraction 0.25 puts sessions ending at >= 75 s in test.
    rows = [
        (1, 7, 0),
        (1, 7, 1),
        (1, 8, 2),
        (1, 7, 3),
        (2, 8, 10),
        (2, 9, 11),
        (3, 7, 80),
        (3, 7, 81),
        (3, 8, 82),
        (3, 9, 100),
        (3, 4, 90),
    ]
    path = tmp_path / "log.csv"
    path.write_text("sid,iid,ts\n" + "".join(f"{s},{i},{t}\n" for s, i, t in rows))
    out = tmp_path / "out"
    code, _, err = run(
        "data",
        "split",
        path,
        out,
        "--test-fraction",
        "0.25",
        "--min-item-support",
        "1",
        "--dedup",
        "--no-valid",
        "--session-key",
        "sid",
        "--item-key",
        "iid",
        "--time-key",
        "ts",
    )
    assert code == 0, err
    assert as_dict(read_events(out / "train_full.parquet")) == {1: [7, 8, 7], 2: [8, 9]}
    assert as_dict(read_events(out / "test.parquet")) == {3: [7, 8, 9]}  # 4 unseen, 7,7 deduped
    assert not (out / "train_tr.parquet").exists()


def test_split_into_an_earlier_split_leaves_no_stale_files(tmp_path, run):
    path, out = tmp_path / "log.parquet", tmp_path / "out"
    random_log(seed=1).write_parquet(path)
    assert run("data", "split", path, out)[0] == 0
    assert (out / "train_valid.parquet").exists()
    assert run("data", "split", path, out, "--no-valid")[0] == 0
    listed = set(json.loads((out / "stats.json").read_text()))
    assert {p.stem for p in out.glob("*.parquet")} == listed == {"train_full", "test"}


@pytest.mark.parametrize("where", ["file", "folder-as-json"])
def test_outputs_that_cannot_be_written_fail_first(tmp_path, run, where):
    path = tmp_path / "log.parquet"
    random_log(seed=1).write_parquet(path)
    if where == "file":
        code, _, err = run("data", "split", path, path / "out")
    else:
        code, _, err = run("data", "stats", path, "--json", tmp_path)
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--test-days", "1", "--test-fraction", "0.1"], "exactly one of"),
        (["--test-fraction", "1.5"], "between 0 and 1"),
        (["--test-days", "0"], "must be > 0"),
        (["--min-session-length", "1"], "must be >= 2"),
        (["--test-days", "1000"], "'train_full' empty"),
        (["--min-item-support", "100000"], "no events left"),
    ],
)
def test_split_bad_options(tmp_path, run, args, needle):
    path = tmp_path / "log.parquet"
    random_log(seed=1).write_parquet(path)
    code, _, err = run("data", "split", path, tmp_path / "out", *args)
    assert code == 2, err
    assert err.startswith("error: ") and needle in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
