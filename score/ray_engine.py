"""`score --engine ray`: the same replay, sharded over a Ray cluster (or a local Ray runtime).

    gru4rec-cli score --model m.onnx --sessions 'events/**/*.parquet' --engine ray --workers 4 \\
        --out recs/ --metrics metrics.json

How the work is cut and put back together:
  1. Read (Ray Data tasks, on the workers): every Parquet file is read row group by row group; each
     event gets its shard, a stable hash of its session id (gru4rec.sharding: the same on every
     machine and run, for integer and string ids), and its position in the input (file number, row),
     which breaks ties in time exactly as the single-process reader does (file order).
  2. Shard (Ray Data's sort shuffle, `sort("_shard", boundaries=...)`): block i holds exactly shard
     i, so every session is whole in one block; nothing passes through the driver. The shuffled blocks
     are materialised in the object store before any scorer starts, so the scorers' reserved CPUs
     cannot starve the shuffle.
  3. Score (a Ray Data actor pool, one scorer per worker, the ONNX bundle loaded once per actor): each
     shard is validated, sorted and replayed by `score.scorer.replay_source`, the code of
     `--engine local`, with ONNX Runtime's CUDA EP (IOBinding) on a GPU worker, the CPU EP otherwise.
     Its recommendations go to `part-SSSSS.parquet` through a temporary name committed when the shard
     completes; its totals (counts and sums, never averages) and step times come back as one row.
  4. Merge (driver): the shard totals add up to the single-process figures (RankAccumulator.merge),
     latency percentiles are taken over the union of all step times, and the recs folder, written
     beside --out under a temporary name, is renamed into place only when every shard is in.

Faults: an actor that dies (its process crashes, its node goes) is restarted by Ray and its shard
retried (MAX_RETRIES times); a retried shard rewrites its own part file, and the driver checks that
every shard came back exactly once and that the shards' events add up to the input's row count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from gru4rec.bundle import companion_paths, weights_path
from gru4rec.errors import UserError
from gru4rec.score.ray_shards import InputFile, ShardScorer, input_files, inspect_inputs, read_files
from gru4rec.score.tiled import tiled

RAY_INSTALL = "pip install 'gru4rec[ray]'"
MAX_RETRIES = 3  # restarts of a dead scorer actor, and retries of the shard it held
CONNECT_TIMEOUT_S = 10.0  # the TCP check of --ray-address
# Test hook: a path; the first scorer that creates this file exits abruptly mid-shard (after writing
# its recommendations under the temporary name, before committing them), as a crashed worker would.
KILL_ENV = "GRU4REC_RAY_KILL_FIRST_ATTEMPT"


@dataclass
class RayEngine:
    """`score --engine ray`: the options of a Ray run; `gru4rec.score.scorer.score` runs it."""

    name = "ray"
    address: str | None = None  # None: start a local Ray runtime for the run
    workers: int | None = None  # None: every GPU (or every cpus_per_worker CPUs) of the cluster
    gpus_per_worker: float | None = None  # None: 1 where the cluster has GPUs, else 0
    cpus_per_worker: float = 1.0
    shards: int | None = None  # None: max(16, 4 x workers)
    connect_timeout_s: float = CONNECT_TIMEOUT_S

    def check_outputs(self, model, sessions, out, metrics, cfg, provider: str = "auto") -> Path | None:
        return check_outputs(self, model, sessions, out, metrics, cfg, provider)

    def run(self, job):
        return run_job(self, job)

    def providers(self, provider: str) -> tuple[str, str]:
        """(the kind the memory plan is made for, the provider the job carries): the workers' GPUs are
        not visible from here, so the plan is for CUDA only when asked for by name (a tiled plan on GPU
        workers is refused in `run_job`), and the workers resolve the provider themselves."""
        return ("cuda" if provider == "cuda" else "cpu"), provider

    def check(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise UserError(f"--workers must be at least 1, got {self.workers}")
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise UserError(f"--gpus-per-worker must be >= 0, got {self.gpus_per_worker}")
        if not self.cpus_per_worker > 0:
            raise UserError(f"--cpus-per-worker must be > 0, got {self.cpus_per_worker}")
        if self.shards is not None and not 1 <= self.shards <= 99_999:
            raise UserError(f"--shards must be between 1 and 99999, got {self.shards}")


def import_ray():
    """The ray module, or the one-line install instruction as a UserError."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise UserError(f"--engine ray needs Ray, which is not installed here: {RAY_INSTALL}") from None
    return ray


