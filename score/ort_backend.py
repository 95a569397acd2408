"""The replay step on ONNX Runtime: the exported evaluation graph, CUDA EP with IOBinding or CPU EP.

Session resets happen outside the exported graph (spec §2.7). Rather than a second session or a
host round trip, the scorer wraps the graph it loads (`scoring_graph`): in front, the state rows
are gathered to their new positions and reset rows zeroed; behind, the two counts are packed into
one output. One run per step then does state moves, GRU step, top-k and target counts.

With IOBinding (the CUDA default) inputs and outputs live in pre-allocated device buffers: two
hidden buffers ping-pong (`hidden_out` of one step is `hidden_prev` of the next and never leaves
the device), the packed step input is copied in place (fixed addresses, as CUDA graphs need) and
only the counts, plus top-k when asked, come back. Buffers have the full batch's capacity and are
bound with each step's own shape, so a shrinking tail reuses them. `cuda_graph=True` asks ORT to
capture each (shape, buffer) combination as a CUDA graph; that needs every node on the CUDA EP.
On CPU plain `run()` is as fast, so it is the default there.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from gru4rec.errors import UserError
from gru4rec.score.replay import StepOutput

PROVIDERS = ("auto", "cuda", "cpu")
CUDA_EP, CPU_EP = "CUDAExecutionProvider", "CPUExecutionProvider"


def cuda_usable() -> bool:
    """Whether the CUDA EP really loads (onnxruntime-gpu lists it even where no GPU or CUDA exists)."""
    import onnx
    import onnx.helper as oh
    import onnxruntime as ort

    if CUDA_EP not in ort.get_available_providers():
        return False
    x = oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    probe = oh.make_model(
        oh.make_graph([oh.make_node("Relu", ["x"], ["y"])], "probe", [x], [y]),
        opset_imports=[oh.make_opsetid("", 17)],
        ir_version=8,
    )
    so = ort.SessionOptions()
    so.log_severity_level = 4  # the failed library load is expected here; keep it off the terminal
    ort.set_default_logger_severity(4)
    try:
        sess = ort.InferenceSession(probe.SerializeToString(), so, providers=[CUDA_EP, CPU_EP])
        return sess.get_providers()[0] == CUDA_EP
    except Exception:
        return False
    finally:
        ort.set_default_logger_severity(3)


def resolve_provider(provider: str) -> str:
    """'auto' | 'cuda' | 'cpu' -> 'cuda' or 'cpu'; a one-line notice when auto falls back to CPU."""
    if provider not in PROVIDERS:
        raise UserError(f"--provider must be one of {', '.join(PROVIDERS)}, got {provider!r}")
    if provider == "cpu":
        return "cpu"
    if cuda_usable():
        return "cuda"
    if provider == "cuda":
        raise UserError(
            "--provider cuda: the ONNX Runtime CUDA execution provider is not usable on this machine"
        )
    print(
        "notice: CUDA is not available; scoring with the ONNX Runtime CPU execution provider", file=sys.stderr
    )
    return "cpu"


def scoring_graph(model, with_topk: bool = True):
    """The eval graph wrapped for replay: one packed int64 input `step_in` [4, b] and a `counts` output.

    Without top-k (metrics only, no recommendations written) the TopK branch is cut out of the
    graph: ranks need only the counts, and TopK over the [b, N] scores is the most expensive node.

    step_in rows: item_idx, target_idx, src_rows, keep (0/1). In front of the exported graph:
    hidden = Gather(hidden_prev [L, b_prev, H], src_rows, axis=1) * keep, so a step moves each
    session's state to its new row (the batch may shrink) and zeroes reset rows on the device.
    Behind it: counts = [n_greater; n_equal] as one [2, b] tensor. One host-to-device and one
    device-to-host copy per step (two with top-k) instead of four each.
    """
    import onnx
    import onnx.helper as oh

    graph = model.graph
    by_name = {i.name: i for i in graph.input}
    if not {"item_idx", "hidden", "target_idx"} <= set(by_name):
        raise UserError("evaluation graph lacks item_idx/hidden/target_idx inputs; re-export the model")
    hidden = by_name["hidden"]
    hidden.name = "hidden_prev"
    hidden.type.tensor_type.shape.dim[1].dim_param = "batch_prev"
    elem = hidden.type.tensor_type.elem_type
    for name in ("item_idx", "target_idx"):
        graph.input.remove(by_name[name])
    graph.input.append(oh.make_tensor_value_info("step_in", onnx.TensorProto.INT64, [4, "batch"]))
    graph.output.append(oh.make_tensor_value_info("counts", onnx.TensorProto.INT64, [2, "batch"]))
    consts = {
        f"gru4rec_row{i}": oh.make_tensor(f"gru4rec_row{i}", onnx.TensorProto.INT64, [], [i])
        for i in range(4)
    }
    consts["gru4rec_keep_shape"] = oh.make_tensor(
        "gru4rec_keep_shape", onnx.TensorProto.INT64, [3], [1, -1, 1]
    )
    consts["gru4rec_row_shape"] = oh.make_tensor("gru4rec_row_shape", onnx.TensorProto.INT64, [2], [1, -1])
    graph.initializer.extend(consts.values())
    front = [
        oh.make_node("Gather", ["step_in", "gru4rec_row0"], ["item_idx"], axis=0),
        oh.make_node("Gather", ["step_in", "gru4rec_row1"], ["target_idx"], axis=0),
        oh.make_node("Gather", ["step_in", "gru4rec_row2"], ["gru4rec_src"], axis=0),
        oh.make_node("Gather", ["step_in", "gru4rec_row3"], ["gru4rec_keep_i"], axis=0),
        oh.make_node("Cast", ["gru4rec_keep_i"], ["gru4rec_keep_f"], to=elem),
        oh.make_node("Reshape", ["gru4rec_keep_f", "gru4rec_keep_shape"], ["gru4rec_keep"]),
        oh.make_node("Gather", ["hidden_prev", "gru4rec_src"], ["gru4rec_moved"], axis=1),
        oh.make_node("Mul", ["gru4rec_moved", "gru4rec_keep"], ["hidden"]),
    ]
    back = [
        oh.make_node("Reshape", ["n_greater", "gru4rec_row_shape"], ["gru4rec_g"]),
        oh.make_node("Reshape", ["n_equal", "gru4rec_row_shape"], ["gru4rec_e"]),
        oh.make_node("Concat", ["gru4rec_g", "gru4rec_e"], ["counts"], axis=0),
    ]
    for i, node in enumerate(front):
        graph.node.insert(i, node)
    graph.node.extend(back)
    if not with_topk:
        _drop_outputs(graph, {"topk_idx", "topk_scores"})
    return model


def _drop_outputs(graph, names: set[str]) -> None:
    """Remove graph outputs, then every node nothing needs any more (walking back from the end)."""
    for out in [o for o in graph.output if o.name in names]:
        graph.output.remove(out)
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(keep))
    for init in [i for i in graph.initializer if i.name not in needed]:
        graph.initializer.remove(init)


def make_session(
    model: bytes | str | Path,
    source: str | Path,
    kind: str,
    threads: int = 0,
    tf32: bool = False,
    cuda_graph: bool = False,
    spin: bool = True,
):
    """An ONNX Runtime session on `kind` ('cuda' or 'cpu', see `resolve_provider`) for a serialized
    graph or a file; UserError (naming `source`) when ORT cannot load it or the CUDA EP does not
    take it. `threads` 0 = ORT's default intra-op thread count. A serialized graph's external data
    (if any) is read from `source`'s folder. `spin=False`: the intra-op threads sleep as soon as a
    run ends, for a session that runs briefly between another session's runs."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not isinstance(model, str | Path):
        so.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", str(Path(source).parent)
        )
    if threads:
        so.intra_op_num_threads = threads
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers: list = [CPU_EP]
    if kind == "cuda":
        options = {"device_id": 0, "use_tf32": int(tf32), "enable_cuda_graph": int(cuda_graph)}
        providers = [(CUDA_EP, options), CPU_EP]
    model = str(model) if isinstance(model, Path) else model
    try:
        session = ort.InferenceSession(model, so, providers=providers)
    except Exception as e:
        raise UserError(
            f"{source}: ONNX Runtime cannot load the graph ({str(e).splitlines()[0][:160]})"
        ) from None
    if kind == "cuda" and session.get_providers()[0] != CUDA_EP:
        raise UserError("the CUDA execution provider failed to initialise for this model")
    return session


