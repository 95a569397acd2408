"""The events reader: formats, official headers, key renames, stable sort, and every bad input via the CLI."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from gru4rec.data import Keys, fingerprint, read_events, session_lengths
from gru4rec.errors import UserError

ROWS = [  # (session, item, time) in file order: unsorted, with a time tie inside session 2
    (2, 20, 5.0),
    (1, 10, 3.0),
    (2, 21, 1.0),
    (1, 11, 1.0),
    (2, 22, 5.0),  # same time as the first row of session 2: must stay after it
    (1, 12, 2.0),
    (3, 30, 9.0),
    (3, 31, 8.0),
]
SORTED = [  # sessions in order of first appearance (ids are labels), events by time, ties in file order
    (2, 21, 1.0),
    (2, 20, 5.0),
    (2, 22, 5.0),
    (1, 11, 1.0),
    (1, 12, 2.0),
    (1, 10, 3.0),
    (3, 31, 8.0),
    (3, 30, 9.0),
]


def write(path, columns=("session_id", "item_id", "time"), rows=ROWS, sep=","):
    if path.suffix == ".parquet":
        pl.DataFrame(rows, schema=list(columns), orient="row").write_parquet(path)
    else:
        path.write_text(sep.join(columns) + "\n" + "".join(sep.join(map(str, r)) + "\n" for r in rows))
    return path


def tuples(df: pl.DataFrame) -> list[tuple]:
    return [(int(s), int(i), float(t)) for s, i, t in df.select("session_id", "item_id", "time").iter_rows()]


@pytest.mark.parametrize("name, sep", [("e.parquet", ","), ("e.csv", ","), ("e.tsv", "\t"), ("e.txt", "\t")])
def test_formats_sort_stably(tmp_path, name, sep):
    df = read_events(write(tmp_path / name, sep=sep))
    assert tuples(df) == SORTED
    assert df.schema == pl.Schema({"session_id": pl.Int64, "item_id": pl.Int64, "time": pl.Float64})


def test_integer_time_stays_integer_and_datetime_becomes_seconds(tmp_path):
    p = tmp_path / "int.csv"
    p.write_text("session_id,item_id,time\n1,5,100\n1,6,99\n")
    df = read_events(p)
    assert df["time"].dtype == pl.Int64 and df["item_id"].to_list() == [6, 5]
    q = tmp_path / "dt.parquet"
    pl.DataFrame(
        {
            "session_id": [1, 1],
            "item_id": [5, 6],
            "time": pl.Series(["2014-04-07 10:00:01.5", "2014-04-07 10:00:00"]).str.to_datetime(),
        }
    ).write_parquet(q)
    df = read_events(q)
    assert df["item_id"].to_list() == [6, 5] and df["time"].to_list() == [1396864800.0, 1396864801.5]


def test_official_tsv_headers_and_key_renames(tmp_path):
    official = read_events(write(tmp_path / "official.tsv", ("SessionId", "ItemId", "Time"), sep="\t"))
    assert tuples(official) == SORTED
    renamed = read_events(
        write(tmp_path / "mine.csv", ("sid", "product", "ts")), Keys("sid", "product", "ts")
    )
    assert tuples(renamed) == SORTED
    # Extra columns are ignored; a rename may also point at an official name.
    p = tmp_path / "extra.parquet"
    pl.DataFrame({"SessionId": [1, 1], "x": ["a", "b"], "item": [3, 4], "Time": [2, 1]}).write_parquet(p)
    assert tuples(read_events(p, Keys(item="item"))) == [(1, 4, 1.0), (1, 3, 2.0)]


def test_keys_may_swap_canonical_names_but_not_share_a_column(tmp_path):
    p = tmp_path / "swapped.parquet"  # a file whose "item_id" column holds sessions, and vice versa
    pl.DataFrame({"item_id": [7, 7, 8, 8], "session_id": [1, 2, 3, 4], "time": [2, 1, 1, 2]}).write_parquet(p)
    df = read_events(p, Keys(session="item_id", item="session_id"))
    assert tuples(df) == [(7, 2, 1.0), (7, 1, 2.0), (8, 3, 1.0), (8, 4, 2.0)]  # 7 appears first
    for keys in (Keys(session="item_id"), Keys(item="time"), Keys(session="x", item="x")):
        with pytest.raises(UserError, match="three different columns"):
            read_events(p, keys)


def test_cli_key_options_reach_the_reader(tmp_path, run):
    path = write(tmp_path / "mine.csv", ("sid", "product", "ts"))
    code, out, err = run(
        "data",
        "stats",
        path,
        "--session-key",
        "sid",
        "--item-key",
        "product",
        "--time-key",
        "ts",
        "--json",
        tmp_path / "s.json",
    )
    assert code == 0, err
    s = json.loads((tmp_path / "s.json").read_text())
    assert (s["sessions"], s["events"], s["items"], s["predictions"]) == (3, 8, 8, 5)
    code, out, err = run("data", "stats", path)  # without the options the columns are missing
    assert code == 2 and "missing column(s) session_id, item_id, time" in err


def test_stats_against_direct_count(tmp_path, run):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 70, 300)
    sid = np.repeat(rng.permutation(10_000)[:300], lengths)
    items = rng.integers(0, 500, lengths.sum())
    path = tmp_path / "e.parquet"
    pl.DataFrame({"session_id": sid, "item_id": items, "time": np.arange(len(sid))}).write_parquet(path)
    code, out, err = run("data", "stats", path, "--json", tmp_path / "s.json")
    assert code == 0, err
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["sessions"] == 300 and s["events"] == lengths.sum() and s["items"] == len(set(items.tolist()))
    assert s["predictions"] == lengths.sum() - 300
    ln = s["length"]
    assert (ln["min"], ln["max"], ln["median"]) == (lengths.min(), lengths.max(), float(np.median(lengths)))
    assert ln["mean"] == pytest.approx(lengths.mean())
    hist = ln["histogram"]
    assert hist["1"] == (lengths == 1).sum() and hist["5-9"] == ((lengths >= 5) & (lengths <= 9)).sum()
    assert hist["50+"] == (lengths >= 50).sum() and sum(hist.values()) == 300
    assert "sessions" in out and "5-9" in out  # the rich tables


def test_session_lengths_and_fingerprint(tmp_path):
    df = read_events(write(tmp_path / "e.csv"))
    lens = dict(session_lengths(df).select("session_id", "length").iter_rows())
    assert lens == {1: 3, 2: 3, 3: 2}
    assert fingerprint(df) == fingerprint(read_events(write(tmp_path / "e.parquet")))
    changed = df.with_columns(
        pl.when(pl.col("item_id") == 30).then(99).otherwise(pl.col("item_id")).alias("item_id")
    )
    assert fingerprint(changed) != fingerprint(df)


# --- every bad input: one `error:` line on stderr, exit code 2, no traceback ------------------------

BAD_CSV = {
    "header_only.csv": ("session_id,item_id,time\n", "no events"),
    "missing_col.csv": ("session_id,item_id\n1,2\n", "missing column(s) time"),
    "null_item.csv": ("session_id,item_id,time\n1,,3\n1,2,4\n", "column 'item_id' has 1 null value(s)"),
    "null_session.csv": ("session_id,item_id,time\n,1,3\n1,2,4\n", "column 'session_id' has 1 null value(s)"),
    "null_time.csv": ("session_id,item_id,time\n1,1,\n1,2,4\n", "column 'time' has 1 null value(s)"),
    "float_session.csv": (
        "session_id,item_id,time\n1.5,1,3\n1,2,4\n",
        "column 'session_id' must hold integer or string ids, found Float64",
    ),
    "string_time.csv": (
        "session_id,item_id,time\n1,1,monday\n1,2,4\n",
        "column 'time' holds text that is not an ISO-8601 time, e.g. 'monday'",
    ),
    "nan_time.csv": ("session_id,item_id,time\n1,1,NaN\n1,2,4\n", "NaN or infinite"),
    "empty.csv": ("", "file is empty"),
    "wrong_kind.json": ('{"a": 1}', "unknown file type '.json'"),
    "garbage.parquet": ("this is not parquet", "cannot read file"),
    "official_missing.tsv": ("SessionId\tItemId\n1\t2\n", "missing column(s) time"),
}


@pytest.mark.parametrize("name", sorted(BAD_CSV))
def test_bad_input_one_line_exit_2(tmp_path, run, name):
    content, needle = BAD_CSV[name]
    path = tmp_path / name
    path.write_text(content)
    code, out, err = run("data", "stats", path)
    assert code == 2
    assert err.startswith("error: ") and needle in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_bad_paths_and_keys(tmp_path, run):
    for path, needle in [
        (tmp_path / "nope.parquet", "file not found"),
        (tmp_path, "folder holds no Parquet, TSV or CSV files"),
    ]:
        code, _, err = run("data", "stats", path)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1
    path = write(tmp_path / "mine.csv", ("sid", "product", "ts"))
    code, _, err = run(
        "data", "stats", path, "--session-key", "sid", "--item-key", "prod", "--time-key", "ts"
    )
    assert code == 2 and "missing column(s) prod (have: sid, product, ts)" in err


def test_bad_parquet_dtypes_and_nulls(tmp_path, run):
    cases = {
        "float_items.parquet": (
            {"session_id": [1, 1], "item_id": [1.0, 2.0], "time": [1, 2]},
            "column 'item_id' must hold integer or string ids, found Float64",
        ),
        "null_items.parquet": ({"session_id": [1, 1], "item_id": [1, None], "time": [1, 2]}, "null value(s)"),
        "empty.parquet": ({"session_id": [], "item_id": [], "time": []}, "no events"),
        "inf_time.parquet": (
            {"session_id": [1, 1], "item_id": [1, 2], "time": [1.0, float("inf")]},
            "NaN or infinite",
        ),
    }
    for name, (data, needle) in cases.items():
        path = tmp_path / name
        pl.DataFrame(data, schema_overrides={"session_id": pl.Int64}).write_parquet(path)
        code, _, err = run("data", "stats", path)
        assert code == 2 and err.startswith("error: ") and needle in err, (name, err)
        assert len(err.strip().splitlines()) == 1


def test_unsigned_ids_too_large(tmp_path, run):
    path = tmp_path / "u64.parquet"
    ids = pl.Series([2**64 - 1, 1], dtype=pl.UInt64)
    pl.DataFrame({"session_id": [1, 1], "item_id": ids, "time": [1, 2]}).write_parquet(path)
    code, _, err = run("data", "stats", path)
    assert code == 2 and err == f"error: {path}: column 'item_id' has ids larger than 2^63-1\n"


def test_real_process_exit_code_and_single_line(tmp_path, cli):
    """One end-to-end check through a real `python -m gru4rec.cli` process."""
    path = tmp_path / "null_item.csv"
    path.write_text("session_id,item_id,time\n1,,3\n")
    proc = cli("data", "stats", path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == f"error: {path}: column 'item_id' has 1 null value(s)\n"


def test_explicit_key_must_exist_even_when_canonical_column_does(tmp_path, run):
    # --item-key names a column the file lacks; silently falling back to item_id would train on
    # the wrong column, so it is an error
    path = write(tmp_path / "e.parquet")
    code, _, err = run("data", "stats", path, "--item-key", "product")
    assert code == 2 and err.count("\n") == 1 and "missing column(s) product" in err
