"""ONNX Runtime scoring end to end (score/scorer.py, ort_backend.py, outputs.py, cli.py).

Every exported model here is scored against the brute-force PyTorch reference of test_replay.py
(one session at a time, state reset, all N scores, ranks by direct comparison).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import polars as pl
import pytest
from test_replay import assert_metrics_equal, brute_force_counts, make_model, random_events, reference_metrics

import gru4rec.checkpoint as ckpt_io
from gru4rec.bundle import load_bundle
from gru4rec.data import read_events
from gru4rec.items import ItemMap
from gru4rec.score.ort_backend import OrtBackend
from gru4rec.score.scorer import ScoreConfig, score, score_source
from gru4rec.score.source import SessionSource

N_ITEMS, TOP_K = 60, 10
IDS = np.arange(1000, 1000 + N_ITEMS, dtype=np.int64)


def export_model(model, items: ItemMap, directory, top_k: int, **options) -> str:
    from gru4rec.export.onnx_export import export_bundle

    ckpt = ckpt_io.Checkpoint(model, items)
    # checkpoint.versions() holds torch's TorchVersion, which weights_only loading refuses; plain
    # strings until the core module stores them so (harmless afterwards).
    with pytest.MonkeyPatch.context() as mp:
        original = ckpt_io.versions
        mp.setattr(ckpt_io, "versions", lambda: {k: str(v) for k, v in original().items()})
        ckpt_io.save(ckpt, directory / "m.pt")
    export_bundle(directory / "m.pt", directory / "m.onnx", top_k=top_k, **options)
    return str(directory / "m.onnx")


# ---------------------------------------------------------------------------------------------- metrics
@pytest.mark.parametrize("mode", ["standard", "conservative", "median"])
def test_ort_metrics_match_brute_force_in_every_tie_mode(tiny, tiny_reference, mode):
    assert sum(c[1] > 1 for c in tiny_reference.values()) > 20  # ties present: the modes differ
    report = score(
        tiny["onnx"], tiny["sessions"], config=ScoreConfig(tie_mode=mode, batch_size=32), provider="cpu"
    )
    assert_metrics_equal(report["metrics"], reference_metrics(tiny_reference, mode))
    assert report["tie_mode"] == mode and report["latency"]["provider"] == "ort-cpu"


@pytest.mark.parametrize("mode", ["standard", "conservative"])
def test_fast_count_graph_matches_brute_force(tiny, tiny_reference, tmp_path, mode):
    """Export's exact speed options (float16 block counts, padded columns, two-stage top-k): same metrics."""
    fast = export_model(tiny["model"], ItemMap(IDS), tmp_path, TOP_K, count_block=16, topk_chunks=4)
    assert load_bundle(fast).meta["count_block"] == "16"
    report = score(fast, tiny["sessions"], config=ScoreConfig(tie_mode=mode, batch_size=32), provider="cpu")
    assert_metrics_equal(report["metrics"], reference_metrics(tiny_reference, mode))


def test_recs_parquet_matches_reference(tiny, tiny_reference, tmp_path):
    out, metrics = tmp_path / "recs.parquet", tmp_path / "metrics.json"
    k = 7
    report = score(
        tiny["onnx"], tiny["sessions"], out=out, metrics=metrics, config=ScoreConfig(k=k, batch_size=16)
    )
    recs = pl.read_parquet(out)
    assert recs.columns == [
        "session_id",
        "position",
        "item_id",
        "next_item_id",
        "rank",
        "rec_item_ids",
        "rec_scores",
    ]
    assert recs.height == len(tiny_reference) == report["metrics"]["n"] == report["n_predictions"]
    keys = list(zip(recs["session_id"].to_list(), recs["position"].to_list(), strict=True))
    assert keys == sorted(keys)  # rows come sorted by session, then position
    assert set(zip(recs["session_id"].to_list(), recs["position"].to_list(), strict=True)) == set(
        tiny_reference
    )
    checked = 0
    for row in recs.iter_rows(named=True):
        g, e, x, y, scores = tiny_reference[(row["session_id"], row["position"])]
        assert (row["item_id"], row["next_item_id"]) == (IDS[x], IDS[y])
        assert row["rank"] == g + 1
        order = np.argsort(-scores, kind="stable")
        assert np.allclose(row["rec_scores"], scores[order[:k]], atol=1e-5)
        if scores[order[k - 1]] - scores[order[k]] > 1e-4 and len(set(np.round(scores[order[:k]], 4))) == k:
            assert row["rec_item_ids"] == IDS[order[:k]].tolist()  # same ids, same order, barring near-ties
            checked += 1
    assert checked > recs.height // 2
    saved = json.loads(metrics.read_text())
    assert saved["metrics"] == pytest.approx(report["metrics"])
    assert saved["latency"]["write_s"] > 0


