"""The user's own data as it comes: string ids, time units, folders / globs / hive datasets, and
outputs that never land on inputs. References are independent: the same events with integer ids, a
single file, or hand-computed values."""

from __future__ import annotations

import json
import os

import numpy as np
import polars as pl
import pytest

from gru4rec.data import Keys, read_events
from gru4rec.errors import UserError


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """Small synthetic train/test with integer ids, the same with string ids ("s-<id>", "sku-<id>")."""
    from gru4rec.synth import generate

    root = tmp_path_factory.mktemp("synth")
    train, test = generate(3000, 300, 5)
    for name, df in (("train", train), ("test", test)):
        df.write_parquet(root / f"{name}.parquet")
        as_text(df).write_parquet(root / f"{name}_str.parquet")
    return root


def as_text(df: pl.DataFrame) -> pl.DataFrame:
    return df.with_columns(
        pl.format("s-{}", "session_id").alias("session_id"), pl.format("sku-{}", "item_id").alias("item_id")
    )


def one_line_error(code: int, err: str, needle: str) -> None:
    """Exit 2 and one `error:` line (notes may precede it), never a traceback."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in err, err
    assert sum(line.startswith("error:") for line in lines) == 1 and needle in lines[-1], err


# --- ids of the user's own type ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipelines(synth, tmp_path_factory):
    """train -> export -> score, once with integer and once with string ids (same seed)."""
    from tests.conftest import run_cli

    out = tmp_path_factory.mktemp("pipe")
    for tag in ("", "_str"):
        m = out / f"m{tag}"
        run_cli("train", synth / f"train{tag}.parquet", "--out", f"{m}.pt", "--preset", "demo",
                "--epochs", "2", "--device", "cpu", "--quiet", check=True)  # fmt: skip
        run_cli("export", f"{m}.pt", "--out", f"{m}.onnx", check=True)
        run_cli("score", "--model", f"{m}.onnx", "--sessions", synth / f"test{tag}.parquet",
                "--out", out / f"recs{tag}.parquet", "--metrics", out / f"met{tag}.json",
                "--chunk-events", "700", check=True)  # fmt: skip
    return out


def test_string_and_integer_ids_give_identical_models_and_scores(pipelines):
    met = [json.loads((pipelines / f"met{t}.json").read_text()) for t in ("", "_str")]
    # Equal up to summation order (chunks hold other sessions when ids sort differently as text).
    assert met[0]["metrics"] == pytest.approx(met[1]["metrics"], rel=1e-12, abs=0)
    assert met[0]["metrics"]["n"] > 500
    items = [pl.read_parquet(pipelines / f"m{t}.items.parquet") for t in ("", "_str")]
    assert items[1]["item_id"].dtype == pl.String
    # Same item order in the map: index i holds the same item whichever way its id is written.
    assert items[1]["item_id"].to_list() == [f"sku-{i}" for i in items[0]["item_id"]]


def test_string_ids_come_back_in_the_outputs_as_given(pipelines):
    ints = pl.read_parquet(pipelines / "recs.parquet")
    strs = pl.read_parquet(pipelines / "recs_str.parquet")
    assert strs.schema["session_id"] == pl.String and strs.schema["rec_item_ids"] == pl.List(pl.String)
    back = strs.with_columns(
        pl.col("session_id").str.strip_prefix("s-").cast(pl.Int64),
        *(pl.col(c).str.strip_prefix("sku-").cast(pl.Int64) for c in ("item_id", "next_item_id")),
        pl.col("rec_item_ids").list.eval(pl.element().str.strip_prefix("sku-").cast(pl.Int64)),
    ).sort("session_id", "position")
    ints = ints.sort("session_id", "position")
    for c in ("session_id", "position", "item_id", "next_item_id", "rank", "rec_item_ids"):
        assert back[c].to_list() == ints[c].to_list(), c
    np.testing.assert_allclose(
        np.vstack(back["rec_scores"].to_list()), np.vstack(ints["rec_scores"].to_list()), atol=1e-5
    )


def test_model_refuses_ids_of_the_other_type(pipelines, synth, run):
    code, _, err = run("score", "--model", pipelines / "m_str.onnx", "--sessions", synth / "test.parquet")
    one_line_error(code, err, "item ids are integer (Int64) but the model was trained on string (String)")
    code, _, err = run("score", "--model", pipelines / "m.onnx", "--sessions", synth / "test_str.parquet")
    one_line_error(code, err, "item ids are string (String) but the model was trained on integer (Int64)")


def test_train_refuses_validation_ids_of_the_other_type(synth, tmp_path, run):
    out = tmp_path / "m.pt"
    code, _, err = run("train", synth / "train_str.parquet", "--valid", synth / "test.parquet", "--out", out,
                       "--preset", "demo", "--epochs", "1", "--device", "cpu", "--quiet")  # fmt: skip
    one_line_error(code, err, "item ids are Int64 but String in")
    assert not out.exists()


def test_categorical_ids_read_as_strings(tmp_path):
    p = tmp_path / "cat.parquet"
    pl.DataFrame({"session_id": ["b", "b", "a"], "item_id": ["x", "y", "x"], "time": [1, 2, 3]}).with_columns(
        pl.col("session_id").cast(pl.Categorical), pl.col("item_id").cast(pl.Enum(["x", "y"]))
    ).write_parquet(p)
    df = read_events(p)
    assert df.schema["session_id"] == pl.String and df.schema["item_id"] == pl.String
    assert df.rows() == [("b", "x", 1), ("b", "y", 2), ("a", "x", 3)]


def test_eval_benchmark_every_baseline_same_with_string_ids(pipelines, synth, tmp_path, run):
    """`eval benchmark` on the integer and the string copy of the data: GRU4Rec (the exported models)
    and every baseline give the same metrics."""
    cfg = tmp_path / "bench.toml"
    text = '[benchmark]\ntie_modes = ["standard", "conservative"]\nmax_k = 20\n'
    for tag in ("int", "str"):
        suffix = "" if tag == "int" else "_str"
        text += f'[[dataset]]\nname = "{tag}"\ntrain = "{synth}/train{suffix}.parquet"\ntest = "{synth}/test{suffix}.parquet"\n'
    for tag in ("int", "str"):
        suffix = "" if tag == "int" else "_str"
        text += f'[[model]]\nname = "GRU4Rec-{tag}"\nkind = "gru4rec"\nonnx = "{pipelines}/m{suffix}.onnx"\ndatasets = ["{tag}"]\n'
    for kind in ("pop", "spop", "itemknn", "sknn", "vsknn"):
        text += f'[[model]]\nkind = "{kind}"\n'
    text += '[[model]]\nkind = "bprmf"\noptions = { epochs = 1 }\n'
    cfg.write_text(text)
    code, _, err = run("eval", "benchmark", "--config", cfg, "--out", tmp_path / "report")
    assert code == 0, err
    rows = json.loads((tmp_path / "report" / "results.json").read_text())["results"]
    by = {(r["dataset"], r["model"].removesuffix("-int").removesuffix("-str")): r["metrics"] for r in rows}
    models = {m for _, m in by}
    assert len(models) == 7
    for m in models:
        for mode in by[("int", m)]:
            assert by[("int", m)][mode] == pytest.approx(by[("str", m)][mode], rel=1e-12, abs=0), m


# --- layouts ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def layouts(synth, tmp_path_factory):
    """The test events as one file, as 4 files whose sessions span files, and as a hive dataset."""
    root = tmp_path_factory.mktemp("layouts")
    test = pl.read_parquet(synth / "test.parquet")
    parts = np.array_split(np.arange(test.height), 4)  # cuts fall inside sessions
    (root / "multi").mkdir()
    for k, rows in enumerate(parts):
        test[rows].write_parquet(root / "multi" / f"part-{k}.parquet")
    (root / "multi" / "_SUCCESS").write_text("")
    day = (pl.col("time") // 86_400).cast(pl.Int64)
    for (d,), df in test.with_columns(day.alias("_d")).group_by("_d"):
        folder = root / "hive" / f"day={d}"
        folder.mkdir(parents=True)
        df.drop("_d").write_parquet(folder / "part-0.parquet")
    return root


def test_glob_folder_and_hive_score_exactly_like_the_file(pipelines, synth, layouts, run):
    want = json.loads((pipelines / "met.json").read_text())["metrics"]
    for sessions in (layouts / "multi", str(layouts / "multi" / "*.parquet"), layouts / "hive",
                     str(layouts / "hive" / "**" / "*.parquet")):  # fmt: skip
        out = layouts / "m.json"
        code, _, err = run("score", "--model", pipelines / "m.onnx", "--sessions", sessions,
                           "--metrics", out, "--chunk-events", "500")  # fmt: skip
        assert code == 0, err
        got = json.loads(out.read_text())["metrics"]
        assert got == pytest.approx(want, rel=1e-12, abs=0), sessions


def test_partition_filter_reads_only_its_partitions(synth, layouts):
    full = read_events(synth / "test.parquet")
    days = sorted(int(p.name.split("=")[1]) for p in (layouts / "hive").iterdir())
    kept = read_events(layouts / "hive", where=pl.col("day") >= days[-2])
    want = full.filter((pl.col("time") // 86_400) >= days[-2])
    assert kept.height == want.height > 0 and kept.sort("session_id", "time").equals(
        want.sort("session_id", "time")
    )


def test_train_reads_a_folder_like_the_file(synth, tmp_path):
    folder = tmp_path / "train"
    folder.mkdir()
    train = pl.read_parquet(synth / "train.parquet")
    n = train.height // 2
    train[:n].write_parquet(folder / "a.parquet")
    train[n:].write_parquet(folder / "b.parquet")
    assert read_events(folder).equals(read_events(synth / "train.parquet"))


# --- bad inputs: one line, exit 2, nothing written ----------------------------------------------------


def test_bad_layouts(tmp_path, run, pipelines):
    a, b = tmp_path / "mixed" / "a.parquet", tmp_path / "mixed" / "b.parquet"
    a.parent.mkdir()
    pl.DataFrame({"session_id": [1, 1], "item_id": [1, 2], "time": [1, 2]}).write_parquet(a)
    pl.DataFrame({"session_id": [2, 2], "item_id": ["1", "2"], "time": [1, 2]}).write_parquet(b)
    code, _, err = run("data", "stats", a.parent)
    one_line_error(code, err, f"column 'item_id' is Int64 in {a} but String in {b}")

    code, _, err = run("data", "stats", str(tmp_path / "nothing-*.parquet"))
    one_line_error(code, err, "the pattern matches no file")

    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty_dir" / "notes.md").write_text("x")
    code, _, err = run("data", "stats", tmp_path / "empty_dir")
    one_line_error(code, err, "folder holds no Parquet, TSV or CSV files")

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    pl.DataFrame({"session_id": [1, 1], "item_id": [1, 2], "time": [1, 2]}).write_parquet(
        corrupt / "a.parquet"
    )
    (corrupt / "b.parquet").write_bytes(b"PAR1 this is not a parquet file")
    out = tmp_path / "m.json"
    code, _, err = run("score", "--model", pipelines / "m.onnx", "--sessions", corrupt, "--metrics", out)
    one_line_error(code, err, f"{corrupt / 'b.parquet'}: cannot read file")
    assert not out.exists()


# --- time units -----------------------------------------------------------------------------------


def test_millisecond_times_are_recognised_or_refused(tmp_path, run):
    secs = pl.DataFrame(
        {
            "sid": [1, 1, 2, 2],
            "sku": [5, 6, 5, 7],
            "ts": [1_700_000_000, 1_700_000_060, 1_700_090_000, 1_700_090_001],
        }
    )
    ms = secs.with_columns(pl.col("ts") * 1000)
    p = tmp_path / "ms.csv"
    ms.write_csv(p)
    keys = Keys("sid", "sku", "ts")
    got = read_events(p, keys)  # auto: recognised by magnitude and converted
    assert got["time"].to_list() == [float(t) for t in secs["ts"]]
    us = tmp_path / "us.parquet"
    secs.with_columns(pl.col("ts") * 1_000_000).write_parquet(us)
    assert read_events(us, keys)["time"].to_list() == [float(t) for t in secs["ts"]]
    # Milliseconds declared as seconds: refused, naming the user's column and the right unit.
    code, _, err = run("data", "stats", p, "--session-key", "sid", "--item-key", "sku", "--time-key", "ts",
                       "--time-unit", "s")  # fmt: skip
    one_line_error(code, err, "column 'ts' read as s gives times up to")
    assert "look like milliseconds; pass --time-unit ms" in err
    # Declared units convert exactly.
    got = read_events(p, Keys("sid", "sku", "ts", "ms"))
    assert got["time"].to_list() == [float(t) for t in secs["ts"]]


def test_split_of_a_millisecond_log_equals_the_seconds_log(tmp_path, run):
    from gru4rec.synth import generate

    train, _ = generate(2000, 200, 9)
    secs, ms = tmp_path / "s.parquet", tmp_path / "ms.parquet"
    train.write_parquet(secs)
    train.with_columns(pl.col("time") * 1000).write_parquet(ms)
    assert run("data", "split", secs, tmp_path / "a", "--test-days", "2")[0] == 0
    code, _, err = run("data", "split", ms, tmp_path / "b", "--test-days", "2")
    assert code == 0 and "looks like epoch milliseconds" in err
    for name in ("train_full", "test", "train_tr", "train_valid"):
        a = pl.read_parquet(tmp_path / "a" / f"{name}.parquet")
        b = pl.read_parquet(tmp_path / "b" / f"{name}.parquet")
        assert a.height == b.height > 0 and (b["time"] == a["time"].cast(pl.Float64)).all(), name


def test_iso_text_and_datetime_times(tmp_path):
    p = tmp_path / "iso.csv"
    p.write_text("s,i,t\na,x,2026-11-28T10:00:00Z\na,y,2026-11-28T11:00:00+01:00\nb,x,2026-11-28T09:00:01Z\n")
    df = read_events(p, Keys("s", "i", "t"))
    base = 1795860000.0  # 2026-11-28T10:00:00Z
    assert df.rows() == [("a", "x", base), ("a", "y", base), ("b", "x", base - 3599)]
    q = tmp_path / "tz.parquet"
    pl.DataFrame(
        {"session_id": [1, 1], "item_id": [1, 2], "time": ["2026-11-28 11:00", "2026-11-28 12:00"]}
    ).with_columns(pl.col("time").str.to_datetime().dt.replace_time_zone("Europe/Berlin")).write_parquet(q)
    assert read_events(q)["time"].to_list() == [base, base + 3600]
    bad = tmp_path / "bad.csv"
    bad.write_text("session_id,item_id,time\n1,1,yesterday\n1,2,today\n")
    with pytest.raises(UserError, match="not an ISO-8601 time, e.g. 'yesterday'"):
        read_events(bad)


# --- outputs never over, inside or among the inputs -----------------------------------------------


def test_no_command_overwrites_its_input(synth, tmp_path, run, pipelines):
    log = tmp_path / "cp" / "train_full.parquet"
    log.parent.mkdir()
    log.write_bytes((synth / "train.parquet").read_bytes())
    before = log.read_bytes()
    cases = [
        (("data", "split", log, log.parent, "--test-days", "2"), "output would overwrite an input file"),
        (("data", "stats", log, "--json", log), "output would overwrite an input file"),
        (("data", "prepare-rsc15", log, log.parent), "output would overwrite an input file"),
        (("train", log, "--out", log, "--preset", "demo"), "output would overwrite an input file"),
        (("score", "--model", pipelines / "m.onnx", "--sessions", log, "--out", log), "overwrite an input"),
        (("data", "split", log.parent, log.parent / "out"), "inside the input folder"),
        (
            (
                "score",
                "--model",
                pipelines / "m.onnx",
                "--sessions",
                str(log.parent / "*.parquet"),
                "--out",
                log.parent / "recs.parquet",
            ),
            "among the input files matched by",
        ),  # fmt: skip
    ]
    for args, needle in cases:
        code, _, err = run(*args)
        one_line_error(code, err, needle)
        assert log.read_bytes() == before, args
    assert sorted(p.name for p in log.parent.iterdir()) == ["train_full.parquet"]


def test_split_says_what_it_dropped_and_why(tmp_path, run):
    rows = [(1, 1, 1), (1, 1, 2), (1, 2, 3), (2, 9, 4)]  # a consecutive repeat; item 9 seen once
    rows += [(s, i, 10 * s + i) for s in range(3, 40) for i in (1, 2, 3)]
    # last day: item 77 appears only there (unseen in train); session 51 is left with one event
    rows += [(50, 1, 1_000_000), (50, 77, 1_000_001), (50, 2, 1_000_002)]
    rows += [(51, 77, 1_000_003), (51, 3, 1_000_004), (51, 77, 1_000_005)]
    p = tmp_path / "log.parquet"
    pl.DataFrame(rows, schema=["session_id", "item_id", "time"], orient="row").write_parquet(p)
    code, out, err = run(
        "data", "split", p, tmp_path / "o", "--dedup", "--min-item-support", "2", "--no-valid"
    )
    assert code == 0, err
    d = json.loads((tmp_path / "o" / "dropped.json").read_text())
    assert d["one_event_sessions_in_input"] == 1
    assert d["events"] == {
        "consecutive duplicates": 1,
        "items with fewer than 2 events": 1,
        "sessions shorter than 2 events": 0,
        "test: events of items unseen in training": 3,
        "test: sessions shorter than 2 after unseen items": 1,
    }
    assert d["sessions"]["items with fewer than 2 events"] == 1  # session 2 vanished with item 9
    assert d["sessions"]["test: sessions shorter than 2 after unseen items"] == 1
    test = pl.read_parquet(tmp_path / "o" / "test.parquet")
    assert test.rows() == [(50, 1, 1_000_000), (50, 2, 1_000_002)]
    assert "dropped 3 events (0 whole sessions) - test: events of items unseen in training" in out


@pytest.mark.parametrize("chunk_events", [1, 7, 100, 10**6])
def test_chunks_hold_whole_sessions_and_stats_are_exact(tmp_path, chunk_events):
    """Integer ids are cut into chunks by id buckets (no per-session table up front): every session
    lands whole in exactly one chunk, in id order, and the statistics equal a plain count."""
    from gru4rec.score.source import SessionSource

    rng = np.random.default_rng(1)
    ids = np.concatenate([rng.integers(-(2**40), 2**40, 60), rng.integers(0, 50, 40), [2**62, -(2**62)]])
    lengths = rng.integers(1, 6, len(np.unique(ids)))
    sessions = np.repeat(np.unique(ids), lengths)
    df = pl.DataFrame(
        {"session_id": sessions, "item_id": np.arange(len(sessions)) % 9, "time": np.arange(len(sessions))}
    )
    df.sample(fraction=1.0, shuffle=True, seed=3).write_parquet(tmp_path / "s.parquet")
    source = SessionSource(tmp_path / "s.parquet", chunk_events=chunk_events)
    seen: list[int] = []
    for chunk in source.chunks():
        seen += chunk["session_id"].unique(maintain_order=True).to_list()
    assert sorted(seen) == sorted(set(seen)) == sorted(np.unique(ids).tolist())  # whole, once each
    n = np.bincount(np.searchsorted(np.unique(ids), sessions))
    assert source.stats.n_events == len(sessions) and source.stats.n_sessions == len(n)
    assert source.stats.n_multi_sessions == int((n >= 2).sum()) and source.stats.max_length == int(n.max())


def test_one_chunk_alive_at_a_time(tmp_path):
    """While the next chunk is read, nothing of the source may still hold the previous one (two
    chunks at once would double the peak): checked at the moment each read starts."""
    import gc
    import weakref

    from gru4rec.score.source import SessionSource

    n = 400
    df = pl.DataFrame({"session_id": np.repeat(np.arange(n), 3), "item_id": np.arange(3 * n) % 17,
                       "time": np.arange(3 * n)})  # fmt: skip
    df.write_parquet(tmp_path / "s.parquet")
    source = SessionSource(tmp_path / "s.parquet", chunk_events=150)
    previous = [lambda: None]
    alive_at_read = []
    collect = source._collect

    def watched(lf):
        gc.collect()
        alive_at_read.append(previous[0]() is not None)
        return collect(lf)

    source._collect = watched
    for chunk in source.chunks():
        previous[0] = weakref.ref(chunk)
        del chunk
    assert len(alive_at_read) >= 8 and not any(alive_at_read)


def test_importing_gru4rec_returns_freed_polars_pages(tmp_path):
    """Polars keeps freed jemalloc pages mapped unless told otherwise before it loads; importing
    gru4rec tells it, also in a child whose parent imported Polars first (its defaults inherited),
    and GRU4REC_JEMALLOC_CONF="" leaves the variable alone."""
    import subprocess
    import sys

    def conf(code: str, **env: str) -> str:
        base = {
            k: v for k, v in os.environ.items() if k not in ("_RJEM_MALLOC_CONF", "GRU4REC_JEMALLOC_CONF")
        }
        run = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True,
                             check=True)  # fmt: skip
        return run.stdout.strip()

    show = "import os, gru4rec, polars; print(os.environ['_RJEM_MALLOC_CONF'])"
    assert conf(show).endswith(",dirty_decay_ms:0,muzzy_decay_ms:0")  # after Polars' own: ours win
    assert conf(show, _RJEM_MALLOC_CONF="narenas:2").endswith("narenas:2,dirty_decay_ms:0,muzzy_decay_ms:0")
    # a parent that imported Polars first: the child still ends with ours
    parent = (
        "import os, subprocess, sys, polars\n"
        f"print(subprocess.run([sys.executable, '-c', {show!r}], capture_output=True, text=True).stdout)"
    )
    assert conf(parent).endswith("muzzy_decay_ms:0")
    assert "decay_ms:0" not in conf(show, GRU4REC_JEMALLOC_CONF="")
