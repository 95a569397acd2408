"""The exported graph in one pass vs the tiled scorer, on catalogs whose [batch x items] scores fit memory.

Why `score` tiles past score/tiled.py UNTILED_CELLS cells per step even where the budget would hold
the whole matrix: the untiled graph's passes over a matrix that large (comparisons, casts, sums, top-k)
go to memory, while a tile's stay in cache. Each model has random weights (the speed of a step does not
depend on what the weights learned); each size is scored metrics-only (the default `score` without
--out) on the CPU EP at batch 1,024, the two plans alternating, and each figure is the best of
`--repeats` runs. The ranks of both plans must agree (recall@20 and MRR@20 equal to the last bit).

    python bench/untiled_vs_tiled.py --out bench/results/untiled-vs-tiled-cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

from large_export import make_checkpoint


def measure(n_items: int, units: int, events: int, repeats: int, folder: Path) -> dict:
    from gru4rec.eval.bench_catalog import catalog_log
    from gru4rec.score.scorer import ScoreConfig, score

    ckpt, onnx, test = folder / "m.pt", folder / "m" / "m.onnx", folder / "test.parquet"
    make_checkpoint(ckpt, n_items, units)
    cli = [sys.executable, "-m", "gru4rec.cli", "export", str(ckpt), "--out", str(onnx)]
    subprocess.run(cli, check=True, capture_output=True)
    catalog_log(n_items, events, seed=3, every_item=False).write_parquet(test)
    plans = {"one pass": n_items, "auto": 0}  # --tile-items N: the whole catalog in one pass
    best: dict[str, dict] = {}
    for _ in range(repeats):
        for name, tile in plans.items():
            report = score(onnx, test, config=ScoreConfig(tile_items=tile), provider="cpu")
            if name not in best or report["latency"]["events_per_s"] > best[name]["events_per_s"]:
                best[name] = {
                    "events_per_s": report["latency"]["events_per_s"],
                    "n_tiles": report["memory"]["n_tiles"],
                    "tile_items": report["memory"]["tile_items"],
                    "metrics": {k: report["metrics"][k] for k in ("recall@20", "mrr@20")},
                }
    one, auto = best["one pass"], best["auto"]
    return {
        "n_items": n_items,
        "units": units,
        "cells_per_step": 1024 * n_items,
        "one_pass": one,
        "auto": auto,
        "speedup_auto_vs_one_pass": auto["events_per_s"] / one["events_per_s"],
        "same_metrics": auto["metrics"] == one["metrics"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results/untiled-vs-tiled-cpu.json"))
    ap.add_argument("--items", default="8192,12288,16384,43097", help="catalog sizes, comma-separated")
    ap.add_argument("--units", default="100,512", help="GRU sizes, comma-separated")
    ap.add_argument("--events", type=int, default=20000, help="test events per size")
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args(argv)
    from gru4rec.io import check_output_file, scratch_dir, write_text_atomic
    from gru4rec.provenance import git_commit
    from gru4rec.score.tiled import TILE_CELLS, UNTILED_CELLS

    check_output_file(a.out)
    rows = []
    for n in (int(x) for x in a.items.split(",")):
        for units in (int(x) for x in a.units.split(",")):
            with scratch_dir("gru4rec-untiled-vs-tiled-") as folder:
                rows.append(measure(n, units, a.events, a.repeats, folder))
            r = rows[-1]
            print(f"{n:>8,} items x {units:>4} units: one pass {r['one_pass']['events_per_s']:>9,.0f} ev/s, "
                  f"auto ({r['auto']['n_tiles']} tiles) {r['auto']['events_per_s']:>9,.0f} ev/s, "
                  f"x{r['speedup_auto_vs_one_pass']:.2f}, same metrics {r['same_metrics']}", file=sys.stderr)  # fmt: skip
    result = {
        "what": "score on the CPU EP at batch 1,024, metrics only: the exported graph in one pass vs the "
        "default plan (tiles past UNTILED_CELLS cells per step), best of the repeats",
        "host": f"{platform.node()} ({platform.machine()})",
        "commit": git_commit(),
        "tile_cells": TILE_CELLS,
        "untiled_cells": UNTILED_CELLS,
        "events": a.events,
        "rows": rows,
    }
    write_text_atomic(a.out, json.dumps(result, indent=2) + "\n")
    return 0 if all(r["same_metrics"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
