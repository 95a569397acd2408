"""The `eval benchmark` config: its schema and the checks made when it is loaded.

Config (TOML), paths relative to the working directory:

    [benchmark]
    tie_modes = ["standard", "conservative"]   # the first is the headline
    max_k = 20                                  # curves for k = 1..max_k
    device = "auto"                             # for GRU4Rec training / PyTorch evaluation

    [[dataset]]
    name = "rsc15_100k"
    train = "../shared/data/rsc15_100k/train.parquet"
    test = "../shared/data/rsc15_100k/test.parquet"

    [[model]]                 # GRU4Rec: give onnx (scored by the ONNX Runtime scorer, with latency),
    name = "GRU4Rec"          # checkpoint (PyTorch evaluation; its training history is plotted) or
    kind = "gru4rec"          # preset (+ params) to train here first (then exported and scored).
    preset = "rsc15"
    datasets = ["rsc15_100k"] # optional: restrict a model to some datasets

    [[model]]
    kind = "sknn"             # pop, spop, itemknn, bprmf, sknn, vsknn
    options = { k = 100, sample_size = 500 }   # the baseline's constructor arguments

Every key is checked when the config is loaded (types, ranges, unknown keys, training preset and
params, baseline options, distinct dataset and model names); gru4rec.eval.benchmark's `run` checks
the input files and the output folder before the first dataset is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gru4rec.errors import UserError
from gru4rec.eval import baselines
from gru4rec.eval.config import (
    ENGINE_KEYS,
    MAX_CUTOFF,
    REQUIRED,
    EngineSpec,
    Table,
    array_of_tables,
    check_top_level,
    device,
    engine,
    presets,
    training,
)
from gru4rec.io import read_toml
from gru4rec.metrics import TIE_MODES


@dataclass
class DatasetSpec:
    name: str
    train: Path
    test: Path


@dataclass
class ModelSpec:
    kind: str
    name: str
    options: dict[str, Any] = field(default_factory=dict)
    datasets: list[str] | None = None
    onnx: Path | None = None
    checkpoint: Path | None = None
    preset: str | None = None
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def is_baseline(self) -> bool:
        return self.kind != "gru4rec"

    @property
    def trains(self) -> bool:
        return not self.is_baseline and self.onnx is None and self.checkpoint is None


@dataclass
class BenchmarkConfig:
    datasets: list[DatasetSpec]
    models: list[ModelSpec]
    tie_modes: tuple[str, ...] = ("standard", "conservative")
    max_k: int = 20
    device: str = "auto"
    score_batch_size: int = 512
    seed: int = 42
    engine: EngineSpec = field(default_factory=EngineSpec)
    source: str = "benchmark config"  # the config file, for messages
    mlflow: Any = None  # gru4rec.eval.tracking.MlflowSpec, from [benchmark.mlflow]


BENCHMARK_KEYS = ("tie_modes", "max_k", "device", "score_batch_size", "seed", "mlflow", *ENGINE_KEYS)
DATASET_KEYS = ("name", "train", "test")
MODEL_KEYS = ("kind", "name", "datasets", "options", "onnx", "checkpoint", "preset", "params")
GRU4REC_ONLY = ("onnx", "checkpoint", "preset", "params")
HEADLINE_K = 20  # the report's Recall@20 / MRR@20


def load_config(path: str | Path) -> BenchmarkConfig:
    """Read and check every table and key; input files are checked by `run` (only those it needs)."""
    raw = read_toml(path, "config file")
    check_top_level(path, raw, ("[benchmark]", "[[dataset]]", "[[model]]"), {})
    top = Table.of(path, "[benchmark]", raw.get("benchmark", {}), BENCHMARK_KEYS)
    cfg = BenchmarkConfig(
        datasets=[_dataset(Table.of(path, f"[[dataset]] #{i}", d, DATASET_KEYS))
                  for i, d in enumerate(array_of_tables(path, raw, "dataset"), 1)],
        models=[_model(Table.of(path, f"[[model]] #{i}", m, MODEL_KEYS))
                for i, m in enumerate(array_of_tables(path, raw, "model"), 1)],
        tie_modes=tuple(top.strings("tie_modes", ("standard", "conservative"), choices=TIE_MODES)),
        max_k=top.integer("max_k", 20, HEADLINE_K, MAX_CUTOFF),
        device=device(top),
        score_batch_size=top.integer("score_batch_size", 512, 1),
        seed=top.integer("seed", 42, 0, 2**32 - 1),
        engine=engine(top),
        source=str(path),
    )  # fmt: skip
    if top.has("mlflow"):
        from gru4rec.eval.tracking import KEYS, spec_from_table

        cfg.mlflow = spec_from_table(
            Table.of(path, "[benchmark.mlflow]", top.raw["mlflow"], KEYS), "gru4rec-benchmark"
        )
    if not cfg.datasets or not cfg.models:
        raise UserError(f"{path}: needs at least one [[dataset]] and one [[model]]")
    _check_unique(path, "[[dataset]]", [d.name for d in cfg.datasets])
    _check_unique(path, "[[model]]", [m.name for m in cfg.models])
    names = [d.name for d in cfg.datasets]
    for m in cfg.models:
        unknown = [n for n in m.datasets or [] if n not in names]
        if unknown:
            raise UserError(
                f"{path}: [[model]] {m.name!r} datasets names unknown dataset(s) {unknown} "
                f"(the [[dataset]] names: {', '.join(names)})"
            )
    return cfg


def _dataset(t: Table) -> DatasetSpec:
    return DatasetSpec(t.string("name"), t.path("train", REQUIRED), t.path("test", REQUIRED))


def _check_unique(path: str | Path, table: str, names: list[str]) -> None:
    """Names label report rows and name plot files: two that are equal (or share a file name) would
    merge or overwrite each other's results."""
    seen: dict[str, str] = {}
    for name in names:
        slug = file_slug(name)
        if not slug:
            raise UserError(f"{path}: {table} name {name!r} needs a letter or digit (it names plot files)")
        if slug in seen:
            same = "is used twice" if seen[slug] == name else f"and {seen[slug]!r} would share plot files"
            raise UserError(f"{path}: {table} name {name!r} {same}; give each a distinct name")
        seen[slug] = name


