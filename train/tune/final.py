"""`tune --final-test`: the best parameters retrained on the whole TRAIN and scored on TEST the way a
deployed model is (checkpoint -> verified ONNX export -> ONNX Runtime replay), side by side with the
preset trained and scored the same way. Results: DIR/final/ (models, final.json) and report.md."""

from __future__ import annotations

import json
import time
from pathlib import Path

import polars as pl

from gru4rec.data import Keys
from gru4rec.io import check_output_dir, write_text_atomic


def final_test(
    train_events: pl.DataFrame,
    test_path: Path,
    best_config: dict,
    preset: str | None,
    seed: int,
    device: str,
    out: Path,
    console,
    keys: Keys = Keys(),
    progress: bool = True,
) -> list[dict]:
    from gru4rec import checkpoint as ckpt_io
    from gru4rec.export.onnx_export import export_bundle
    from gru4rec.score.scorer import ScoreConfig, score
    from gru4rec.train.params import from_dict, resolve
    from gru4rec.train.trainer import train

    folder = check_output_dir(out / "final")
    runs = [("tuned", from_dict(best_config))]
    if preset is not None:
        runs.append((f"preset {preset.strip().lower()}", resolve(preset=preset)))
    rows = []
    for label, cfg in runs:
        stem = label.replace(" ", "-")
        console.print(f"final test: training {label} on the whole TRAIN ({train_events.height:,} events)")
        t0 = time.perf_counter()
        ck = train(train_events, cfg, device=device, seed=seed, progress=progress, console=console)
        train_s = time.perf_counter() - t0
        ckpt_io.save(ck, folder / f"{stem}.pt")
        del ck
        export_bundle(folder / f"{stem}.pt", folder / f"{stem}.onnx", top_k=20)
        report = score(
            folder / f"{stem}.onnx", test_path, config=ScoreConfig(cutoffs=(1, 5, 10, 20), keys=keys)
        )
        m = report["metrics"]
        rows.append(
            {
                "model": label,
                "recall@20": m["recall@20"],
                "mrr@20": m["mrr@20"],
                "recall@10": m["recall@10"],
                "mrr@10": m["mrr@10"],
                "n_predictions": report["n_predictions"],
                "n_unknown_dropped": report["n_unknown_dropped"],
                "n_skipped_sessions": report["n_skipped_sessions"],
                "train_s": train_s,
                "onnx": str(folder / f"{stem}.onnx"),
                "params": cfg.to_dict(),
            }
        )
        console.print(
            f"final test {label}: Recall@20 {m['recall@20']:.4f}  MRR@20 {m['mrr@20']:.4f} "
            f"({report['n_predictions']:,} predictions, ONNX Runtime)",
            markup=False,
        )
        for line in drop_lines(report):
            console.print(f"final test {label}: {line}", markup=False)
    write_text_atomic(
        folder / "final.json", json.dumps({"test": str(test_path), "seed": seed, "runs": rows}, indent=2)
    )
    _append_to_report(out / "report.md", rows, test_path, seed)
    return rows


def drop_lines(report: dict) -> list[str]:
    """What scoring TEST left out, in `score`'s words."""
    lines = []
    if report["n_unknown_dropped"]:
        lines.append(f"dropped {report['n_unknown_dropped']:,} event(s) of items unknown to the model")
    if report["n_skipped_sessions"]:
        lines.append(f"skipped {report['n_skipped_sessions']:,} session(s) with fewer than 2 known events")
    return lines


def _append_to_report(report: Path, rows: list[dict], test_path: Path, seed: int) -> None:
    lines = [
        "## Final test",
        "",
        f"Retrained on the whole TRAIN with --seed {seed}, exported to ONNX (verified) and scored on "
        f"`{test_path}` by the score stage (standard tie mode). Details: `final/final.json`.",
        "",
        "| model | Recall@20 | MRR@20 | Recall@10 | MRR@10 | training s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['recall@20']:.4f} | {r['mrr@20']:.4f} | {r['recall@10']:.4f} | "
            f"{r['mrr@10']:.4f} | {r['train_s']:.0f} |"
        )
    lines += [""] + [f"- {r['model']}: {line}" for r in rows for line in drop_lines(r)]
    text = report.read_text() if report.exists() else ""
    cut = text.find("## Final test")
    if cut >= 0:
        text = text[:cut]
    write_text_atomic(report, text.rstrip("\n") + "\n\n" + "\n".join(lines) + "\n")
