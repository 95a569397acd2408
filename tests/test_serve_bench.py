"""`gru4rec-cli bench serve` end to end on a tiny model: bounded, loopback only, JSON written.

Nothing here compares timings (a shared machine makes them noise), and each level is ended by its
request count, not the clock (--seconds is only the bound on a hung server); it checks that every
request was answered, that the levels and the stateless comparison are reported, and that the stateless
replay gave the stateful top-k.
"""

from __future__ import annotations

import json

from conftest import ours, run_cli


def test_bench_serve_writes_bounded_results(int_model, tmp_path):
    out, scratch = tmp_path / "serve.json", tmp_path / "tmp"
    scratch.mkdir()
    run_cli(
        "bench", "serve", "--model", int_model["onnx"], "--sessions", int_model["sessions"], "--out", out,
        "--concurrency", "1,4", "--requests", "120", "--seconds", "600", "--lengths", "2,3",
        "--stateless-sessions", "4", "--threads", "1", check=True, tmpdir=scratch,
    )  # fmt: skip
    assert ours(scratch) == []  # its working copies are removed: a nightly bench fills no disk
    result = json.loads(out.read_text())
    assert [lv["concurrency"] for lv in result["levels"]] == [1, 4]
    for level in result["levels"]:
        assert level["requests"] == 120 and level["ok"] == 120 and level["errors"] == 0
        assert set(level["latency_ms"]) >= {"p50", "p95", "p99"} and level["events_per_s"] > 0
    rows = result["stateful_vs_stateless"]
    assert [r["length"] for r in rows] == [2, 3] and all(r["same_top_k"] for r in rows)
    assert rows[1]["model_calls_per_event"] == {"stateful": 1.0, "stateless": 2.0}


def test_bench_serve_refuses_a_remote_url(int_model, tmp_path):
    proc = run_cli("bench", "serve", "--model", int_model["onnx"], "--url", "http://example.com:80")
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "loopback" in proc.stderr
