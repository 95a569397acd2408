"""Baselines scored by the same metric code as GRU4Rec: POP, S-POP, Item-KNN, BPR-MF, SKNN, V-SKNN."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from gru4rec.errors import UserError
from gru4rec.eval.baselines.base import Baseline


def _makers() -> dict[str, Callable[..., Baseline]]:
    from gru4rec.eval.baselines.bprmf import BPRMF
    from gru4rec.eval.baselines.itemknn import ItemKNN
    from gru4rec.eval.baselines.pop import Pop
    from gru4rec.eval.baselines.sknn import SessionKNN, vsknn
    from gru4rec.eval.baselines.spop import SessionPop

    return {
        "pop": Pop,
        "spop": SessionPop,
        "itemknn": ItemKNN,
        "bprmf": BPRMF,
        "sknn": SessionKNN,
        "vsknn": vsknn,
    }


def _maker(name: str) -> Callable[..., Baseline]:
    makers = _makers()
    key = name.lower().replace("-", "").replace("_", "")
    if key not in makers:
        raise UserError(f"unknown baseline {name!r}; use one of {', '.join(NAMES)}")
    return makers[key]


def make(name: str, **options: Any) -> Baseline:
    """A baseline by its (case-insensitive) name, with its constructor options."""
    try:
        return _maker(name)(**options)
    except TypeError as e:
        raise UserError(f"baseline {name}: bad option ({e})") from None


def option_defaults(name: str) -> dict[str, Any]:
    """The options a baseline takes, with their defaults (V-SKNN passes the rest on to SKNN)."""
    from gru4rec.eval.baselines.sknn import SessionKNN

    def defaults(fn: Callable) -> dict[str, Any]:
        params = inspect.signature(fn).parameters.values()
        return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}

    maker = _maker(name)
    own = defaults(maker)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(maker).parameters.values()):
        return {**defaults(SessionKNN), **own}
    return own


NAMES = ("pop", "spop", "itemknn", "bprmf", "sknn", "vsknn")
