"""Unequal GRU layer sizes (e.g. layers=64,32): the padded [L, B, max(H)] state of the exported graphs.

The reference step (test_export.layered_reference_step) is written in float64 from the spec (torch.nn.GRUCell per torch-cell layer,
each of its own size; the original GRU4Rec cell by formula for a one-hot first layer).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import polars as pl
import pytest
from test_export import ALLOWED_OPS
from test_export import layered_reference_step as reference_step
from test_export import random_model as export_random_model
from test_replay import assert_metrics_equal, brute_force_counts, random_events, reference_metrics

from gru4rec import checkpoint as ckpt_io
from gru4rec.bundle import load_bundle, pad_layers
from gru4rec.evaluate import evaluate
from gru4rec.export.onnx_export import export_bundle
from gru4rec.export.verify import ort_session
from gru4rec.items import ItemMap
from gru4rec.model import GRU4Rec
from gru4rec.score.scorer import ScoreConfig, score, score_source
from gru4rec.score.source import SessionSource
from gru4rec.score.torch_backend import TorchBackend

N, D, TOP_K = 200, 12, 10
MODES = {
    "shared": {},
    "separate": {"constrained_embedding": False, "embedding": D},
    "onehot": {"constrained_embedding": False, "embedding": 0},
}


def random_model(layers, mode: str, seed: int) -> GRU4Rec:
    return export_random_model(mode, len(layers), seed, n_items=N, layers=layers)


def save(model: GRU4Rec, path, seed: int = 0) -> None:
    ids = np.random.default_rng(seed).choice(10**9, model.cfg.n_items, replace=False).astype(np.int64)
    ck = ckpt_io.Checkpoint(model, ItemMap(ids), params={"layers": model.cfg.layers}, data_fingerprint="fp")
    with pytest.MonkeyPatch.context() as mp:  # plain-string versions (weights_only load), as test_export
        original = ckpt_io.versions
        mp.setattr(ckpt_io, "versions", lambda: {k: str(v) for k, v in original().items()})
        ckpt_io.save(ck, path)


def plain_ops(path) -> set[str]:
    """Op types of the graph once ONNX Runtime has folded its constant-only nodes (the Pad widths, which
    torch writes as a small ConstantOfShape/Slice/Transpose chain over constants); no Shape op at all."""
    import onnxruntime as ort

    assert "Shape" not in {n.op_type for n in onnx.load(str(path)).graph.node}
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(path) + ".folded"
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return {n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("layers")
    out = {}
    for i, layers in enumerate([(64, 32), (32, 64)]):
        for j, mode in enumerate(MODES):
            model = random_model(layers, mode, seed=10 * i + j)
            name = f"{mode}-{layers[0]}-{layers[1]}"
            save(model, root / f"{name}.pt", seed=i)
            result = export_bundle(root / f"{name}.pt", root / name / "m.onnx", top_k=TOP_K)
            out[layers, mode] = (model, result)
    return out


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("layers", [(64, 32), (32, 64)])
@pytest.mark.parametrize("batch", [1, 7])
def test_padded_state_parity_with_float64_reference(exported, layers, mode, batch):
    model, result = exported[layers, mode]
    assert result.report.passed  # export's own verification (PyTorch float32 vs ORT) ran and passed
    bundle = load_bundle(result.onnx_path)
    assert (bundle.n_layers, bundle.hidden_size, bundle.layer_sizes) == (2, 64, layers)
    for path in (result.onnx_path, result.eval_path):  # a Split and a Pad per narrow layer, no Shape
        assert plain_ops(path) <= ALLOWED_OPS
    serving, evaluation = ort_session(result.onnx_path), ort_session(result.eval_path)
    assert [i.shape for i in serving.get_inputs() if i.name == "hidden"] == [[2, "batch", 64]]
    rng = np.random.default_rng(batch)
    ref_h = [np.zeros((batch, n)) for n in layers]
    h_srv = h_evl = np.zeros((2, batch, 64), np.float32)
    for _ in range(6):
        x, t = rng.integers(0, N, batch), rng.integers(0, N, batch)
        keep = rng.random(batch) > 0.3
        ref_h = [h * keep[:, None] for h in ref_h]
        h_srv, h_evl = h_srv * keep[None, :, None], h_evl * keep[None, :, None]
        ref, ref_h = reference_step(model, x, ref_h)
        scores, h_srv, top_s, top_i = serving.run(None, {"item_idx": x, "hidden": h_srv})
        h_evl, etop_s, etop_i, n_gt, n_eq = evaluation.run(
            None, {"item_idx": x, "hidden": h_evl, "target_idx": t}
        )
        assert np.abs(scores - ref).max() <= 1e-4 and scores.std() > 0.5
        for h in (h_srv, h_evl):
            for layer, n in enumerate(layers):
                assert np.abs(h[layer, :, :n] - ref_h[layer]).max() <= 1e-5
                assert not h[layer, :, n:].any()  # the padding beyond a layer's size is written as 0
        rows = np.arange(batch)[:, None]
        assert np.abs(top_s - ref[rows, top_i]).max() <= 1e-4 and np.array_equal(top_i, etop_i)
        assert np.array_equal(top_i, np.argsort(-ref, 1, kind="stable")[:, :TOP_K])
        delta = ref - ref[np.arange(batch), t][:, None]  # items within 2e-4 of the target may go either way
        assert np.all((n_gt >= (delta > 2e-4).sum(1)) & (n_gt <= (delta >= -2e-4).sum(1) - 1))
        assert np.all((n_eq >= 1) & (n_eq <= (np.abs(delta) <= 2e-4).sum(1)))


@pytest.mark.parametrize("layers", [(64, 32), (32, 64)])
def test_padding_columns_of_the_input_state_are_ignored(exported, layers):
    _, result = exported[layers, "shared"]
    sess = ort_session(result.onnx_path)
    rng = np.random.default_rng(0)
    x = rng.integers(0, N, 5)
    h = pad_layers([rng.standard_normal((5, n)) for n in layers], 64)
    junk = h.copy()
    for layer, n in enumerate(layers):
        junk[layer, :, n:] = rng.standard_normal((5, 64 - n))
    clean, dirty = (
        sess.run(None, {"item_idx": x, "hidden": h}),
        sess.run(None, {"item_idx": x, "hidden": junk}),
    )
    for a, b in zip(clean, dirty):
        assert np.array_equal(a, b)


def test_cli_trains_exports_and_scores_unequal_layers(tmp_path, run):
    """The new user's path: `train -p layers=16,8`, `export`, `score`: ORT metrics == PyTorch evaluate."""
    events = random_events(400, 40, seed=3)
    tr, te = events.filter(pl.col("session_id") % 5 != 0), events.filter(pl.col("session_id") % 5 == 0)
    tr.write_parquet(tmp_path / "tr.parquet")
    te.write_parquet(tmp_path / "te.parquet")
    code, _, err = run("train", tmp_path / "tr.parquet", "--out", tmp_path / "m.pt", "--epochs", "2",
                       "-p", "layers=16,8", "-p", "n_sample=16", "-p", "batch_size=16",
                       "--device", "cpu", "--threads", "1")  # fmt: skip
    assert code == 0, err
    code, out, err = run("export", tmp_path / "m.pt", "--out", tmp_path / "m.onnx", "--top-k", "5")
    assert code == 0, err
    assert "16,8 (state padded to 16)" in out
    code, _, err = run("score", "--model", tmp_path / "m.onnx", "--sessions", tmp_path / "te.parquet",
                       "--metrics", tmp_path / "metrics.json", "--provider", "cpu")  # fmt: skip
    assert code == 0, err
    got = json.loads((tmp_path / "metrics.json").read_text())["metrics"]

    ck = ckpt_io.load(tmp_path / "m.pt")
    assert ck.model.cfg.layers == [16, 8]
    want = reference_metrics(brute_force_counts(ck.model, ck.items.ids, te), "standard")
    assert want["n"] > 100
    assert_metrics_equal(got, want)
    torch_path = evaluate(ck.model, ck.items, te, batch_size=7)
    assert_metrics_equal(torch_path, want)
    # and through the Python API, at a batch where the replay shrinks and moves states between rows
    report = score(
        tmp_path / "m.onnx", tmp_path / "te.parquet", config=ScoreConfig(batch_size=7), provider="cpu"
    )
    assert_metrics_equal(report["metrics"], want)
    source = SessionSource(tmp_path / "te.parquet")
    torch_score = score_source(TorchBackend(ck.model, 5), ck.items, source, ScoreConfig(k=5, batch_size=7))
    assert_metrics_equal(torch_score["metrics"], want)
