"""The exported model bundle: serving graph, evaluation graph and item-map sidecar, read as one.

`gru4rec-cli export ... --out DIR/m.onnx` writes three files that only make sense together:
  DIR/m.onnx           serving step graph (item_idx, hidden -> scores, hidden_out, top-k)
  DIR/m.eval.onnx      evaluation step graph (adds target_idx -> n_greater, n_equal)
  DIR/m.items.parquet  sidecar: item_idx, item_id (index -> original id)
  DIR/<export id>.weights  only for models whose weights take 512 MiB or more (or with
                       `export --external-data`): both graphs' weights as ONNX external data,
                       each tensor once; its name is in the `weights_file` metadata
The recurrent state is one float32 tensor `hidden` [L, B, H], H = `hidden_size` = max(layer sizes):
layer l uses columns [0, H_l) of hidden[l]; with unequal layers (e.g. 64,32) the graphs ignore the
columns beyond H_l on input and write zeros there on output (`pad_layers` / `unpad_layers` convert
from / to the per-layer states of `GRU4Rec`). The layer sizes are in the `model_config` metadata.
Both graphs carry the same `metadata_props` (see `MODEL_KEYS`); the sidecar carries the item map's
sha256 and the export id in its Parquet key-value metadata. `load_bundle` checks that all three
come from the same export before anything is scored, so a sidecar copied from another model (or a
half-finished overwrite) is refused instead of silently mapping indices to the wrong items.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from gru4rec.data import ITEM
from gru4rec.errors import UserError
from gru4rec.items import INDEX, ItemMap

FORMAT = "gru4rec-onnx"
FORMAT_VERSION = 1
SIDECAR_KEY = "gru4rec.items_sha256"  # Parquet key-value metadata of the sidecar
SIDECAR_EXPORT_KEY = "gru4rec.export_id"
WEIGHTS_KEY = "weights_file"  # metadata of external-data exports: the data file's name, beside the graphs
INT_KEYS = ("format_version", "top_k", "topk_chunks", "n_items", "n_layers", "hidden_size", "opset")
JSON_KEYS = ("hyperparameters", "model_config", "versions")
# Every key below is present in both graphs' metadata_props (values are strings; JSON_KEYS hold JSON).
MODEL_KEYS = (
    "format", "format_version", "graph", "export_id", "export_time_utc", "gru4rec_version", "versions",
    "hyperparameters", "model_config", "data_fingerprint", "input_mode", "precision", "opset",
    "top_k", "topk_chunks", "n_items", "n_layers", "hidden_size", "items_sha256",
)  # fmt: skip


def items_sha256(ids: np.ndarray) -> str:
    """Fingerprint of an item map: sha256 of the ids in index order as little-endian int64; string ids
    as a type tag, then each id's utf-8 byte length (int64) and the concatenated bytes."""
    if ids.dtype != object:
        return hashlib.sha256(np.ascontiguousarray(ids, dtype="<i8").tobytes()).hexdigest()
    encoded = [str(x).encode() for x in ids]
    h = hashlib.sha256(b"gru4rec-str-ids\0")
    h.update(np.array([len(b) for b in encoded], dtype="<i8").tobytes())
    h.update(b"".join(encoded))
    return h.hexdigest()


def companion_paths(onnx_path: str | Path) -> tuple[Path, Path]:
    """(eval graph, sidecar) paths that belong to the serving graph `onnx_path`."""
    p = Path(onnx_path)
    stem = p.with_suffix("") if p.suffix == ".onnx" else p
    return stem.with_name(stem.name + ".eval.onnx"), stem.with_name(stem.name + ".items.parquet")


def weights_path(onnx_path: str | Path, meta: dict | None = None) -> Path | None:
    """The external-data file the graph at `onnx_path` reads, or None (weights inside the graph)."""
    name = (meta if meta is not None else read_metadata(onnx_path)).get(WEIGHTS_KEY)
    return Path(onnx_path).with_name(name) if name else None


