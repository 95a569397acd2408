"""`gru4rec-cli export MODEL --out m.onnx`: serving + evaluation graphs and item-map sidecar."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

EXIT_CHECK_FAILED = 1


def register(app: typer.Typer) -> None:
    app.command("export")(export)


def export(
    model: Annotated[Path, typer.Argument(help="Checkpoint written by `gru4rec-cli train` (model.pt).")],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            help="Serving graph path, e.g. DIR/m.onnx; DIR/m.eval.onnx and DIR/m.items.parquet go beside it.",
        ),
    ],
    top_k: Annotated[
        int, typer.Option("--top-k", help="K of the top-k outputs computed inside the graph.")
    ] = 20,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset version (17 to 20).")] = 17,
    fp16: Annotated[
        bool, typer.Option("--fp16", help="Half-precision weights and compute; inputs/outputs stay float32.")
    ] = False,
    topk_chunks: Annotated[
        int,
        typer.Option(
            "--topk-chunks",
            help="Two-stage top-k over C column chunks (0: one TopK over all items); a GPU speed option.",
        ),
    ] = 0,
    count_block: Annotated[
        int,
        typer.Option(
            "--count-block",
            help="Eval graph: exact target counts summed in float16 blocks of this many columns "
            "(1 to 2048; 0: float32 sums); a GPU speed option.",
        ),
    ] = 0,
    no_verify: Annotated[
        bool,
        typer.Option("--no-verify", help="Skip the PyTorch vs ONNX Runtime replay check (not recommended)."),
    ] = False,
    external_data: Annotated[
        bool | None,
        typer.Option(
            "--external-data/--no-external-data",
            help="Weights in one file beside the graphs, DIR/<export id>.weights (ONNX external data), stored "
            "once for both graphs \\[default: when they take 512 MiB or more; one ONNX file cannot hold 2 GiB].",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Export a checkpoint to ONNX, verified against PyTorch before the files are put in place.

    Verification replays random multi-step sessions (with hidden resets) through PyTorch and ONNX Runtime (CPU) and requires max |score diff| <= 1e-4, max |hidden diff| <= 1e-5 and identical top-k but for exact ties. On failure nothing is written (an earlier export at --out is kept) and the exit code is 1. With --fp16 the errors and top-k overlap are reported, not enforced.
    """
    from rich.console import Console

    from gru4rec.export.onnx_export import export_bundle
    from gru4rec.export.verify import VerificationFailed

    console = Console(stderr=True, soft_wrap=True)
    try:
        with console.status("exporting") as status:
            result = export_bundle(
                model, out, top_k=top_k, opset=opset, fp16=fp16, verify=not no_verify, topk_chunks=topk_chunks,
                count_block=count_block, external_data=external_data,
                status=lambda msg: status.update(msg),
            )  # fmt: skip
    except VerificationFailed as e:
        for line in e.report.lines():
            console.print(f"  {line}", markup=False)
        print(f"verification failed: {e}; nothing written", file=sys.stderr)
        raise typer.Exit(EXIT_CHECK_FAILED) from None
    out_console = Console(soft_wrap=True)
    if result.report is not None:
        out_console.print("verification (PyTorch vs ONNX Runtime CPU):")
        for line in result.report.lines():
            out_console.print(f"  {line}", markup=False)
    else:
        out_console.print("verification skipped (--no-verify)")
    m = result.meta
    weights = (
        f", {m['weights_file']} ({_mb(result.onnx_path.with_name(m['weights_file']))})"
        if m.get("weights_file")
        else ""
    )
    out_console.print(
        f"wrote {result.onnx_path} ({_mb(result.onnx_path)}), {result.eval_path.name}, {result.sidecar_path.name}{weights}: "
        f"{m['input_mode']} input, {_gru(m)} GRU, {int(m['n_items']):,} items, "
        f"top-{m['top_k']}{_chunks(m)}, {m['precision']}, opset {m['opset']}",
        markup=False,
    )


def _gru(meta: dict) -> str:
    layers = json.loads(meta["model_config"])["layers"]
    if len(set(layers)) == 1:
        return f"{len(layers)} x {layers[0]}"
    return f"{','.join(map(str, layers))} (state padded to {meta['hidden_size']})"


def _chunks(meta: dict) -> str:
    out = f" in {meta['topk_chunks']} chunks" if meta["topk_chunks"] != "0" else ""
    block = meta.get("count_block", "0")
    return out + (f", counts in blocks of {block}" if block != "0" else "")


def _mb(path: Path) -> str:
    return f"{path.stat().st_size / 2**20:.1f} MiB"
