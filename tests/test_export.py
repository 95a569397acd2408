"""Export: ONNX graphs vs an independent float64 reference, tie counts, top-k, bundle checks, CLI errors.

The reference step is written here from the spec (torch.nn.GRUCell in float64 for the torch-cell
layers, the original GRU4Rec cell by formula for the one-hot layer), not taken from the exporter.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import polars as pl
import pytest
import torch

from gru4rec import checkpoint as ckpt_io
from gru4rec.bundle import companion_paths, items_sha256, load_bundle, scan_metadata_props
from gru4rec.errors import UserError
from gru4rec.export.onnx_export import export_bundle
from gru4rec.export.verify import VerificationFailed, ort_session
from gru4rec.items import ItemMap
from gru4rec.model import GRU4Rec, ModelConfig

N, H, D = 300, 16, 12
MODES = {
    "shared": {},
    "separate": {"constrained_embedding": False, "embedding": D},
    "onehot": {"constrained_embedding": False, "embedding": 0},
}
ALLOWED_OPS = {
    "Gather", "Gemm", "MatMul", "Sigmoid", "Tanh", "Add", "Sub", "Mul", "Split", "Squeeze", "Unsqueeze",
    "Concat", "Constant", "TopK", "Cast", "GatherElements", "Greater", "Equal", "ReduceSum", "Pad", "Reshape",
}  # fmt: skip


def random_model(mode: str, n_layers: int, seed: int, n_items: int = N, layers=None) -> GRU4Rec:
    """Random weights scaled up so scores spread out (a fresh init gives near-ties everywhere);
    `layers`: the layer sizes, else n_layers of H."""
    sizes = list(layers) if layers is not None else [H] * n_layers
    model = GRU4Rec(ModelConfig(n_items=n_items, layers=sizes, **MODES[mode]), seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.Wy.mul_(10)
        model.By.uniform_(-1, 1, generator=g)
        for p in [*model.b_ih, *model.b_hh] + ([model.Bx0] if mode == "onehot" else []):
            p.uniform_(-0.5, 0.5, generator=g)
    return model.eval()


def save_model(model: GRU4Rec, path, seed: int = 0):
    ids = np.random.default_rng(seed).choice(10**9, model.cfg.n_items, replace=False).astype(np.int64)
    ckpt = ckpt_io.Checkpoint(model, ItemMap(ids), params={"loss": "cross-entropy", "layers": model.cfg.layers},
                              data_fingerprint=f"fp-{seed}")  # fmt: skip
    # checkpoint.versions() returns torch's TorchVersion (not weights_only-loadable); store plain
    # strings until the core module does (harmless once it does).
    with pytest.MonkeyPatch.context() as mp:
        original = ckpt_io.versions
        mp.setattr(ckpt_io, "versions", lambda: {k: str(v) for k, v in original().items()})
        ckpt_io.save(ckpt, path)
    return ckpt


# ---------------------------------------------------------------------------------------------- reference
def reference_step(model: GRU4Rec, x: np.ndarray, hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 step from the spec: (scores [B,N], hidden [L,B,H])."""
    scores, states = layered_reference_step(model, x, list(hidden))
    return scores, np.stack(states)


def layered_reference_step(model: GRU4Rec, x: np.ndarray, states: list[np.ndarray]):
    """float64, any layer sizes: (scores [B, N], per-layer states [B, H_l])."""
    sd = {k: v.detach().double() for k, v in model.state_dict().items()}
    sizes = model.cfg.layers
    idx = torch.from_numpy(x)
    hs = [torch.from_numpy(h).double() for h in states]
    out = []
    if model.cfg.mode == "onehot":  # original cell, blocks [c, r, z]
        H, h = sizes[0], hs[0]
        gx = sd["Wx0"][idx] + sd["Bx0"]
        rz = h @ sd["Wrz0"]
        r, z = torch.sigmoid(gx[:, H : 2 * H] + rz[:, :H]), torch.sigmoid(gx[:, 2 * H :] + rz[:, H:])
        inp = (1 - z) * h + z * torch.tanh(gx[:, :H] + (r * h) @ sd["Wh0"])
        out.append(inp)
        hs, sizes = hs[1:], sizes[1:]
    else:
        inp = (sd["Wy"] if model.cfg.mode == "shared" else sd["E"])[idx]
    for layer, (h, H) in enumerate(zip(hs, sizes)):
        cell = torch.nn.GRUCell(inp.shape[1], H).double()
        cell.load_state_dict({
            "weight_ih": sd[f"W_ih.{layer}"], "weight_hh": sd[f"W_hh.{layer}"],
            "bias_ih": sd[f"b_ih.{layer}"], "bias_hh": sd[f"b_hh.{layer}"],
        })  # fmt: skip
        with torch.no_grad():
            inp = cell(inp, h)
        out.append(inp)
    scores = inp @ sd["Wy"].T + sd["By"].T
    return scores.numpy(), [h.numpy() for h in out]


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One verified export per (input mode, number of layers): (model, ExportResult)."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for i, (mode, n_layers) in enumerate([(m, L) for m in MODES for L in (1, 2)]):
        model = random_model(mode, n_layers, seed=10 + i)
        save_model(model, root / f"{mode}{n_layers}.pt", seed=i)
        result = export_bundle(root / f"{mode}{n_layers}.pt", root / f"{mode}{n_layers}" / "m.onnx", top_k=10)
        out[mode, n_layers] = (model, result)
    return out


