"""The Ray engine's work on the workers (score/ray_engine.py drives it): which files are read,
how their rows become events keyed by shard, and the scorer actor that replays one shard.

A row's position in the input (file number, row) travels with it, so ties in time break exactly as
the single-process reader breaks them (file order); a shard is a stable hash of the session id
(gru4rec.sharding), so every session is whole in one shard on every machine and run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gru4rec.data import ITEM, SESSION, TIME, Keys
from gru4rec.errors import UserError

PART = "part-{:05d}.parquet"
_ROW_BITS = 40  # input position = file number << 40 | row in file (1e12 rows per file)


# ---------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class InputFile:
    path: str
    index: int  # position in the sorted file list: ties in time are broken by (file, row)
    columns: tuple[str, str, str]  # the file's session, item and time columns
    n_rows: int


def input_files(sessions: str | Path) -> list[Path]:
    """The Parquet files of a file, folder or glob, as the core reader resolves them (sorted by path:
    the order that breaks ties in time)."""
    from gru4rec.data import event_files

    files = event_files(str(sessions))
    other = [p for p in files if p.suffix.lower() not in (".parquet", ".pq")]
    if other:
        raise UserError(
            f"{other[0]}: --engine ray reads Parquet files; convert it (gru4rec-cli data ...) or use --engine local"
        )
    return files


def inspect_inputs(files: list[Path], keys: Keys) -> list[InputFile]:
    """Key columns, dtypes and null counts of every file from its Parquet footer, before any work."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gru4rec.data import key_columns

    out = []
    for i, f in enumerate(files):
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:
            raise UserError(f"{f}: not a readable Parquet file ({str(e).splitlines()[0][:160]})") from None
        schema = pf.schema_arrow
        cols = key_columns(schema.names, keys, f)  # the core's rule: named keys, else official headers
        kinds = {dst: schema.field(src).type for dst, src in cols.items()}
        s, it, t = kinds[SESSION], kinds[ITEM], kinds[TIME]
        if not (pa.types.is_integer(s) or _is_text(s)):
            raise UserError(
                f"{f}: column '{cols[SESSION]}' must hold integer or string session ids, found {s}"
            )
        if not (pa.types.is_integer(it) or _is_text(it)):
            raise UserError(f"{f}: column '{cols[ITEM]}' must hold integer or string ids, found {it}")
        if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_temporal(t)):
            raise UserError(f"{f}: column '{cols[TIME]}' must be numeric seconds or a datetime, found {t}")
        meta = pf.metadata
        index = {name: j for j, name in enumerate(schema.names)}
        for src in cols.values():
            if src not in index or meta.num_row_groups == 0:
                continue
            nulls = 0
            for g in range(meta.num_row_groups):
                col = meta.row_group(g).column(index[src])
                stats = col.statistics
                if stats is not None and stats.has_null_count:
                    nulls += stats.null_count
            if nulls:
                raise UserError(f"{f}: column '{src}' has {nulls} null value(s)")
        out.append(InputFile(str(f.resolve()), i, (cols[SESSION], cols[ITEM], cols[TIME]), meta.num_rows))
    if sum(f.n_rows for f in out) == 0:
        raise UserError(f"{files[0] if len(files) == 1 else 'the input files'}: no events")
    return out


def _is_text(t) -> bool:
    import pyarrow as pa

    t = t.value_type if pa.types.is_dictionary(t) else t
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _ids(column):
    """Integer ids as int64, text ids (also dictionary-encoded) as large strings."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_integer(column.type):
        return pc.cast(column, pa.int64())
    if pa.types.is_dictionary(column.type):
        column = (
            column.dictionary_decode()
            if hasattr(column, "dictionary_decode")
            else pc.cast(column, column.type.value_type)
        )
    return pc.cast(column, pa.large_string())


def _events_block(table, file_index: int, first_row: int, n_shards: int):
    """A row group renamed to the canonical columns, with `_order` (input position) and `_shard`."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from gru4rec.sharding import shard_of

    session, item, time_ = (table.column(i) for i in range(3))
    session, item = _ids(session), _ids(item)
    time_ = pc.cast(time_, pa.timestamp("us")) if pa.types.is_temporal(time_.type) else time_
    if pa.types.is_integer(time_.type):
        time_ = pc.cast(time_, pa.int64())
    elif pa.types.is_floating(time_.type):
        time_ = pc.cast(time_, pa.float64())
    order = (
        (np.int64(file_index) << np.int64(_ROW_BITS)) + first_row + np.arange(table.num_rows, dtype=np.int64)
    )
    return pa.table(
        {
            SESSION: session,
            ITEM: item,
            TIME: time_,
            "_order": order,
            "_shard": shard_of(session, n_shards),
        }
    )


