"""Reading the eval stage's TOML configs: every key is checked for type and range as the file loads.

A wrong type, an impossible value or an unknown key (a typo) is a UserError naming the file, the
table and the key in the config's own terms, before any work is done: a nightly job must not train
for an hour and then trip over `cutoffs = ["a"]`, and a misspelt key must not be silently ignored.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gru4rec.errors import UserError

# Cut-offs are computed one by one for every prediction; past a few hundred they describe no list a
# user would see, and a typo such as 2000 instead of 20 should be caught rather than run.
MAX_CUTOFF = 1000


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


def show(value: Any) -> str:
    """`value` roughly as TOML spells it (strings in double quotes, true/false), for messages."""
    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # TOML true is not the number 1


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def int_range(lo: int, hi: int | None) -> str:
    return f"between {lo} and {hi}" if hi is not None else f">= {lo}"


def check_top_level(
    file: str | Path, raw: dict[str, Any], known: Sequence[str], hints: dict[str, str]
) -> None:
    """Refuse top-level tables and keys the config does not have. `known`: its tables as written
    ("[nightly]", "[[model]]"); `hints` maps a likely slip to advice."""
    names = {k.strip("[]") for k in known}
    for key, value in raw.items():
        if key in names:
            continue
        what = f"table [{key}]" if isinstance(value, (dict, list)) else f"top-level key {key!r}"
        hint = f"; {hints[key]}" if key in hints else ""
        raise UserError(f"{file}: unknown {what} (known: {', '.join(known)}){hint}")


def array_of_tables(file: str | Path, raw: dict[str, Any], key: str) -> list[Any]:
    """The `[[key]]` entries; a plain `[key]` table or a scalar is refused with the right spelling."""
    value = raw.get(key, [])
    if not isinstance(value, list):
        raise UserError(
            f"{file}: {key} must be written as [[{key}]] tables (one per entry), got {show(value)}"
        )
    return value


@dataclass
class Table:
    """One TOML table of a config file, read key by key with checks; `name` is how messages call it."""

    file: str | Path
    name: str
    raw: dict[str, Any]

    @classmethod
    def of(cls, file: str | Path, name: str, value: Any, known: Sequence[str]) -> Table:
        if not isinstance(value, dict):
            raise UserError(f"{file}: {name} must be a table, got {show(value)}")
        unknown = [k for k in value if k not in known]
        if unknown:
            raise UserError(f"{file}: unknown key {unknown[0]!r} in {name} (known: {', '.join(known)})")
        return cls(file, name, value)

    def has(self, key: str) -> bool:
        return key in self.raw

    def error(self, message: str) -> UserError:
        return UserError(f"{self.file}: {self.name} {message}")

    def bad(self, key: str, expected: str, value: Any) -> UserError:
        return self.error(f"{key} must be {expected}, got {show(value)}")

    def _get(self, key: str, default: Any) -> tuple[Any, bool]:
        """(value, whether the file gives it); a missing required key is an error."""
        if key in self.raw:
            return self.raw[key], True
        if default is REQUIRED:
            raise self.error(f"needs {key!r}")
        return default, False

    def string(self, key: str, default: Any = REQUIRED, choices: Sequence[str] | None = None) -> Any:
        value, given = self._get(key, default)
        if not given:
            return value
        if choices is not None and (not isinstance(value, str) or value not in choices):
            raise self.bad(key, f"one of {', '.join(choices)}", value)
        if not isinstance(value, str) or not value.strip():
            raise self.bad(key, "a non-empty string", value)
        return value

    def path(self, key: str, default: Any = None) -> Path | None:
        value, given = self._get(key, default)
        if not given:
            return value
        if not isinstance(value, str) or not value.strip():
            raise self.bad(key, "a path (a non-empty string)", value)
        return Path(value)

    def input_file(self, key: str, default: Any = None) -> Path | None:
        """A path that must name an existing file now, so a run never starts on a missing input."""
        path = self.path(key, default)
        if path is not None and not path.is_file():
            raise self.error(f"{key}: file not found: {path}")
        return path

    def input_events(self, key: str, default: Any = None) -> Path | None:
        """Events that must exist now: a file, a folder or a glob that matches (content is checked
        when they are read)."""
        import glob

        path = self.path(key, default)
        if path is None:
            return path
        text = str(path)
        if any(ch in text for ch in "*?["):
            if not glob.glob(text, recursive=True):
                raise self.error(f"{key}: the pattern matches no file: {path}")
        elif not path.exists():
            raise self.error(f"{key}: file not found: {path}")
        return path

    def integer(self, key: str, default: Any, lo: int, hi: int | None = None) -> Any:
        value, given = self._get(key, default)
        if given and not (is_int(value) and lo <= value and (hi is None or value <= hi)):
            raise self.bad(key, f"an integer {int_range(lo, hi)}", value)
        return value

    def number(self, key: str, default: Any, lo: float = 0.0) -> Any:
        value, given = self._get(key, default)
        if given and not (is_number(value) and value >= lo):
            raise self.bad(key, f"a number >= {lo:g}", value)
        return float(value) if given else value

    def boolean(self, key: str, default: Any) -> Any:
        value, given = self._get(key, default)
        if given and not isinstance(value, bool):
            raise self.bad(key, "true or false", value)
        return value

    def strings(self, key: str, default: Any, choices: Sequence[str] | None = None,
                allow_empty: bool = False) -> list[str]:  # fmt: skip
        """A list of distinct non-empty strings (from `choices` when given)."""
        value, given = self._get(key, default)
        if not given:
            return list(value) if value is not None else value
        ok = (
            isinstance(value, list)
            and (allow_empty or len(value) > 0)
            and all(isinstance(v, str) and v.strip() for v in value)
            and len(set(value)) == len(value)
            and (choices is None or all(v in choices for v in value))
        )
        if not ok:
            of = f"values from {', '.join(choices)}" if choices is not None else "strings"
            raise self.bad(key, f"a {'' if allow_empty else 'non-empty '}list of distinct {of}", value)
        return list(value)

    def integers(self, key: str, default: Any, lo: int, hi: int | None = None) -> list[int]:
        """A non-empty list of distinct integers in [lo, hi]."""
        value, given = self._get(key, default)
        if not given:
            return list(value)
        ok = (
            isinstance(value, list)
            and len(value) > 0
            and all(is_int(v) and lo <= v and (hi is None or v <= hi) for v in value)
            and len(set(value)) == len(value)
        )
        if not ok:
            raise self.bad(key, f"a non-empty list of distinct integers {int_range(lo, hi)}", value)
        return list(value)

    def mapping(self, key: str) -> dict[str, Any]:
        """An inline table whose own keys are checked by the caller (training params, baseline options)."""
        value, given = self._get(key, {})
        if given and not isinstance(value, dict):
            raise self.bad(key, "a table such as { key = value }", value)
        return dict(value)


def device(table: Table, key: str = "device") -> str:
    """auto, cpu, cuda or cuda:N (the train stage's devices)."""
    value = table.string(key, "auto")
    kind, _, index = value.partition(":")
    if value not in ("auto", "cpu", "cuda") and not (kind == "cuda" and index.isdigit()):
        raise table.bad(key, "one of auto, cpu, cuda (or cuda:N)", value)
    return value


def check_cuda(table_name: str, file: str | Path, value: str) -> None:
    """Refuse a device the train stage cannot use (CUDA on a machine without one) now, not after the
    work before training; the train stage's own check decides."""
    from gru4rec.train.trainer import resolve_device

    try:
        resolve_device(value)
    except UserError as e:
        raise UserError(f"{file}: {table_name} device = {show(value)}: {e}") from None


def training(table: Table, preset: str | None, params: dict[str, Any]) -> None:
    """Check a preset and training params with the train stage's own rules (keys, types, ranges, combinations)."""
    from dataclasses import fields

    from gru4rec.train.params import TrainConfig, resolve

    Table.of(table.file, f"{table.name} params", params, [f.name for f in fields(TrainConfig)])
    try:
        resolve(preset=preset, overrides=params)
    except UserError as e:
        raise table.error(f"params: {e}") from None


def presets() -> tuple[str, ...]:
    from gru4rec.train.presets import PRESETS

    return tuple(PRESETS)


# `engine = "ray"` in [nightly] / [benchmark]: score on Ray (score/ray_engine.py) instead of in-process.
ENGINE_KEYS = ("engine", "ray_address", "workers")


@dataclass
class EngineSpec:
    name: str = "local"  # local | ray
    ray_address: str | None = None  # None: a local Ray runtime for the run
    workers: int | None = None  # None: the engine's default (every CPU or GPU of the cluster)


def engine(table: Table) -> EngineSpec:
    """engine, ray_address and workers of a table; "ray" needs the gru4rec[ray] extra, checked now."""
    spec = EngineSpec(
        name=table.string("engine", "local", ("local", "ray")),
        ray_address=table.string("ray_address", None),
        workers=table.integer("workers", None, 1),
    )
    if spec.name != "ray" and (spec.ray_address is not None or spec.workers is not None):
        raise table.error('ray_address and workers need engine = "ray"')
    if spec.name == "ray":
        from gru4rec.score.ray_engine import import_ray

        try:
            import_ray()
        except UserError as e:
            raise table.error(f'engine = "ray": {e}') from None
    return spec
