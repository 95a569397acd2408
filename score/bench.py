"""`gru4rec-cli bench score`: ORT vs torch scoring speed, side by side in one run, as JSON.

Always: ORT CPU EP and torch eager CPU at one batch size, plus ORT CPU online (batch 1) latency on
a subset of sessions. With a usable CUDA EP: ORT CUDA EP with IOBinding at batch 256 / 1024 / 4096
(and 1024 with TF32), online batch-1 latency, torch eager on the same GPU, and the roofline of one
batch-1024 step from the GPU's measured matmul rate and memory bandwidth. Every run scores the
same sessions, so their metrics must agree; the JSON says whether they did.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import numpy as np
import polars as pl

from gru4rec.data import BENCH_DATA_DIR
from gru4rec.errors import UserError
from gru4rec.provenance import git_commit

DIGINETICA = BENCH_DATA_DIR / "diginetica"
DIGINETICA_SHAPE = {"n_items": 43_097, "layers": [512]}
GPU_BATCHES = (256, 1024, 4096)
# The exact speed options of the eval graph (export --count-block / --topk-chunks) that pay on a GPU,
# also timed on CUDA; bench/score_variants.py compares all the alternatives (ORT's two-stage TopK is
# slower there than one TopK, so it is left out).
FAST_EXPORT = {"count_block": 1024, "topk_chunks": 0}


def run_bench(
    model: Path | None = None,
    sessions: Path | None = None,
    out: Path | None = None,
    batch_size: int = 1024,
    online_sessions: int = 200,
) -> dict:
    import torch
    from rich.console import Console

    from gru4rec.bundle import load_bundle
    from gru4rec.checkpoint import load as load_checkpoint
    from gru4rec.io import check_output_file, scratch_dir
    from gru4rec.score.ort_backend import cuda_usable

    if out is not None:
        check_output_file(out, inputs=(model, sessions))
    console = Console(stderr=True)
    with scratch_dir("gru4rec-bench-score-") as tmp:
        with console.status("preparing model and data"):
            sessions, data_desc, train_path = _sessions(sessions, tmp)
            onnx_path, ckpt_path, model_desc = _model(model, train_path, tmp)
            bundle = load_bundle(onnx_path)
            torch_model = load_checkpoint(ckpt_path).model if ckpt_path is not None else None
            online_path = _subset(sessions, online_sessions, tmp / "online.parquet")
        has_cuda = cuda_usable()

        plan = _plan(bundle, torch_model, ckpt_path, sessions, online_path, batch_size, has_cuda, tmp)
        load_before = os.getloadavg()
        runs, failed = _run_plan(plan, bundle, console)
    result = {
        "benchmark": "score",
        "machine": {
            "cpu": _cpu(),
            "gpu": _gpu() if has_cuda else None,
            "cuda_ep": has_cuda,
            "load_avg_1m_before_after": [load_before[0], os.getloadavg()[0]],  # shared machines: context
        },
        "versions": _versions(),
        "commit": git_commit(),
        "data": data_desc,
        "model": model_desc,
        "runs": runs,
        "failed": failed,
        "metrics_agree_fp32_batch_runs": _agree([r for r in runs if r["mode"] == "batch" and not r["tf32"]]),
        "speedup_ort_cpu_vs_torch_cpu": _ratio(runs, "ORT CPU EP", "torch eager CPU"),
    }
    if torch.cuda.is_available():
        result["roofline_b1024"] = _roofline(bundle.n_items, bundle.hidden_size, bundle.n_layers, 1024, runs)
    if out is not None:
        from gru4rec.io import write_text_atomic

        write_text_atomic(out, json.dumps(result, indent=2) + "\n")
        console.print(f"wrote {out}")
    return result


def _plan(bundle, torch_model, ckpt_path, sessions: Path, online_path: Path, batch_size: int, has_cuda: bool,
          tmp: Path) -> list[tuple[str, object, int, str, Path]]:  # fmt: skip
    """(label, backend factory, batch, mode, sessions) of every run, in the order they are timed."""
    import torch

    from gru4rec.score.ort_backend import OrtBackend
    from gru4rec.score.torch_backend import TorchBackend

    def ort(provider: str, tf32: bool = False, cuda_graph: bool = False, bundle=bundle, with_topk=True):
        return lambda: OrtBackend.from_bundle(
            bundle, provider, tf32, cuda_graph=cuda_graph, with_topk=with_topk
        )

    def torch_eager(device: str):
        return lambda: TorchBackend(torch_model, bundle.top_k, device)

    plan: list[tuple[str, object, int, str, Path]] = [
        ("ORT CPU EP", ort("cpu"), batch_size, "batch", sessions)
    ]
    if torch_model is not None:
        plan.append(("torch eager CPU", torch_eager("cpu"), batch_size, "batch", sessions))
    plan.append(("ORT CPU EP ranks-only", ort("cpu", with_topk=False), batch_size, "batch", sessions))
    plan.append(("ORT CPU EP online", ort("cpu"), 1, "online", online_path))
    if has_cuda:
        plan += [(f"ORT CUDA EP b{b}", ort("cuda"), b, "batch", sessions) for b in GPU_BATCHES]
        plan.append(("ORT CUDA EP b1024 tf32", ort("cuda", tf32=True), 1024, "batch", sessions))
        plan.append(("ORT CUDA EP b1024 tf32 cuda-graph", ort("cuda", True, True), 1024, "batch", sessions))
        if ckpt_path is not None:
            fast = _fast_bundle(ckpt_path, tmp)
            tag = f"block{FAST_EXPORT['count_block']}"
            plan.append((f"ORT CUDA EP b1024 {tag}", ort("cuda", bundle=fast), 1024, "batch", sessions))
            for b in (1024, 4096):
                plan.append(
                    (
                        f"ORT CUDA EP b{b} tf32 cuda-graph {tag}",
                        ort("cuda", True, True, fast),
                        b,
                        "batch",
                        sessions,
                    )
                )
        # metrics only (what `score` runs without --out): no TopK node in the graph
        plan.append(("ORT CUDA EP b1024 ranks-only", ort("cuda", with_topk=False), 1024, "batch", sessions))
        plan.append(
            (
                "ORT CUDA EP b1024 tf32 cuda-graph ranks-only",
                ort("cuda", True, True, with_topk=False),
                1024,
                "batch",
                sessions,
            )
        )
        if ckpt_path is not None:
            for b in (1024, 4096):
                plan.append(
                    (
                        f"ORT CUDA EP b{b} tf32 cuda-graph {tag} ranks-only",
                        ort("cuda", True, True, fast, with_topk=False),
                        b,
                        "batch",
                        sessions,
                    )
                )
        plan.append(("ORT CUDA EP online", ort("cuda"), 1, "online", online_path))
        plan.append(("ORT CUDA EP online cuda-graph", ort("cuda", cuda_graph=True), 1, "online", online_path))
    if torch_model is not None and torch.cuda.is_available():
        plan.append(("torch eager CUDA b1024", torch_eager("cuda"), 1024, "batch", sessions))
        plan.append(("torch eager CUDA online", torch_eager("cuda"), 1, "online", online_path))
    return plan


def _run_plan(plan, bundle, console) -> tuple[list[dict], list[dict]]:
    """Time every run of the plan; a failing configuration is recorded and the rest still run."""
    runs, failed = [], []
    for label, make_backend, batch, mode, path in plan:
        with console.status(f"scoring: {label}"):
            try:
                runs.append(_timed_run(label, make_backend(), bundle.items, path, batch, mode))
            except (
                Exception
            ) as e:  # one failing configuration (e.g. CUDA graph capture) must not lose the rest
                failed.append(
                    {"label": label, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
                )
                console.print(f"{label:28s} failed: {failed[-1]['error']}")
                continue
        r = runs[-1]
        console.print(
            f"{label:28s} {r['events_per_s']:>12,.0f} events/s   step p50 {r['step_ms_p50']:.3f} ms  "
            f"p99 {r['step_ms_p99']:.3f} ms   recall@20 {r['recall@20']:.4f}"
        )
    return runs, failed


# ---------------------------------------------------------------------------------------------- runs
def _timed_run(label: str, backend, items, sessions: Path, batch: int, mode: str) -> dict:
    from gru4rec.score.scorer import ScoreConfig, score_source
    from gru4rec.score.source import SessionSource

    source = SessionSource(sessions)
    # Warm up at the run's own batch: same buffers, so captured CUDA graphs stay valid.
    _warm_up(backend, 1 if mode == "online" else min(batch, source.stats.n_multi_sessions))
    report = score_source(backend, items, source, ScoreConfig(batch_size=batch, latency_mode=mode))
    lat, m = report["latency"], report["metrics"]
    return {
        "label": label,
        "backend": backend.name,
        "device": backend.device,
        "mode": mode,
        "batch_size": lat["batch_size"],
        "tf32": bool(getattr(backend, "tf32", False)),
        "cuda_graph": bool(getattr(backend, "cuda_graph", False)),
        "events_per_s": lat["events_per_s"],
        "sessions_per_s": lat["sessions_per_s"],
        "step_ms_p50": lat["step_ms_p50"],
        "step_ms_p95": lat["step_ms_p95"],
        "step_ms_p99": lat["step_ms_p99"],
        "n_steps": lat["n_steps"],
        "replay_s": lat["replay_s"],
        "n_events_scored": m["n"],
        "recall@20": m["recall@20"],
        "mrr@20": m["mrr@20"],
    }


def _warm_up(backend, batch: int, steps: int = 3) -> None:
    """First runs allocate arenas and pick kernels: keep them out of the timings.

    No top-k is fetched, as in the timed runs (metrics only), so ranks-only backends warm up too."""
    rng = np.random.default_rng(0)
    backend.start(batch)
    for _ in range(steps):
        x = rng.integers(0, backend.n_items, batch)
        backend.step(
            x,
            x,
            np.zeros(batch, dtype=np.int64),
            np.ones(batch, dtype=bool),
            False,
        )


def _agree(runs: list[dict], tol: float = 1e-4) -> bool:
    if not runs:
        return True
    ref = runs[0]
    return all(abs(r[k] - ref[k]) <= tol for r in runs for k in ("recall@20", "mrr@20"))


def _ratio(runs: list[dict], a: str, b: str) -> float | None:
    by = {r["label"]: r["events_per_s"] for r in runs}
    return by[a] / by[b] if a in by and b in by else None


def _roofline(n_items: int, hidden: int, n_layers: int, batch: int, runs: list[dict]) -> dict:
    """Lower bound of one step: GEMM flops at the measured matmul rate + item matrix and score traffic."""

    rate_fp32, rate_tf32 = _matmul_rate(tf32=False), _matmul_rate(tf32=True)
    bandwidth = _copy_bandwidth()
    flops = 2 * batch * hidden * n_items + n_layers * 2 * batch * 6 * hidden * hidden
    traffic = 4 * (n_items * hidden + 2 * batch * n_items)  # item matrix read; scores written, read back
    bound = {
        "fp32": flops / rate_fp32 + traffic / bandwidth,
        "tf32": flops / rate_tf32 + traffic / bandwidth,
    }
    measured = {r["label"]: r["step_ms_p50"] / 1e3 for r in runs if r["batch_size"] == batch}
    return {
        "batch_size": batch,
        "gemm_flops_per_step": flops,
        "bytes_per_step": traffic,
        "matmul_tflops_fp32": rate_fp32 / 1e12,
        "matmul_tflops_tf32": rate_tf32 / 1e12,
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "roofline_step_ms": {k: v * 1e3 for k, v in bound.items()},
        "measured_step_ms_p50": {k: v * 1e3 for k, v in measured.items()},
        "measured_over_roofline": {
            k: v / bound["tf32" if "tf32" in k else "fp32"] for k, v in measured.items()
        },
    }


def time_ms(fn, device: str = "cuda", repeats: int = 10) -> float:
    """Mean milliseconds per call after one warm-up call; CUDA events on the GPU, a host clock elsewhere."""
    import time

    import torch

    fn()
    if device != "cuda":
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - t0) * 1e3 / repeats
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def _matmul_rate(tf32: bool, n: int = 8192) -> float:
    """Measured fp32 (or TF32) matmul flop/s on the GPU."""
    import torch

    a = torch.randn(n, n, device="cuda")
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        return 2 * n**3 / (time_ms(lambda: a @ a) / 1e3)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def _copy_bandwidth(n_bytes: int = 2**30) -> float:
    """Measured device memory bandwidth (bytes read + written per second) of a large copy."""
    import torch

    src = torch.empty(n_bytes // 4, device="cuda")
    dst = torch.empty_like(src)
    return 2 * n_bytes / (time_ms(lambda: dst.copy_(src)) / 1e3)


# ---------------------------------------------------------------------------------------------- inputs
def _sessions(sessions: Path | None, tmp: Path) -> tuple[Path, dict, Path | None]:
    """(test sessions, description, training file whose items define a random model's catalog)."""
    if sessions is not None:
        return Path(sessions), {"sessions": str(sessions)}, None
    if (DIGINETICA / "test.parquet").exists():
        return (
            DIGINETICA / "test.parquet",
            {"dataset": "diginetica", "sessions": str(DIGINETICA / "test.parquet")},
            (DIGINETICA / "train.parquet"),
        )
    from gru4rec.synth import generate

    train, test = generate(20_000, 5_000, seed=1)
    train.write_parquet(tmp / "train.parquet")
    test.write_parquet(tmp / "test.parquet")
    return (
        tmp / "test.parquet",
        {"dataset": "synthetic", "sessions": 20_000, "items": 5_000},
        tmp / "train.parquet",
    )


def _model(model: Path | None, train_path: Path | None, tmp: Path) -> tuple[Path, Path | None, dict]:
    """(m.onnx, checkpoint for the torch runs or None, description). A .pt is exported on the fly."""
    from gru4rec.export.onnx_export import export_bundle

    if model is not None and Path(model).suffix == ".onnx":
        return (
            Path(model),
            None,
            {"onnx": str(model), "note": "ONNX only: pass a checkpoint (.pt) for torch runs"},
        )
    if model is not None:
        ckpt = Path(model)
        desc = {"checkpoint": str(model)}
    else:
        if train_path is None:
            raise UserError("bench score: --sessions without --model; pass a checkpoint (.pt) or an m.onnx")
        ckpt, desc = _random_model(train_path, tmp)
    export_bundle(ckpt, tmp / "m.onnx", top_k=20, verify=False)
    return tmp / "m.onnx", ckpt, desc


def _fast_bundle(ckpt: Path, tmp: Path):
    """The same model exported with the exact speed options (FAST_EXPORT)."""
    from gru4rec.bundle import load_bundle
    from gru4rec.export.onnx_export import export_bundle

    export_bundle(ckpt, tmp / "fast" / "m.onnx", top_k=20, verify=False, **FAST_EXPORT)
    return load_bundle(tmp / "fast" / "m.onnx")


def _random_model(train_path: Path, tmp: Path) -> tuple[Path, dict]:
    """Random weights over the training file's catalog: diginetica-shaped on diginetica (43,097 x 512)."""
    from unittest import mock

    import gru4rec.checkpoint as ckpt_io
    from gru4rec.data import read_events
    from gru4rec.items import ItemMap
    from gru4rec.model import GRU4Rec, ModelConfig

    items = ItemMap.from_events(read_events(train_path))
    model = GRU4Rec(ModelConfig(n_items=len(items), layers=list(DIGINETICA_SHAPE["layers"])), seed=0)
    path = tmp / "random.pt"
    # checkpoint.versions() holds torch's TorchVersion, which weights_only loading refuses: store strings.
    original = ckpt_io.versions
    with mock.patch.object(ckpt_io, "versions", lambda: {k: str(v) for k, v in original().items()}):
        ckpt_io.save(ckpt_io.Checkpoint(model, items), path)
    return path, {
        "random_weights": True,
        "n_items": len(items),
        "layers": model.cfg.layers,
        "mode": model.cfg.mode,
    }


def _subset(sessions: Path, n_sessions: int, path: Path) -> Path:
    """The first `n_sessions` sessions (by id): online replays are long at batch 1."""
    from gru4rec.data import SESSION, read_events

    events = read_events(sessions)
    keep = events[SESSION].unique().sort().head(n_sessions)
    events.filter(pl.col(SESSION).is_in(keep.implode())).write_parquet(path)
    return path


def _cpu() -> str:
    import os

    from gru4rec.score.latency import cpu_name

    return f"{cpu_name()} ({os.cpu_count()} logical cores)"


def _gpu() -> str:
    from gru4rec.score.ort_backend import gpu_name

    return gpu_name()


def _versions() -> dict:
    import onnxruntime
    import torch

    import gru4rec

    return {
        "gru4rec": gru4rec.__version__,
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "onnxruntime": onnxruntime.__version__,
        "polars": pl.__version__,
        "numpy": np.__version__,
    }
