"""False alarms of `eval nightly`: an unchanged model as its own champion, N local and M Ray runs.

    .venv/bin/python bench/nightly_false_alarms.py --out bench/results/nightly-false-alarms.json   (make bench)

The model: `train --preset rsc15` (1 epoch) on rsc15_100k's train set, scored on its test set, where
../shared/data is present; else the demo model on synthetic data. Its bundle is copied to a
champion path, and every run is a separate `gru4rec-cli eval nightly` process with `promote = true`:
the copy must be promoted (or kept) every time, never a regression (exit 1). The JSON lists each
run's exit code, the latency verdict, both medians of the interleaved pairs, the spread and the
allowance, so a reader sees how far from a false alarm each night was.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

CLI = [sys.executable, "-m", "gru4rec.cli"]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "rsc15_100k"


def sh(*args) -> None:
    print("+", " ".join(map(str, args)), file=sys.stderr, flush=True)
    subprocess.run([*CLI, *map(str, args)], check=True)


def prepare(work: Path) -> tuple[Path, Path, str]:
    model = work / "model.onnx"
    if SHARED.is_dir():
        train, test, what = (
            SHARED / "train.parquet",
            SHARED / "test.parquet",
            "rsc15_100k, preset rsc15, 1 epoch",
        )
        preset = ["--preset", "rsc15", "-p", "n_epochs=1"]
    else:
        sh("data", "synth", work / "demo", "--sessions", 20000, "--items", 2000, "--seed", 7)
        train, test, what = (
            work / "demo" / "train.parquet",
            work / "demo" / "test.parquet",
            "synthetic, preset demo",
        )
        preset = ["--preset", "demo"]
    if not model.exists():
        sh("train", train, "--out", work / "model.pt", *preset, "--device", "cpu", "--overwrite")
        sh("export", work / "model.pt", "--out", model, "--top-k", 20)
    return model, test, what


def nightly(work: Path, model: Path, test: Path, engine: str, runs: int) -> list[dict]:
    from gru4rec.eval.promote import bundle_files

    folder = work / engine
    shutil.rmtree(folder, ignore_errors=True)
    champion = folder / "prod" / "m.onnx"
    champion.parent.mkdir(parents=True)
    for src, dst in zip(bundle_files(model), bundle_files(champion), strict=True):
        shutil.copyfile(src, dst)
    config = folder / "nightly.toml"
    config.write_text(
        f'[nightly]\nhistory = "{folder / "h.parquet"}"\nout = "{folder / "out"}"\ntest = "{test}"\n'
        f'model = "{model}"\nbatch_size = 64\n'
        + ('engine = "ray"\nworkers = 2\n' if engine == "ray" else "")
        + f'[nightly.champion]\nmodel = "{champion}"\npromote = true\n'
    )
    out = []
    for i in range(runs):
        t0 = time.perf_counter()
        proc = subprocess.run(
            [*CLI, "eval", "nightly", "--config", str(config)], capture_output=True, text=True
        )
        summary = (
            json.loads((folder / "out" / "summary.json").read_text()) if proc.returncode in (0, 1) else {}
        )
        entry = next((e for e in summary.get("table", []) if e["name"] == "ms_per_1k_events"), {})
        out.append({
            "run": i + 1, "exit": proc.returncode, "seconds": time.perf_counter() - t0,
            "status": summary.get("current", {}).get("status"), "verdict": entry.get("verdict"),
            "champion_ms_per_1k": entry.get("champion"), "challenger_ms_per_1k": entry.get("challenger_paired"),
            "spread_ms": entry.get("spread"), "allowed_ms": entry.get("allowed"),
            "slower_pairs": entry.get("slower_pairs"), "pairs": entry.get("pairs"),
            "stderr_tail": proc.stderr.strip().splitlines()[-1:] if proc.returncode not in (0,) else [],
        })  # fmt: skip
        print(f"{engine} run {i + 1}: exit {proc.returncode}, {out[-1]['status']}, latency {out[-1]['verdict']}",
              file=sys.stderr, flush=True)  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results/nightly-false-alarms.json"))
    ap.add_argument("--workdir", type=Path, default=Path("bench/.work/nightly"))
    ap.add_argument("--local-runs", type=int, default=10)
    ap.add_argument("--ray-runs", type=int, default=5)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    model, test, what = prepare(args.workdir)
    results = {"local": nightly(args.workdir, model, test, "local", args.local_runs)}
    if args.ray_runs:
        results["ray"] = nightly(args.workdir, model, test, "ray", args.ray_runs)
    from gru4rec.provenance import git_commit
    from gru4rec.score.latency import cpu_name

    doc = {
        "what": "eval nightly with the challenger's own copy as champion (promote = true): false alarms",
        "model": what,
        "test": str(test),
        "commit": git_commit(),
        "machine": {"cpu": cpu_name(), "python": platform.python_version()},
        "false_regressions": {k: sum(r["exit"] == 1 for r in v) for k, v in results.items()},
        "errors": {k: sum(r["exit"] not in (0, 1) for r in v) for k, v in results.items()},
        "verdicts": {
            k: {v2: sum(r["verdict"] == v2 for r in v) for v2 in ("ok", "inconclusive", "regression")}
            for k, v in results.items()
        },  # fmt: skip
        "runs": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({k: doc[k] for k in ("false_regressions", "errors", "verdicts")}), flush=True)
    sys.exit(1 if any(doc["false_regressions"].values()) or any(doc["errors"].values()) else 0)


if __name__ == "__main__":
    main()
