"""Search spaces for `gru4rec-cli tune`: TOML files with a [fixed] and a [search] table.

The official spaces ship beside this module (spaces/xe.toml, spaces/bpr-max.toml); a user's file
has the same form. Everything is checked before a study is opened: unknown parameters or keys,
wrong types, empty or single-value ranges, steps that do not divide the range, and ranges whose
ends make an invalid training configuration are errors naming the file and the parameter.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

from gru4rec.errors import UserError
from gru4rec.io import read_toml
from gru4rec.train.params import convert, from_dict, param_type

SPACES_DIR = Path(__file__).with_name("spaces")
BUILTIN = ("xe", "bpr-max")
KINDS = ("int", "float", "categorical")
# A virtual parameter: the official embedding modes as one searchable choice.
EMBEDDING_MODES = {
    "shared": {"constrained_embedding": True, "embedding": 0},
    "separate": {"constrained_embedding": False, "embedding": "layersize"},
    "onehot": {"constrained_embedding": False, "embedding": 0},
}
MODE = "embedding_mode"
NOT_SEARCHABLE = {"n_epochs": "pruning decides how many epochs a trial runs; fix it in [fixed] or -p"}
# Accepted in a space, with a note: they change speed or memory, never a trial's metric.
NO_EFFECT = {
    "cuda_graph": "how the CUDA step is launched",
    "eval_batch_size": "sessions per step of the validation replay, which scores every session alike",
}
_DIM_KEYS = {"int": {"type", "low", "high", "step", "log"}, "float": {"type", "low", "high", "step", "log"}}
_DIM_KEYS["categorical"] = {"type", "choices"}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class Dim:
    """One searched parameter."""

    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: tuple = ()

    def suggest(self, trial) -> Any:
        if self.kind == "int":
            return trial.suggest_int(
                self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log
            )
        if self.kind == "float":
            return self.clean(
                trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)
            )
        return trial.suggest_categorical(self.name, list(self.choices))

    def clean(self, value: Any) -> Any:
        """A stepped float as the decimal grid point it stands for: Optuna computes low + k * step in
        binary (0.30000000000000004); best.toml and the report show 0.3."""
        if self.kind != "float" or self.step is None or not isinstance(value, float):
            return value
        low, step = Decimal(repr(self.low)), Decimal(repr(self.step))
        return float(low + step * round((Decimal(repr(value)) - low) / step))

    def corners(self) -> list[Any]:
        return list(self.choices) if self.kind == "categorical" else [self.low, self.high]

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "categorical":
            return {"type": self.kind, "choices": list(self.choices)}
        d = {"type": self.kind, "low": self.low, "high": self.high, "log": self.log}
        if self.step is not None:
            d["step"] = self.step
        return d

    def describe(self) -> str:
        if self.kind == "categorical":
            return f"{self.name} in {{{', '.join(json.dumps(c) if isinstance(c, str) else str(c) for c in self.choices)}}}"
        step = f" step {self.step:g}" if self.step is not None else ""
        return f"{self.name} {self.low:g}..{self.high:g}{step}{' (log)' if self.log else ''}"


@dataclass(frozen=True)
class SearchSpace:
    name: str  # xe, bpr-max or the file's stem: the default study name
    source: str  # where it came from, for messages
    fixed: dict[str, Any] = field(default_factory=dict)
    dims: tuple[Dim, ...] = ()

    def with_fixed(self, pairs: dict[str, Any], source: str = "-p") -> SearchSpace:
        """`-p` values: fixed, and taken out of the search (they override the file)."""
        fixed = {**self.fixed, **pairs}
        dims = tuple(d for d in self.dims if d.name not in pairs)
        if not dims:
            raise UserError(
                f"{source} fixes every searched parameter of {self.source}: nothing left to search"
            )
        space = replace(self, fixed=fixed, dims=dims)
        _check_mode_conflicts(space, source)
        return space

    def params(self, sampled: dict[str, Any], base: dict[str, Any] | None = None) -> dict[str, Any]:
        """Training parameters of one point: base (preset) < fixed < sampled; the mode expanded."""
        merged = {**(base or {}), **self.fixed, **sampled}
        mode = merged.pop(MODE, None)
        if mode is not None:
            merged.update(EMBEDDING_MODES[mode])
        return merged

    def identity(self) -> dict[str, Any]:
        """What makes two studies comparable (stored in the study; compared on resume)."""
        return {"fixed": dict(sorted(self.fixed.items())), "search": {d.name: d.to_dict() for d in self.dims}}

    def check(self, base: dict[str, Any]) -> None:
        """Every corner of the space must be a valid training configuration (caught now, not in trial 37)."""
        lows = {d.name: d.corners()[0] for d in self.dims}
        points = [lows, {d.name: d.corners()[-1] for d in self.dims}]
        for d in self.dims:
            points += [{**lows, d.name: v} for v in d.corners()]
        for point in points:
            try:
                from_dict(self.params(point, base))
            except UserError as e:
                at = ", ".join(f"{k}={v}" for k, v in point.items())
                raise UserError(f"search space {self.source}: at {at}: {e}") from None

    def describe(self) -> list[str]:
        return [d.describe() for d in self.dims]

    def notes(self) -> list[str]:
        """One line per searched parameter that cannot change a trial's result."""
        return [
            f"note: searching {d.name} cannot change results ({NO_EFFECT[d.name]}); it only spends trials"
            for d in self.dims
            if d.name in NO_EFFECT
        ]