def bundle_paths(onnx_path: str | Path) -> list[Path]:
    """Every file of the bundle, in install order: weights (if external), sidecar, eval graph,
    serving graph last (whoever installs them in this order never exposes a mixed bundle)."""
    eval_path, sidecar = companion_paths(onnx_path)
    weights = weights_path(onnx_path) if Path(onnx_path).is_file() else None
    return [*([weights] if weights else []), sidecar, eval_path, Path(onnx_path)]


def weights_bytes(bundle: ModelBundle) -> int:
    """About what the weights take in memory: the external-data file, else the eval graph's file."""
    return (bundle.weights_path or bundle.eval_path).stat().st_size


def remove_unreferenced(weights: Path) -> None:
    """Delete an external-data file that no ONNX graph in its folder reads any more."""
    for graph in weights.parent.glob("*.onnx*"):
        try:
            if read_metadata(graph).get(WEIGHTS_KEY) == weights.name:
                return
        except UserError:
            continue
    weights.unlink(missing_ok=True)


def check_weights(path: Path, graph: Path) -> None:
    """The external-data file exists and holds every byte `graph`'s initializers point at."""
    import onnx

    if not path.is_file():
        raise UserError(
            f"{path}: weights file not found (export writes it beside {graph.name}; copy it with the bundle)"
        )
    size = path.stat().st_size
    model = onnx.load(str(graph), load_external_data=False)
    for t in model.graph.initializer:
        info = {e.key: e.value for e in t.external_data}
        if info and (info.get("location") != path.name or int(info["offset"]) + int(info["length"]) > size):
            raise UserError(
                f"{path}: weights file is truncated or belongs to another export; re-export the model"
            )


@dataclass(frozen=True)
class ModelBundle:
    onnx_path: Path
    eval_path: Path
    items: ItemMap
    meta: dict[str, Any]  # decoded metadata_props of the serving graph
    n_items: int
    n_layers: int
    hidden_size: int  # width of the hidden tensor: max(layer_sizes)
    top_k: int
    layer_sizes: tuple[int, ...] = ()
    weights_path: Path | None = None  # the external-data file, when the export has one


def pad_layers(states, width: int | None = None) -> np.ndarray:
    """Per-layer states [B, H_l] (numpy or torch) -> the graphs' padded `hidden` [L, B, H] float32."""
    states = [np.asarray(h.detach().cpu() if hasattr(h, "detach") else h, dtype=np.float32) for h in states]
    width = width or max(h.shape[1] for h in states)
    out = np.zeros((len(states), states[0].shape[0], width), np.float32)
    for layer, h in enumerate(states):
        out[layer, :, : h.shape[1]] = h
    return out


def unpad_layers(hidden: np.ndarray, layer_sizes) -> list[np.ndarray]:
    """The graphs' `hidden` [L, B, H] -> per-layer states [B, H_l] (views)."""
    return [hidden[layer, :, :n] for layer, n in enumerate(layer_sizes)]


def decode_metadata(props: dict[str, str], source: str | Path) -> dict[str, Any]:
    """metadata_props (string -> string) -> typed dict; UserError when it is not a gru4rec export."""
    if props.get("format") != FORMAT:
        raise UserError(f"{source}: not a gru4rec ONNX export (no '{FORMAT}' metadata)")
    missing = [k for k in MODEL_KEYS if k not in props]
    if missing:
        raise UserError(f"{source}: ONNX metadata lacks {', '.join(missing)}")
    meta: dict[str, Any] = dict(props)
    try:
        for k in INT_KEYS:
            meta[k] = int(props[k])
        for k in JSON_KEYS:
            meta[k] = json.loads(props[k])
    except ValueError as e:
        raise UserError(f"{source}: corrupt ONNX metadata ({e})") from None
    if meta["format_version"] > FORMAT_VERSION:
        raise UserError(f"{source}: export format {meta['format_version']} is newer than this gru4rec")
    return meta


def _varint(buf, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf, pos: int, end: int):
    """(field number, wire type, value, start) of each protobuf field in buf[pos:end]; a length-delimited
    field's value is its payload's (start, end) span, `start` where the field's key begins.
    ValueError/IndexError on bytes that are not a message."""
    while pos < end:
        start = pos
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1 or wire == 5:
            value, pos = None, pos + (8 if wire == 1 else 4)
        elif wire == 2:
            size, pos = _varint(buf, pos)
            if pos + size > end:
                raise ValueError("truncated file")
            value, pos = (pos, pos + size), pos + size
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")
        if field == 0 or pos > end:
            raise ValueError("not a protobuf message")
        yield field, wire, value, start


