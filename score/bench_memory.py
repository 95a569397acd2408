"""`gru4rec-cli bench score-memory`: peak RSS and events/s of `score` as the test set grows.

Synthetic test sets of 1M and 10M events (whole synthetic sessions tiled under fresh session ids),
each as one Parquet file and as a 16-file dataset, scored by the demo model on the ORT CPU EP with
no recommendations written (metrics only). Every run is its own `gru4rec-cli score` process, so its
peak RSS (ru_maxrss of that child) is its own. Goal: RSS at 10M within 1.2x of RSS at 1M, events/s
within 10%: the chunked reader holds one chunk of whole sessions, not the test set.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import polars as pl

from gru4rec.data import SESSION
from gru4rec.provenance import git_commit

SIZES = (1_000_000, 10_000_000)
N_FILES = 16
GOAL_RSS_RATIO = 1.2  # peak RSS at the largest size over the smallest, at most
GOAL_SPEED_LOSS = 0.10  # events/s at the largest size may be this much lower, at most


def run_bench(out: Path | None, sizes: tuple[int, ...] = SIZES, workdir: Path | None = None) -> dict:
    from rich.console import Console

    from gru4rec.io import check_output_file, scratch_dir

    if out is not None:
        check_output_file(out)
    console = Console(stderr=True)
    with scratch_dir("gru4rec-bench-memory-", workdir) as tmp:
        with console.status("training the demo model (1 epoch) for the scoring runs"):
            model, test = _demo_model(tmp)
        runs = []
        for n in sizes:
            single, folder = _test_sets(test, n, tmp)
            for layout, path in (("single file", single), (f"{N_FILES}-file dataset", folder)):
                console.print(f"scoring {n:,} events, {layout} ...")
                runs.append({"target_events": n, "layout": layout, **_score_run(model, path, tmp)})
                r = runs[-1]
                console.print(f"  peak RSS {r['peak_rss_mib']:.0f} MiB, {r['events_per_s']:,.0f} events/s")
    result = {
        "what": "score (ORT CPU EP, metrics only) on synthetic test sets: peak RSS and events/s",
        "host": f"{platform.node()} ({platform.machine()})",
        "commit": git_commit(),
        "runs": runs,
        "ratios": _ratios(runs, sizes),
    }
    if out is not None:
        from gru4rec.io import write_text_atomic

        write_text_atomic(out, json.dumps(result, indent=2) + "\n")
    console.print_json(json.dumps(result["ratios"]))
    return result


def _demo_model(tmp: Path) -> tuple[Path, pl.DataFrame]:
    cli = [sys.executable, "-m", "gru4rec.cli"]
    data = tmp / "data"
    (tmp / "m.pt").unlink(missing_ok=True)
    steps = [
        ["data", "synth", data, "--sessions", "20000", "--items", "2000", "--seed", "7"],
        [
            "train",
            data / "train.parquet",
            "--out",
            tmp / "m.pt",
            "--preset",
            "demo",
            "--epochs",
            "1",
            "--device",
            "cpu",
            "--quiet",
        ],  # fmt: skip
        ["export", tmp / "m.pt", "--out", tmp / "m.onnx", "--no-verify"],
    ]
    for args in steps:
        subprocess.run([*cli, *map(str, args)], check=True, capture_output=True)
    return tmp / "m.onnx", pl.read_parquet(data / "test.parquet")


def _test_sets(test: pl.DataFrame, n_events: int, tmp: Path) -> tuple[Path, Path]:
    """`test` tiled under fresh session ids to about n_events events: one file and N_FILES files."""
    reps = -(-n_events // test.height)
    n_ids = int(test[SESSION].max()) + 1
    big = pl.concat([test.with_columns(pl.col(SESSION) + r * n_ids) for r in range(reps)], rechunk=True).head(
        n_events
    )
    single = tmp / f"test-{n_events}.parquet"
    big.write_parquet(single, row_group_size=100_000)
    folder = tmp / f"test-{n_events}-parts"
    folder.mkdir(exist_ok=True)
    step = -(-big.height // N_FILES)
    for k in range(N_FILES):  # cuts fall inside sessions: a session may span two files
        big.slice(k * step, step).write_parquet(folder / f"part-{k:02d}.parquet", row_group_size=100_000)
    return single, folder


def cli_peak_rss(args: list, stdout: list[str] | None = None) -> int:
    """Run `gru4rec-cli ARGS` in a process of its own; its own peak RSS in KiB (RuntimeError on
    failure). Its output lines go to `stdout` when given."""
    code = (
        "import resource, sys\n"
        "from gru4rec.cli import main\n"
        "try:\n    main(sys.argv[1:])\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        # VmHWM is this process's own peak. ru_maxrss is not: Linux carries the high-water mark of
        # the memory image exec replaced, i.e. of the parent that forked us (this benchmark, holding
        # the 10M-event test set), into the child's figure.
        "try:\n"
        "    status = open('/proc/self/status').read()\n"
        "    print(int(status.split('VmHWM:')[1].split()[0]))\n"
        "except (OSError, IndexError):\n"
        "    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"gru4rec-cli {args[0]} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    lines = proc.stdout.strip().splitlines()
    if stdout is not None:
        stdout.extend(lines[:-1])
    return int(lines[-1])


def _score_run(model: Path, sessions: Path, tmp: Path) -> dict:
    metrics = tmp / "m.json"
    args = ["score", "--model", model, "--sessions", sessions, "--metrics", metrics, "--provider", "cpu"]
    t0 = time.perf_counter()
    rss_kib = cli_peak_rss(args)
    wall = time.perf_counter() - t0
    report = json.loads(metrics.read_text())
    return {
        "n_events": report["n_events"],
        "n_predictions": report["n_predictions"],
        "recall@20": report["metrics"]["recall@20"],
        "wall_s": wall,
        "events_per_s": report["n_events"] / wall,  # the whole command: start, reading, replay
        "replay_events_per_s": report["latency"]["events_per_s"],  # scored events per replay second
        "peak_rss_mib": rss_kib / 1024,
    }


def _ratios(runs: list[dict], sizes: tuple[int, ...]) -> dict:
    if len(sizes) < 2:
        return {}
    small, large = sizes[0], sizes[-1]
    out = {}
    for layout in {r["layout"] for r in runs}:
        a = next(r for r in runs if r["layout"] == layout and r["target_events"] == small)
        b = next(r for r in runs if r["layout"] == layout and r["target_events"] == large)
        rss = b["peak_rss_mib"] / a["peak_rss_mib"]
        speed = b["events_per_s"] / a["events_per_s"]
        out[layout] = {
            "rss_large_over_small": rss,
            "events_per_s_large_over_small": speed,
            "replay_events_per_s_large_over_small": b["replay_events_per_s"] / a["replay_events_per_s"],
            "goal_met": rss <= GOAL_RSS_RATIO and speed >= 1 - GOAL_SPEED_LOSS,
        }
    return out