def load_space(spec: str | Path) -> SearchSpace:
    """`xe`, `bpr-max` (shipped) or the path of a TOML file."""
    text = str(spec)
    if text in BUILTIN:
        path, source = SPACES_DIR / f"{text}.toml", f"built-in space {text}"
    else:
        path, source = Path(text), text
        if path.suffix.lower() != ".toml" and not path.exists():
            raise UserError(f"--space {text}: not a built-in space ({', '.join(BUILTIN)}) nor a TOML file")
    raw = read_toml(path, "search space")
    return parse_space(raw, name=text if text in BUILTIN else path.stem, source=source)


def parse_space(raw: dict[str, Any], name: str, source: str) -> SearchSpace:
    unknown = set(raw) - {"fixed", "search"}
    if unknown:
        raise UserError(f"{source}: unknown table(s) {sorted(unknown)}; a space has [fixed] and [search]")
    fixed_raw, search_raw = raw.get("fixed", {}), raw.get("search", {})
    for table, value in (("fixed", fixed_raw), ("search", search_raw)):
        if not isinstance(value, dict):
            raise UserError(f"{source}: [{table}] must be a table")
    if not search_raw:
        raise UserError(f"{source}: [search] is empty: nothing to search")
    both = set(fixed_raw) & set(search_raw)
    if both:
        raise UserError(f"{source}: {sorted(both)[0]} is both fixed and searched")
    fixed = {k: fixed_value(k, v, f"{source} [fixed]") for k, v in fixed_raw.items()}
    dims = tuple(_parse_dim(k, v, f"{source} [search] {k}") for k, v in search_raw.items())
    space = SearchSpace(name=name, source=source, fixed=fixed, dims=dims)
    _check_mode_conflicts(space, source)
    return space


def fixed_value(key: str, value: Any, source: str) -> Any:
    if key == MODE:
        if value not in EMBEDDING_MODES:
            raise UserError(f"{source}: {MODE} must be one of {', '.join(EMBEDDING_MODES)}, got {value!r}")
        return value
    return convert(key, value, source)


def parse_fixed_pairs(pairs: list[str]) -> dict[str, Any]:
    """`-p key=value` for tune: train parameters (text, as `train -p`) or embedding_mode."""
    from gru4rec.train.params import parse_pairs

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if key.strip() == MODE and sep:
            out[MODE] = fixed_value(MODE, value.strip().lower(), f"-p {pair}")
        else:
            out.update(parse_pairs([pair]))
    return out