def replay(model, result, batch: int, steps: int, seed: int):
    """Run both graphs and the reference over `steps` steps with random resets; yield per-step arrays."""
    rng = np.random.default_rng(seed)
    serving, evaluation = ort_session(result.onnx_path), ort_session(result.eval_path)
    L = len(model.cfg.layers)
    h_ref, h_srv, h_evl = (np.zeros((L, batch, H), np.float32) for _ in range(3))
    for _ in range(steps):
        x, t = rng.integers(0, N, batch), rng.integers(0, N, batch)
        keep = (rng.random(batch) > 0.3)[None, :, None]
        h_ref, h_srv, h_evl = h_ref * keep, h_srv * keep, h_evl * keep
        ref_scores, h_ref = reference_step(model, x, h_ref)
        scores, h_srv, top_s, top_i = serving.run(None, {"item_idx": x, "hidden": h_srv.astype(np.float32)})
        h_evl, etop_s, etop_i, n_gt, n_eq = evaluation.run(
            None, {"item_idx": x, "hidden": h_evl.astype(np.float32), "target_idx": t}
        )
        yield dict(x=x, t=t, ref=ref_scores, h_ref=h_ref, scores=scores, h=h_srv, top_s=top_s, top_i=top_i,
                   h_eval=h_evl, etop_s=etop_s, etop_i=etop_i, n_gt=n_gt, n_eq=n_eq)  # fmt: skip


# ---------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("n_layers", [1, 2])
def test_parity_with_float64_reference(exported, mode, n_layers):
    model, result = exported[mode, n_layers]
    assert result.report.passed and result.report.max_score_diff <= 1e-4
    for s in replay(model, result, batch=9, steps=5, seed=n_layers):
        assert np.abs(s["scores"] - s["ref"]).max() <= 1e-4
        assert np.abs(s["h"] - s["h_ref"]).max() <= 1e-5
        assert np.abs(s["h_eval"] - s["h_ref"]).max() <= 1e-5
        assert s["scores"].std() > 0.5  # the test model's scores are spread out, not near-tied


def test_dynamic_batch_one_file(exported):
    model, result = exported["shared", 2]
    session = ort_session(result.onnx_path)
    for batch in (1, 7, 256):
        x = np.arange(batch) * 7 % N
        h = np.random.default_rng(batch).standard_normal((2, batch, H)).astype(np.float32) * 0.5
        scores, h_out, top_s, top_i = session.run(None, {"item_idx": x, "hidden": h})
        ref_scores, ref_h = reference_step(model, x, h)
        assert scores.shape == (batch, N) and h_out.shape == (2, batch, H) and top_i.shape == (batch, 10)
        assert np.abs(scores - ref_scores).max() <= 1e-4 and np.abs(h_out - ref_h).max() <= 1e-5