# ---------------------------------------------------------------------------------------------- runtime
def _reachable(address: str, timeout: float) -> None:
    """A TCP connect to host:port first: Ray's own connect retries for minutes on a dead address."""
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--ray-address {address!r}: expected auto, host:port or ray://host:port")
    try:
        socket.create_connection((host, int(port)), timeout=min(timeout, 10.0)).close()
    except OSError as e:
        raise UserError(
            f"--ray-address {address}: cannot reach the Ray cluster ({e.strerror or e})"
        ) from None


@contextlib.contextmanager
def ray_runtime(ray, options: RayEngine) -> Iterator[str]:
    """Connect to `options.address` or start a local runtime (stopped afterwards); an already
    initialised Ray (a notebook, a test) is used as it is. Yields a description of the runtime."""
    if ray.is_initialized():
        yield "existing Ray runtime"
        return
    address = options.address
    kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    if address and address != "auto":
        _reachable(address, options.connect_timeout_s)
    if address:
        kwargs.pop("include_dashboard")
    # No thread around ray.init to bound it: the local runtime's processes die with the thread that
    # started them (PR_SET_PDEATHSIG). The TCP check above bounds the wait for a dead address.
    where = f"the Ray cluster at {address}" if address else "a local Ray runtime"
    try:
        ray.init(address=address, **kwargs)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        hint = f" (is `ray[client]` installed? {RAY_INSTALL})" if "ray[client]" in first else ""
        raise UserError(f"could not connect to {where}: {first}{hint}") from None
    try:
        yield f"Ray cluster at {address}" if address else "local Ray runtime"
    finally:
        ray.shutdown()


