"""Scoring-graph variants on ONNX Runtime, timed and checked against the float32 baseline.

Each variant is an evaluation graph built by the export code (gru4rec.export.graph.EvalStep) and run
through the scorer's own backend (gru4rec.score.ort_backend.OrtBackend: IOBinding on CUDA, the
packed step input, counts and top-k copied back every step, so a step's wall time includes its
device sync). Per run: median / p90 step time over --steps steps after --warmup steps, rotating
--input-sets random input sets; then agreement with the baseline (float32 graph, TF32 off, no CUDA
graph, same batch) on --check-steps replayed steps: exact n_greater / n_equal rate, hit@20
agreement (n_greater < 20) and top-k overlap.

Variants: base (one TopK, float32 counts); chunksC (two-stage TopK over C column chunks);
blockM (counts summed in float16 blocks of M columns over a -inf padded score matrix, exact);
blockM+chunksC; fp16 (half-precision weights and scores); half-scores (float32 GRU and state,
float16 item matrix and scores), optionally +rerankR (float16 top-R re-scored in float32 to order
the top-k). fp16 and half-scores are approximate: their agreement is reported, not guaranteed.

GPU:  python bench/score_variants.py --out $OUT            (diginetica shape, random weights)
      python bench/score_variants.py --model /tmp/d.pt --out $OUT
CPU:  python bench/score_variants.py --provider cpu --tiny --out /tmp/sv
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DIGINETICA = {"n_items": 43_097, "hidden": 512}
TINY = {"n_items": 500, "hidden": 32}


@dataclass(frozen=True)
class Variant:
    name: str
    fp16: bool = False
    topk_chunks: int = 0
    count_block: int = 0
    score_half: bool = False
    rerank: int = 0

    @property
    def exact(self) -> bool:
        return not (self.fp16 or self.score_half)


def variants(block: int, chunk_counts: tuple[int, ...], rerank: int) -> list[Variant]:
    out = [Variant("base")]
    out += [Variant(f"chunks{c}", topk_chunks=c) for c in chunk_counts]
    out.append(Variant(f"block{block}", count_block=block))
    out += [Variant(f"block{block}+chunks{c}", topk_chunks=c, count_block=block) for c in chunk_counts]
    mid = chunk_counts[len(chunk_counts) // 2]
    out.append(Variant("fp16", fp16=True))
    out.append(Variant(f"fp16+block{block}+chunks{mid}", fp16=True, topk_chunks=mid, count_block=block))
    half = {"score_half": True, "count_block": block}
    out.append(Variant(f"half-scores+block{block}", **half))
    out.append(Variant(f"half-scores+block{block}+chunks{mid}", topk_chunks=mid, **half))
    out.append(
        Variant(
            f"half-scores+block{block}+chunks{mid}+rerank{rerank}", topk_chunks=mid, rerank=rerank, **half
        )
    )
    return out


# ---------------------------------------------------------------------------------------------- model
def random_checkpoint(n_items: int, hidden: int, seed: int, scale: float):
    """Random diginetica-shaped model; output weights scaled up so scores spread (few exact ties)."""
    import torch

    from gru4rec.checkpoint import Checkpoint
    from gru4rec.items import ItemMap
    from gru4rec.model import GRU4Rec, ModelConfig

    model = GRU4Rec(ModelConfig(n_items=n_items, layers=[hidden]), seed=seed)
    with torch.no_grad():
        model.Wy.mul_(scale)
        model.By.uniform_(-0.1, 0.1)
    return Checkpoint(model, ItemMap(np.arange(n_items, dtype=np.int64)))


def build_eval_graph(ckpt, v: Variant, top_k: int, path: Path) -> None:
    """The variant's evaluation graph, as `gru4rec-cli export` writes m.eval.onnx."""
    import torch

    from gru4rec.bundle import items_sha256
    from gru4rec.export.graph import EVAL_IO, EvalStep
    from gru4rec.export.onnx_export import BATCH, DEFAULT_OPSET, finish_graph, model_metadata, trace_to_onnx

    model = ckpt.model.cpu().eval()
    cfg = model.cfg
    dtype = torch.float16 if v.fp16 else torch.float32
    step = EvalStep(model, top_k, dtype, v.topk_chunks, v.count_block, v.score_half, v.rerank).eval()
    L, H, B = len(cfg.layers), max(cfg.layers), 3  # H: padded state width
    example = (torch.arange(B) % cfg.n_items, torch.zeros(L, B, H), (torch.arange(B) + 1) % cfg.n_items)
    meta = model_metadata(
        ckpt, top_k, v.topk_chunks, DEFAULT_OPSET, "float16" if v.fp16 else "float32",
        items_sha256(ckpt.items.ids), "bench", v.count_block,
    )  # fmt: skip
    shapes = {
        "item_idx": [BATCH], "target_idx": [BATCH], "hidden": [L, BATCH, H], "hidden_out": [L, BATCH, H],
        "topk_scores": [BATCH, top_k], "topk_idx": [BATCH, top_k], "n_greater": [BATCH], "n_equal": [BATCH],
    }  # fmt: skip
    proto = trace_to_onnx(step, example, EVAL_IO, DEFAULT_OPSET)
    path.write_bytes(finish_graph(proto, meta, "eval", shapes))


