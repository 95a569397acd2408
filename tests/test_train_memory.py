"""train/memory.py: the estimate against the tensors a real Trainer allocates, and the one-line
refusal before any work when a model cannot fit."""

from __future__ import annotations

import pytest
import torch

from gru4rec.items import ItemMap
from gru4rec.model import GRU4Rec
from gru4rec.synth import generate
from gru4rec.train.memory import estimate
from gru4rec.train.params import from_dict
from gru4rec.train.trainer import Trainer, model_config, prepare


def item_table_bytes(trainer: Trainer, n_items: int) -> int:
    """Every tensor with one row per item that the trainer, its model and optimiser hold."""
    opt = trainer.opt
    held = [*trainer.model.parameters(), *[t for v in vars(opt).values() if isinstance(v, list) for t in v]]
    seen, total = set(), 0
    for t in held:
        if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == n_items and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


@pytest.mark.parametrize(
    "params",
    [
        {"layers": [24]},
        {"layers": [24], "momentum": 0.3},
        {"layers": [16, 24], "optimizer": "adam"},
        {"layers": [24], "constrained_embedding": False, "embedding": 12},
        {"layers": [24], "constrained_embedding": False, "embedding": 0},
    ],
)
def test_estimate_counts_the_item_tables_the_trainer_allocates(params):
    train, _ = generate(300, 500, seed=1)
    items = ItemMap.from_events(train)
    cfg = from_dict({**params, "batch_size": 16, "n_sample": 8, "sample_store_size": 1000})
    sched, supp = prepare(train, items, cfg)
    model = GRU4Rec(model_config(cfg, len(items)), seed=0)
    trainer = Trainer(model, cfg, sched, supp, "cpu", 0)
    need = estimate(cfg, len(items), validating=False)
    assert item_table_bytes(trainer, len(items)) == need.table_bytes * (1 + need.state_copies)


def test_a_model_that_cannot_fit_is_refused_in_one_line_before_any_work(cli, tmp_path):
    train, _ = generate(300, 500, seed=1)
    train.write_parquet(tmp_path / "train.parquet")
    out, params = tmp_path / "m.pt", tmp_path / "huge.toml"
    params.write_text("layers = [4000000]\n")  # ~500 items x 4M units x 3 copies: far beyond any machine here
    res = cli(
        "train",
        str(tmp_path / "train.parquet"),
        "--out",
        str(out),
        "--params",
        str(params),
        "--device",
        "cpu",
    )
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "needs about" in res.stderr and "GiB free" in res.stderr and not out.exists()
