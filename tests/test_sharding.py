"""Stable shard hash of session ids (gru4rec/sharding.py) against a plain-Python reference."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from gru4rec.errors import UserError
from gru4rec.sharding import hash_ids, shard_of

MASK = (1 << 64) - 1


def ref_splitmix64(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def ref_string(s: str) -> int:
    h = 0
    for b in s.encode():
        h = (h * 0x100000001B3 + b + 1) & MASK
    return ref_splitmix64(h ^ ((len(s.encode()) * 0x9E3779B97F4A7C15) & MASK))


INTS = [0, 1, -1, 7, 2**31, 2**63 - 1, -(2**63), 123456789012]
STRINGS = ["", "a", "b", "ab", "ba", "session-42", "ünïcødé ✓", "x" * 300, "", "a\x00b"]


def test_integer_ids_match_reference_whatever_the_container():
    ref = [ref_splitmix64(x & MASK) for x in INTS]
    assert hash_ids(INTS).tolist() == ref
    assert hash_ids(np.array(INTS, dtype=np.int64)).tolist() == ref
    assert hash_ids(pl.Series(INTS, dtype=pl.Int64)).tolist() == ref
    assert hash_ids(pa.chunked_array([INTS[:3], INTS[3:]])).tolist() == ref
    small = [0, 1, -1, 7]
    assert hash_ids(pa.array(small, pa.int32())).tolist() == hash_ids(pa.array(small, pa.int64())).tolist()


def test_string_ids_match_reference_whatever_the_container():
    ref = [ref_string(s) for s in STRINGS]
    assert hash_ids(STRINGS).tolist() == ref
    assert hash_ids(pl.Series(STRINGS, dtype=pl.String)).tolist() == ref
    assert hash_ids(pl.Series(STRINGS).cast(pl.Categorical)).tolist() == ref
    assert hash_ids(pa.array(STRINGS, pa.large_string())).tolist() == ref
    assert hash_ids(pa.array(STRINGS)[3:]).tolist() == ref[3:]  # a sliced array (non-zero offset)


def test_same_shards_in_another_process():
    ids = list(range(-50, 50)) + [2**40 + i for i in range(50)]
    code = f"from gru4rec.sharding import shard_of; print(shard_of({ids!r}, 7).tolist()); print(shard_of({STRINGS!r}, 7).tolist())"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    assert out[0] == str(shard_of(ids, 7).tolist()) and out[1] == str(shard_of(STRINGS, 7).tolist())


def test_shards_are_balanced_and_in_range():
    for ids in (np.arange(200_000), [f"s{i}" for i in range(200_000)]):
        shards = shard_of(ids, 16)
        counts = np.bincount(shards, minlength=16)
        assert shards.min() >= 0 and shards.max() < 16
        assert counts.min() > 0.9 * counts.mean() and counts.max() < 1.1 * counts.mean()


def test_nulls_and_other_types_refused():
    with pytest.raises(UserError, match="null"):
        hash_ids(pa.array([1, None, 3]))
    with pytest.raises(UserError, match="integers or strings"):
        hash_ids(pa.array([1.5, 2.5]))
