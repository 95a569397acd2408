"""Checkpoint -> serving graph + evaluation graph + item-map sidecar, verified before they appear.

All three files are written to temporary names beside their targets, verified there, and only then
renamed into place (sidecar first, serving graph last: `load_bundle` checks that they belong
together, so a crash between renames is caught, not silently used). A failed verification leaves
no output behind and any previous export at that path untouched; `--no-verify` skips the check.
"""

from __future__ import annotations

import contextlib
import io
import json
import uuid
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

import gru4rec
from gru4rec.bundle import (
    FORMAT,
    FORMAT_VERSION,
    SIDECAR_EXPORT_KEY,
    SIDECAR_KEY,
    WEIGHTS_KEY,
    companion_paths,
    items_sha256,
    remove_unreferenced,
    weights_path,
)
from gru4rec.errors import UserError
from gru4rec.export.external import WeightsWriter, attach_weights, step_params, weights_name
from gru4rec.io import atomic_path
from gru4rec.items import INDEX, ItemMap

# Weights from this size on go to external data by default: stored once instead of in both graphs,
# and read without a protobuf copy (a reader holds the weights once, not twice).
EXTERNAL_FROM = 512 * 2**20
MIN_OPSET, DEFAULT_OPSET, MAX_OPSET = 17, 17, 20  # 20: newest opset of torch's TorchScript exporter
BATCH = "batch"


@dataclass
class ExportResult:
    onnx_path: Path
    eval_path: Path
    sidecar_path: Path
    meta: dict[str, str]
    report: Any = None  # verify.VerifyReport, or None with --no-verify


def trace_to_onnx(step, example: tuple, names: tuple[list[str], list[str]], opset: int, params: bool = True):
    """torch.onnx (TorchScript exporter: it keeps our explicit gate ops as written) -> ModelProto;
    `params=False` leaves the parameters out, as graph inputs (external.py stores them)."""
    import onnx
    import torch

    inputs, outputs = names
    dynamic = {n: {1 if n in ("hidden", "hidden_out") else 0: BATCH} for n in inputs + outputs}
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy-exporter deprecation notice is not the user's business
        torch.onnx.export(
            step, example, buf, dynamo=False, opset_version=opset, input_names=inputs,
            output_names=outputs, dynamic_axes=dynamic, do_constant_folding=True, export_params=params,
        )  # fmt: skip
    return onnx.load_from_string(buf.getvalue())


def set_io_shapes(model, shapes: dict[str, list[int | str]]) -> None:
    """Overwrite the declared shapes of graph inputs/outputs with the documented ones."""
    for value in list(model.graph.input) + list(model.graph.output):
        if value.name not in shapes:  # a parameter traced as an input (external data): its own shape
            continue
        dims = value.type.tensor_type.shape.dim
        del dims[:]
        for d in shapes[value.name]:
            dims.add(**({"dim_param": d} if isinstance(d, str) else {"dim_value": d}))


def model_metadata(
    ckpt, top_k: int, topk_chunks: int, opset: int, precision: str, digest: str, export_id: str,
    count_block: int = 0,
) -> dict[str, str]:  # fmt: skip
    cfg = ckpt.model.cfg
    return {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "export_id": export_id,
        "export_time_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "gru4rec_version": gru4rec.__version__,
        "versions": json.dumps(_versions(ckpt)),
        "hyperparameters": json.dumps(ckpt.params, default=str, sort_keys=True),
        "model_config": json.dumps(cfg.to_dict(), sort_keys=True),
        "data_fingerprint": ckpt.data_fingerprint or "",
        "input_mode": cfg.mode,
        "precision": precision,
        "opset": str(opset),
        "top_k": str(top_k),
        "topk_chunks": str(topk_chunks),
        "count_block": str(count_block),
        "n_items": str(cfg.n_items),
        "n_layers": str(len(cfg.layers)),
        "hidden_size": str(max(cfg.layers)),  # width of the hidden tensor (padded: graph.py)
        "items_sha256": digest,
    }


def _versions(ckpt) -> dict[str, str]:
    import onnx
    import torch

    trained = (ckpt.info or {}).get("versions", {})
    return {"torch": str(torch.__version__), "onnx": onnx.__version__, "trained_with": trained}


