"""Scoring with the item axis in tiles: memory that does not grow with the catalog.

The exported eval graph scores a whole [b, N] matrix per step; at millions of items that matrix
(and the comparisons made of it) no longer fits. Here the scorer splits the eval graph in two
ONNX Runtime sessions over the same weights:

- front: step_in, hidden_prev -> hidden_out, x (the last layer's output, the input of the score
  GEMM) and t, the target's score. The eval graph as exported, minus the score GEMM and what
  follows it.
- tile: x, t, a tile of item rows W [T, H] and biases [T], the running top-k and counts -> the
  updated top-k and counts. Called once per tile; the running top-k is merged inside the graph
  (TopK of the concatenation), so every op is one of ORT's plain kernels (Gemm, Greater, ReduceSum,
  TopK) at the shapes it is fast at, and the tile size is chosen at score time from a memory
  budget instead of being fixed at export (a Loop or unrolled tiles in the exported graph would fix
  it, and a Loop runs its body one iteration at a time outside the fast kernels' batching).

Exactness. Counts: n_greater and n_equal of a tile are exact integers (float32 sums below 2**24)
and add up across tiles. The target's score t is computed by a Gemm of the same shape family as
the tile's (x against the target rows, bias added by the Gemm, transB), so it is the value the
tile GEMM gives that column: the target itself is counted equal, as in the untiled graph. Top-k:
ONNX TopK breaks ties by the lower index; the running list holds earlier tiles (lower indices)
and is concatenated before the new tile, so ties still go to the lower item index. Tests compare
both against a brute-force numpy reference and against the untiled graph.

The item tables (every initializer with one row per item: the output matrix, the biases, an
input embedding) are mapped from the model's file (`load_tables`; the graph is parsed without their
data), are graph inputs of the front session, fed the same arrays each step, and the tile session
reads row slices of them: on the CPU EP nothing is copied, so the weights are in memory once.

Tile width: about TILE_CELLS (batch x item) cells, so that a tile's scores and the passes over them
run from cache (docs/performance.md has the measurements).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from gru4rec.allocator import available_memory, gpu_free_memory
from gru4rec.bundle import load_without_tables
from gru4rec.errors import UserError
from gru4rec.score.ort_backend import _drop_outputs, make_session, resolve_provider, scoring_graph
from gru4rec.score.replay import StepOutput

# Bytes per (row x item) cell that one step holds at once: scores, the comparisons' bool and
# float32 copies; the untiled eval graph holds about this much over the whole catalog.
CELL_BYTES = 24
# A tile's [batch x tile] scores, and the comparisons and casts made of them, are streamed through
# several times per tile: at about 4M cells (16 MiB of float32 scores) they stay in cache, and a cell
# costs about half what it does at 16M cells or more (`gru4rec-cli bench catalog`, docs/performance.md).
TILE_CELLS = 1 << 22
MIN_TILE = 8192  # the narrowest tile a small budget may force; below it, the batch shrinks instead
# Up to this many cells per step the exported graph runs untiled where the budget holds it. Past it
# the graph's passes over the whole [batch, N] matrix run from memory, and tiles of TILE_CELLS score
# faster even where the matrix fits (`python bench/untiled_vs_tiled.py`, docs/performance.md).
UNTILED_CELLS = 2 * TILE_CELLS
DEFAULT_BUDGET_FRACTION = 0.25
DEFAULT_BUDGET_CAP = 1 << 30  # the plan takes at most this; a plan within UNTILED_CELLS needs far less


def default_budget() -> int:
    return int(min(available_memory() * DEFAULT_BUDGET_FRACTION, DEFAULT_BUDGET_CAP))


def default_gpu_budget(weights_bytes: int) -> int:
    """Half of the GPU's free memory once the weights are on it: on CUDA a larger batch is faster, so
    no cap. Where free GPU memory cannot be read, the CPU default, with a notice."""
    import sys

    free = gpu_free_memory()
    if free is None:
        budget = default_budget()
        print(f"notice: free GPU memory unknown; planning with {budget / 2**20:,.0f} MiB "
              "(set --memory-budget)", file=sys.stderr)  # fmt: skip
        return budget
    return max(0, free - weights_bytes) // 2


def parse_bytes(text: str) -> int:
    """'512MB', '2GiB', '1.5G', '800000000' -> bytes; UserError on anything else."""
    units = {
        "": 1,
        "K": 1e3,
        "M": 1e6,
        "G": 1e9,
        "T": 1e12,
        "KI": 2**10,
        "MI": 2**20,
        "GI": 2**30,
        "TI": 2**40,
    }
    s = text.strip().upper().removesuffix("B")
    num = s.rstrip("KMGTI")
    try:
        value = float(num) * units[s[len(num) :]]
    except (KeyError, ValueError):
        raise UserError(f"--memory-budget: not a size: {text!r} (e.g. 512MB, 2GB, 1.5GiB)") from None
    if value < 1 << 20:
        raise UserError(f"--memory-budget {text!r} is below 1 MB")
    return int(value)


@dataclass(frozen=True)
class MemoryPlan:
    budget: int  # bytes for the per-step working set (the weights come on top)
    batch: int  # replay batch (the requested one, or smaller when even MIN_TILE does not fit)
    tile: int  # items per tile; == n_items: the untiled eval graph
    n_items: int

    @property
    def tiled(self) -> bool:
        return tiled(self.tile, self.n_items)

    @property
    def n_tiles(self) -> int:
        return -(-self.n_items // self.tile)

    def report(self) -> dict:
        return {
            "budget_bytes": self.budget,
            "batch": self.batch,
            "tile_items": self.tile,
            "n_tiles": self.n_tiles,
        }

    def describe(self) -> str:
        return describe_memory(self.report())


def describe_memory(plan: dict) -> str:
    """One line for a memory plan's `report()` (also the metrics JSON's `memory`)."""
    how = (
        f"{plan['n_tiles']} tiles of {plan['tile_items']:,} items per step"
        if plan["n_tiles"] > 1
        else f"all {plan['tile_items']:,} items in one pass"
    )
    batch = f"batch {plan['batch']:,}, " if plan["batch"] else ""
    return f"memory budget {plan['budget_bytes'] / 2**20:,.0f} MiB: {batch}{how}"


def plan_memory(n_items: int, top_k: int, batch: int, budget: int | None, tile_items: int = 0,
                kind: str = "cpu", weights_bytes: int = 0) -> MemoryPlan:  # fmt: skip
    """Batch and tile from a memory budget. CPU EP: the untiled graph where [batch, N] fits the budget
    and is at most UNTILED_CELLS cells, else tiles of about TILE_CELLS cells and never wider than the
    budget allows; where not even MIN_TILE items fit, a smaller batch. CUDA EP: always the untiled
    graph, with the batch the budget allows (see `plan_cuda`). `tile_items` forces the tile width
    (the catalog's size or more: one pass)."""
    if kind == "cuda":
        return plan_cuda(n_items, batch, budget or default_gpu_budget(weights_bytes), tile_items)
    budget = budget or default_budget()
    if tile_items:
        if not top_k <= tile_items:
            raise UserError(f"--tile-items must be at least the model's top-k ({top_k}), got {tile_items}")
        return MemoryPlan(budget, batch, min(tile_items, n_items), n_items)
    widest = budget // (batch * CELL_BYTES)
    if widest >= n_items and batch * n_items <= UNTILED_CELLS:
        return MemoryPlan(budget, batch, n_items, n_items)
    floor = min(n_items, max(MIN_TILE, top_k))
    if widest < floor:
        batch, widest = max(1, budget // (floor * CELL_BYTES)), floor
    return MemoryPlan(budget, batch, int(max(min(widest, TILE_CELLS // batch), top_k)), n_items)


def plan_cuda(n_items: int, batch: int, budget: int, tile_items: int = 0) -> MemoryPlan:
    """On CUDA the exported graph runs untiled and the budget (GPU memory) bounds the batch instead.

    Why not tiles there: the untiled graph is one cuBLAS GEMM and one CUDA TopK per step over the
    whole catalog, and at a million items even a batch of a few dozen rows keeps the GPU busy (the
    GEMM is as wide as the catalog), while tiles would add a launch, a merge and a host round trip
    per tile and per step. The weights must fit the GPU's memory (a 5M x 512 float32 model is 10 GiB)."""
    if tile_items and tile_items < n_items:
        raise UserError("--tile-items: tiles run on the CPU execution provider; on CUDA the memory budget "
                        "bounds the batch instead (pass --provider cpu to score in tiles)")  # fmt: skip
    rows = budget // (n_items * CELL_BYTES)
    if rows < 1:
        raise UserError(
            f"one row of scores over {n_items:,} items needs {n_items * CELL_BYTES / 2**20:,.0f} MiB of GPU "
            f"memory, more than the budget of {budget / 2**20:,.0f} MiB: pass a larger --memory-budget, "
            "or --provider cpu to score in tiles"
        )
    return MemoryPlan(budget, int(min(batch, rows)), n_items, n_items)


# ------------------------------------------------------------------------------------------------
def item_tables(model, n_items: int) -> list[str]:
    """Initializers with one row per item (or per padded score column): the tables fed as inputs."""
    return [i.name for i in model.graph.initializer if i.dims and i.dims[0] >= n_items]


def score_gemm(graph):
    """The Gemm that makes the [b, N] scores: the node whose output the target gather reads."""
    producers = {o: n for n in graph.node for o in n.output}
    gathers = [n for n in graph.node if n.op_type == "GatherElements"]
    node = producers.get(gathers[0].input[0]) if len(gathers) == 1 else None
    attrs = {a.name: a for a in node.attribute} if node is not None else {}
    if (
        node is None
        or node.op_type != "Gemm"
        or len(node.input) != 3
        or attrs.get("transB") is None
        or attrs["transB"].i != 1
        or any(a in attrs and attrs[a].f != 1.0 for a in ("alpha", "beta"))
        or attrs.get("transA") is not None
        and attrs["transA"].i != 0
    ):
        raise UserError(
            "evaluation graph: no plain score Gemm (x, W, b) found; re-export to score it in tiles"
        )
    return node


def front_graph(model, n_items: int):
    """(ModelProto, names of item tables, score-matrix name, bias name) of the tiled front graph:
    step_in, hidden_prev, item tables -> hidden_out, gru4rec_x (the score Gemm's input)."""
    import onnx.helper as oh

    model = scoring_graph(model, with_topk=False)
    graph = model.graph
    gemm = score_gemm(graph)
    x, w, b = gemm.input
    tables = item_tables(model, n_items)
    if w not in tables or b not in tables:
        raise UserError("evaluation graph: the score Gemm does not read item tables; re-export")
    elem = next(i for i in graph.initializer if i.name == w).data_type
    for init in [i for i in graph.initializer if i.name in tables]:
        graph.input.append(oh.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        graph.initializer.remove(init)
    graph.node.append(oh.make_node("Identity", [x], ["gru4rec_x"]))
    graph.output.append(oh.make_tensor_value_info("gru4rec_x", elem, ["batch", None]))
    _drop_outputs(graph, {o.name for o in graph.output} - {"hidden_out", "gru4rec_x"})
    read = {i for node in graph.node for i in node.input}
    for unused in [i for i in graph.input if i.name in tables and i.name not in read]:  # e.g. the biases
        graph.input.remove(unused)
    return model, [i for i in tables if i in read], w, b


def half_gemm(inputs: list[str], out: str) -> list:
    """A float16 Gemm as the CPU EP runs the exported one: float32 operands, the result cast back
    (ORT's own float16 kernel rounds differently at some shapes, which would move ties)."""
    import onnx
    import onnx.helper as oh

    F = onnx.TensorProto.FLOAT
    cast = [oh.make_node("Cast", [i], [f"{out}_{n}32"], to=F) for n, i in enumerate(inputs)]
    gemm = oh.make_node("Gemm", [c.output[0] for c in cast], [f"{out}_32"], transB=1)
    return [*cast, gemm, oh.make_node("Cast", [f"{out}_32"], [out], to=onnx.TensorProto.FLOAT16)]


def tile_graph(elem: int, with_topk: bool):
    """x [b,H], t [b,1], W [T,H], bias [T] (+ k, offset, running top-k) and running counts -> updated.

    Output `s` is the tile's scores (float32; a float16 model's scores cast exactly): asked for
    with the target rows as the tile, its diagonal is each row's target score, computed by the
    very ops that score every tile, so the target ties with itself as in the untiled graph."""
    import onnx
    import onnx.helper as oh

    F, I64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
    vi = oh.make_tensor_value_info
    inputs = [
        vi("x", elem, ["b", "h"]),
        vi("t", F, ["b", 1]),
        vi("W", elem, ["T", "h"]),
        vi("bias", elem, ["T"]),
    ]
    inputs += [vi("gt", I64, ["b"]), vi("eq", I64, ["b"])]
    outputs = [vi("gt_out", I64, ["b"]), vi("eq_out", I64, ["b"]), vi("s", F, ["b", "T"])]
    inits = [oh.make_tensor("axis1", I64, [1], [1])]
    if elem == onnx.TensorProto.FLOAT16:
        # float16 scores, compared and ranked as their exact float32 casts (the CPU EP's float16
        # Greater with a broadcast operand calls some equal values greater)
        nodes = half_gemm(["x", "W", "bias"], "s16") + [oh.make_node("Cast", ["s16"], ["s"], to=F)]
    else:
        nodes = [oh.make_node("Gemm", ["x", "W", "bias"], ["s"], transB=1)]
    for op, count, out in (("Greater", "gt", "gt_out"), ("Equal", "eq", "eq_out")):
        nodes += [
            oh.make_node(op, ["s", "t"], [f"{op}_hit"]),
            oh.make_node("Cast", [f"{op}_hit"], [f"{op}_f"], to=F),  # float32 sums: exact below 2**24
            oh.make_node("ReduceSum", [f"{op}_f", "axis1"], [f"{op}_sum"], keepdims=0),
            oh.make_node("Cast", [f"{op}_sum"], [f"{op}_n"], to=I64),
            oh.make_node("Add", [count, f"{op}_n"], [out]),
        ]
    if with_topk:
        inputs += [
            vi("k", I64, [1]),
            vi("offset", I64, []),
            vi("run_v", F, ["b", "K"]),
            vi("run_i", I64, ["b", "K"]),
        ]
        inputs += [vi("K", I64, [1])]
        outputs += [vi("run_v_out", F, ["b", "K"]), vi("run_i_out", I64, ["b", "K"])]
        nodes += [
            oh.make_node("TopK", ["s", "k"], ["tv", "ti"], axis=1),
            oh.make_node("Add", ["ti", "offset"], ["tig"]),
            # earlier tiles first: among equal scores TopK keeps the lower position, the lower item
            oh.make_node("Concat", ["run_v", "tv"], ["cv"], axis=1),
            oh.make_node("Concat", ["run_i", "tig"], ["ci"], axis=1),
            oh.make_node("TopK", ["cv", "K"], ["run_v_out", "pos"], axis=1),
            oh.make_node("GatherElements", ["ci", "pos"], ["run_i_out"], axis=1),
        ]
    graph = oh.make_graph(nodes, "gru4rec_score_tile", inputs, outputs, inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)


def load_tables(model, names: list[str], path: Path) -> dict[str, np.ndarray]:
    """The named initializers of the graph file at `path` as read-only arrays mapped from the file
    their external data names (a weights file, or the graph file itself: `load_without_tables`).
    Nothing is copied: the pages are read as scoring touches them and are the page cache's, so the
    weights are in memory once (reading them through onnx would hold them twice at once: the parsed
    graph and the arrays)."""
    from onnx import TensorProto, helper, numpy_helper

    by_name = {i.name: i for i in model.graph.initializer}
    out = {}
    for name in names:
        t = by_name[name]
        if t.data_location != TensorProto.EXTERNAL:  # stored as typed fields, not raw bytes: small
            out[name] = numpy_helper.to_array(t)
            continue
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
        shape = tuple(int(d) for d in t.dims)
        info = {e.key: e.value for e in t.external_data}
        file, offset = path.parent / info["location"], int(info.get("offset", 0))
        if file.stat().st_size < offset + dtype.itemsize * int(np.prod(shape)):
            raise UserError(f"{file}: weights file is truncated; re-export the model")
        out[name] = np.memmap(file, dtype=dtype, mode="r", offset=offset, shape=shape)
    return out


def run_tiles(session, x: np.ndarray, targets: np.ndarray, W: np.ndarray, bias: np.ndarray, tile: int,
              top_k: int, with_topk: bool) -> StepOutput:  # fmt: skip
    """One step's counts against each row's target item (and top-k) over all items, `tile` rows of
    W at a time through `session` (a `tile_graph`)."""
    b, K = len(x), np.array([top_k], np.int64)
    state = {"gt": np.zeros(b, np.int64), "eq": np.zeros(b, np.int64)}
    if with_topk:
        state |= {"run_v": np.full((b, top_k), -np.inf, np.float32), "run_i": np.zeros((b, top_k), np.int64)}

    def feed(rows, t: np.ndarray, offset: int) -> dict:
        out = {"x": x, "t": t, "W": W[rows], "bias": bias[rows], **state}
        if with_topk:
            k = min(top_k, len(out["bias"]))
            out |= {"k": np.array([k], np.int64), "offset": np.array(offset, np.int64), "K": K}
        return out

    # the targets' own scores, by the ops that score every tile (state and top-k are not read back)
    t = np.ascontiguousarray(
        session.run(["s"], feed(targets, np.zeros((b, 1), np.float32), 0))[0].diagonal()[:, None]
    )
    names = ["gt_out", "eq_out", *(("run_v_out", "run_i_out") if with_topk else ())]
    for lo in range(0, len(W), tile):
        state = dict(
            zip(("gt", "eq", "run_v", "run_i"), session.run(names, feed(slice(lo, lo + tile), t, lo)))
        )
    out = StepOutput(state["gt"], state["eq"])
    if with_topk:
        out.topk_idx, out.topk_scores = state["run_i"], state["run_v"]
    return out


class TiledOrtBackend:
    """Step backend (see score/replay.py) over the eval graph, the item axis in tiles of `tile` items."""

    def __init__(
        self, eval_path: str | Path, n_items: int, top_k: int, n_layers: int, hidden_size: int,
        tile: int, provider: str = "auto", threads: int = 0, with_topk: bool = True,
    ):  # fmt: skip
        import onnx

        from gru4rec.score.latency import cpu_name

        self.kind = resolve_provider(provider)
        if self.kind != "cpu":
            raise UserError(
                "tiled scoring runs on the CPU execution provider; on CUDA the memory budget bounds the "
                "batch instead of tiling (pass --provider cpu to score in tiles)"
            )
        self.n_items, self.top_k, self.tile = int(n_items), int(top_k), int(tile)
        self.n_layers, self.hidden_size, self.with_topk = int(n_layers), int(hidden_size), bool(with_topk)
        eval_path = Path(eval_path)
        try:  # the graph without the item tables' data: they are mapped from the file (load_tables)
            model = load_without_tables(eval_path, self.n_items)
        except Exception as e:
            raise UserError(
                f"{eval_path}: not a readable ONNX model ({str(e).splitlines()[0][:160]})"
            ) from None
        tables = item_tables(model, self.n_items)
        self.tables = load_tables(model, tables, eval_path)
        front, feeds, w, b = front_graph(model, self.n_items)  # (edits `model` in place)
        onnx.external_data_helper.load_external_data_for_model(front, str(eval_path.parent))
        self.feeds = {n: self.tables[n] for n in feeds}
        self.W, self.bias = self.tables[w][: self.n_items], self.tables[b][: self.n_items]
        # The front runs once per step between the tile loops: were its threads left spinning after
        # each run, they would take the cores from the tile session's (docs/performance.md).
        self.front = make_session(front.SerializeToString(), eval_path, "cpu", threads, spin=False)
        elem = onnx.helper.np_dtype_to_tensor_dtype(self.W.dtype)
        tile_model = tile_graph(elem, self.with_topk)
        self.tile_session = make_session(tile_model.SerializeToString(), eval_path, "cpu", threads)
        self.name, self.device, self.tf32, self.io_binding = "ort-cpu-tiled", cpu_name(), False, False

    @classmethod
    def from_bundle(cls, bundle, tile: int, provider: str = "auto", **options) -> TiledOrtBackend:
        return cls(
            bundle.eval_path, bundle.n_items, bundle.top_k, bundle.n_layers, bundle.hidden_size, tile,
            provider, **options,
        )  # fmt: skip

    def start(self, batch_size: int) -> None:
        self.batch = int(batch_size)
        self._stage = np.zeros(4 * max(self.batch, 2), dtype=np.int64)
        self.hidden = np.zeros((self.n_layers, 1, self.hidden_size), dtype=np.float32)

    def step(self, item_idx, target_idx, src_rows, reset_mask, fetch_topk: bool) -> StepOutput:
        if fetch_topk and not self.with_topk:
            raise ValueError("this backend was built without top-k (with_topk=False)")
        n = len(item_idx)
        b = max(n, 2)  # one row runs as two: MLAS takes another (GEMV) path for a single unpacked row
        flat = self._stage
        for r, values in enumerate((item_idx, target_idx, src_rows, ~reset_mask)):
            flat[r * b : r * b + n] = values
            flat[r * b + n : (r + 1) * b] = values[0]
        feed = {"step_in": flat[: 4 * b].reshape(4, b), "hidden_prev": self.hidden, **self.feeds}
        hidden, x = self.front.run(["hidden_out", "gru4rec_x"], feed)
        self.hidden = np.ascontiguousarray(hidden[:, :n])
        out = run_tiles(
            self.tile_session, x, flat[b : b + b], self.W, self.bias, self.tile, self.top_k, self.with_topk
        )
        topk = (out.topk_idx[:n], out.topk_scores[:n]) if fetch_topk else ()
        return StepOutput(out.n_greater[:n], out.n_equal[:n], *topk)


def plan_for(cfg, bundle, kind: str = "cpu") -> MemoryPlan:
    """The memory plan of a scoring run (`score.scorer.ScoreConfig` over a loaded bundle) on the
    execution provider `kind` ('cpu' or 'cuda')."""
    from gru4rec.bundle import weights_bytes

    args = (cfg.memory_budget, cfg.tile_items, kind, weights_bytes(bundle) if kind == "cuda" else 0)
    if cfg.latency_mode == "online":  # one row per step: the batch stays 1
        return replace(plan_memory(bundle.n_items, bundle.top_k, 1, *args), batch=0)  # 0: keep its own
    return plan_memory(bundle.n_items, bundle.top_k, cfg.batch_size, *args)


def tiled(tile: int, n_items: int) -> bool:
    """Whether tiles of `tile` items (0: none) take the tiled backend: they split the catalog."""
    return 0 < tile < n_items


def make_backend(bundle, tile: int, provider: str = "auto", tf32: bool = False, with_topk: bool = True,
                 threads: int = 0):  # fmt: skip
    """The step backend for tiles of `tile` items: the exported eval graph where one tile is the
    whole catalog (0 too), else the tiled backend."""
    from gru4rec.score.ort_backend import OrtBackend

    if tiled(tile, bundle.n_items):
        return TiledOrtBackend.from_bundle(bundle, tile, provider, threads=threads, with_topk=with_topk)
    return OrtBackend.from_bundle(bundle, provider, tf32, threads=threads, with_topk=with_topk)