# ---------------------------------------------------------------------------------------------- runs
def input_sets(n_items: int, batch: int, n: int, seed: int) -> list[tuple]:
    rng = np.random.default_rng(seed)
    rows = np.arange(batch, dtype=np.int64)
    return [
        (
            rng.integers(0, n_items, batch),
            rng.integers(0, n_items, batch),
            rows,
            rng.random(batch) < 0.1,  # ~10% of rows start a new session
        )
        for _ in range(n)
    ]


def run_config(path: Path, n_items, top_k, L, H, provider, batch, tf32, cuda_graph, args) -> dict:
    from gru4rec.score.ort_backend import OrtBackend

    t0 = time.perf_counter()
    backend = OrtBackend(path, n_items, top_k, L, H, provider, tf32, cuda_graph=cuda_graph)
    load_s = time.perf_counter() - t0
    backend.start(batch)
    checks = []
    for i, (x, t, src, reset) in enumerate(input_sets(n_items, batch, args.check_steps, seed=123)):
        if i == 0:  # after start() the state has width 1 (CPU) and every row is a new session
            src, reset = np.zeros_like(src), np.ones_like(reset)
        o = backend.step(x, t, src, reset, True)
        checks.append((o.n_greater.copy(), o.n_equal.copy(), o.topk_idx.copy()))
    sets = input_sets(n_items, batch, args.input_sets, seed=7)
    for i in range(args.warmup):
        backend.step(*sets[i % len(sets)], True)
    times = np.empty(args.steps)
    for i in range(args.steps):
        s = time.perf_counter()
        backend.step(*sets[i % len(sets)], True)  # copies counts and top-k back: synchronous
        times[i] = time.perf_counter() - s
    ms = times * 1e3
    return {
        "batch": batch,
        "tf32": tf32,
        "cuda_graph": bool(backend.cuda_graph),
        "step_ms_p50": float(np.median(ms)),
        "step_ms_p90": float(np.percentile(ms, 90)),
        "step_ms_min": float(ms.min()),
        "events_per_s": batch / float(np.median(times)),
        "session_load_s": load_s,
        "_checks": checks,
    }


def agreement(checks, ref, top_k: int) -> dict:
    g = np.concatenate([c[0] for c in checks])
    e = np.concatenate([c[1] for c in checks])
    rg = np.concatenate([c[0] for c in ref])
    re = np.concatenate([c[1] for c in ref])
    ti = np.concatenate([c[2] for c in checks])
    rti = np.concatenate([c[2] for c in ref])
    overlap = np.mean([len(np.intersect1d(a, b)) / top_k for a, b in zip(ti, rti, strict=True)])
    return {
        "rows": int(len(g)),
        "counts_exact": float(np.mean((g == rg) & (e == re))),
        "n_greater_exact": float(np.mean(g == rg)),
        "n_greater_max_abs_diff": int(np.abs(g - rg).max()),
        "hit_at_k_agree": float(np.mean((g < top_k) == (rg < top_k))),
        "topk_overlap": float(overlap),
        "topk_rows_identical": float(np.mean(np.all(ti == rti, axis=1))),
    }


def plan(v: Variant, batches: list[int], cuda: bool) -> list[tuple[int, bool, bool]]:
    """(batch, tf32, cuda_graph), most informative first: a time budget cuts the tail.

    CUDA: every variant with a CUDA graph (float32 and TF32) at the first batch and TF32 at the
    others; the base graph also without CUDA graph, and first its float32 references per batch.
    """
    if not cuda:
        return [(b, False, False) for b in batches]
    b0 = batches[0]
    tf = [False] if v.fp16 else [True, False]
    out = [(b0, t, True) for t in tf] + [(b, tf[0], True) for b in batches[1:]]
    if v.name == "base":  # the float32 references of every batch first: all agreement is against them
        out = [(b, False, False) for b in batches] + out + [(b0, True, False)]
    return out


def placement(path: Path) -> dict:
    """Providers of the nodes that ran (ORT profiler): any CPU node or Memcpy costs a sync per step."""
    from collections import Counter

    from gru4rec.export.placement import node_placements

    nodes = node_placements(path, "CUDAExecutionProvider", batch=256)
    off = [f"{op}:{name}" for name, op, prov in nodes if prov != "CUDAExecutionProvider" or "Memcpy" in op]
    return {"providers": dict(Counter(p for _, _, p in nodes)), "off_cuda_or_memcpy": off[:20]}