def test_io_binding_path_on_cpu_matches_reference(tiny, tiny_reference, tmp_path):
    """The CUDA code path (capacity buffers, per-shape bindings, ping-pong state), run on the CPU EP."""
    b = load_bundle(tiny["onnx"])
    backend = OrtBackend(b.eval_path, b.n_items, b.top_k, b.n_layers, b.hidden_size, "cpu", io_binding=True)
    for batch in (1, 24):  # 24: shrinks through widths 12, 6, 3, 2, 1 in the tail
        out = tmp_path / f"recs{batch}.parquet"
        report = score_source(
            backend, b.items, SessionSource(tiny["sessions"]), ScoreConfig(batch_size=batch), out=out
        )
        assert_metrics_equal(report["metrics"], reference_metrics(tiny_reference, "standard"))
        recs = pl.read_parquet(out)
        for row in recs.sample(50, seed=batch).iter_rows(named=True):
            scores = tiny_reference[(row["session_id"], row["position"])][4]
            assert np.allclose(row["rec_scores"], np.sort(scores)[::-1][:TOP_K], atol=1e-5)
    assert len(backend._bindings) > 2  # several (width, buffer) combinations were bound


@pytest.mark.parametrize("io_binding", [False, True])
def test_ranks_only_graph_has_no_topk_and_matches_reference(tiny, tiny_reference, io_binding):
    """Metrics without recommendations: the TopK branch is cut from the graph, the ranks stay exact."""
    import onnx

    from gru4rec.score.ort_backend import scoring_graph

    b = load_bundle(tiny["onnx"])
    pruned = scoring_graph(onnx.load(str(b.eval_path)), with_topk=False)
    assert "TopK" not in {n.op_type for n in pruned.graph.node}
    assert not {"topk_idx", "topk_scores"} & {o.name for o in pruned.graph.output}
    onnx.checker.check_model(pruned)
    backend = OrtBackend.from_bundle(b, "cpu", io_binding=io_binding, with_topk=False)
    report = score_source(backend, b.items, SessionSource(tiny["sessions"]), ScoreConfig(batch_size=24))
    assert_metrics_equal(report["metrics"], reference_metrics(tiny_reference, "standard"))
    with pytest.raises(ValueError):
        backend.step(*(np.zeros(1, np.int64),) * 3, np.ones(1, bool), True)


@pytest.mark.parametrize("io_binding", [False, True])
def test_ort_moves_state_rows_when_the_batch_shrinks(tiny, tmp_path, io_binding):
    # batch 2, lengths 4, 3, 3: the last step's only row continues the session that was in row 1
    events = pl.DataFrame(
        {"session_id": [1] * 4 + [2] * 3 + [3] * 3, "item_id": [5, 6, 7, 8, 1, 2, 3, 9, 9, 4]}
    )
    events = events.with_columns(
        time=pl.int_range(pl.len()), item_id=pl.col("item_id") + 1020
    )  # untied items
    events.write_parquet(tmp_path / "s.parquet")
    b = load_bundle(tiny["onnx"])
    backend = OrtBackend(
        b.eval_path, b.n_items, b.top_k, b.n_layers, b.hidden_size, "cpu", io_binding=io_binding
    )
    out = tmp_path / "recs.parquet"
    config = ScoreConfig(batch_size=2, tie_mode="median")
    report = score_source(backend, b.items, SessionSource(tmp_path / "s.parquet"), config, out=out)
    ref = brute_force_counts(tiny["model"], IDS, events)
    for row in pl.read_parquet(out).iter_rows(named=True):  # per-pair ranks: metrics alone could hide a swap
        g, e = ref[(row["session_id"], row["position"])][:2]
        assert row["rank"] == g + 1 + (e - 1) / 2
    assert_metrics_equal(report["metrics"], reference_metrics(ref, "median"))
    assert report["latency"]["n_steps"] == 4


def test_online_mode_with_ort(tiny, tiny_reference):
    report = score(tiny["onnx"], tiny["sessions"], config=ScoreConfig(latency_mode="online"), provider="cpu")
    lat = report["latency"]
    assert (lat["mode"], lat["batch_size"], lat["n_steps"]) == ("online", 1, len(tiny_reference))
    assert 0 < lat["step_ms_p50"] <= lat["step_ms_p95"] <= lat["step_ms_p99"]
    assert_metrics_equal(report["metrics"], reference_metrics(tiny_reference, "standard"))