def test_topk_matches_torch_topk(exported):
    model, result = exported["separate", 1]
    for s in replay(model, result, batch=64, steps=3, seed=5):
        vals, idx = torch.topk(torch.from_numpy(s["scores"]), 10, dim=1)
        np.testing.assert_array_equal(s["top_s"], vals.numpy())  # same scores: values exactly equal
        np.testing.assert_array_equal(s["etop_i"], s["top_i"])
        differ = s["top_i"] != idx.numpy()
        # indices may differ only between exactly tied scores
        assert np.all(s["scores"][np.nonzero(differ)[0], s["top_i"][differ]] == vals.numpy()[differ])
        # and against the float64 reference: same items, but for near-ties below fp32 rounding
        ref_val, ref_idx = torch.topk(torch.from_numpy(s["ref"]), 10, dim=1)
        swapped = s["top_i"] != ref_idx.numpy()
        rows = np.nonzero(swapped)[0]
        assert np.all(np.abs(s["ref"][rows, s["top_i"][swapped]] - ref_val.numpy()[swapped]) <= 2e-4)


@pytest.mark.parametrize("count_block,topk_chunks", [(0, 0), (64, 4)])
def test_eval_counts_brute_force_with_planted_ties(tmp_path, count_block, topk_chunks):
    model = random_model("shared", 1, seed=3)
    tied = np.arange(20, 60)  # 40 items that always score exactly 0.25: zero rows, equal biases
    with torch.no_grad():
        model.Wy[tied] = 0.0
        model.By[tied] = 0.25
    save_model(model, tmp_path / "m.pt")
    result = export_bundle(
        tmp_path / "m.pt", tmp_path / "m.onnx", top_k=5, count_block=count_block, topk_chunks=topk_chunks
    )
    assert result.report.passed
    serving, evaluation = ort_session(result.onnx_path), ort_session(result.eval_path)
    rng = np.random.default_rng(0)
    B = 48
    x = rng.integers(0, N, B)
    t = np.where(np.arange(B) % 2 == 0, rng.choice(tied, B), rng.integers(0, N, B))  # half the targets tied
    h = rng.standard_normal((1, B, H)).astype(np.float32) * 0.5
    scores = torch.from_numpy(serving.run(["scores"], {"item_idx": x, "hidden": h})[0])
    n_gt, n_eq, top_i = evaluation.run(
        ["n_greater", "n_equal", "topk_idx"], {"item_idx": x, "hidden": h, "target_idx": t}
    )
    assert top_i.max() < N  # padded columns (count_block) never reach the top-k
    for b in range(B):  # brute force, one item at a time
        target = scores[b, t[b]]
        greater = sum(int(scores[b, j] > target) for j in range(N))
        equal = sum(int(scores[b, j] == target) for j in range(N))
        assert (n_gt[b], n_eq[b]) == (greater, equal), b
    assert np.all(n_eq[::2] == len(tied)) and bool(
        (scores[:, tied] == 0.25).all()
    )  # the ties were really there


# ---------------------------------------------------------------------------------------------- files
def test_graphs_check_and_carry_metadata(exported):
    model, result = exported["onehot", 2]
    metas = []
    for path in (result.onnx_path, result.eval_path):
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto, full_check=True)
        assert proto.opset_import[0].version >= 17
        assert {n.op_type for n in proto.graph.node} <= ALLOWED_OPS  # no GRU op, nothing exotic
        batch_dims = [
            v.type.tensor_type.shape.dim for v in list(proto.graph.input) + list(proto.graph.output)
        ]
        assert all(any(d.dim_param == "batch" for d in dims) for dims in batch_dims)
        metas.append({p.key: p.value for p in proto.metadata_props})
        assert scan_metadata_props(path.read_bytes()) == metas[-1]  # the fast reader load_bundle uses
    serving, evaluation = metas
    assert [o for o in ("item_idx", "hidden")] == [
        i.name for i in onnx.load(str(result.onnx_path)).graph.input
    ]
    assert serving["graph"] == "serving" and evaluation["graph"] == "eval"
    for key in ("hyperparameters", "data_fingerprint", "gru4rec_version", "export_time_utc", "top_k", "n_items",
                "n_layers", "hidden_size", "items_sha256", "export_id"):  # fmt: skip
        assert serving[key] == evaluation[key] and serving[key] != ""
    assert json.loads(serving["hyperparameters"]) == {"loss": "cross-entropy", "layers": [H, H]}
    assert (serving["n_items"], serving["n_layers"], serving["hidden_size"], serving["top_k"]) == (
        str(N),
        "2",
        str(H),
        "10",
    )
    sidecar = pl.read_parquet(companion_paths(result.onnx_path)[1])
    assert sidecar.columns == ["item_idx", "item_id"]
    assert serving["items_sha256"] == items_sha256(sidecar.sort("item_idx")["item_id"].to_numpy())
    bundle = load_bundle(result.onnx_path)
    assert (bundle.n_items, bundle.n_layers, bundle.hidden_size, bundle.top_k) == (N, 2, H, 10)
    assert bundle.meta["hyperparameters"]["loss"] == "cross-entropy"
    np.testing.assert_array_equal(
        bundle.items.ids, ckpt_io.load(result.onnx_path.parent.parent / "onehot2.pt").items.ids
    )