def finish_graph(model, meta: dict[str, str], graph: str, shapes: dict) -> bytes:
    set_io_shapes(model, shapes)
    model.producer_name, model.producer_version = "gru4rec", gru4rec.__version__
    model.graph.name = f"gru4rec_{graph}_step"
    del model.metadata_props[:]
    for key, value in {**meta, "graph": graph}.items():
        model.metadata_props.add(key=key, value=value)
    if not meta.get(WEIGHTS_KEY):  # external weights: checked once written (check_graph_file)
        check_graph(model, graph)
    return model.SerializeToString()


def check_graph(model: Any, graph: str) -> None:
    """onnx.checker on a ModelProto, or on a file path (which resolves its external data)."""
    import onnx

    try:
        onnx.checker.check_model(str(model) if isinstance(model, Path) else model, full_check=True)
    except onnx.checker.ValidationError as e:  # a bug in this module, not a user error
        raise RuntimeError(f"exported {graph} graph fails onnx.checker: {e}") from e


def sidecar_frame(items: ItemMap) -> pl.DataFrame:
    return pl.DataFrame([pl.Series(INDEX, np.arange(len(items), dtype=np.int64)), items.series("item_id")])


@dataclass
class Graphs:
    serving: Any  # serialized bytes; with external data the ModelProto, weights attached when written
    eval: Any
    meta: dict[str, str]
    params: tuple[dict, dict] | None = None  # external data: each graph's parameters by input name


def build_graphs(
    ckpt, top_k: int, opset: int, fp16: bool, export_id: str, topk_chunks: int = 0, count_block: int = 0,
    external: bool | None = None,
) -> Graphs:  # fmt: skip
    """The serving and eval graphs; `external` None: weights in the graphs below EXTERNAL_FROM, else external data."""
    import torch

    from gru4rec.export.graph import EVAL_IO, SERVING_IO, EvalStep, ServingStep

    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UserError(f"--opset must be between {MIN_OPSET} and {MAX_OPSET}, got {opset}")
    model = ckpt.model.cpu().eval()
    cfg = model.cfg
    dtype = torch.float16 if fp16 else torch.float32
    serving = ServingStep(model, top_k, dtype, topk_chunks).eval()
    evaluation = EvalStep(model, top_k, dtype, topk_chunks, count_block).eval()
    n_bytes = sum(p.numel() * p.element_size() for p in serving.parameters())
    too_big = n_bytes >= 2**31 - 2**24  # protobuf's 2 GB message limit, with room for the graph itself
    if too_big and external is False:
        raise UserError(
            f"weights take {n_bytes / 2**30:.2f} GiB; one ONNX file holds < 2 GiB: drop --no-external-data"
        )
    external = n_bytes >= EXTERNAL_FROM if external is None else external
    L, H, N = len(cfg.layers), max(cfg.layers), cfg.n_items
    B = 3  # any batch: the axis is exported dynamic
    x, h, t = torch.arange(B) % N, torch.zeros(L, B, H), (torch.arange(B) + 1) % N
    precision = "float16" if fp16 else "float32"
    digest = items_sha256(ckpt.items.ids)
    meta = model_metadata(ckpt, top_k, topk_chunks, opset, precision, digest, export_id, count_block)
    if external:
        meta[WEIGHTS_KEY] = weights_name(export_id)
    shapes = {
        "item_idx": [BATCH], "target_idx": [BATCH], "hidden": [L, BATCH, H], "hidden_out": [L, BATCH, H],
        "scores": [BATCH, N], "topk_scores": [BATCH, top_k], "topk_idx": [BATCH, top_k],
        "n_greater": [BATCH], "n_equal": [BATCH],
    }  # fmt: skip
    protos = [
        trace_to_onnx(serving, (x, h), SERVING_IO, opset, params=not external),
        trace_to_onnx(evaluation, (x, h, t), EVAL_IO, opset, params=not external),
    ]
    if not external:
        serving_bytes = finish_graph(protos[0], meta, "serving", shapes)
        return Graphs(serving_bytes, finish_graph(protos[1], meta, "eval", shapes), meta)
    for proto, graph in zip(protos, ("serving", "eval")):
        finish_graph(proto, meta, graph, shapes)  # metadata and shapes; serialized once attached
    return Graphs(*protos, meta, (step_params(serving), step_params(evaluation)))