def scan_metadata_props(buf) -> dict[str, str]:
    """metadata_props of a serialized ModelProto without parsing the graph (whose weights are most of
    the file): walk the top-level protobuf fields, skip all but field 14. Raises ValueError/IndexError
    on bytes that are not a well-formed message."""
    from onnx import StringStringEntryProto

    props = {}
    for field, wire, value, _ in _fields(buf, 0, len(buf)):
        if field == 14 and wire == 2:
            entry = StringStringEntryProto.FromString(bytes(buf[value[0] : value[1]]))
            props[entry.key] = entry.value
    return props


def _tensors(buf):
    """(name, dims, raw_data span or None, tensor span, tensor field start) of each initializer of a
    serialized ModelProto: ModelProto.graph (7) -> initializer (5) -> dims (1), name (8), raw_data (9)."""
    for field, wire, graph, _ in _fields(buf, 0, len(buf)):
        if field != 7 or wire != 2:
            continue
        for field, wire, tensor, start in _fields(buf, *graph):
            if field != 5 or wire != 2:
                continue
            name, dims, raw = None, [], None
            for field, wire, value, _ in _fields(buf, *tensor):
                if field == 1 and wire == 0:
                    dims.append(value)
                elif field == 1 and wire == 2:  # packed
                    pos = value[0]
                    while pos < value[1]:
                        d, pos = _varint(buf, pos)
                        dims.append(d)
                elif field == 8 and wire == 2:
                    name = bytes(buf[value[0] : value[1]]).decode()
                elif field == 9 and wire == 2:
                    raw = value
            yield name, dims, raw, tensor, start


def _key_and_length(field: int, size: int) -> bytes:
    out, value = bytearray(), (field << 3) | 2
    for v in (value, size):
        while v >= 0x80:
            out.append((v & 0x7F) | 0x80)
            v >>= 7
        out.append(v)
    return bytes(out)