def gpu_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:
        pass
    return "CUDA device 0"


class OrtBackend:
    def __init__(
        self,
        eval_path: str | Path,
        n_items: int,
        top_k: int,
        n_layers: int,
        hidden_size: int,
        provider: str = "auto",
        tf32: bool = False,
        threads: int = 0,
        cuda_graph: bool = False,
        io_binding: bool | None = None,
        with_topk: bool = True,
    ):
        """`io_binding` defaults to on for CUDA, off for CPU (forcing it on CPU tests the same path).

        `with_topk=False` builds a ranks-only graph (metrics without recommendations)."""
        import onnx

        from gru4rec.score.latency import cpu_name

        self.kind = resolve_provider(provider)
        self.n_items, self.top_k = int(n_items), int(top_k)
        self.n_layers, self.hidden_size = int(n_layers), int(hidden_size)
        try:
            model = scoring_graph(onnx.load(str(eval_path), load_external_data=False), with_topk)
        except UserError:
            raise
        except Exception as e:
            raise UserError(
                f"{eval_path}: not a readable ONNX model ({str(e).splitlines()[0][:160]})"
            ) from None
        self.cuda_graph = bool(cuda_graph) and self.kind == "cuda"
        self.session = make_session(
            model.SerializeToString(), eval_path, self.kind, threads, tf32, self.cuda_graph
        )
        self.name = f"ort-{self.kind}"
        self.device = gpu_name() if self.kind == "cuda" else cpu_name()
        self.tf32 = bool(tf32) and self.kind == "cuda"
        self.io_binding = self.kind == "cuda" if io_binding is None else bool(io_binding)
        self.ort_device = "cuda" if self.kind == "cuda" else "cpu"
        self.batch: int | None = None
        self._graph_ids = 0  # ORT keeps every captured graph for the session's lifetime: never reuse an id
        self.with_topk = bool(with_topk)

    @classmethod
    def from_bundle(cls, bundle, provider: str = "auto", tf32: bool = False, **options) -> OrtBackend:
        """The evaluation graph of a loaded `gru4rec.bundle.ModelBundle`."""
        return cls(
            bundle.eval_path,
            bundle.n_items,
            bundle.top_k,
            bundle.n_layers,
            bundle.hidden_size,
            provider,
            tf32,
            **options,
        )

    # ----------------------------------------------------------------------------------------------
    def start(self, batch_size: int) -> None:
        """Capacity for `batch_size` rows; zero state. Buffers are reused when the capacity is unchanged."""
        B = int(batch_size)
        self._stage = np.zeros(4 * B, dtype=np.int64)
        self._prev_width = 1
        if not self.io_binding:
            self.hidden = np.zeros((self.n_layers, 1, self.hidden_size), dtype=np.float32)
        elif self.batch == B:
            for h in self._hidden:  # same addresses (captured CUDA graphs stay valid), zeroed
                h.update_inplace(np.zeros(h.shape(), dtype=np.float32))
        else:
            self._allocate(B)
        self.batch = B

    def _allocate(self, B: int) -> None:
        import onnxruntime as ort

        def buf(shape, dtype) -> ort.OrtValue:
            return ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype=dtype), self.ort_device, 0)

        L, H, K = self.n_layers, self.hidden_size, self.top_k
        self._hidden = (buf((L, B, H), np.float32), buf((L, B, H), np.float32))
        self._in = buf((4, B), np.int64)
        self._counts, self._topk_idx, self._topk_scores = (
            buf((2, B), np.int64),
            buf((B, K), np.int64),
            buf((B, K), np.float32),
        )
        self._bindings: dict = {}
        self._parity = 0

    def _binding(self, b_prev: int, b: int):
        """IOBinding for a step of width b after one of width b_prev, reading hidden[parity].

        Capacity buffers are bound with the step's own shape: a [.., b, ..] tensor occupies the
        buffer's first elements, and the next step reads it back with the same shape.
        """
        import onnxruntime as ort

        key = (b_prev, b, self._parity)
        if key not in self._bindings:
            L, H, K, dev = self.n_layers, self.hidden_size, self.top_k, self.ort_device
            src, dst = self._hidden[self._parity], self._hidden[1 - self._parity]
            io = self.session.io_binding()
            io.bind_input("step_in", dev, 0, np.int64, [4, b], self._in.data_ptr())
            io.bind_input("hidden_prev", dev, 0, np.float32, [L, b_prev, H], src.data_ptr())
            io.bind_output("hidden_out", dev, 0, np.float32, [L, b, H], dst.data_ptr())
            io.bind_output("counts", dev, 0, np.int64, [2, b], self._counts.data_ptr())
            if self.with_topk:
                io.bind_output("topk_idx", dev, 0, np.int64, [b, K], self._topk_idx.data_ptr())
                io.bind_output("topk_scores", dev, 0, np.float32, [b, K], self._topk_scores.data_ptr())
            ro = ort.RunOptions()
            if self.cuda_graph:  # one graph per (shape, buffer) combination: its addresses are fixed
                self._graph_ids += 1
                ro.add_run_config_entry("gpu_graph_id", str(self._graph_ids))
            self._bindings[key] = (io, ro)
        return self._bindings[key]

    def step(
        self,
        item_idx: np.ndarray,
        target_idx: np.ndarray,
        src_rows: np.ndarray,
        reset_mask: np.ndarray,
        fetch_topk: bool,
    ) -> StepOutput:
        if fetch_topk and not self.with_topk:
            raise ValueError("this backend was built without top-k (with_topk=False)")
        b = len(item_idx)
        flat = self._stage  # rows item, target, src, keep of this step, packed at the front
        for r, values in enumerate((item_idx, target_idx, src_rows, ~reset_mask)):
            flat[r * b : (r + 1) * b] = values
        if not self.io_binding:
            names = ["hidden_out", "counts", *(("topk_idx", "topk_scores") if fetch_topk else ())]
            res = self.session.run(
                names, {"step_in": flat[: 4 * b].reshape(4, b), "hidden_prev": self.hidden}
            )
            self.hidden = res[0]
            return StepOutput(res[1][0], res[1][1], *(res[2:] if fetch_topk else ()))
        # The whole staging array goes over (fixed size and address); the graph reads its first 4b values.
        self._in.update_inplace(flat.reshape(4, self.batch))
        io, ro = self._binding(self._prev_width, b)
        self.session.run_with_iobinding(io, ro)
        self._parity, self._prev_width = 1 - self._parity, b
        counts = self._counts.numpy().reshape(-1)[: 2 * b].reshape(2, b)
        out = StepOutput(counts[0], counts[1])
        if fetch_topk:
            K = self.top_k
            out.topk_idx = self._topk_idx.numpy().reshape(-1)[: b * K].reshape(b, K)
            out.topk_scores = self._topk_scores.numpy().reshape(-1)[: b * K].reshape(b, K)
        return out