def write_graphs(graphs: Graphs, serving_path: Path, eval_path: Path, data_path: Path | None) -> None:
    """Both graph files; with external data their weights go to `data_path`, each tensor once."""
    if graphs.params is None:
        eval_path.write_bytes(graphs.eval)
        serving_path.write_bytes(graphs.serving)
        return
    writer = WeightsWriter(data_path)
    try:
        for proto, params, path in zip(
            (graphs.serving, graphs.eval), graphs.params, (serving_path, eval_path)
        ):
            attach_weights(proto, params, writer, graphs.meta[WEIGHTS_KEY])
            path.write_bytes(proto.SerializeToString())
    finally:
        writer.close()


def export_bundle(
    checkpoint: str | Path,
    out: str | Path,
    top_k: int = 20,
    opset: int = DEFAULT_OPSET,
    fp16: bool = False,
    verify: bool = True,
    status=None,
    topk_chunks: int = 0,
    count_block: int = 0,
    external_data: bool | None = None,
) -> ExportResult:
    """Export a checkpoint; raises UserError on bad input, verify.VerificationFailed on a failed check.

    `status(message)` is called before each phase (progress display).
    """
    say = status or (lambda _msg: None)
    out = Path(out)
    if out.suffix != ".onnx" or out.name.endswith(".eval.onnx"):
        raise UserError(f"--out must name the serving graph, ending in .onnx (not .eval.onnx): {out}")
    if not Path(checkpoint).is_file():  # before importing torch: a typo should fail fast
        raise UserError(f"{checkpoint}: model file not found")
    from gru4rec import checkpoint as ckpt_io

    eval_out, sidecar_out = companion_paths(out)
    say(f"loading {checkpoint}")
    ckpt = ckpt_io.load(checkpoint, mmap=True)  # the optimiser state is never read, so never loaded
    ckpt.train_state = None
    export_id = uuid.uuid4().hex
    say("tracing the serving and evaluation graphs")
    graphs = build_graphs(ckpt, top_k, opset, fp16, export_id, topk_chunks, count_block, external_data)
    meta = graphs.meta
    data = out.parent / meta[WEIGHTS_KEY] if WEIGHTS_KEY in meta else None
    replaced = weights_path(out) if out.is_file() else None  # the weights file an old export here reads
    report = None
    try:
        with contextlib.ExitStack() as stack:
            # ExitStack renames in reverse order of entry: sidecar, then eval graph, then the serving
            # graph last, so a crash in between leaves an old serving graph that load_bundle refuses
            # to pair with the new companions (export ids differ) instead of a silently mixed set.
            # The weights file has a name of its own (the export id): no installed graph reads it
            # yet, so it is written in place before the graphs that point at it are verified.
            tmp_onnx = stack.enter_context(atomic_path(out))
            tmp_eval = stack.enter_context(atomic_path(eval_out))
            tmp_side = stack.enter_context(atomic_path(sidecar_out))
            sidecar_frame(ckpt.items).write_parquet(
                tmp_side, metadata={SIDECAR_KEY: meta["items_sha256"], SIDECAR_EXPORT_KEY: export_id}
            )
            if data is not None:
                say(f"writing the weights to {data.name} (external data)")
            write_graphs(graphs, tmp_onnx, tmp_eval, data)
            if data is not None:
                check_graph(tmp_onnx, "serving")
                check_graph(tmp_eval, "eval")
            if verify:
                from gru4rec.export.verify import VerificationFailed, verify_graphs

                say("verifying: PyTorch vs ONNX Runtime replay")
                report = verify_graphs(ckpt.model, tmp_onnx, tmp_eval, top_k=top_k, fp16=fp16)
                if not report.passed:
                    raise VerificationFailed(report)
    except BaseException:
        if data is not None:
            data.unlink(missing_ok=True)
        raise
    if replaced is not None and replaced != data:
        remove_unreferenced(replaced)
    return ExportResult(out, eval_out, sidecar_out, meta, report)