def load_without_tables(path: str | Path, n_rows: int):
    """The ONNX ModelProto at `path` with the data of every initializer of `n_rows` or more rows (the
    item tables) left out, so parsing the graph never holds the item tables in memory: their raw_data
    is dropped and they become external data of `path` itself (location, offset and length of the
    bytes left in the file), as tables exported to a weights file already are. External data is not
    loaded."""
    import mmap

    from onnx import ModelProto, TensorProto

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        drop = [(start, tensor, raw, name) for name, dims, raw, tensor, start in _tensors(buf)
                if raw is not None and dims and dims[0] >= n_rows]  # fmt: skip
        if not drop:
            return ModelProto.FromString(buf[:])
        graph, head = next(
            (v, s) for field, wire, v, s in _fields(buf, 0, len(buf)) if field == 7 and wire == 2
        )
        body, pos = bytearray(), graph[0]
        for start, tensor, raw, _ in drop:  # in file order: each tensor again, without its raw_data field
            body += buf[pos:start]
            fields = list(_fields(buf, *tensor))
            ends = [f[3] for f in fields[1:]] + [tensor[1]]
            payload = b"".join(buf[f[3] : end] for f, end in zip(fields, ends) if f[2] != raw)
            body += _key_and_length(5, len(payload)) + payload
            pos = tensor[1]
        body += buf[pos : graph[1]]
        data = buf[:head] + _key_and_length(7, len(body)) + bytes(body) + buf[graph[1] :]
    model = ModelProto.FromString(data)
    where = {name: raw for _, _, raw, name in drop}
    for t in model.graph.initializer:
        if t.name in where:
            start, end = where[t.name]
            t.data_location = TensorProto.EXTERNAL
            for key, value in (("location", Path(path).name), ("offset", start), ("length", end - start)):
                t.external_data.add(key=key, value=str(value))
    return model


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Decoded gru4rec metadata of one ONNX file (read without loading the weights)."""
    import mmap

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: ONNX model not found")
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            props = scan_metadata_props(buf)
    except Exception as e:
        raise UserError(f"{path}: not a readable ONNX model ({e or type(e).__name__})") from None
    return decode_metadata(props, path)


def read_sidecar(path: Path) -> tuple[ItemMap, dict[str, str]]:
    """The item map and key-value metadata of a sidecar Parquet; UserError when unreadable."""
    if not path.is_file():
        raise UserError(f"{path}: item-map sidecar not found (export writes it beside the .onnx file)")
    try:
        kv = pl.read_parquet_metadata(path)
        df = pl.read_parquet(path)
    except Exception as e:
        raise UserError(f"{path}: not a readable Parquet sidecar ({str(e).splitlines()[0][:160]})") from None
    if set(df.columns) != {INDEX, ITEM} or df[INDEX].null_count() or df[ITEM].null_count():
        raise UserError(f"{path}: sidecar must have non-null columns {INDEX}, {ITEM}; found {df.columns}")
    df = df.sort(INDEX)
    if not np.array_equal(df[INDEX].to_numpy(), np.arange(df.height)):
        raise UserError(f"{path}: sidecar {INDEX} is not 0..N-1")
    if df[ITEM].dtype != pl.String and not df[ITEM].dtype.is_integer():
        raise UserError(f"{path}: sidecar {ITEM} must hold integer or string ids, found {df[ITEM].dtype}")
    return ItemMap.from_series(df[ITEM]), kv


def load_bundle(onnx_path: str | Path) -> ModelBundle:
    """Read and cross-check serving graph, eval graph and sidecar; UserError on any mismatch."""
    onnx_path = Path(onnx_path)
    eval_path, sidecar = companion_paths(onnx_path)
    meta = read_metadata(onnx_path)
    if meta["graph"] != "serving":
        raise UserError(
            f"{onnx_path}: is the {meta['graph']} graph; pass the serving graph (m.onnx, not m.eval.onnx)"
        )
    if not eval_path.is_file():
        raise UserError(f"{eval_path}: evaluation graph not found (export writes it beside {onnx_path.name})")
    eval_meta = read_metadata(eval_path)
    if eval_meta["graph"] != "eval" or eval_meta["export_id"] != meta["export_id"]:
        raise UserError(
            f"{eval_path}: evaluation graph does not belong to {onnx_path} (different export); re-export"
        )
    items, kv = read_sidecar(sidecar)
    digest = items_sha256(items.ids)
    if kv.get(SIDECAR_KEY) != digest:
        raise UserError(f"{sidecar}: sidecar content does not match its own checksum (corrupt or edited)")
    if digest != meta["items_sha256"] or len(items) != meta["n_items"]:
        raise UserError(
            f"{sidecar}: item map does not match {onnx_path} (items_sha256 {digest[:12]} vs "
            f"{meta['items_sha256'][:12]}, {len(items)} vs {meta['n_items']} items); re-export the model"
        )
    if kv.get(SIDECAR_EXPORT_KEY) != meta["export_id"]:
        raise UserError(
            f"{sidecar}: item-map sidecar does not belong to {onnx_path} (different export); re-export"
        )
    weights = weights_path(onnx_path, meta)
    if weights is not None:
        for graph in (onnx_path, eval_path):
            check_weights(weights, graph)
    layers = meta["model_config"].get("layers") if isinstance(meta["model_config"], dict) else None
    if (
        not isinstance(layers, list)
        or not all(isinstance(n, int) and n > 0 for n in layers)
        or len(layers) != meta["n_layers"]
        or max(layers) != meta["hidden_size"]
    ):
        raise UserError(
            f"{onnx_path}: corrupt ONNX metadata (model_config layers {layers!r} do not match "
            f"n_layers {meta['n_layers']}, hidden_size {meta['hidden_size']})"
        )
    return ModelBundle(
        onnx_path=onnx_path,
        eval_path=eval_path,
        items=items,
        meta=meta,
        n_items=meta["n_items"],
        n_layers=meta["n_layers"],
        hidden_size=meta["hidden_size"],
        top_k=meta["top_k"],
        layer_sizes=tuple(layers),
        weights_path=weights,
    )