def _plan_resources(ray, options: RayEngine, provider: str) -> tuple[int, float, str, int]:
    """(workers, GPUs per worker, worker provider, shards) from the options and the cluster's resources."""
    res = ray.cluster_resources()
    n_gpu, n_cpu = float(res.get("GPU", 0)), float(res.get("CPU", 0))
    gpus = options.gpus_per_worker
    if gpus is None:
        gpus = 1.0 if n_gpu >= 1 and provider != "cpu" else 0.0
    if provider == "cuda" and gpus == 0:
        raise UserError("--provider cuda with --engine ray needs GPU workers: set --gpus-per-worker (e.g. 1)")
    if provider == "cpu" and gpus > 0:
        raise UserError("--provider cpu and --gpus-per-worker > 0 contradict each other")
    if gpus > n_gpu:
        raise UserError(f"--gpus-per-worker {gpus:g}: the Ray cluster has {n_gpu:g} GPU(s)")
    if options.cpus_per_worker > n_cpu:
        raise UserError(
            f"--cpus-per-worker {options.cpus_per_worker:g}: the Ray cluster has {n_cpu:g} CPU(s)"
        )
    workers = options.workers
    if workers is None:
        workers = int(n_gpu // gpus) if gpus > 0 else int(n_cpu // options.cpus_per_worker)
    workers = max(1, workers)
    shards = options.shards or max(16, 4 * workers)
    return workers, gpus, ("cuda" if gpus > 0 else "cpu"), shards


# ---------------------------------------------------------------------------------------------- outputs
def check_recs_dir(out: Path, inputs: list[Path], model_files) -> Path:
    """--out of a distributed run is a folder of part files: new, or a previous recs folder (replaced)."""
    from gru4rec.io import check_output_dir

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(
            f"{out}: --out of --engine ray is a folder (one Parquet file per shard); a file is there"
        )
    if out.is_dir():
        stray = [p.name for p in out.iterdir() if not _is_part(p.name)]
        if stray:
            raise UserError(
                f"{out}: folder exists and holds files that are not recommendations ({stray[0]}); name a new "
                "folder or an earlier recs folder of --engine ray (which is replaced)"
            )
    resolved = out.resolve()
    for f in (*inputs, *model_files):
        if resolved == Path(f).resolve() or resolved in Path(f).resolve().parents:
            raise UserError(f"{out}: output folder would overwrite or hold an input file ({f})")
    check_output_dir(out.parent)
    return out


def _is_part(name: str) -> bool:
    return name.startswith("part-") and name.endswith(".parquet") and name[5:-8].isdigit()


def _remove_tree(path: Path, timeout_s: float = 10.0) -> None:
    """Remove a failed run's recs folder; again while a scorer that was mid-write puts a part back."""
    deadline = time.monotonic() + timeout_s
    while True:
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists() or time.monotonic() > deadline:
            return
        time.sleep(0.2)


def _commit_dir(tmp: Path, out: Path, shards: set[int]) -> None:
    """Check the temporary folder holds exactly one part per shard, then rename it to `out`."""
    for p in tmp.iterdir():  # temporary files of attempts that died before their commit
        if not _is_part(p.name):
            p.unlink()
    found = {int(p.name[5:-8]) for p in tmp.iterdir()}
    if found != shards:
        raise RuntimeError(f"recs folder has parts {sorted(found ^ shards)[:5]} that do not match the shards")
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- the run
def check_outputs(engine: RayEngine, model, sessions, out, metrics, cfg, provider) -> Path | None:
    """Every check that needs no Ray: options, provider, output paths (a recs folder, not a file)."""
    from gru4rec.io import check_output_file
    from gru4rec.score.ort_backend import PROVIDERS

    engine.check()
    if provider not in PROVIDERS:
        raise UserError(f"--provider must be one of {', '.join(PROVIDERS)}, got {provider!r}")
    if out is None and cfg.k is not None:
        raise UserError("--k sets the recommendations per event written to --out; add --out")
    model_files = (Path(model), *companion_paths(model))
    files = input_files(sessions)
    if out is not None:
        out = check_recs_dir(Path(out), files, model_files)
    if metrics is not None:
        check_output_file(metrics, inputs=(*files, *model_files))
        if out is not None and Path(metrics).resolve().is_relative_to(Path(out).resolve()):
            raise UserError("--metrics must not be inside the --out folder")
    return out


@dataclass
class RayJob:
    """One distributed run, as planned on the driver: what the read, shuffle and scorer pool need."""

    inputs: list[InputFile]
    bundle: object  # gru4rec.bundle.Bundle
    cfg: object  # ScoreConfig, with the time unit fixed for every shard
    source_name: str
    provider: str  # of the workers: cuda or cpu
    tf32: bool
    workers: int
    gpus_per_worker: float
    cpus_per_worker: float
    n_shards: int
    out_tmp: Path | None  # the recs folder under its temporary name
    progress: bool

    @property
    def n_rows(self) -> int:
        return sum(f.n_rows for f in self.inputs)


def run_job(engine: RayEngine, job) -> object:
    """The Ray engine's part of `score.scorer.score`: plan, read, shard, score; an EngineResult."""
    from gru4rec.data import open_events
    from gru4rec.score.scorer import EngineResult, ReplayTotals, check_scored, sessions_fingerprint

    ray = import_ray()
    cfg = job.cfg
    inputs = inspect_inputs(input_files(job.sessions), cfg.keys)
    # one time unit for every shard, fixed here as the local reader fixes it for every chunk
    unit = open_events(job.sessions, cfg.keys).resolve_time_unit()
    cfg = dataclasses.replace(cfg, keys=dataclasses.replace(cfg.keys, time_unit=unit))
    # The test data's content digest is defined over the local reader's order, which shards do not
    # share: the driver computes it beside the job (a read of the file, while the workers score).
    pool = ThreadPoolExecutor(max_workers=1)
    fingerprint = pool.submit(sessions_fingerprint, job.sessions, cfg.keys)
    pool.shutdown(wait=False)  # its one thread ends with the read
    out = job.out
    with ray_runtime(ray, engine) as runtime:
        workers, gpus, worker_provider, n_shards = _plan_resources(ray, engine, job.provider)
        if worker_provider == "cuda" and job.memory is not None and job.memory.tiled:
            raise UserError(
                "this catalog is scored in tiles within the memory budget, which runs on CPU workers: "
                "pass --provider cuda (the budget then bounds the batch on the GPU) or --provider cpu"
            )
        tmp = _make_tmp_dir(out) if out is not None else None
        plan = RayJob(inputs, job.bundle, cfg, str(job.sessions), worker_provider, job.tf32, workers, gpus,
                      engine.cpus_per_worker, n_shards, tmp, job.progress)  # fmt: skip
        try:
            rows, phases = _run(ray, plan)
            totals = ReplayTotals.from_state(json.loads(rows[0]["totals"]))
            for row in rows[1:]:
                totals.merge(ReplayTotals.from_state(json.loads(row["totals"])))
            if totals.n_events != plan.n_rows:
                raise RuntimeError(f"shards hold {totals.n_events} events, the input {plan.n_rows}")
            check_scored(totals, job.sessions)
            if tmp is not None:
                _commit_dir(tmp, out, {int(r["shard"]) for r in rows})
                tmp = None
        finally:
            if tmp is not None:
                _remove_tree(tmp)
        ray_version = ray.__version__
    _merge_latency(job.recorder, rows)
    return EngineResult(
        totals,
        job.recorder,
        fingerprint.result(),
        provider=f"ort-{worker_provider}" + ("-tiled" if tiled(cfg.tile_items, job.bundle.n_items) else ""),
        device=_device_name(worker_provider),
        batch_size=max(int(r["batch"]) for r in rows),
        tf32=bool(job.tf32) and worker_provider == "cuda",
        engine={
            "name": "ray",
            "workers": workers,
            "shards": n_shards,
            "runtime": runtime,
            "address": engine.address,
            "gpus_per_worker": gpus,
            "cpus_per_worker": engine.cpus_per_worker,
            "shards_with_events": len(rows),
            "input_files": len(inputs),
            "worker_processes": len({int(r["pid"]) for r in rows}),
            "ray_version": ray_version,
            **phases,  # the job's wall time split: Ray Data read + shuffle, then the scorer pool
        },
    )


def _make_tmp_dir(out: Path) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def _read_and_shard(ray, ctx, files: list[dict], n_shards: int):
    """The input as materialised blocks, block i holding exactly shard i."""
    from ray.data.context import ShuffleStrategy

    ds = ray.data.from_items(files, override_num_blocks=len(files))
    ds = ds.map_batches(read_files, batch_size=1, batch_format="pyarrow", fn_kwargs={"n_shards": n_shards})
    # A range sort on the shard with one boundary per shard: block i holds exactly shard i, so every
    # session is whole in one block. Materialised before the scorers start, so their reserved CPUs
    # cannot starve the shuffle; the sort shuffle runs as plain tasks on Ray's pooled workers (the
    # hash shuffle starts aggregator actors for every run, slow to start on a small machine).
    previous = ctx.shuffle_strategy
    ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    try:
        shuffled = ds.sort("_shard", boundaries=list(range(1, n_shards))).materialize()
    finally:
        ctx.shuffle_strategy = previous
    return shuffled


def _run(ray, job: RayJob) -> tuple[list[dict], dict[str, float]]:
    """Read and shard with Ray Data, score with an actor pool; one result row per shard with events."""
    from ray.data import ActorPoolStrategy, DataContext

    from gru4rec.score.progress import ScoreProgress

    logging.getLogger("ray.data").setLevel(logging.ERROR)  # Ray Data's notices are not the user's business
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # ours below counts scored events, as the local engine's does
    ctx.print_on_execution_start = False
    files = [{"path": f.path, "index": f.index, "columns": list(f.columns)} for f in job.inputs]
    bar = ScoreProgress(job.progress, job.n_rows)
    t0 = time.perf_counter()
    with bar:
        bar.stage("reading and sharding")
        shuffled = _read_and_shard(ray, ctx, files, job.n_shards)
        t1 = time.perf_counter()
        bar.stage("scoring shards")
        bundle_ref = [
            ray.put(bundle_files_bytes(job.bundle.onnx_path))
        ]  # in a list: Ray must not resolve it for us
        threads = max(1, int(job.cpus_per_worker))
        with warnings.catch_warnings():
            # Ray marks **ray_remote_args as deprecated; no other spelling yet
            warnings.simplefilter("ignore")
            scored = shuffled.map_batches(
                ShardScorer,
                batch_size=None,
                batch_format="pyarrow",
                compute=ActorPoolStrategy(size=job.workers),
                num_cpus=job.cpus_per_worker,
                num_gpus=job.gpus_per_worker or None,
                fn_constructor_args=(
                    bundle_ref,
                    job.cfg,
                    job.provider,
                    job.tf32,
                    threads,
                    str(job.out_tmp) if job.out_tmp is not None else None,
                    job.source_name,
                    os.environ.get(KILL_ENV),
                ),  # fmt: skip
                max_restarts=MAX_RETRIES,
                max_task_retries=MAX_RETRIES,
            )
        rows: list[dict] = []
        batches = scored.iter_batches(batch_size=None, batch_format="pyarrow")
        try:
            for batch in batches:
                for row in batch.to_pylist():
                    if row.get("error"):
                        raise UserError(row["error"])
                    rows.append(row)
                    bar.advance(int(row["n_predictions"]))
        finally:
            # On an error, stop the scorers now (closing the iterator shuts Ray Data's executor and
            # its actor pool down): scorers still running would write parts into the recs folder
            # the caller is about to remove.
            close = getattr(batches, "close", None)
            if close is not None:
                close()
    shards = [int(r["shard"]) for r in rows]
    if len(set(shards)) != len(shards):
        raise RuntimeError(f"a shard came back more than once: {sorted(shards)}")
    if not rows:
        raise RuntimeError("no shard came back")
    phases = {"read_shuffle_s": t1 - t0, "score_s": time.perf_counter() - t1}
    return sorted(rows, key=lambda r: r["shard"]), phases


def bundle_files_bytes(onnx: str | Path) -> dict[str, bytes]:
    """A bundle's files under the names load_bundle expects (m.onnx, m.eval.onnx, m.items.parquet;
    an external weights file under its own name)."""
    eval_path, sidecar = companion_paths(onnx)
    names = dict(zip(("m.onnx", "m.eval.onnx", "m.items.parquet"), (onnx, eval_path, sidecar)))
    weights = weights_path(onnx)
    if weights is not None:
        names[weights.name] = weights
    return {name: Path(path).read_bytes() for name, path in names.items()}


def _merge_latency(recorder, rows) -> None:
    """Every worker's step times (with their widths) into the run's recorder: the percentiles and
    the time per event are over the union of all steps, defined as the local engine defines them."""
    from gru4rec.score.latency import LatencyRecorder

    for r in rows:
        recorder.merge(LatencyRecorder.from_state(json.loads(r["latency"])))


def _device_name(provider: str) -> str:
    from gru4rec.score.latency import cpu_name
    from gru4rec.score.ort_backend import gpu_name

    return gpu_name() if provider == "cuda" else cpu_name()
