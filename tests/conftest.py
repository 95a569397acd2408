"""Shared test fixtures: markers (slow, gpu, data), paths to ../shared/data, CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    import torch

    skip_slow = pytest.mark.skip(reason="slow: run with --runslow (make test-all)")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or skip (a user's clone has no ../shared)."""
    if not (SHARED_DATA / "rsc15_100k" / "train.parquet").exists():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


def synthetic_files(folder: Path, n_sessions: int, n_items: int, seed: int):
    """Synthetic sessions written as folder/train.parquet and folder/test.parquet: (train, test) frames."""
    from gru4rec.synth import generate

    train, test = generate(n_sessions=n_sessions, n_items=n_items, seed=seed)
    train.write_parquet(folder / "train.parquet")
    test.write_parquet(folder / "test.parquet")
    return train, test


def nightly_config(folder: Path, body: str, *, history: str = "h.parquet", name: str = "n.toml") -> Path:
    """A nightly config file in `folder`, its history and out folder there too: `[nightly]` history and
    out, then `body` (the rest of [nightly] and any further tables)."""
    path = folder / name
    path.write_text(f'[nightly]\nhistory = "{folder / history}"\nout = "{folder / "out"}"\n{body}')
    return path


def run_cli(*args: str, check: bool = False, timeout: float = 1800, tmpdir: Path | None = None
            ) -> subprocess.CompletedProcess:  # fmt: skip
    """Run `gru4rec-cli ARGS` in a subprocess, as a user would; returns the completed process.
    `timeout` bounds the wait (subprocess.TimeoutExpired past it: a hung command fails its test);
    `tmpdir` is the command's TMPDIR, for a test to see what it leaves behind."""
    env = {**os.environ, "TMPDIR": str(tmpdir)} if tmpdir is not None else None
    proc = subprocess.run(
        [sys.executable, "-m", "gru4rec.cli", *map(str, args)], capture_output=True, text=True, cwd=REPO,
        timeout=timeout, env=env,
    )  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(
            f"gru4rec-cli {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}"
        )
    return proc


def ours(folder: Path) -> list[str]:
    """What our code left in a temporary folder: its folders are named gru4rec-* (onnxruntime keeps a
    .ses file of its own there, rewritten in place)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("gru4rec-"))


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def run(capsys):
    """`gru4rec-cli ARGS` in this process (same `main`, no interpreter start): (exit code, stdout, stderr)."""
    from gru4rec.cli import main

    def call(*args):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        out = capsys.readouterr()
        return code, out.out, out.err

    return call


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small models on one torch thread: a second thread only adds synchronisation (and stalls badly
    on a busy machine). Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------- serve tests
@pytest.fixture(scope="module")
def tune_data(tmp_path_factory) -> dict[str, Path]:
    """The `tune` tests' training and validation events (tests/tune_util.py)."""
    from tune_util import write_data

    return write_data(tmp_path_factory.mktemp("tune-data"))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny exported models by id type, each with its `score --out` reference (built on first use)."""
    from serve_util import build_model, offline_recs

    cache: dict = {}

    def get(kind: str) -> dict:
        if kind not in cache:
            root = tmp_path_factory.mktemp(f"serve-{kind}")
            m = build_model(root, kind)
            m["offline"] = offline_recs(m, root / "recs.parquet")
            cache[kind] = m
        return cache[kind]

    return get


@pytest.fixture(scope="module")
def int_model(models):
    return models("int")


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    """A real redis-server on a free loopback port for the module (skips where it is not installed)."""
    from serve_util import start_redis

    from gru4rec.serve.loadgen import stop_process

    proc, url = start_redis(tmp_path_factory.mktemp("redis"))
    yield url
    stop_process(proc)


# ---------------------------------------------------------------------------------------------- scoring tests
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny exported model with exactly tied items (0..11 score 0) and test sessions for it."""
    from test_replay import make_model, random_events
    from test_score import IDS, N_ITEMS, TOP_K, export_model

    from gru4rec.items import ItemMap

    root = tmp_path_factory.mktemp("tiny")
    model = make_model(N_ITEMS, seed=7, tied=12)
    onnx_path = export_model(model, ItemMap(IDS), root, TOP_K)
    events = random_events(150, N_ITEMS, seed=8)
    sessions = root / "test.parquet"
    events.write_parquet(sessions)
    return {"root": root, "model": model, "onnx": onnx_path, "sessions": str(sessions), "events": events}


@pytest.fixture(scope="module")
def tiny_reference(tiny):
    """Brute-force PyTorch counts of `tiny`'s test sessions (test_replay.brute_force_counts)."""
    from test_replay import brute_force_counts
    from test_score import IDS

    return brute_force_counts(tiny["model"], IDS, tiny["events"])
