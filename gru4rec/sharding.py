"""Stable shard of a session id: the same id lands in the same shard on every machine, process and run.

Distributed scoring cuts the test sessions into shards by a hash of the session id, so that every
session is whole in exactly one shard whatever the file layout or the number of workers. Python's
`hash()` is salted per process and the hashes of dataframe libraries may change between versions,
so the hash here is spelt out and vectorised with numpy:

  integer ids  splitmix64 of the id as a 64-bit two's-complement integer (int32 and int64 columns
               holding the same numbers agree);
  string ids   a polynomial hash of the UTF-8 bytes, h = sum((b_j + 1) * P^(L-1-j)) mod 2^64, mixed
               with the length and finalised by splitmix64.

shard = hash % n_shards. Only determinism matters for correctness (a collision merely puts two
sessions in one shard); splitmix64's finaliser spreads consecutive ids evenly over the shards.
"""

from __future__ import annotations

import numpy as np

from gru4rec.errors import UserError

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_P = 0x100000001B3  # the FNV-1a 64 prime: odd, so powers never vanish mod 2^64


def splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser of uint64 values (wrapping arithmetic), vectorised."""
    with np.errstate(over="ignore"):
        z = np.asarray(x, dtype=np.uint64) + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def _string_hash(offsets: np.ndarray, data: np.ndarray) -> np.ndarray:
    """Polynomial hash of each string given Arrow-style int64 offsets [n+1] and uint8 bytes."""
    lengths = np.diff(offsets)
    n, total = len(lengths), int(offsets[-1] - offsets[0])
    h = np.zeros(n, dtype=np.uint64)
    if total:
        starts = offsets[:-1] - offsets[0]
        owner = np.repeat(np.arange(n), lengths)  # which string each byte belongs to
        exponent = (starts[owner] + lengths[owner] - 1) - np.arange(total)  # L-1-j
        powers = np.ones(int(lengths.max()), dtype=np.uint64)
        with np.errstate(over="ignore"):
            for k in range(1, len(powers)):  # longest id length, not data size
                powers[k] = powers[k - 1] * np.uint64(_P)
            terms = (data[offsets[0] : offsets[-1]].astype(np.uint64) + np.uint64(1)) * powers[exponent]
        nonempty = lengths > 0
        h[nonempty] = np.add.reduceat(terms, starts[nonempty])  # uint64 sums wrap mod 2^64
    with np.errstate(over="ignore"):
        return splitmix64(h ^ (lengths.astype(np.uint64) * _GOLDEN))


def hash_ids(values) -> np.ndarray:
    """uint64 hash of each session id: a pyarrow Array/ChunkedArray, polars Series, numpy array or list."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    elif not isinstance(values, pa.Array):
        if hasattr(values, "to_arrow"):  # a polars Series
            values = values.to_arrow()
        else:
            values = pa.array(values)
        if isinstance(values, pa.ChunkedArray):
            values = values.combine_chunks()
    if values.null_count:
        raise UserError(f"session ids have {values.null_count} null value(s)")
    kind = values.type
    if pa.types.is_dictionary(kind):  # a categorical column: hash the values, not the codes
        values = values.dictionary_decode()
        kind = values.type
    if pa.types.is_integer(kind):
        if pa.types.is_uint64(kind):
            ints = values.to_numpy(zero_copy_only=False).astype(np.uint64)
        else:
            ints = values.cast(pa.int64()).to_numpy(zero_copy_only=False).view(np.uint64)
        return splitmix64(ints)
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind):
        strings = pc.cast(values, pa.large_string())
        _, offsets_buf, data_buf = strings.buffers()
        offsets = np.frombuffer(offsets_buf, dtype=np.int64)[
            strings.offset : strings.offset + len(strings) + 1
        ]
        data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
        return _string_hash(offsets, data)
    raise UserError(f"session ids must be integers or strings to be sharded, found {kind}")


def shard_of(values, n_shards: int) -> np.ndarray:
    """int32 shard in [0, n_shards) of each session id."""
    if n_shards < 1:
        raise ValueError(f"n_shards must be at least 1, got {n_shards}")
    return (hash_ids(values) % np.uint64(n_shards)).astype(np.int32)