def torch_split(
    n_items: int, hidden: int, batch: int, top_k: int, block: int, chunks: int, dev: str = "cuda"
) -> dict:
    """Milliseconds of each piece of a step in torch on the same GPU (CUDA events): where time goes."""
    import torch

    from gru4rec.score.bench import time_ms

    def ms(fn) -> float:
        return time_ms(fn, dev, repeats=20)

    x = torch.randn(batch, hidden, device=dev)
    w = torch.randn(n_items, hidden, device=dev) / hidden**0.5
    s = x @ w.T
    t = s[:, :1]
    cols = -(-n_items // block) * block
    sp = torch.nn.functional.pad(s, (0, cols - n_items), value=float("-inf"))
    out = {}
    prev = torch.backends.cuda.matmul.allow_tf32
    try:
        for tf32 in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            out[f"gemm_{'tf32' if tf32 else 'fp32'}"] = ms(lambda: x @ w.T)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    xh, wh = x.half(), w.half()
    out["gemm_fp16"] = ms(lambda: xh @ wh.T)
    out["topk"] = ms(lambda: torch.topk(s, top_k, dim=1))
    out["topk_fp16"] = ms(lambda: torch.topk(s.half(), top_k, dim=1))
    m = cols // chunks

    def two_stage():
        v, i = torch.topk(sp.view(batch, chunks, m), top_k, dim=2)
        return torch.topk(v.view(batch, -1), top_k, dim=1)

    out[f"topk_two_stage_{chunks}"] = ms(two_stage)
    out["counts_fp32_sums"] = ms(lambda: ((s > t).float().sum(1), (s == t).float().sum(1)))
    out[f"counts_fp16_blocks_{block}"] = ms(
        lambda: (
            (sp > t).half().view(batch, -1, block).sum(2).float().sum(1),
            (sp == t).half().view(batch, -1, block).sum(2).float().sum(1),
        )
    )
    out["read_scores_once"] = ms(lambda: s.sum())
    return out


# ---------------------------------------------------------------------------------------------- main
def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="checkpoint (.pt); default: random diginetica-shaped weights")
    p.add_argument("--provider", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help=f"tiny random model {TINY} (CPU tests)")
    p.add_argument("--batches", default=None, help="comma list (default 1024,4096; tiny: 64)")
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--count-block", type=int, default=None, help="default 1024 (tiny: 64)")
    p.add_argument("--chunks", default=None, help="top-k chunk counts, comma list (default 16,64,256)")
    p.add_argument("--rerank", type=int, default=0, help="re-ranked float16 candidates (default 2 x top-k)")
    p.add_argument("--only", default=None, help="comma list of variant names to run")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--input-sets", type=int, default=4)
    p.add_argument("--check-steps", type=int, default=4)
    p.add_argument("--scale", type=float, default=4.0, help="random model: output weight scale")
    p.add_argument("--budget-s", type=float, default=200.0, help="stop starting new runs after this")
    p.add_argument("--out", type=Path, required=True, help="directory for score_variants.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    started = time.perf_counter()

    import onnxruntime

    from gru4rec.io import scratch_dir
    from gru4rec.score.ort_backend import gpu_name

    shape = TINY if args.tiny else DIGINETICA
    batches = [int(b) for b in (args.batches or ("64" if args.tiny else "1024,4096")).split(",")]
    block = args.count_block or (64 if args.tiny else 1024)
    chunk_counts = tuple(int(c) for c in (args.chunks or ("4,8" if args.tiny else "16,64,256")).split(","))
    if args.model:
        from gru4rec.checkpoint import load

        ckpt = load(args.model)
        model_desc = {"checkpoint": str(args.model)}
    else:
        ckpt = random_checkpoint(shape["n_items"], shape["hidden"], seed=0, scale=args.scale)
        model_desc = {"random_weights": True, "scale": args.scale}
    cfg = ckpt.model.cfg
    N, L, H = cfg.n_items, len(cfg.layers), max(cfg.layers)
    model_desc.update(n_items=N, layers=cfg.layers, mode=cfg.mode)
    todo = variants(block, chunk_counts, args.rerank or 2 * args.top_k)
    if args.only:
        keep = set(args.only.split(","))
        todo = [v for v in todo if v.name in keep or v.name == "base"]
    cuda = args.provider == "cuda"
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "score_variants",
        "device": gpu_name() if cuda else platform.processor() or platform.machine(),
        "provider": args.provider,
        "versions": {"onnxruntime": onnxruntime.__version__, "python": platform.python_version()},
        "model": model_desc,
        "top_k": args.top_k,
        "steps": args.steps,
        "runs": [],
        "skipped": [],
        "failed": [],
    }
    with scratch_dir("gru4rec-score-variants-") as tmp:  # every variant's graph: removed at the end
        refs: dict[int, list] = {}
        for v in todo:
            path = tmp / f"{v.name}.eval.onnx"
            try:
                t0 = time.perf_counter()
                build_eval_graph(ckpt, v, args.top_k, path)
                export_s = time.perf_counter() - t0
            except Exception as e:
                result["failed"].append({"variant": v.name, "stage": "export", "error": repr(e)[:300]})
                continue
            if cuda:
                try:
                    result.setdefault("placement", {})[v.name] = placement(path)
                except Exception as e:
                    result.setdefault("placement", {})[v.name] = {"error": repr(e)[:300]}
            _time_variant(v, path, export_s, batches, cuda, (N, L, H), refs, result, args, started)
    if cuda:
        try:
            import torch

            if torch.cuda.is_available():
                mid = chunk_counts[len(chunk_counts) // 2]
                result["torch_split_ms"] = torch_split(N, H, batches[0], args.top_k, block, mid)
        except Exception as e:
            result["torch_split_ms"] = {"error": repr(e)[:300]}
    _write(args.out, result, started)
    _table(result)
    return 0 if result["runs"] else 1


def _time_variant(v, path: Path, export_s: float, batches: list[int], cuda: bool, shape: tuple[int, int, int],
                  refs: dict[int, list], result: dict, args: argparse.Namespace, started: float) -> None:  # fmt: skip
    """Time one exported variant at every batch (and TF32 / CUDA graph setting) its plan lists."""
    n_items, n_layers, hidden = shape
    queue = plan(v, batches, cuda)
    while queue:
        batch, tf32, cg = queue.pop(0)
        label = f"{v.name} b{batch}{' tf32' if tf32 else ''}{' cuda-graph' if cg else ''}"
        if time.perf_counter() - started > args.budget_s:
            result["skipped"].append(label)
            continue
        try:
            r = run_config(path, n_items, args.top_k, n_layers, hidden, args.provider, batch, tf32, cg, args)
        except Exception as e:
            result["failed"].append({"variant": v.name, "run": label, "error": repr(e)[:300]})
            print(f"{label:44s} FAILED {repr(e)[:120]}", flush=True)
            if cg:  # e.g. a node the CUDA graph cannot capture: still time the variant without
                queue.insert(0, (batch, tf32, False))
            continue
        checks = r.pop("_checks")
        if v.name == "base" and not tf32 and not cg:
            refs[batch] = checks
        r.update(variant=v.name, label=label, exact_by_construction=v.exact, export_s=export_s)
        r.update(fp16=v.fp16, topk_chunks=v.topk_chunks, count_block=v.count_block)
        r.update(score_half=v.score_half, rerank=v.rerank)
        ref = refs.get(batch)
        r["agreement_vs_base_fp32"] = agreement(checks, ref, args.top_k) if ref else None
        result["runs"].append(r)
        a = r["agreement_vs_base_fp32"] or {}
        print(
            f"{label:44s} {r['events_per_s']:>12,.0f} ev/s  p50 {r['step_ms_p50']:7.3f} ms  "
            f"counts exact {a.get('counts_exact', float('nan')):.4f}  "
            f"topk overlap {a.get('topk_overlap', float('nan')):.4f}",
            flush=True,
        )
        _write(args.out, result, started)


def _write(out: Path, result: dict, started: float) -> None:
    result["elapsed_s"] = time.perf_counter() - started
    tmp = out / "score_variants.json.tmp"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out / "score_variants.json")


