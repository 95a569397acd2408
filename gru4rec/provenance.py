"""Where a benchmark figure came from: the source commit."""

from __future__ import annotations

import subprocess
from pathlib import Path


def git_commit() -> str:
    """The source checkout's commit, or "unknown" outside a git checkout (e.g. a copied tree)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except Exception:
        return "unknown"


class EventsDigest:
    """Content hash of an events frame that is fed in consecutive pieces (the scorer's chunks): the
    digest is the same however the frame is cut, so `score --metrics` and `eval nightly` agree on
    which test data a figure belongs to without either holding the whole file.

    Each column is hashed on its own stream (numbers as their little-endian bytes; strings as their
    byte lengths and UTF-8 bytes), so appending pieces equals hashing the concatenation."""

    def __init__(self, columns: tuple[str, ...] = ("session_id", "item_id", "time")):
        import hashlib

        self.columns = columns
        self._streams: dict[str, hashlib._Hash] = {}
        self._new = hashlib.sha256
        self.n_rows = 0

    def _feed(self, name: str, data: bytes) -> None:
        self._streams.setdefault(name, self._new()).update(data)

    def update(self, df) -> None:
        import numpy as np
        import polars as pl

        self.n_rows += df.height
        for col in self.columns:
            s = df[col]
            if s.dtype in (pl.String, pl.Categorical):
                s = s.cast(pl.String)
                self._feed(f"{col}:len", s.str.len_bytes().cast(pl.Int64).to_numpy().astype("<i8").tobytes())
                self._feed(f"{col}:utf8", "".join(s.to_list()).encode())
            else:
                arr = s.to_numpy()
                self._feed(
                    f"{col}:{arr.dtype.kind}",
                    np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"))).tobytes(),
                )

    def hexdigest(self) -> str:
        import hashlib

        total = hashlib.sha256(str(self.n_rows).encode())
        for name in sorted(self._streams):
            total.update(name.encode() + b"=" + self._streams[name].digest())
        return total.hexdigest()[:16]
