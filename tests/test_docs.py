"""The docs cannot drift: the CLI reference is what the CLI generates now, the measured tables are what
bench/results holds, and the README stays a short user's guide."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TYPER = Path(sys.executable).parent / "typer"


@pytest.mark.skipif(not TYPER.exists() and shutil.which("typer") is None, reason="typer's CLI not installed")
def test_cli_reference_is_what_the_cli_generates(tmp_path):
    typer = str(TYPER) if TYPER.exists() else "typer"
    out = tmp_path / "cli.md"
    cmd = [
        typer,
        "gru4rec.cli",
        "utils",
        "docs",
        "--name",
        "gru4rec-cli",
        "--title",
        "CLI reference",
        "--output",
        str(out),
    ]
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
    assert out.read_text() == (ROOT / "docs" / "cli.md").read_text(), "docs/cli.md is stale: run `make docs`"


def test_measured_tables_are_what_the_json_holds():
    proc = subprocess.run(
        [sys.executable, "docs/gen_performance.py", "--check"], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr


def test_readme_is_a_short_guide_without_commit_hashes():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    hashes = [
        h for h in re.findall(r"\b[0-9a-f]{7,40}\b", text) if re.search(r"[a-f]", h) and re.search(r"\d", h)
    ]
    assert not hashes
