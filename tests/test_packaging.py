"""The wheel: stages install under gru4rec/, nothing named train/export/score/eval/serve at the top level."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ("train", "export", "score", "eval", "serve")
SOURCES = ("pyproject.toml", "README.md", "gru4rec", *STAGES)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    # Build from a copy: setuptools writes build/ and *.egg-info next to the sources.
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(path, src / name)
    out = tmp_path_factory.mktemp("wheel")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "-q",
        "-w",
        str(out),
        str(src),
    ]
    if importlib.util.find_spec("setuptools") is not None:  # offline build with the venv's setuptools
        cmd.insert(5, "--no-build-isolation")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    wheels = list(out.glob("gru4rec-*.whl"))
    assert len(wheels) == 1, wheels
    with zipfile.ZipFile(wheels[0]) as zf:
        yield zf


def test_stages_live_inside_the_package(wheel):
    names = wheel.namelist()
    for stage in STAGES:
        assert f"gru4rec/{stage}/__init__.py" in names, stage
        assert f"gru4rec/{stage}/cli.py" in names, stage
    assert "gru4rec/eval/baselines/__init__.py" in names
    for module in ("cli", "data", "items", "metrics", "synth", "prepare", "stats", "data_commands"):
        assert f"gru4rec/{module}.py" in names, module


def test_nothing_else_at_the_top_level(wheel):
    top = {name.split("/")[0] for name in wheel.namelist()}
    assert not top & set(STAGES), top
    assert {t for t in top if not t.endswith(".dist-info")} == {"gru4rec"}, top


def test_console_script_declared(wheel):
    info = next(n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt"))
    text = wheel.read(info).decode()
    assert "[console_scripts]" in text and "gru4rec-cli = gru4rec.__main__:main" in text


def test_search_spaces_ship_in_the_wheel(wheel):
    """`tune --space xe|bpr-max` reads these data files beside gru4rec/train/tune/space.py."""
    names = wheel.namelist()
    repo_spaces = sorted(p.name for p in (REPO / "train" / "tune" / "spaces").glob("*.toml"))
    assert repo_spaces == ["bpr-max.toml", "xe.toml"]
    for name in repo_spaces:
        assert f"gru4rec/train/tune/spaces/{name}" in names, name
        assert (
            wheel.read(f"gru4rec/train/tune/spaces/{name}")
            == (REPO / "train" / "tune" / "spaces" / name).read_bytes()
        )
