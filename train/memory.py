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
    dense_bytes: int = 0  # the GRU weights with their optimiser state

    @property
    def total(self) -> int:
        return (
            self.table_bytes * (1 + self.state_copies) + self.dense_bytes + self.eval_bytes + self.other_bytes
        )


def table_columns(cfg) -> int:
    """Columns of one item's rows over all item tables (W_y, b_y, and E or W_x)."""
    cols = cfg.layers[-1] + 1
    if not cfg.constrained_embedding:
        cols += cfg.embedding if cfg.embedding > 0 else 3 * cfg.layers[0]
    return cols


def dense_parameters(cfg) -> int:
    """GRU weights: per layer 3H x (inputs + H) matrices and 6H biases (upper bound over the modes)."""
    sizes = list(cfg.layers)
    inputs = [cfg.embedding or sizes[-1] if cfg.constrained_embedding or cfg.embedding else sizes[0]]
    inputs += sizes[:-1]
    return sum(3 * h * (n_in + h) + 6 * h for h, n_in in zip(sizes, inputs, strict=True))


def estimate(cfg, n_items: int, validating: bool) -> TrainMemory:
    states = 2 if cfg.optimizer == "adam" else 1 + (cfg.momentum > 0)
    rows = eval_rows(cfg.eval_batch_size, n_items)
    return TrainMemory(
        dense_bytes=4 * dense_parameters(cfg) * (1 + states),
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
    from gru4rec.allocator import available_memory

    return available_memory()


def check_fits(cfg, n_items: int, device, validating: bool) -> TrainMemory:
    """The estimate; UserError when it exceeds the free memory of `device`."""
    need = estimate(cfg, n_items, validating)
    free = available_bytes(device)
    if need.total > free:
        gib = 2**30
        raise UserError(
            f"training {n_items:,} items with layers {cfg.layers} needs about {need.total / gib:.1f} GiB (item "
            f"tables {need.table_bytes / gib:.1f} GiB x {1 + need.state_copies} with {cfg.optimizer} state and "
            f"scratch, GRU weights {need.dense_bytes / gib:.1f} GiB), more than the {free / gib:.1f} GiB free on "
            f"{device}: fewer units, adagrad without momentum, or a machine with more memory"
        )
    return need
