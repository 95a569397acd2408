"""`train --out`: checked before any data is read, never replaced silently, Ctrl-C saves and says how to resume."""

from __future__ import annotations

import io
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import polars as pl
import pytest
from conftest import REPO
from rich.console import Console

from gru4rec import checkpoint
from gru4rec.errors import UserError
from gru4rec.synth import generate
from gru4rec.train.safety import TrainingInterrupted
from gru4rec.train.trainer import train

P = ["-p", "layers=8", "-p", "n_sample=16", "-p", "batch_size=8", "--device", "cpu", "--threads", "1"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    tr, _ = generate(300, 60, 5)
    tr.write_parquet(root / "tr.parquet")
    tr.filter(pl.col("session_id") % 2 == 0).write_parquet(root / "half.parquet")
    return root


def one_line_error(code: int, err: str) -> str:
    assert code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1, (code, err)
    return err


# -------------------------------------------------------------------------------- output probed up front
def test_unwritable_out_fails_before_data_is_read(data, tmp_path, run):
    # 250 characters is a valid file name, but not the temporary name beside it that the atomic save
    # needs (".NAME.XXXXXXXX.tmp" > 255): only a real write shows it (it used to fail after epoch 1).
    out = tmp_path / ("m" * 247 + ".pt")
    code, _, err = run("train", data / "tr.parquet", "--out", out, "--epochs", "1", *P)
    assert "cannot write" in one_line_error(code, err) and "epoch 1/" not in err
    # checked before the data: a broken training file is not even read
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    code, _, err = run("train", tmp_path / "broken.parquet", "--out", out, *P)
    assert "cannot write" in one_line_error(code, err)
    assert not out.exists() and not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_train_api_probes_out_before_training(data, tmp_path):
    buf = io.StringIO()
    console = Console(file=buf, width=200)
    with pytest.raises(UserError, match="cannot write"):
        train(pl.read_parquet(data / "tr.parquet"), {"layers": [8], "n_sample": 16, "n_epochs": 1},
              device="cpu", out=tmp_path / ("m" * 247 + ".pt"), console=console)  # fmt: skip
    assert "device:" not in buf.getvalue()  # refused before the model was even built


# -------------------------------------------------------------------------------- existing checkpoints
def test_existing_out_needs_resume_or_overwrite(data, tmp_path, run):
    out = tmp_path / "m.pt"
    base = ("train", data / "tr.parquet", "--out", out, *P)
    assert run(*base, "--epochs", "1")[0] == 0
    saved = out.read_bytes()

    cases = {  # args -> phrases the one error line must hold
        "unfinished, same run": (["--epochs", "3"], ["unfinished run", "1 of 3 epochs", "same data",
                                                     "--resume to continue", "--overwrite"]),
        "finished, same run": (["--epochs", "1"], ["a finished run", "1 of 1 epochs", "--overwrite"]),
        "other parameters": (["--epochs", "3", "-p", "learning_rate=0.3"],
                             ["unfinished run of another training", "1 of 3 epochs",
                              "parameter learning_rate differs", "--resume cannot", "--overwrite"]),
        "other seed": (["--epochs", "3", "--seed", "9"], ["another training", "--seed 42, not 9"]),
    }  # fmt: skip
    for case, (args, needles) in cases.items():
        code, _, err = run(*base, *args)
        err = one_line_error(code, err)
        assert all(n in err for n in needles), (case, err)
        assert "epoch 1/" not in err and out.read_bytes() == saved, case

    code, _, err = run("train", data / "half.parquet", "--out", out, *P, "--epochs", "2")
    assert "different data (fingerprint" in one_line_error(code, err) and out.read_bytes() == saved
    code, _, err = run(*base, "--epochs", "2", "--resume", "--overwrite")
    assert "pass one" in one_line_error(code, err) and out.read_bytes() == saved
    code, _, err = run(*base, "--epochs", "2", "-p", "learning_rate=0.3", "--resume")
    err = one_line_error(code, err)
    assert "cannot resume" in err and "learning_rate" in err and "--overwrite" in err

    # --overwrite replaces it with the new run; --resume continues a compatible one
    assert run(*base, "--epochs", "2", "-p", "learning_rate=0.3", "--overwrite")[0] == 0
    ck = checkpoint.load(out)
    assert ck.params["learning_rate"] == 0.3 and [h["epoch"] for h in ck.info["history"]] == [1, 2]
    code, _, err = run(*base, "--epochs", "3", "-p", "learning_rate=0.3", "--resume")
    assert code == 0 and "resuming" in err
    assert [h["epoch"] for h in checkpoint.load(out).info["history"]] == [1, 2, 3]


def test_a_file_that_is_not_a_checkpoint_is_not_replaced(data, tmp_path, run):
    out = tmp_path / "notes.pt"
    out.write_text("my notes")
    code, _, err = run("train", data / "tr.parquet", "--out", out, *P, "--epochs", "1")
    assert "not a gru4rec checkpoint" in one_line_error(code, err) and "--overwrite" in err
    assert out.read_text() == "my notes"


def test_train_api_refuses_existing_out_without_flag(data, tmp_path):
    tr = pl.read_parquet(data / "tr.parquet")
    p = {"layers": [8], "n_sample": 16, "batch_size": 8, "n_epochs": 1}
    out = tmp_path / "m.pt"
    train(tr, p, device="cpu", progress=False, out=out)
    with pytest.raises(UserError, match="finished run"):
        train(tr, p, device="cpu", progress=False, out=out)
    train(tr, {**p, "learning_rate": 0.2}, device="cpu", progress=False, out=out, overwrite=True)
    assert checkpoint.load(out).params["learning_rate"] == 0.2


# -------------------------------------------------------------------------------- Ctrl-C
def _start(args: list[str], log) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "gru4rec.cli", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=log, env=env)  # fmt: skip


