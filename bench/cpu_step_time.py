"""CPU time per full training step (process_time, so a shared box's load matters less).

    python bench/cpu_step_time.py PRESET [STEPS] [THREADS] [wall]

Runs the trainer's full steps on rsc15_100k/train.parquet with the preset; prints the median and
mean CPU ms per step over STEPS steps (after 20 warm-up steps). Works against any checkout whose
Trainer has the same constructor (used to compare main and a branch side by side).
"""

from __future__ import annotations

import statistics
import sys
import time

import polars as pl
import torch

from gru4rec.items import ItemMap
from gru4rec.model import GRU4Rec
from gru4rec.train.params import resolve
from gru4rec.train.trainer import Trainer, model_config, prepare

preset = sys.argv[1]
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 200
torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 1)
CLOCK = time.perf_counter if len(sys.argv) > 4 and sys.argv[4] == "wall" else time.process_time
events = pl.read_parquet("/work/shared/data/rsc15_100k/train.parquet")
cfg = resolve(preset)
items = ItemMap.from_events(events)
sched, supp = prepare(events, items, cfg)
torch.manual_seed(1)
model = GRU4Rec(model_config(cfg, len(items)), seed=1)
tr = Trainer(model, cfg, sched, supp, "cpu", 1)
times = []
with torch.no_grad():
    for s in range(20 + steps):
        t0 = CLOCK()
        tr._before_full_step()
        tr._full_step()
        if s >= 20:
            times.append(CLOCK() - t0)
ms = [t * 1e3 for t in times]
print(
    f"{preset} threads={torch.get_num_threads()} median {statistics.median(ms):.2f} ms  mean {statistics.mean(ms):.2f} ms  loss {float(tr.loss_acc):.2f}"
)