def test_load_bundle_refuses_mismatched_or_broken_files(exported, tmp_path):
    a, b = exported["shared", 1][1], exported["separate", 1][1]
    side_a, side_b = companion_paths(a.onnx_path)[1], companion_paths(b.onnx_path)[1]

    def copy_a(name):
        d = tmp_path / name
        shutil.copytree(a.onnx_path.parent, d)
        return d / "m.onnx"

    m = copy_a("foreign_sidecar")
    shutil.copy(side_b, companion_paths(m)[1])
    with pytest.raises(UserError, match="does not match"):
        load_bundle(m)
    m = copy_a("edited_sidecar")  # ids changed, checksum metadata kept
    kv = pl.read_parquet_metadata(side_a)
    pl.read_parquet(side_a).with_columns(pl.col("item_id") + 1).write_parquet(
        companion_paths(m)[1], metadata=kv
    )
    with pytest.raises(UserError, match="checksum"):
        load_bundle(m)
    m = copy_a("same_items_other_export")  # e.g. an overwrite that crashed between the renames
    kv = pl.read_parquet_metadata(side_a)
    assert kv["gru4rec.export_id"] == scan_metadata_props(a.onnx_path.read_bytes())["export_id"]
    pl.read_parquet(side_a).write_parquet(
        companion_paths(m)[1], metadata={**kv, "gru4rec.export_id": "0" * 32}
    )
    with pytest.raises(UserError, match="different export"):
        load_bundle(m)
    m = copy_a("foreign_eval")
    shutil.copy(b.eval_path, companion_paths(m)[0])
    with pytest.raises(UserError, match="does not belong"):
        load_bundle(m)
    m = copy_a("no_sidecar")
    companion_paths(m)[1].unlink()
    with pytest.raises(UserError, match="sidecar not found"):
        load_bundle(m)
    m = copy_a("no_eval")
    companion_paths(m)[0].unlink()
    with pytest.raises(UserError, match="evaluation graph not found"):
        load_bundle(m)
    m = copy_a("corrupt")
    for junk in (b"\x00garbage" * 10, b"", m.read_bytes()[:1000]):  # junk, empty, truncated
        m.write_bytes(junk)
        with pytest.raises(UserError, match="not a readable ONNX model|not a gru4rec"):
            load_bundle(m)
    with pytest.raises(UserError, match="serving graph"):
        load_bundle(a.eval_path)
    with pytest.raises(UserError, match="not found"):
        load_bundle(tmp_path / "absent.onnx")


def test_failed_verification_writes_nothing_and_keeps_old_files(exported, tmp_path, monkeypatch):
    from gru4rec.export import graph

    model, good = exported["shared", 1]
    ckpt_path = good.onnx_path.parent.parent / "shared1.pt"
    out = tmp_path / "m.onnx"
    export_bundle(ckpt_path, out, top_k=10)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def wrong_gate_convention(self, layer, x, h):  # the classic exporter bug: z and (1 - z) swapped
        gi = torch.nn.functional.linear(x, self.W_ih[layer], self.b_ih[layer]).split(self.H, 1)
        gh = torch.nn.functional.linear(h, self.W_hh[layer], self.b_hh[layer]).split(self.H, 1)
        r, z = torch.sigmoid(gi[0] + gh[0]), torch.sigmoid(gi[1] + gh[1])
        n = torch.tanh(gi[2] + r * gh[2])
        return z * n + (1 - z) * h

    monkeypatch.setattr(graph.ServingStep, "_torch_cell", wrong_gate_convention)
    with pytest.raises(VerificationFailed) as err:
        export_bundle(ckpt_path, out, top_k=10)
    assert not err.value.report.passed and err.value.report.max_hidden_diff > 1e-3
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp files, old export intact
    from typer.testing import CliRunner

    from gru4rec.cli import app

    res = CliRunner().invoke(app, ["export", str(ckpt_path), "--out", str(tmp_path / "new" / "m.onnx")])
    assert res.exit_code == 1 and "verification failed" in res.output
    assert not (tmp_path / "new" / "m.onnx").exists()