def _wait_for(path, pattern: str, proc: subprocess.Popen, timeout: float = 120) -> str:
    """Poll the stderr log until `pattern` appears (bounded; fails if the process ends first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text()
        if re.search(pattern, text):
            return text
        assert proc.poll() is None, f"exited {proc.returncode} before {pattern!r}:\n{text}"
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no {pattern!r} within {timeout}s:\n{path.read_text()}")


def _interrupt(proc: subprocess.Popen, log) -> tuple[int, str]:
    proc.send_signal(signal.SIGINT)
    try:
        code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return code, log.read_text()


def test_ctrl_c_saves_the_last_epoch_and_prints_the_resume_command(data, tmp_path, run):
    out = tmp_path / "m.pt"
    args = ["train", str(data / "tr.parquet"), "--out", str(out), "--epochs", "100000", *P]
    log = tmp_path / "err1.log"
    with open(log, "w") as f:
        proc = _start(args, f)
        _wait_for(log, r"epoch 2/100000", proc)
        code, err = _interrupt(proc, log)
    assert code == 130 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    m = re.fullmatch(r"interrupted in epoch (\d+)/100000: (.+) holds the checkpoint saved after epoch "
                     r"(\d+)/100000; resume with: (.+)", last)  # fmt: skip
    assert m, last
    saved = int(m[3])
    assert m[2] == str(out) and saved >= 2 and int(m[1]) in (saved, saved + 1)
    ck = checkpoint.load(out)  # intact, and holds exactly the epoch the line names
    assert ck.train_state["epoch"] == saved and len(ck.info["history"]) == saved
    command = shlex.split(m[4])
    assert command == ["gru4rec-cli", *args, "--resume"]

    # the printed command continues from that epoch (run here in-process, one more epoch: a later
    # --epochs overrides the earlier one)
    code, _, err2 = run(*command[1:], "--epochs", str(saved + 1))
    assert code == 0 and f"resuming {out} after epoch {saved}" in err2, err2
    assert [h["epoch"] for h in checkpoint.load(out).info["history"]] == list(range(1, saved + 2))


def test_ctrl_c_before_the_first_epoch_leaves_the_old_file(tmp_path):
    # an epoch long enough (seconds) that the interrupt lands inside epoch 1
    tr, _ = generate(4000, 500, 3)
    tr.write_parquet(tmp_path / "big.parquet")
    out = tmp_path / "m.pt"
    out.write_bytes(b"an old model")
    args = ["train", str(tmp_path / "big.parquet"), "--out", str(out), "--overwrite", "--epochs", "2",
            "-p", "layers=64", "-p", "n_sample=512", "--device", "cpu", "--threads", "1"]  # fmt: skip
    log = tmp_path / "err.log"
    with open(log, "w") as f:
        proc = _start(args, f)
        _wait_for(log, r"device: ", proc)
        code, err = _interrupt(proc, log)
    last = err.strip().splitlines()[-1]
    assert code == 130 and "Traceback" not in err, err
    assert last.startswith("interrupted in epoch 1/2, before any epoch was saved"), last
    assert shlex.split(last.split("start again with: ")[1]) == ["gru4rec-cli", *args]
    assert out.read_bytes() == b"an old model"


def test_ctrl_c_right_after_the_device_line_is_an_interrupted_epoch(data, tmp_path):
    # CI once saw the SIGINT land between the "device:" line and the epoch loop: it escaped as a bare
    # KeyboardInterrupt ("before training started") although the user had seen training start
    class InterruptAfterDeviceLine(Console):
        def print(self, *objects, **kw):
            super().print(*objects, **kw)
            if any(str(o).startswith("device:") for o in objects):
                raise KeyboardInterrupt

    console = InterruptAfterDeviceLine(file=io.StringIO(), width=200)
    with pytest.raises(KeyboardInterrupt) as e:  # not TrainingInterrupted: a failure, not a dead pytest
        train(pl.read_parquet(data / "tr.parquet"), {"layers": [8], "n_sample": 16, "n_epochs": 2},
              device="cpu", out=tmp_path / "m.pt", console=console)  # fmt: skip
    assert isinstance(e.value, TrainingInterrupted), "a bare KeyboardInterrupt: 'before training started'"
    assert (e.value.saved_epochs, e.value.epoch) == (0, 1) and not (tmp_path / "m.pt").exists()


def test_ctrl_c_while_the_cli_is_importing_exits_130_with_one_line(monkeypatch, capsys):
    # `gru4rec-cli` imports typer, Polars and the stages before any command runs, long enough to be hit:
    # a Ctrl-C then used to print Python's traceback. Simulated here as the import being interrupted.
    from gru4rec.__main__ import main

    class Interrupted:
        def __getattr__(self, name):
            raise KeyboardInterrupt

    monkeypatch.setitem(sys.modules, "gru4rec.cli", Interrupted())
    with pytest.raises((SystemExit, KeyboardInterrupt)) as e:  # a bare KeyboardInterrupt: the bug
        main()
    assert isinstance(e.value, SystemExit), "KeyboardInterrupt escaped: Python prints its traceback"
    assert e.value.code == 130 and capsys.readouterr().err == "interrupted\n"