def read_files(batch, n_shards: int) -> Iterator:
    """Ray Data map_batches function: file rows in, one events block per row group out."""
    import pyarrow.parquet as pq

    for row in batch.to_pylist():
        pf = pq.ParquetFile(row["path"])
        first = 0
        for g in range(pf.num_row_groups):
            table = pf.read_row_group(g, columns=list(row["columns"]))
            table = table.select(list(row["columns"]))  # the order asked for, whatever the file's
            yield _events_block(table, row["index"], first, n_shards)
            first += table.num_rows


# ---------------------------------------------------------------------------------------------- scorer
class ShardScorer:
    """One per Ray worker: loads the bundle once, then scores the shards of each block it is handed."""

    def __init__(self, bundle_ref, cfg, provider: str, tf32: bool, threads: int, out_dir: str | None,
                 source_name: str, kill_marker: str | None):  # fmt: skip
        import ray

        from gru4rec.bundle import load_bundle
        from gru4rec.io import scratch_dir
        from gru4rec.score.tiled import make_backend

        files: dict[str, bytes] = ray.get(bundle_ref[0])
        # The bundle's files are needed only while the sessions load (tiled tables stay mapped after
        # the folder is gone); removed at once, since Ray ends its workers without running cleanup.
        with scratch_dir("gru4rec-model-") as folder:
            for name, data in files.items():
                Path(folder, name).write_bytes(data)
            bundle = load_bundle(Path(folder, "m.onnx"))
            self.backend = make_backend(bundle, cfg.tile_items, provider, tf32, out_dir is not None, threads)
        self.items = bundle.items
        self.cfg, self.out_dir, self.source_name, self.kill_marker = cfg, out_dir, source_name, kill_marker

    def __call__(self, block):
        import polars as pl
        import pyarrow as pa

        frame = pl.from_arrow(block)
        try:
            rows = [self._score(int(shard), part) for (shard,), part in frame.group_by("_shard")]
        except UserError as e:  # bad data: sent back as a row (Ray would wrap and retry an exception)
            rows = [{"shard": -1, "totals": "", "latency": "", "n_predictions": 0, "batch": 0,
                     "pid": os.getpid(), "error": str(e)}]  # fmt: skip
        return pa.Table.from_pylist(rows, schema=_result_schema())

    def _score(self, shard: int, part) -> dict:
        from gru4rec.data import validate_events
        from gru4rec.score.frame_source import FrameSource
        from gru4rec.score.latency import LatencyRecorder
        from gru4rec.score.outputs import open_recs, recs_schema
        from gru4rec.score.scorer import replay_batch, replay_source

        rec = LatencyRecorder()
        with rec.phase("load"):
            # file order first, then the stable (session, time) sort: ties in time keep input order
            events = validate_events(
                part.sort("_order").drop("_order", "_shard"),
                self.source_name,
                time_unit=self.cfg.keys.time_unit,
            )
            source = FrameSource(events, f"{self.source_name} (shard {shard})", self.cfg.chunk_events)
        path = Path(self.out_dir, PART.format(shard)) if self.out_dir is not None else None
        with open_recs(path, recs_schema(source.session_dtype, self.items.dtype)) as writer:
            totals = replay_source(self.backend, self.items, source, self.cfg, writer, rec)
            self._maybe_die()
        return {
            "shard": shard,
            "totals": json.dumps(totals.state()),
            "latency": json.dumps(rec.state()),
            "n_predictions": totals.acc.n,
            "batch": replay_batch(self.cfg, source) if source.stats.n_multi_sessions else 0,
            "pid": os.getpid(),
        }

    def _maybe_die(self) -> None:
        if not self.kill_marker:
            return
        try:
            fd = os.open(self.kill_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
        os._exit(1)


def _result_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("shard", pa.int32()),
            ("totals", pa.string()),
            ("latency", pa.string()),  # the shard's LatencyRecorder state: steps where they ran
            ("n_predictions", pa.int64()),
            ("batch", pa.int64()),  # the shard's replay batch
            ("pid", pa.int64()),
            ("error", pa.string()),  # a UserError of the worker (bad data), else null
        ]
    )
