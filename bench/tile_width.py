"""Cost per (row x item) cell of the tiled scorer's tile session as the tile widens, at several batches.

Why the planner sizes tiles by cells (score/tiled.py TILE_CELLS) and not by the widest tile the memory
budget allows: a tile's scores are read by several passes (comparisons, casts, sums, top-k), which run
from cache only while the [batch x tile] matrix is small. The tile session here is the scorer's own
(`tile_graph`, `run_tiles`) over random float32 weights; each figure is the median of `--repeats`
full passes over `--items` items (the target pass included), in ns per cell.

    python bench/tile_width.py --out bench/results/tile-width-cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np


def sweep(items: int, units: int, batches: list[int], tiles: list[int], repeats: int, threads: int) -> list:
    import onnx

    from gru4rec.score.ort_backend import make_session
    from gru4rec.score.tiled import run_tiles, tile_graph

    rng = np.random.default_rng(0)
    W = rng.standard_normal((items, units), dtype=np.float32)
    bias = rng.standard_normal(items, dtype=np.float32)
    rows = []
    for with_topk in (False, True):
        graph = tile_graph(onnx.TensorProto.FLOAT, with_topk).SerializeToString()
        session = make_session(graph, "tile_graph", "cpu", threads)
        for batch in batches:
            x = rng.standard_normal((batch, units), dtype=np.float32)
            targets = rng.integers(0, items, batch)
            for tile in tiles:
                run_tiles(session, x, targets, W, bias, tile, 20, with_topk)  # warm-up: ORT's first run
                seconds = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    run_tiles(session, x, targets, W, bias, tile, 20, with_topk)
                    seconds.append(time.perf_counter() - t0)
                ns = 1e9 * statistics.median(seconds) / (batch * items)
                rows.append({"batch": batch, "tile": tile, "cells": batch * tile, "top_k": with_topk,
                             "ns_per_cell": round(ns, 3)})  # fmt: skip
                print(f"batch {batch:5d} tile {tile:6d} top-k {with_topk!s:5}: {ns:.2f} ns/cell", flush=True)
    return rows


def main() -> None:
    from gru4rec.provenance import git_commit

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results/tile-width-cpu.json"))
    ap.add_argument("--items", type=int, default=200_000)
    ap.add_argument("--units", type=int, default=100)
    ap.add_argument("--batches", default="1024,256,64")
    ap.add_argument("--tiles", default="4096,8192,16384,43690")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: one per core)")
    a = ap.parse_args()
    batches = [int(x) for x in a.batches.split(",")]
    tiles = [int(x) for x in a.tiles.split(",")]
    rows = sweep(a.items, a.units, batches, tiles, a.repeats, a.threads)
    result = {
        "what": "ns per (row x item) cell of the tiled scorer's tile session, by batch and tile width",
        "host": f"{platform.node()} ({platform.machine()})",
        "commit": git_commit(),
        "items": a.items,
        "units": a.units,
        "rows": rows,
    }
    from gru4rec.io import write_text_atomic

    write_text_atomic(a.out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
