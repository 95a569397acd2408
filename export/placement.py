"""Which execution provider ran each node: `python -m gru4rec.export.placement m.onnx [--batch 256]`.

Runs the graph once (random inputs of the documented shapes) with ONNX Runtime's profiler on and
reads the provider of every node from the profile, so the answer is what actually ran, after ORT's
graph optimisations and memcpy insertion. Prints a count per provider and every node that is not
on the wanted provider (default CUDAExecutionProvider); exit 1 if there is any such node or a
Memcpy node (a host<->device copy inside the step), 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

PROVIDER_NAMES = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}


def random_feed(session, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of the gru4rec step graphs: item/target indices below n_items, a random hidden state."""
    meta = session.get_modelmeta().custom_metadata_map
    n_items = int(meta.get("n_items", 1))
    rng = np.random.default_rng(seed)
    feed = {}
    for inp in session.get_inputs():
        if inp.name == "hidden":
            L, _, H = inp.shape
            feed[inp.name] = rng.standard_normal((L, batch, H)).astype(np.float32) * 0.1
        else:
            feed[inp.name] = rng.integers(0, n_items, batch)
    return feed


def node_placements(
    path: str | Path, provider: str = "CUDAExecutionProvider", batch: int = 256, runs: int = 2
):
    """-> list of (node name, op type, provider) for every node that ran, from ORT's profiler."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.log_severity_level = 3
    with tempfile.TemporaryDirectory() as tmp:
        opts.profile_file_prefix = os.path.join(tmp, "ort_profile")
        providers = [provider] + (["CPUExecutionProvider"] if provider != "CPUExecutionProvider" else [])
        session = ort.InferenceSession(str(path), opts, providers=providers)
        feed = random_feed(session, batch)
        for _ in range(runs):  # the first run can take a different (warm-up) path
            session.run(None, feed)
        profile = session.end_profiling()
        events = json.loads(Path(profile).read_text())
    seen: dict[str, tuple[str, str, str]] = {}
    for ev in events:
        args = ev.get("args") or {}
        if ev.get("cat") == "Node" and "provider" in args and ev.get("name", "").endswith("_kernel_time"):
            name = ev["name"][: -len("_kernel_time")]
            seen[name] = (name, args.get("op_name", "?"), args["provider"])
    return list(seen.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gru4rec.export.placement", description=__doc__.splitlines()[0]
    )
    parser.add_argument("model", nargs="+", help="ONNX file(s), e.g. m.onnx m.eval.onnx")
    parser.add_argument("--provider", choices=sorted(PROVIDER_NAMES), default="cuda", help="wanted provider")
    parser.add_argument("--batch", type=int, default=256, help="batch size of the profiled run")
    args = parser.parse_args(argv)
    wanted = PROVIDER_NAMES[args.provider]
    bad_total = 0
    for path in args.model:
        nodes = node_placements(path, wanted, args.batch)
        counts = Counter(p for _, _, p in nodes)
        off = [(n, op, p) for n, op, p in nodes if p != wanted or op.startswith("Memcpy")]
        print(f"{path}: {len(nodes)} nodes ran; " + ", ".join(f"{p}: {c}" for p, c in counts.most_common()))
        for name, op, prov in off:
            print(f"  not on {wanted}: {op} {name} ({prov})")
        bad_total += len(off)
    print("all nodes on " + wanted if bad_total == 0 else f"{bad_total} node(s) off {wanted}")
    return 0 if bad_total == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
