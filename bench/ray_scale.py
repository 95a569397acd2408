"""`score --engine local` vs `--engine ray --workers 1` and `--workers 2` on one 5M-event test set.

    .venv/bin/python bench/ray_scale.py --out bench/results/ray-score-latest.json   (make bench)

The demo model (`data synth` 20,000 sessions, `train --preset demo`, `export`) and a 5M-event test
set from the same synthetic world (same seed and catalog, more sessions) are made once in --workdir
and reused. Each run is a separate `gru4rec-cli score` process, timed from start to exit as a user
sees it (a local Ray runtime is started and stopped inside the ray runs); events/s below is scored
events over that wall time. The metrics of the three runs must agree to 1e-12 (else exit 1).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

CLI = [sys.executable, "-m", "gru4rec.cli"]


def sh(*args) -> None:
    print("+", " ".join(map(str, args)), file=sys.stderr, flush=True)
    subprocess.run([*CLI, *map(str, args)], check=True)


def prepare(work: Path, n_events: int) -> tuple[Path, Path]:
    import polars as pl

    model, test = work / "model.onnx", work / f"test-{n_events}.parquet"
    if not model.exists():
        sh("data", "synth", work / "demo", "--sessions", 20000, "--items", 2000, "--seed", 7)
        sh("train", work / "demo" / "train.parquet", "--out", work / "model.pt", "--preset", "demo")
        sh("export", work / "model.pt", "--out", model, "--top-k", 20)
    if not test.exists():
        sessions = int(n_events / 4.2) + 1000  # ~4.4 events per synthetic session before the split
        sh("data", "synth", work / "big", "--sessions", sessions, "--items", 2000, "--seed", 7)
        events = pl.concat([pl.read_parquet(work / "big" / f) for f in ("train.parquet", "test.parquet")])
        lengths = events.group_by("session_id", maintain_order=True).len()
        keep = lengths.filter(pl.col("len").cum_sum() <= n_events)["session_id"]
        events.filter(pl.col("session_id").is_in(keep.implode())).write_parquet(test, row_group_size=250_000)
    return model, test


def timed_score(model: Path, test: Path, metrics: Path, *extra: str) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [*CLI, "score", "--model", str(model), "--sessions", str(test), "--metrics", str(metrics), *extra],
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"score {' '.join(extra)} failed:\n{proc.stderr}")
    report = json.loads(metrics.read_text())
    lat, engine = report["latency"], report.get("engine", {})
    return {
        "args": " ".join(extra) or "--engine local",
        "process_wall_s": wall,
        "events_per_s_process_wall": report["n_predictions"] / wall,
        "step_ms_p50": lat["step_ms_p50"],
        "step_ms_p99": lat["step_ms_p99"],
        "replay_s": lat["replay_s"],
        "job_wall_s": lat.get("wall_s"),
        "ray_read_shuffle_s": engine.get("read_shuffle_s"),
        "ray_score_s": engine.get("score_s"),
        "shards": engine.get("shards"),
        "metrics": report["metrics"],
        "n_predictions": report["n_predictions"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results/ray-score-latest.json"))
    ap.add_argument("--workdir", type=Path, default=Path("bench/.work/ray"))
    ap.add_argument("--events", type=int, default=5_000_000)
    args = ap.parse_args()
    from gru4rec.io import check_output_file, write_text_atomic
    from gru4rec.provenance import git_commit
    from gru4rec.score.latency import cpu_name

    check_output_file(args.out)
    args.workdir.mkdir(parents=True, exist_ok=True)
    model, test = prepare(args.workdir, args.events)
    load_before = os.getloadavg()
    runs = [
        timed_score(model, test, args.workdir / "local.json", "--provider", "cpu"),
        timed_score(model, test, args.workdir / "ray1.json", "--engine", "ray", "--workers", "1"),
        timed_score(model, test, args.workdir / "ray2.json", "--engine", "ray", "--workers", "2"),
    ]
    ref = runs[0]["metrics"]
    diff = max(abs(r["metrics"][k] - ref[k]) for r in runs[1:] for k in ref)
    result = {
        "what": "score --engine local vs --engine ray --workers 1 / 2, ORT CPU EP, one process each",
        "commit": git_commit(),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "test_file": str(test),
        "n_predictions": runs[0]["n_predictions"],
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "max_metric_abs_diff_vs_local": diff,
        "runs": runs,
    }
    write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    for r in runs:
        print(
            f"{r['args']:<28} {r['process_wall_s']:7.1f} s  {r['events_per_s_process_wall']:>10,.0f} events/s"
        )
    print(
        f"max |metric - local| = {diff:.2e}; load average before/after {load_before[0]:.1f}/{os.getloadavg()[0]:.1f}"
    )
    if diff > 1e-12:
        sys.exit(1)


if __name__ == "__main__":
    main()
