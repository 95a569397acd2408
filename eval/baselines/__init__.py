"""Baselines scored by the same metric code as GRU4Rec: POP, S-POP, Item-KNN, BPR-MF, SKNN, V-SKNN."""

from __future__ import annotations

from typing import Any

from gru4rec.errors import UserError
from gru4rec.eval.baselines.base import Baseline


def make(name: str, **options: Any) -> Baseline:
    """A baseline by its (case-insensitive) name, with its constructor options."""
    from gru4rec.eval.baselines.bprmf import BPRMF
    from gru4rec.eval.baselines.itemknn import ItemKNN
    from gru4rec.eval.baselines.pop import Pop
    from gru4rec.eval.baselines.sknn import SessionKNN, vsknn
    from gru4rec.eval.baselines.spop import SessionPop

    makers = {
        "pop": Pop,
        "spop": SessionPop,
        "itemknn": ItemKNN,
        "bprmf": BPRMF,
        "sknn": SessionKNN,
        "vsknn": vsknn,
    }
    key = name.lower().replace("-", "").replace("_", "")
    if key not in makers:
        raise UserError(f"unknown baseline {name!r}; use one of {', '.join(NAMES)}")
    try:
        return makers[key](**options)
    except TypeError as e:
        raise UserError(f"baseline {name}: bad option ({e})") from None


NAMES = ("pop", "spop", "itemknn", "bprmf", "sknn", "vsknn")
