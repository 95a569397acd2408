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
