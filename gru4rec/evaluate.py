"""PyTorch evaluation (spec §7): session-parallel replay of test sessions, ranks over all items.

Unknown test items are dropped as events (neighbours become consecutive), sessions left with one
event yield nothing, states are zeroed whenever a slot takes a new session, the batch shrinks at
the end and the replay never stops early. Every event but the first of a session is scored.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import torch

from gru4rec.batching import Sessions, make_schedule
from gru4rec.items import ItemMap, drop_short_sessions
from gru4rec.metrics import DEFAULT_CUTOFFS, RankAccumulator, target_ranks

EVAL_CELLS = 1 << 26  # scores per replay step, at most: the batch shrinks for huge catalogs


def eval_rows(batch_size: int, n_items: int) -> int:
    """Sessions per step: the configured batch, fewer where [batch, items] would be huge."""
    return max(1, min(batch_size, EVAL_CELLS // max(n_items, 1)))


@torch.inference_mode()
def evaluate(
    model,
    items: ItemMap,
    events: pl.DataFrame,
    batch_size: int = 512,
    cutoffs=DEFAULT_CUTOFFS,
    mode: str = "standard",
    device=None,
) -> dict:
    dev = torch.device(device) if device is not None else model.Wy.device
    known, n_dropped = items.translate(events)
    batch_size = eval_rows(batch_size, len(items))  # [batch, items] scores per step stay bounded
    sched = make_schedule(Sessions.from_events(drop_short_sessions(known)), batch_size)
    acc = RankAccumulator(tuple(cutoffs))
    was_training, model_dev = model.training, model.Wy.device
    model.eval().to(dev)
    try:
        inputs, targets, slots = (
            torch.from_numpy(a).to(dev) for a in (sched.inputs, sched.targets, sched.slot)
        )
        keep = torch.from_numpy(~sched.reset).to(dev, torch.float32).unsqueeze(1)
        hidden = model.init_hidden(sched.n_slots, dev)
        ranks = []
        bounds = sched.step_offsets.tolist()
        for a, b in zip(bounds[:-1], bounds[1:]):
            slot = slots[a:b]
            h = [hl.index_select(0, slot) * keep[a:b] for hl in hidden]
            scores, new_h = model(inputs[a:b], h)
            ranks.append(target_ranks(scores, targets[a:b], mode))
            for hl, nh in zip(hidden, new_h):
                hl.index_copy_(0, slot, nh)
        acc.add(torch.cat(ranks) if ranks else np.zeros(0))
    finally:
        model.to(model_dev).train(was_training)
    result = acc.result()
    result["n_unknown_dropped"] = int(n_dropped)
    return result