def _table(result: dict) -> None:
    print(
        f"\n{'run':44s} {'events/s':>12s} {'p50 ms':>8s} {'exact':>7s} {'hit@k':>7s} {'max|dg|':>7s} {'overlap':>8s}"
    )
    for r in sorted(result["runs"], key=lambda r: (r["batch"], r["step_ms_p50"])):
        a = r["agreement_vs_base_fp32"] or {}
        print(
            f"{r['label']:44s} {r['events_per_s']:>12,.0f} {r['step_ms_p50']:>8.3f} "
            f"{a.get('counts_exact', math.nan):>7.4f} {a.get('hit_at_k_agree', math.nan):>7.4f} "
            f"{a.get('n_greater_max_abs_diff', -1):>7d} {a.get('topk_overlap', math.nan):>8.4f}"
        )
    for f in result["failed"]:
        print(f"FAILED {f}")
    for name, pl in result.get("placement", {}).items():
        if pl.get("off_cuda_or_memcpy") or "error" in pl:
            print(f"placement {name}: {pl}")
    if "torch_split_ms" in result:
        print("torch split (ms):", json.dumps(result["torch_split_ms"]))
    if result["skipped"]:
        print(f"skipped (time budget): {', '.join(result['skipped'])}")


if __name__ == "__main__":
    sys.exit(main())