def test_unknown_items_dropped_through_ort(tiny, tmp_path):
    events = random_events(100, N_ITEMS + 10, seed=9)
    path = tmp_path / "s.parquet"
    events.write_parquet(path)
    report = score(tiny["onnx"], path, config=ScoreConfig(batch_size=8), provider="cpu")
    assert report["n_unknown_dropped"] == int((events["item_id"] >= 1000 + N_ITEMS).sum()) > 0
    known_lengths = {}
    for sid, item in zip(events["session_id"].to_list(), events["item_id"].to_list(), strict=True):
        known_lengths[sid] = known_lengths.get(sid, 0) + (item < 1000 + N_ITEMS)
    skipped = sum(n < 2 for n in known_lengths.values())
    assert report["n_skipped_sessions"] == skipped > 0
    assert report["n_scored_sessions"] + skipped == report["n_sessions"] == len(known_lengths)
    assert_metrics_equal(
        report["metrics"], reference_metrics(brute_force_counts(tiny["model"], IDS, events), "standard")
    )


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_score_prints_tables_and_writes_json(cli, tiny, tmp_path):
    metrics = tmp_path / "m.json"
    proc = cli("score", "--model", tiny["onnx"], "--sessions", tiny["sessions"], "--metrics", metrics,
               "--cutoffs", "1,10", "--batch-size", "64", "--provider", "auto")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Recall" in proc.stdout and "events/s" in proc.stdout
    doc = json.loads(metrics.read_text())
    assert set(doc) >= {
        "metrics",
        "tie_mode",
        "cutoffs",
        "n_events",
        "n_sessions",
        "n_unknown_dropped",
        "latency",
        "model",
    }
    assert set(doc["metrics"]) == {"recall@1", "mrr@1", "ndcg@1", "recall@10", "mrr@10", "ndcg@10", "n"}
    assert set(doc["latency"]) >= {"step_ms_p50", "step_ms_p95", "step_ms_p99", "events_per_s", "sessions_per_s",
                                   "load_s", "replay_s", "write_s", "provider", "batch_size", "device", "mode"}  # fmt: skip
    assert doc["n_events"] == tiny["events"].height


def _bad_inputs(tiny, tmp_path):
    ev = tiny["events"]
    (tmp_path / "zero.parquet").write_bytes(b"")
    ev.head(0).write_parquet(tmp_path / "header_only.parquet")
    ev.drop("time").write_parquet(tmp_path / "no_time.parquet")
    ev.unique("session_id").write_parquet(tmp_path / "singles.parquet")
    ev.with_columns(item_id=pl.col("item_id") + 10**6).write_parquet(tmp_path / "unknown.parquet")
    bad = tmp_path / "bad_model"
    bad.mkdir()
    for f in tiny["root"].glob("m.*"):
        shutil.copy(f, bad / f.name)
    pl.DataFrame({"item_idx": np.arange(N_ITEMS), "item_id": IDS[::-1].copy()}).write_parquet(
        bad / "m.items.parquet"
    )
    s = tiny["sessions"]
    folder = tmp_path / "folder.parquet"
    folder.mkdir()
    return {
        "zero-byte file": (["--sessions", tmp_path / "zero.parquet"], "empty"),
        "header only": (["--sessions", tmp_path / "header_only.parquet"], "no events"),
        "missing column": (["--sessions", tmp_path / "no_time.parquet"], "missing column"),
        "one-event sessions": (["--sessions", tmp_path / "singles.parquet"], "single event"),
        "all items unknown": (["--sessions", tmp_path / "unknown.parquet"], "unknown"),
        "sidecar mismatch": (["--sessions", s, "--model", bad / "m.onnx"], "sidecar"),
        "k above top-k": (
            ["--sessions", s, "--k", str(TOP_K + 1), "--out", tmp_path / "never.parquet"],
            "top-k",
        ),
        "k without --out": (["--sessions", s, "--k", "5"], "add --out"),
        "out is a folder": (["--sessions", s, "--out", folder], "directory"),
        "out parent is a file": (["--sessions", s, "--out", tmp_path / "zero.parquet" / "r.parquet"], "file"),
        "out overwrites the input": (["--sessions", s, "--out", s], "overwrite an input"),
        "out is the metrics file": (["--sessions", s, "--out", tmp_path / "never.json"], "Parquet"),
        "keys name one column": (["--sessions", s, "--session-key", "item_id"], "three different"),
        "cutoff above catalog": (["--sessions", s, "--cutoffs", f"5,{N_ITEMS + 1}"], "catalog"),
        "bad tie mode": (["--sessions", s, "--tie-mode", "random"], "tie-mode"),
    }


