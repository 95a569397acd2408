"""Issue 25 checks on rsc15_100k (xe space, 1-epoch trials, layers 100, CPU): duplicate configurations
among finished trials after interrupt+resume, top-up, --timeout chunks and --n-jobs 2, read from the
study DB; and the same command sequence twice. Usage: repeats-check.py CODE WORKDIR, CODE = a folder under /tmp/run25 holding a pip --target install of the code (HEAD or main)"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

code, work = sys.argv[1], Path(sys.argv[2])
work.mkdir(parents=True, exist_ok=True)
D = "/work/shared/data/rsc15_100k"
ENV = {**os.environ, "PYTHONPATH": f"/tmp/run25/{code}/lib", "OMP_NUM_THREADS": "1"}
PY = "/work/wt-tune/.venv/bin/python"
optuna.logging.set_verbosity(optuna.logging.ERROR)


def args(out, n, *extra):
    return [
        PY,
        "-m",
        "gru4rec",
        "tune",
        f"{D}/train.parquet",
        "--out",
        str(out),
        "--space",
        "xe",
        "--preset",
        "rsc15",
        "-p",
        "n_epochs=1",
        "-p",
        "layers=100",
        "--n-trials",
        str(n),
        "--device",
        "cpu",
        "--threads",
        "1",
        "--seed",
        "42",
        "--pruner",
        "none",
        "--quiet",
        *extra,
    ]


def sh(cmd):
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr
    return r


def trials(out):
    try:
        return optuna.load_study(study_name="xe", storage=f"sqlite:///{out}/study.db").get_trials(
            deepcopy=False
        )
    except Exception:
        return []


def dups(out):
    fin = [
        tuple(sorted(t.params.items()))
        for t in trials(out)
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
    ]
    return len(fin), len(fin) - len(set(fin))


res = {}
# 1. interrupt + resume
out = work / "resume"
# a background shell starts us with SIGINT ignored, and children inherit that: restore Ctrl-C for it
p = subprocess.Popen(
    args(out, 8),
    env=ENV,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
)
end = time.monotonic() + 900
while time.monotonic() < end:
    t = trials(out)
    if sum(x.state == TrialState.COMPLETE for x in t) >= 2 and any(
        x.state == TrialState.RUNNING and x.intermediate_values == {} for x in t
    ):
        break
    time.sleep(0.2)
p.send_signal(signal.SIGINT)
_, perr = p.communicate(timeout=120)
res["interrupt_exit"] = p.returncode
res["interrupt_last_line"] = perr.strip().splitlines()[-1] if perr.strip() else ""
res["after_interrupt"] = {
    "finished": dups(out)[0],
    "failed": sum(t.state == TrialState.FAIL for t in trials(out)),
}
sh(args(out, 8))
res["interrupt+resume"] = dups(out)
# 2. top-up
sh(args(out, 12))
res["top-up 8->12"] = dups(out)
# 3. --timeout chunks
for _ in range(3):
    sh(args(out, 100, "--timeout", "20"))
res["3 x --timeout 20"] = dups(out)
# 4. a new --n-jobs 2 run on the study
n = dups(out)[0]
sh(args(out, n + 6, "--n-jobs", "2"))
res[f"--n-jobs 2 top-up to {n + 6}"] = dups(out)
res["skipped repeats (failed, not counted)"] = sum("repeat_of" in t.user_attrs for t in trials(out))
# 5. reproducibility: the same sequence twice
seqs = []
for name in ("repro-a", "repro-b"):
    o = work / name
    for n in (3, 6, 9):
        sh(args(o, n))
    seqs.append([(t.number, t.state.name, tuple(sorted(t.params.items())), t.value) for t in trials(o)])
res["repro: sequence 3->6->9 twice identical (params, states, values)"] = seqs[0] == seqs[1]
res["repro-a dups"] = dups(work / "repro-a")
print(json.dumps({"code": code, **{k: v for k, v in res.items()}}, indent=1))