def test_fp16_reports_instead_of_failing(exported, tmp_path):
    model, result = exported["shared", 1]
    res = export_bundle(
        result.onnx_path.parent.parent / "shared1.pt", tmp_path / "h.onnx", top_k=10, fp16=True
    )
    rep = res.report
    assert rep.fp16 and rep.passed and 0 < rep.max_score_diff < 0.5 and rep.topk_overlap > 0.8
    assert load_bundle(res.onnx_path).meta["precision"] == "float16"
    assert res.onnx_path.stat().st_size < 0.6 * result.onnx_path.stat().st_size
    inputs = {i.name: i.type for i in ort_session(res.onnx_path).get_inputs()}
    assert inputs == {"item_idx": "tensor(int64)", "hidden": "tensor(float)"}


def test_bad_options_are_user_errors(tmp_path, exported):  # unequal layers export: test_export_layers.py
    ckpt_path = exported["shared", 1][1].onnx_path.parent.parent / "shared1.pt"
    with pytest.raises(UserError, match="top-k"):
        export_bundle(ckpt_path, tmp_path / "k.onnx", top_k=N + 1)
    with pytest.raises(UserError, match="opset"):
        export_bundle(ckpt_path, tmp_path / "o.onnx", opset=16)
    with pytest.raises(UserError, match=r"\.onnx"):
        export_bundle(ckpt_path, tmp_path / "m.eval.onnx")
    assert not any(tmp_path.glob("*.onnx"))


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_export_and_clean_errors(cli, exported, tmp_path, capsys):
    from gru4rec.cli import main

    ckpt_path = exported["onehot", 1][1].onnx_path.parent.parent / "onehot1.pt"
    with pytest.raises(SystemExit) as done:  # in-process: a subprocess would pay torch's import again
        main(["export", str(ckpt_path), "--out", str(tmp_path / "cli" / "m.onnx"), "--top-k", "5"])
    out = capsys.readouterr().out
    assert done.value.code in (0, None) and "max |score diff|" in out and "FAILED" not in out
    assert load_bundle(tmp_path / "cli" / "m.onnx").top_k == 5

    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint at all")
    for bad in (tmp_path / "missing.pt", tmp_path / "corrupt.pt"):
        proc = cli("export", bad, "--out", tmp_path / "x.onnx")  # as a user runs it
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and str(bad) in lines[0]
    assert not (tmp_path / "x.onnx").exists()


def test_placement_lists_every_node(exported):
    from gru4rec.export.placement import main, node_placements

    _, result = exported["shared", 2]
    nodes = node_placements(result.eval_path, "CPUExecutionProvider", batch=5)
    assert {p for _, _, p in nodes} == {"CPUExecutionProvider"}
    assert {"TopK", "ReduceSum", "Gemm"} <= {op for _, op, _ in nodes}
    assert main(["--provider", "cpu", "--batch", "3", str(result.onnx_path)]) == 0


def test_two_stage_topk_same_items(exported, tmp_path):
    model, result = exported["shared", 1]
    ckpt_path = result.onnx_path.parent.parent / "shared1.pt"
    res = export_bundle(ckpt_path, tmp_path / "c.onnx", top_k=10, topk_chunks=7)  # 300 = 7 x 43 - 1: padded
    assert res.report.passed and load_bundle(res.onnx_path).meta["topk_chunks"] == 7
    ops = {n.op_type for n in onnx.load(str(res.onnx_path)).graph.node}
    assert {"Pad", "Reshape"} <= ops and "Shape" not in ops  # every shape a constant
    serving = ort_session(res.onnx_path)
    rng = np.random.default_rng(1)
    x, h = rng.integers(0, N, 33), rng.standard_normal((1, 33, H)).astype(np.float32)
    scores, _, top_s, top_i = serving.run(None, {"item_idx": x, "hidden": h})
    vals, idx = torch.topk(torch.from_numpy(scores), 10, dim=1)
    np.testing.assert_array_equal(top_s, vals.numpy())
    differ = top_i != idx.numpy()
    assert np.all(scores[np.nonzero(differ)[0], top_i[differ]] == vals.numpy()[differ])  # ties only