def run_main(capsys, *args) -> tuple[int, str]:
    """`gru4rec-cli ARGS` in this process (the real entry point, minus interpreter start-up)."""
    from gru4rec.cli import main

    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    return exc.value.code, capsys.readouterr().err


def test_cli_bad_inputs_give_one_line_and_exit_2(capsys, tiny, tmp_path):
    for case, (args, needle) in _bad_inputs(tiny, tmp_path).items():
        if "--model" not in args:
            args = ["--model", tiny["onnx"], *args]
        code, err = run_main(
            capsys, "score", *args, "--metrics", tmp_path / "never.json", "--provider", "cpu"
        )
        lines = err.strip().splitlines()
        assert code == 2, (case, err)
        assert len(lines) == 1 and lines[0].startswith("error: "), (case, err)
        assert needle in lines[0], (case, lines[0])
        assert not (tmp_path / "never.json").exists() and not (tmp_path / "never.parquet").exists()
        assert pl.read_parquet(tiny["sessions"]).height > 0, case  # the input is never overwritten


def test_cli_user_error_in_a_real_process(cli, tiny):
    base = ("score", "--model", tiny["onnx"], "--sessions", tiny["sessions"])
    for extra, start in (
        (("--tie-mode", "x"), "error: --tie-mode"),
        (("--batch-size", "x"), "error: Invalid"),
    ):
        proc = cli(*base, *extra)
        assert proc.returncode == 2 and proc.stderr.startswith(start) and proc.stderr.count("\n") == 1, (
            proc.stderr
        )


def test_provider_cuda_without_cuda_is_an_error(capsys, tiny):
    from gru4rec.score.ort_backend import cuda_usable

    if cuda_usable():
        pytest.skip("CUDA is usable here")
    code, err = run_main(
        capsys, "score", "--model", tiny["onnx"], "--sessions", tiny["sessions"], "--provider", "cuda"
    )
    assert code == 2 and err.count("\n") == 1 and "--provider cuda" in err


# ---------------------------------------------------------------------------------------------- real data
def test_rsc15_metrics_equal_brute_force_pytorch(shared_data, tmp_path):
    train = read_events(shared_data / "rsc15_100k" / "train.parquet")
    test_path = shared_data / "rsc15_100k" / "test.parquet"
    items = ItemMap.from_events(train)
    model = make_model(len(items), hidden=48, seed=11)  # scaled Wy and random biases: no accidental ties
    onnx_path = export_model(model, items, tmp_path, top_k=20)
    ref = brute_force_counts(model, items.ids, read_events(test_path))
    out = tmp_path / "recs.parquet"
    report = score(onnx_path, test_path, out=out, config=ScoreConfig(batch_size=512), provider="cpu")
    assert report["metrics"]["n"] == len(ref) == 10_152
    assert_metrics_equal(report["metrics"], reference_metrics(ref, "standard"), tol=1e-6)
    recs = pl.read_parquet(out)
    keys = zip(recs["session_id"].to_list(), recs["position"].to_list(), strict=True)
    ref_rank = np.array([ref[key][0] + 1 for key in keys])
    assert np.mean(recs["rank"].to_numpy() == ref_rank) > 0.999  # float32 GEMM order may flip a far near-tie


# ---------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_ort_cuda_io_binding_matches_reference(tiny, tiny_reference, tmp_path, cuda_graph):
    b = load_bundle(tiny["onnx"])
    backend = OrtBackend(
        b.eval_path, b.n_items, b.top_k, b.n_layers, b.hidden_size, "cuda", cuda_graph=cuda_graph
    )
    assert backend.io_binding and backend.name == "ort-cuda"
    for batch in (1, 24, 1024):
        out = tmp_path / f"recs{batch}.parquet"
        report = score_source(
            backend, b.items, SessionSource(tiny["sessions"]), ScoreConfig(batch_size=batch), out=out
        )
        assert_metrics_equal(report["metrics"], reference_metrics(tiny_reference, "standard"))
        for row in pl.read_parquet(out).sample(50, seed=batch).iter_rows(named=True):
            scores = tiny_reference[(row["session_id"], row["position"])][4]
            assert np.allclose(row["rec_scores"], np.sort(scores)[::-1][:TOP_K], atol=1e-4)


@pytest.mark.gpu
def test_torch_cuda_backend_matches_reference(tiny, tiny_reference):
    from gru4rec.score.torch_backend import TorchBackend

    backend = TorchBackend(make_model(N_ITEMS, seed=7, tied=12), TOP_K, "cuda")
    report = score_source(backend, ItemMap(IDS), SessionSource(tiny["sessions"]), ScoreConfig(batch_size=24))
    assert_metrics_equal(report["metrics"], reference_metrics(tiny_reference, "standard"))