def _model(t: Table) -> ModelSpec:
    kinds = ("gru4rec", *baselines.NAMES)
    raw_kind = t.string("kind", REQUIRED)
    kind = raw_kind.lower().replace("-", "").replace("_", "")
    if kind not in kinds:
        raise t.bad("kind", f"one of {', '.join(kinds)}", raw_kind)
    datasets = t.strings("datasets", None)
    if kind == "gru4rec":
        return _gru4rec_model(t, datasets)
    misplaced = [k for k in GRU4REC_ONLY if t.has(k)]
    if misplaced:
        raise t.error(f"{misplaced[0]} is a GRU4Rec key; a {kind} baseline takes options = {{ ... }}")
    options = _baseline_options(t, kind)
    return ModelSpec(kind, t.string("name", baselines.make(kind).name), options, datasets)


def _gru4rec_model(t: Table, datasets: list[str] | None) -> ModelSpec:
    if t.has("options"):
        raise t.error("options is for baselines; GRU4Rec takes preset and params (or onnx / checkpoint)")
    spec = ModelSpec(
        "gru4rec", t.string("name", "GRU4Rec"), datasets=datasets, onnx=t.path("onnx"),
        checkpoint=t.path("checkpoint"), preset=t.string("preset", None, presets()), params=t.mapping("params"),
    )  # fmt: skip
    given = spec.onnx is not None or spec.checkpoint is not None
    if given and (t.has("preset") or t.has("params")):
        raise t.error(
            "takes either onnx / checkpoint (a trained model) or preset / params (train one here), not both"
        )
    if not given and not (t.has("preset") or t.has("params")):
        raise t.error(f"GRU4Rec model {spec.name!r} needs onnx, checkpoint or preset / params")
    for key, suffix in (("onnx", ".onnx"), ("checkpoint", ".pt")):
        path = getattr(spec, key)
        if path is not None and path.suffix != suffix:
            raise t.bad(key, f"a {suffix} file", str(path))
    if not given:
        training(t, spec.preset, spec.params)
    return spec


def _baseline_options(t: Table, kind: str) -> dict[str, Any]:
    """Options checked against the baseline's constructor: known names, the defaults' types, ranges."""
    options = t.mapping("options")
    defaults = baselines.option_defaults(kind)
    table = Table.of(t.file, f"{t.name} options", options, list(defaults))
    for key, default in defaults.items():
        if isinstance(default, bool):
            table.boolean(key, default)
        elif isinstance(default, int):
            table.integer(key, default, 1 if key in POSITIVE_OPTIONS else 0)
        elif isinstance(default, float):
            table.number(key, default)
        elif isinstance(default, str):
            table.string(key, default, STRING_OPTIONS.get(key))
    try:
        baselines.make(kind, **options)  # the constructor's own checks (similarity names, ...)
    except UserError as e:
        raise t.error(f"options: {e}") from None
    return options


# Counts and sizes that must be at least 1; other numeric options may be 0 (seed, sample_size = all).
POSITIVE_OPTIONS = ("top_n", "k", "factors", "epochs", "batch_size")
# String options the constructors do not check themselves.
STRING_OPTIONS = {"score_dtype": ("float32", "float64")}


def file_slug(text: str) -> str:
    """A name as it appears in file names (plots, checkpoints)."""
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")