def _parse_dim(name: str, spec: Any, where: str) -> Dim:
    if name in NOT_SEARCHABLE:
        raise UserError(f"{where}: cannot be searched ({NOT_SEARCHABLE[name]})")
    if name != MODE:
        convert(name, _example(name), where)  # an unknown parameter fails here, naming the known ones
    if not isinstance(spec, dict):
        raise UserError(f'{where}: expected a table such as {{type = "float", low = 0.01, high = 0.25}}')
    kind = spec.get("type")
    if kind not in KINDS:
        raise UserError(f"{where}: type must be one of {', '.join(KINDS)}, got {kind!r}")
    extra = set(spec) - _DIM_KEYS[kind]
    if extra:
        raise UserError(f"{where}: unknown key(s) {sorted(extra)} for type {kind}")
    if kind == "categorical":
        return _parse_categorical(name, spec, where)
    if name == MODE:
        raise UserError(f"{where}: {MODE} is categorical (choices from {', '.join(EMBEDDING_MODES)})")
    ptype = param_type(name)
    want = float if kind == "float" else int
    if want is int and ptype not in (int, list[int]) or want is float and ptype is not float:
        raise UserError(f"{where}: type {kind} does not fit this parameter ({_type_name(ptype)})")
    for key in ("low", "high"):
        if key not in spec:
            raise UserError(f"{where}: missing {key}")
    low, high, step, log = spec["low"], spec["high"], spec.get("step"), spec.get("log", False)
    for key, v in (("low", low), ("high", high), ("step", step)):
        if v is None:
            continue
        if not _is_num(v) or (want is int and not isinstance(v, int)) or not math.isfinite(v):
            raise UserError(
                f"{where}: {key} must be {'an integer' if want is int else 'a finite number'}, got {v!r}"
            )
    if not isinstance(log, bool):
        raise UserError(f"{where}: log must be true or false, got {log!r}")
    if low > high:
        raise UserError(f"{where}: empty range: low {low} > high {high}")
    if low == high:
        raise UserError(f"{where}: low = high = {low}: a single value; put it in [fixed]")
    if step is not None:
        if step <= 0:
            raise UserError(f"{where}: step must be > 0, got {step}")
        n = (high - low) / step
        if abs(n - round(n)) > 1e-9 * max(1.0, n):
            raise UserError(f"{where}: step {step} does not divide the range {low}..{high}")
        if log:
            raise UserError(
                f"{where}: log and step cannot be combined (Optuna samples a log range continuously)"
            )
    if log and low <= 0:
        raise UserError(f"{where}: a log range needs low > 0, got {low}")
    if want is float:
        low, high, step = float(low), float(high), (float(step) if step is not None else None)
    return Dim(name, kind, low, high, step, log)


def _parse_categorical(name: str, spec: dict, where: str) -> Dim:
    choices = spec.get("choices")
    if not isinstance(choices, list) or not choices:
        raise UserError(f"{where}: choices must be a non-empty list")
    if name == MODE:
        values = [fixed_value(MODE, c, where) for c in choices]
    else:
        if param_type(name) == list[int]:
            values = _layer_choices(choices, where)
        else:
            values = [convert(name, c, where) for c in choices]
    if len(set(map(json.dumps, values))) != len(values):
        raise UserError(f"{where}: choices repeat a value: {choices}")
    return Dim(name, "categorical", choices=tuple(values))


def _layer_choices(choices: list, where: str) -> list:
    """Layer stacks: 100, [100, 100] or "100,100". Optuna's choices must be scalars (a list breaks its
    importance code), so once any choice is a stack every choice becomes its text "100,100"."""
    if all(map(_is_int, choices)):
        return list(choices)
    return [_layers_text(c, where) for c in choices]


def _layers_text(value: Any, where: str) -> str:
    from gru4rec.train.params import parse_pairs

    if isinstance(value, list) and value and all(map(_is_int, value)):
        value = ",".join(map(str, value))
    elif _is_int(value):
        value = str(value)
    if not isinstance(value, str):
        raise UserError(
            f'{where}: a layers choice is an integer, a list such as [100, 100] or a string such as "100,100", got {value!r}'
        )
    layers = parse_pairs([f"layers={value}"])["layers"]  # checks it
    return ",".join(map(str, layers))


def _example(name: str) -> Any:
    """A value of the right type, to ask params whether the key exists."""
    from gru4rec.train.params import TrainConfig

    return TrainConfig().to_dict().get(name, 0)


def _type_name(t: type) -> str:
    return "a list of layer sizes" if t is list[int] else t.__name__


def _check_mode_conflicts(space: SearchSpace, source: str) -> None:
    names = set(space.fixed) | {d.name for d in space.dims}
    if MODE in names:
        clash = sorted(names & {"constrained_embedding", "embedding"})
        if clash:
            raise UserError(f"{source}: {MODE} sets {clash[0]}; give one or the other")
