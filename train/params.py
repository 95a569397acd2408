"""Training hyperparameters: defaults < preset < --params TOML < -p key=value, then validation.

Names and defaults follow the official PyTorch GRU4Rec (spec §6). Every problem (unknown key,
wrong type, impossible value, contradictory combination) is a UserError naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gru4rec.errors import UserError
from gru4rec.io import read_toml as io_read_toml
from gru4rec.train.presets import PRESETS

LOSSES = ("cross-entropy", "bpr-max", "top1-max", "bpr", "top1")  # implemented in losses.py
OPTIMIZERS = ("adagrad", "adam")


def _p(default: Any, help: str) -> Any:
    """A parameter with its `train --help` text (one source for the code and the help)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    loss: str = _p("cross-entropy", f"ranking loss: {', '.join(LOSSES)}")
    layers: list[int] = _p([100], "GRU layer sizes, e.g. 100 or 100,100")
    embedding: int = _p(
        0,
        "separate input embedding size (0: none; 'layersize': layers[0]); needs constrained_embedding=false",
    )
    constrained_embedding: bool = _p(True, "share the input and output item matrix")
    dropout_p_embed: float = _p(0.0, "dropout on the item input")
    dropout_p_hidden: float = _p(0.0, "dropout on the GRU output")
    batch_size: int = _p(64, "sessions trained in parallel")
    learning_rate: float = _p(0.05, "step size")
    momentum: float = _p(0.0, "Adagrad momentum (official IndexedAdagradM)")
    n_sample: int = _p(2048, "extra negatives per step, drawn by popularity^sample_alpha (0: in-batch only)")
    sample_alpha: float = _p(0.5, "popularity exponent of the negative sampler")
    sample_store_size: int = _p(10_000_000, "negatives pre-drawn at once")
    bpreg: float = _p(1.0, "score regularisation of bpr-max")
    elu_param: float = _p(0.5, "ELU alpha of the final activation (0: linear)")
    logq: float = _p(0.0, "logQ correction weight of cross-entropy for the sampled negatives")
    n_epochs: int = _p(10, "passes over the training data")
    optimizer: str = _p("adagrad", f"{' or '.join(OPTIMIZERS)} (adam is lazy on item rows)")
    dwell_boost: float = _p(0.0, "seconds T: repeat an event 1 + floor(dwell / T) times (0: off)")
    dwell_cap: int = _p(5, "most repeats of one event under dwell boosting")
    eval_batch_size: int = _p(512, "sessions per step in the validation replay")
    cuda_graph: bool = _p(True, "capture the full-batch step in a CUDA graph (ignored on CPU)")
    tf32: bool = _p(False, "TF32 matmuls on CUDA (off: fp32 parity)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> TrainConfig:
        def bad(key: str, why: str) -> UserError:
            return UserError(f"parameter {key}: {why}")

        if self.loss not in LOSSES:
            raise bad("loss", f"unknown loss {self.loss!r}; use one of {', '.join(LOSSES)}")
        if self.optimizer not in OPTIMIZERS:
            raise bad(
                "optimizer", f"unknown optimizer {self.optimizer!r}; use one of {', '.join(OPTIMIZERS)}"
            )
        if not self.layers or any(h <= 0 for h in self.layers):
            raise bad("layers", "must be a non-empty list of positive sizes")
        for key in ("batch_size", "n_epochs", "sample_store_size", "eval_batch_size", "dwell_cap"):
            if getattr(self, key) < 1:
                raise bad(key, "must be >= 1")
        for key in ("embedding", "n_sample"):
            if getattr(self, key) < 0:
                raise bad(key, "must be >= 0")
        for key in ("dropout_p_embed", "dropout_p_hidden"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise bad(key, "is a drop probability and must be in [0, 1)")
        if self.learning_rate <= 0:
            raise bad("learning_rate", "must be > 0")
        if not 0.0 <= self.momentum < 1.0:
            raise bad("momentum", "must be in [0, 1)")
        for key, kind in _HINTS.items():  # nan/inf would only surface as a diverged loss, much later
            if kind is float and not math.isfinite(getattr(self, key)):
                raise bad(key, f"must be a finite number, got {getattr(self, key)}")
        for key in ("sample_alpha", "bpreg", "elu_param", "logq", "dwell_boost"):
            if getattr(self, key) < 0:
                raise bad(key, "must be >= 0")
        # contradictory combinations
        if self.embedding > 0 and self.constrained_embedding:
            raise bad(
                "embedding", "a separate embedding needs constrained_embedding=false (shared mode has none)"
            )
        if self.logq > 0 and self.loss != "cross-entropy":
            raise bad("logq", f"the logq correction applies to cross-entropy only, not {self.loss}")
        if self.optimizer == "adam" and self.momentum > 0:
            raise bad("momentum", "is an Adagrad option; Adam has its own moments (set momentum=0)")
        if self.n_sample == 0 and self.batch_size < 2:
            raise bad(
                "batch_size", "must be >= 2 when n_sample=0 (the batch is the only source of negatives)"
            )
        if self.n_sample > self.sample_store_size:
            raise bad("sample_store_size", f"must be >= n_sample ({self.n_sample})")
        return self


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)


def _convert(key: str, value: Any, from_text: bool) -> Any:
    """Coerce a value to the field's type; text from -p is parsed, TOML values must already fit."""
    kind = _HINTS[key]
    what = f"parameter {key}"
    if kind is bool:
        if isinstance(value, bool):
            return value
        if from_text and str(value).lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return str(value).lower() in ("true", "1", "yes", "on")
        raise UserError(f"{what}: expected true/false, got {value!r}")
    if kind is int:
        if key == "embedding" and value == "layersize":
            return "layersize"  # resolved to layers[0] after merging (official option)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_text:
            try:
                return int(str(value))
            except ValueError:
                pass
        raise UserError(f"{what}: expected an integer, got {value!r}")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if from_text:
            try:
                return float(str(value))
            except ValueError:
                pass
        raise UserError(f"{what}: expected a number, got {value!r}")
    if kind is str:
        if isinstance(value, str):
            return value.strip().lower()
        raise UserError(f"{what}: expected a string, got {value!r}")
    # layers: list[int]; text "100", "100,100" or "[100, 100]"
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if from_text and isinstance(value, str):
        parts = [p for p in value.strip().strip("[]").replace(" ", "").split(",") if p]
        try:
            return [int(p) for p in parts]
        except ValueError:
            pass
    elif isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return list(value)
    raise UserError(f"{what}: expected a list of integers such as 100 or 100,100, got {value!r}")


def params_help() -> list[str]:
    """The parameter list shown under `train --help`, one 'key = default: meaning' line each."""
    return [
        f"{f.name} = {json.dumps(f.default_factory() if callable(f.default_factory) else f.default)}: "
        f"{f.metadata['help']}"
        for f in dataclasses.fields(TrainConfig)
    ]


def _check_key(key: str, source: str) -> None:
    if key not in _FIELDS:
        raise UserError(f"{source}: unknown parameter {key!r}; known: {', '.join(_FIELDS)}")


def parse_pairs(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"-p {pair!r}: expected key=value")
        _check_key(key, f"-p {pair}")
        out[key] = _convert(key, value.strip(), from_text=True)
    return out


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    raw = io_read_toml(path, "params file")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        _check_key(key, str(path))
        try:
            out[key] = _convert(key, value, from_text=False)
        except UserError as e:
            raise UserError(f"{path}: {e}") from None
    return out


def resolve(
    preset: str | None = None,
    params_file: str | Path | None = None,
    pairs: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> TrainConfig:
    """Merge the layers in precedence order and validate."""
    merged: dict[str, Any] = {}
    if preset is not None:
        preset = preset.strip().lower()  # like every other string parameter
        if preset not in PRESETS:
            raise UserError(f"unknown preset {preset!r}; available: {', '.join(PRESETS)}")
        merged.update(PRESETS[preset])
    if params_file is not None:
        merged.update(read_toml(params_file))
    merged.update(parse_pairs(pairs or []))
    for key, value in (overrides or {}).items():
        _check_key(key, "parameters")
        merged[key] = _convert(key, value, from_text=False)
    return from_dict(merged)


def from_dict(params: dict[str, Any] | TrainConfig) -> TrainConfig:
    if isinstance(params, TrainConfig):
        return dataclasses.replace(params).validate()
    clean: dict[str, Any] = {}
    for key, value in params.items():
        _check_key(key, "parameters")
        clean[key] = _convert(key, value, from_text=isinstance(value, str) and _HINTS[key] is not str)
    if clean.get("embedding") == "layersize":
        clean["embedding"] = list(clean.get("layers", [100]))[0]
    return TrainConfig(**clean).validate()


def convert(key: str, value: Any, source: str) -> Any:
    """One parameter value as a TOML file holds it, checked and coerced; errors name `source`."""
    _check_key(key, source)
    try:
        return _convert(key, value, from_text=False)
    except UserError as e:
        raise UserError(f"{source}: {e}") from None


def param_type(key: str) -> type:
    """The Python type of parameter `key` (int, float, bool, str, or list[int] for layers)."""
    return _HINTS[key]
