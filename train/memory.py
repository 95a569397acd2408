"""What training will need, said before any work: item tables, their optimiser state, the rest.

At millions of items the item tables dominate: each table (the output matrix W_y and its biases,
plus an input table E or W_x where the input mode has one) is held as the parameter, its optimiser
state (Adagrad: the accumulator, and the velocity with momentum; Adam: two moments) and one
scratch table the row updates coalesce duplicates in (train/optim.py). An estimate that does not
fit the memory there is refused with one line, instead of an out-of-memory kill hours later.
"""

from __future__ import annotations

from dataclasses import dataclass

from gru4rec.errors import UserError
from gru4rec.evaluate import eval_rows

OVERHEAD = 1 << 30  # Python, torch, the data and the sampler's store, roughly


@dataclass(frozen=True)
class TrainMemory:
    table_bytes: int  # the item tables' parameters
    state_copies: int  # optimiser state + scratch, in copies of the tables
    eval_bytes: int  # the validation replay's score matrix and comparisons
    other_bytes: int

    @property
    def total(self) -> int:
        return self.table_bytes * (1 + self.state_copies) + self.eval_bytes + self.other_bytes


def table_columns(cfg) -> int:
    """Columns of one item's rows over all item tables (W_y, b_y, and E or W_x)."""
    cols = cfg.layers[-1] + 1
    if not cfg.constrained_embedding:
        cols += cfg.embedding if cfg.embedding > 0 else 3 * cfg.layers[0]
    return cols


def estimate(cfg, n_items: int, validating: bool) -> TrainMemory:
    states = 2 if cfg.optimizer == "adam" else 1 + (cfg.momentum > 0)
    rows = eval_rows(cfg.eval_batch_size, n_items)
    return TrainMemory(
        table_bytes=4 * n_items * table_columns(cfg),
        state_copies=states + 1,
        eval_bytes=12 * rows * n_items if validating else 0,
        other_bytes=OVERHEAD + 8 * cfg.sample_store_size,
    )


def available_bytes(device) -> int:
    """Free memory where the tables will live: the GPU's, or this machine's MemAvailable."""
    if getattr(device, "type", str(device)) == "cuda":
        import torch

        return int(torch.cuda.mem_get_info(device)[0])
    from gru4rec.score.tiled import available_memory

    return available_memory()


def check_fits(cfg, n_items: int, device, validating: bool) -> TrainMemory:
    """The estimate; UserError when it exceeds the free memory of `device`."""
    need = estimate(cfg, n_items, validating)
    free = available_bytes(device)
    if need.total > free:
        gib = 2**30
        raise UserError(
            f"training {n_items:,} items x {table_columns(cfg) - 1} columns needs about {need.total / gib:.1f} GiB "
            f"(item tables {need.table_bytes / gib:.1f} GiB x {1 + need.state_copies} with {cfg.optimizer} state "
            f"and scratch), more than the {free / gib:.1f} GiB free on {device}: fewer units, "
            "optimizer adagrad without momentum, or a machine with more memory"
        )
    return need
