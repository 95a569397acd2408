"""Regenerate the measured tables of docs/performance.md and README.md from bench/results/*.json.

Every table sits between `<!-- gen:NAME -->` and `<!-- /gen:NAME -->` markers; this script rewrites
what is between them and leaves the prose alone, so a figure in the docs is always the figure in the
JSON it cites. `make docs` runs it; `--check` exits 1 (naming the files) when a file is out of date.

    python docs/gen_performance.py [--check]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
TARGETS = (ROOT / "docs" / "performance.md", ROOT / "docs" / "tuning.md", ROOT / "README.md")
BLOCK = re.compile(r"(<!-- gen:(?P<name>[a-z0-9-]+) -->\n)(?P<body>.*?)(<!-- /gen:(?P=name) -->)", re.S)

GPU_SEEDS = ("train-h100-seed1.json", "train-h100-seed2.json", "train-h100-seed3.json")
GPU_TRAIN_CMD = (
    "gru4rec-cli bench train --device cuda --seed {seed} --out bench/results/train-h100-seed{seed}.json"
)
CPU_TRAIN = (
    ("train-cpu-rsc15.json", "--datasets rsc15_100k --epochs 2 --runs 3"),
    ("train-cpu-diginetica-preset.json", "--datasets rsc15_100k --preset diginetica --epochs 2 --runs 3"),
    ("train-cpu-rsc15-10epochs.json", "--datasets rsc15_100k --epochs 10 --seed 1 --runs 3"),
)
SCORE_GPU_ROWS = (  # (label in score-h100.json, what the row is called here)
    ("ORT CUDA EP b256", "ORT CUDA EP + IOBinding"),
    ("ORT CUDA EP b1024", "ORT CUDA EP + IOBinding"),
    ("ORT CUDA EP b4096", "ORT CUDA EP + IOBinding"),
    ("ORT CUDA EP b1024 tf32 cuda-graph", "ORT CUDA EP, TF32, CUDA graph"),
    ("ORT CUDA EP b1024 tf32 cuda-graph block1024", "same, blocked counts (`export --count-block 1024`)"),
    ("ORT CUDA EP b1024 ranks-only", "ranks only (metrics without `--out`), fp32"),
    (
        "ORT CUDA EP b1024 tf32 cuda-graph block1024 ranks-only",
        "ranks only, TF32, CUDA graph, blocked counts",
    ),
    ("torch eager CUDA b1024", "torch eager CUDA"),
    ("ORT CUDA EP online cuda-graph", "ORT CUDA EP online, CUDA graph"),
    ("ORT CUDA EP online", "ORT CUDA EP online, no graph"),
    ("torch eager CUDA online", "torch eager CUDA online"),
)


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def ms(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def spread(values: list[float], fmt: str) -> str:
    """Mean (min-max) of `values`."""
    mean = statistics.fmean(values)
    return f"{mean:{fmt}} ({min(values):{fmt}}–{max(values):{fmt}})"


def gpu_runs() -> dict[str, list[dict]]:
    """The H100 training runs per dataset, one per seed file."""
    by_data: dict[str, list[dict]] = {}
    for name in GPU_SEEDS:
        for run in load(name)["runs"]:
            by_data.setdefault(run["dataset"], []).append(run)
    return by_data


def official() -> dict[str, dict]:
    return {r["dataset"]: r for r in load("official-h100.json")["runs"]}


def accuracy() -> str:
    ref = official()
    rows = []
    for data, runs in gpu_runs().items():
        o = ref[data]
        r20 = [r["recall@20"] for r in runs]
        m20 = [r["mrr@20"] for r in runs]
        rows.append([data, runs[0]["preset"], spread(r20, ".4f"), f"{o['recall@20']:.4f}",
                     f"{statistics.fmean(r20) / o['recall@20']:.1%}", spread(m20, ".4f"), f"{o['mrr@20']:.4f}",
                     f"{statistics.fmean(m20) / o['mrr@20']:.1%}"])  # fmt: skip
    head = [
        "data",
        "preset",
        "Recall@20, 3 seeds",
        "official",
        "ratio",
        "MRR@20, 3 seeds",
        "official",
        "ratio",
    ]
    cmd = "`" + GPU_TRAIN_CMD.format(seed="N") + "` for N = 1, 2, 3"
    return (
        table(head, rows)
        + f"\nReproduce: {cmd}. Files: `bench/results/train-h100-seed{{1,2,3}}.json`, "
        + ("`bench/results/official-h100.json` (the official code's figures and where they come from).\n")
    )


def train_gpu() -> str:
    ref = official()
    rows = []
    for data, runs in gpu_runs().items():
        eps = [r["events_per_s_median"] for r in runs]
        rows.append([data, runs[0]["preset"], spread(eps, ",.0f"), f"{statistics.fmean(eps) / ref[data]['events_per_s']:.1f}x",
                     f"{statistics.fmean(r['train_seconds'] for r in runs):.1f} s"])  # fmt: skip
    d = load(GPU_SEEDS[0])
    note = (f"\nDevice: {d['device']}, torch {d['torch']}; 10 epochs, fp32 (no TF32), CUDA graph on; \"vs official\": "
            "the official PyTorch code on the same GPU and files (`bench/results/official-h100.json`). ")  # fmt: skip
    cmd = "`" + GPU_TRAIN_CMD.format(seed="N") + "` for N = 1, 2, 3."
    head = ["data", "preset", "events/s, 3 seeds (range)", "vs official", "10 epochs"]
    return table(head, rows) + note + "Reproduce: " + cmd + "\n"


def train_cpu() -> str:
    rows = []
    for name, args in CPU_TRAIN:
        d = load(name)
        runs = d["runs"]
        eps = [e for r in runs for e in r["events_per_s"]]
        rows.append([
            f"{runs[0]['dataset']}, {runs[0]['preset']} preset", str(runs[0]["epochs"]), spread(eps, ",.0f"),
            f"{statistics.fmean(r['train_seconds'] for r in runs):.1f} s",
            f"{statistics.fmean(r['recall@20'] for r in runs):.4f} / {statistics.fmean(r['mrr@20'] for r in runs):.4f}",
            f"`gru4rec-cli bench train --device cpu {args}` → `bench/results/{name}`",
        ])  # fmt: skip
    head = ["data, preset", "epochs", "events/s, every epoch of 3 seeds (range)", "time per run",
            "Recall@20 / MRR@20 (mean)", "command → file"]  # fmt: skip
    d = load(CPU_TRAIN[0][0])
    return (
        table(head, rows)
        + f"\nDevice: {d['device']}, torch {d['torch']}, the project's 2-core development machine.\n"
    )


def score_gpu() -> str:
    d = load("score-h100.json")
    runs = {r["label"]: r for r in d["runs"]}
    rows = []
    for label, what in SCORE_GPU_ROWS:
        r = runs[label]
        lat = f"{ms(r['step_ms_p50'])} / {ms(r['step_ms_p99'])} ms"
        rows.append([what, str(r["batch_size"]), f"{r['events_per_s']:,.0f}", lat, f"{r['recall@20']:.4f}"])
    head = ["backend", "batch", "scored events/s", "step p50 / p99", "Recall@20"]
    gpu = d["machine"]["gpu"]
    v = d["versions"]
    note = (f"\nDevice: {gpu}, onnxruntime {v['onnxruntime']}, torch {v['torch']}; diginetica test set, "
            f"diginetica-preset model. Reproduce: `gru4rec-cli bench score --model diginetica.pt "
            f"--out bench/results/score-h100.json` on a GPU machine.\n")  # fmt: skip
    return table(head, rows) + note


def roofline() -> str:
    r = load("score-h100.json")["roofline_b1024"]
    best = min(r["measured_step_ms_p50"].items(), key=lambda kv: kv[1])
    rows = [
        ["GEMM work per step", f"{r['gemm_flops_per_step'] / 1e9:.1f} GFLOP"],
        ["bytes per step (item matrix read, score matrix written)", f"{r['bytes_per_step'] / 1e6:.0f} MB"],
        ["measured matmul rate, fp32 / TF32", f"{r['matmul_tflops_fp32']:.0f} / {r['matmul_tflops_tf32']:.0f} TFLOP/s"],
        ["measured copy bandwidth", f"{r['copy_bandwidth_gb_s'] / 1e3:.1f} TB/s"],
        ["roofline step, fp32 / TF32", f"{r['roofline_step_ms']['fp32']:.2f} / {r['roofline_step_ms']['tf32']:.2f} ms"],
        [f"fastest measured step ({best[0]})", f"{best[1]:.2f} ms = {best[1] / r['roofline_step_ms']['tf32']:.1f}x the TF32 roofline"],
    ]  # fmt: skip
    return table([f"batch {r['batch_size']}, diginetica-shaped model", "figure"], rows) + (
        "\nFrom `bench/results/score-h100.json` (`roofline_b1024`), measured in the same `bench score` run.\n"
    )


def score_cpu() -> str:
    d = load("score-cpu.json")
    rows = [
        [r["label"], str(r["batch_size"]), f"{r['events_per_s']:,.0f}", f"{ms(r['step_ms_p50'])} ms"]
        for r in d["runs"]
    ]
    note = (f"\nDevice: {d['machine']['cpu']}; a random-weight model of the diginetica shape ({d['model']['n_items']:,} "
            f"items); ORT CPU EP {d['speedup_ort_cpu_vs_torch_cpu']:.1f}x torch eager. Reproduce: "
            "`gru4rec-cli bench score --out bench/results/score-cpu.json`.\n")  # fmt: skip
    return table(["backend", "batch", "scored events/s", "step p50"], rows) + note


def score_memory() -> str:
    d = load("score-memory.json")
    runs = {(r["target_events"], r["layout"]): r for r in d["runs"]}
    sizes = sorted({k[0] for k in runs})
    layouts = ("single file", "16-file dataset")
    rows = [[f"{n / 1e6:g}M events"] + [f"{runs[n, lay]['peak_rss_mib']:.0f} MiB / {runs[n, lay]['events_per_s']:,.0f}"
                                       for lay in layouts] for n in sizes]  # fmt: skip
    ratios = [f"{d['ratios'][lay]['rss_large_over_small']:.2f}x / {d['ratios'][lay]['events_per_s_large_over_small']:.2f}x"
              for lay in layouts]  # fmt: skip
    rows.append([f"{sizes[-1] / 1e6:g}M over {sizes[0] / 1e6:g}M", *ratios])
    note = "\nReproduce: `gru4rec-cli bench score-memory --out bench/results/score-memory.json` (`make bench`).\n"
    return (
        table(["test set", "one file: peak RSS / events/s", "16-file dataset: peak RSS / events/s"], rows)
        + note
    )


def catalog() -> str:
    d = load("catalog-cpu.json")
    rows = []
    for r in d["runs"]:
        tr, ex, sc = r["train"], r["export"], r["score"]
        disk = sum(r["bundle_bytes"].values()) / 2**20
        mem = sc["memory"]
        tiles = f"{mem['n_tiles']:,} x {mem['tile_items']:,}" if mem["n_tiles"] > 1 else "untiled"
        rows.append([f"{r['n_items']:,}", f"{r['weights_bytes'] / 2**20:,.0f} MiB",
                     f"{tr['events_per_s']:,.0f} / {tr['peak_rss_mib']:,.0f} MiB",
                     f"{ex['wall_s']:.0f} s / {ex['peak_rss_mib']:,.0f} MiB", f"{disk:,.0f} MiB",
                     f"{sc['events_per_s']:,.0f} / {sc['peak_rss_mib']:,.0f} MiB", tiles,
                     f"{sc['flop_rate'] / 1e9:.1f}"])  # fmt: skip
    head = ["items", "weights", "train: events/s / peak RSS", "export: time / peak RSS", "bundle on disk",
            "score: events/s / peak RSS", "score tiles", "score GFLOP/s"]  # fmt: skip
    ratios = "; ".join(
        f"{int(n):,} items: FLOP rate {v['score_flop_rate_over_smallest']:.2f}x the smallest, peak RSS "
        f"{v['score_rss_over_smallest_plus_weights']:.2f}x (smallest's + weights), "
        f"{v['score_rss_minus_weights_mib']:,.0f} MiB beyond the weights"
        for n, v in d["ratios"].items()
    )
    return table(head, rows) + (
        f"\n{d['units']} units, 1 epoch, CPU ({d['host']}). {ratios}. Reproduce: `gru4rec-cli bench catalog "
        "--out bench/results/catalog-cpu.json` (`make bench`).\n"
    )


def ray() -> str:
    d = load("ray-score-latest.json")
    rows = []
    for r in d["runs"]:
        engine = "`--engine local`" if "ray" not in r["args"] else f"`{r['args']}`"
        opt = lambda v: f"{v:.1f} s" if v is not None else "—"  # noqa: E731
        rows.append([engine, f"{r['process_wall_s']:.1f} s", f"{r['events_per_s_process_wall']:,.0f}",
                     opt(r["ray_read_shuffle_s"]), opt(r["ray_score_s"]), f"{r['step_ms_p50']:.1f} ms"])  # fmt: skip
    note = (f"\n{d['n_predictions']:,} predictions of the demo model on a synthetic test set, ORT CPU EP, "
            f"{d['cores']} cores; largest metric difference to the local engine {d['max_metric_abs_diff_vs_local']:.1e}. "
            "Reproduce: `python bench/ray_scale.py --out bench/results/ray-score-latest.json` (`make bench`).\n")  # fmt: skip
    head = ["run", "process wall", "scored events/s", "Ray read + shuffle", "Ray scoring", "step p50"]
    return table(head, rows) + note


def baselines() -> str:
    d = load("shared/results.json")
    order = ["GRU4Rec", "V-SKNN", "SKNN", "Item-KNN", "S-POP", "BPR-MF", "POP"]
    rows = []
    for data in d["datasets"]:
        name = data["name"] if isinstance(data, dict) else data
        cells = {}
        for r in d["results"]:
            if r["dataset"] == name:
                m = r["metrics"]
                key = "GRU4Rec" if r["kind"] == "gru4rec" else r["model"]
                cells[key] = (f"{m['standard']['recall@20']:.4f} / {m['standard']['mrr@20']:.4f} "
                              f"({m['conservative']['recall@20']:.4f} / {m['conservative']['mrr@20']:.4f})")  # fmt: skip
        rows.append([name] + [cells.get(k, "—") for k in order])
    note = ("\nRecall@20 / MRR@20 in standard tie mode (conservative in brackets). Reproduce: `gru4rec-cli eval "
            "benchmark --config eval/configs/benchmark-shared.toml --out bench/results/shared` "
            "(report with plots: `bench/results/shared/report.md`).\n")  # fmt: skip
    return table(["data", *order], rows) + note


def serve() -> str:
    d = load("serve-cpu.json")
    rows = []
    for lv in d["levels"]:
        lat, cpu = lv["latency_ms"], lv["cpu_ms_per_event"]
        rows.append([str(lv["concurrency"]), f"{lv['events_per_s']:,.0f}", f"{lat['p50']:.1f} / {lat['p95']:.1f} / {lat['p99']:.1f}",
                     f"{lv['server']['mean_batch']:.1f}", f"{cpu['server']:.2f} / {cpu['load_generator']:.2f}"])  # fmt: skip
    m, load_avg = d["model"], d["machine"].get("load_avg_1m_before_after")
    busy = f" Load average before / after: {load_avg[0]:.1f} / {load_avg[1]:.1f}." if load_avg else ""
    note = (f"\nServer, ONNX Runtime ({d['machine']['provider']}) and load generator on one machine ({d['machine']['cpu']}); "
            f"{'random-weight ' if m.get('random_weights') else ''}model of {m['n_items']:,} items, layers {m['layers']}; "
            f"{d['server']['state']} state, max batch {d['server']['max_batch']}.{busy} Reproduce: `gru4rec-cli bench serve "
            "--out bench/results/serve-cpu.json` (`make bench`).\n")  # fmt: skip
    head = [
        "concurrency",
        "events/s",
        "latency p50 / p95 / p99 (ms)",
        "mean batch",
        "CPU ms per event: server / load generator",
    ]
    return table(head, rows) + note


def serve_stateless() -> str:
    d = load("serve-cpu.json")
    rows = [[str(r["length"]), f"{r['stateful_ms_per_event']:.1f}", f"{r['stateless_ms_per_event']:.1f}", f"{r['ratio']:.1f}x",
             f"{r['model_calls_per_event']['stateless']:.1f}"] for r in d["stateful_vs_stateless"]]  # fmt: skip
    head = [
        "session length",
        "stateful ms/event",
        "stateless ms/event",
        "ratio",
        "model calls per event, stateless",
    ]
    return (
        table(head, rows)
        + "\nThe same sessions at batch 1 through the same graph, no HTTP; file: `bench/results/serve-cpu.json`.\n"
    )


def nightly() -> str:
    d = load("nightly-false-alarms.json")
    rows = [[engine, str(len(runs)), str(d["false_regressions"][engine]), str(d["errors"][engine]),
             ", ".join(f"{k} {v}" for k, v in d["verdicts"][engine].items() if v)] for engine, runs in d["runs"].items()]  # fmt: skip
    head = ["engine", "nightly runs", "false regressions", "errors", "latency verdicts"]
    return table(head, rows) + (
        f"\nAn unchanged model ({d['model']}) as its own champion with `promote = true`. Reproduce: `python "
        "bench/nightly_false_alarms.py --out bench/results/nightly-false-alarms.json` (`make bench`).\n"
    )


def tune() -> str:
    import polars as pl

    rows = []
    for run in ("run1", "run2"):
        folder = RESULTS / "tune-rsc15-new" / run
        trials = pl.read_parquet(folder / "trials.parquet")
        done = trials.filter(pl.col("state").is_in(["COMPLETE", "PRUNED"]))
        models = {r["model"]: r for r in json.loads((folder / "final.json").read_text())["runs"]}
        tuned, preset = models["tuned"], next(v for k, v in models.items() if k.startswith("preset"))
        states = done["state"].value_counts().sort("state")
        rows.append([run, str(done.height), ", ".join(f"{r['count']} {r['state'].lower()}" for r in states.to_dicts()),
                     f"{done['value'].max():.4f}", f"{tuned['recall@20']:.4f} / {tuned['mrr@20']:.4f}",
                     f"{preset['recall@20']:.4f} / {preset['mrr@20']:.4f}"])  # fmt: skip
    head = [
        "run",
        "finished trials",
        "states",
        "best valid MRR@20",
        "--final-test tuned R@20 / MRR@20",
        "preset",
    ]
    return table(head, rows) + (
        "\nrsc15_100k, `gru4rec-cli tune train.parquet --out DIR --space xe --preset rsc15 -p n_epochs=3 -p layers=100 "
        "--n-trials 30 --n-jobs 2 --threads 1 --device cpu --seed 42 --final-test test.parquet`; files: "
        "`bench/results/tune-rsc15-new/run{1,2}/`.\n"
    )


def tune_repeats() -> str:
    new, old = (load(f"tune-rsc15-new/repeats-check-{n}.json") for n in ("new", "before"))

    def steps(d: dict) -> list[tuple[str, list]]:  # the [finished, repeated] counts, in run order
        out = [(k, v) for k, v in d.items() if isinstance(v, list) and len(v) == 2]
        return [(k.replace("repro-a dups", "a separate study topped up 3 -> 6 -> 9"), v) for k, v in out]

    rows = [[a, f"{x[0]} / {x[1]}", f"{y[0]} / {y[1]}"] for (a, x), (_, y) in zip(steps(new), steps(old))]
    note = ("\nThe same command sequence on one study (finished trials / repeated configurations), the code now and "
            "before; the `--n-jobs 2` row tops up to the study's own count. Reproduce: `python "
            "bench/results/tune-rsc15-new/repeats-check.py` (its JSONs beside it).\n")  # fmt: skip
    return table(["step", "now", "before"], rows) + note


TABLES: dict[str, Callable[[], str]] = {
    "tune": tune,
    "tune-repeats": tune_repeats,
    "serve": serve,
    "serve-stateless": serve_stateless,
    "nightly": nightly,
    "accuracy": accuracy,
    "train-gpu": train_gpu,
    "train-cpu": train_cpu,
    "score-gpu": score_gpu,
    "score-roofline": roofline,
    "score-cpu": score_cpu,
    "score-memory": score_memory,
    "catalog": catalog,
    "ray": ray,
    "baselines": baselines,
}


def render(text: str, source: Path) -> str:
    def block(m: re.Match) -> str:
        name = m.group("name")
        if name not in TABLES:
            raise SystemExit(f"{source}: unknown table <!-- gen:{name} --> (known: {', '.join(TABLES)})")
        return m.group(1) + TABLES[name]() + m.group(4)

    return BLOCK.sub(block, text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only say whether the files are up to date")
    args = p.parse_args(argv)
    stale = []
    for path in TARGETS:
        text = path.read_text()
        new = render(text, path)
        if new != text:
            stale.append(path)
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        print(
            f"out of date (run python docs/gen_performance.py): {', '.join(map(str, stale))}", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
