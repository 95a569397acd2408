"""A model past ONNX's 2 GiB limit (default 1.2M items x 512 units): export, verify, score.

The checkpoint has random weights (training a model this size for one epoch on a CPU takes longer
than the point needs: the export path, its verification and the tiled scorer do not care what the
weights learned). Each stage is its own `gru4rec-cli` process with its own peak RSS. Reported: the
bundle's files and sizes, the bytes the graphs' initializers point at (each tensor counted once per
graph) against the weights file (each tensor stored once), the verification figures, and scoring's
memory plan, speed and peak RSS.

    python bench/large_export.py --out bench/results/export-2gib.json [--items 1200000 --units 512]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np


def make_checkpoint(path: Path, n_items: int, units: int) -> None:
    from gru4rec import checkpoint as ckpt_io
    from gru4rec.items import ItemMap
    from gru4rec.model import GRU4Rec, ModelConfig

    model = GRU4Rec(ModelConfig(n_items=n_items, layers=[units]), seed=1).eval()
    items = ItemMap(np.arange(1_000_000, 1_000_000 + n_items, dtype=np.int64))
    ckpt_io.save(ckpt_io.Checkpoint(model, items, params={"layers": [units]}), path)


def stage(args: list, what: str, stdout: list[str] | None = None) -> dict:
    from gru4rec.score.bench_memory import cli_peak_rss

    t0 = time.perf_counter()
    rss = cli_peak_rss(args, stdout)
    return {"stage": what, "wall_s": time.perf_counter() - t0, "peak_rss_mib": rss / 1024}


def initializer_bytes(graph: Path) -> int:
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    return sum(
        int({e.key: e.value for e in t.external_data}.get("length", 0)) for t in model.graph.initializer
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results/export-2gib.json"))
    ap.add_argument("--items", type=int, default=1_200_000)
    ap.add_argument("--units", type=int, default=512)
    ap.add_argument("--test-events", type=int, default=3000, help="events scored (each against every item)")
    ap.add_argument("--workdir", type=Path, default=None)
    a = ap.parse_args(argv)
    from gru4rec.bundle import bundle_paths, load_bundle
    from gru4rec.eval.bench_catalog import catalog_log
    from gru4rec.io import scratch_dir, write_text_atomic
    from gru4rec.provenance import git_commit

    with scratch_dir("gru4rec-2gib-", a.workdir) as tmp:
        ckpt, onnx_path, test = tmp / "m.pt", tmp / "m.onnx", tmp / "test.parquet"
        print(f"random-weight checkpoint: {a.items:,} items x {a.units} units", file=sys.stderr)
        make_checkpoint(ckpt, a.items, a.units)
        catalog_log(a.items, a.test_events, seed=2, every_item=False).write_parquet(test)
        said: list[str] = []
        runs = [stage(["export", ckpt, "--out", onnx_path], "export (verified)", said)]
        runs.append(stage(["score", "--model", onnx_path, "--sessions", test, "--metrics", tmp / "metrics.json",
                           "--provider", "cpu"], "score (metrics only)"))  # fmt: skip
        bundle = load_bundle(onnx_path)
        report = json.loads((tmp / "metrics.json").read_text())
        result = {
            "what": "a model past ONNX's 2 GiB limit (random weights): export, verify, score on the CPU",
            "host": f"{platform.node()} ({platform.machine()})",
            "commit": git_commit(),
            "n_items": a.items,
            "units": a.units,
            "parameter_bytes": a.items * (a.units + 1) * 4,
            "files": {p.name: p.stat().st_size for p in bundle_paths(onnx_path)},
            "initializer_bytes": {"serving": initializer_bytes(bundle.onnx_path), "eval": initializer_bytes(bundle.eval_path)},
            "export_said": [ln.strip() for ln in said],
            "runs": runs,
            "score": {"n_predictions": report["n_predictions"], "events_per_s": report["latency"]["events_per_s"],
                      "memory": report["memory"], "recall@20": report["metrics"]["recall@20"]},
        }  # fmt: skip
    write_text_atomic(a.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
