"""`eval benchmark`: the datasets x models matrix, its report, results and plots.

Numbers are checked against independent computations: POP by a plain loop over the data, GRU4Rec
(trained, exported and scored by ONNX Runtime inside the benchmark) against the PyTorch evaluator.
"""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
from conftest import synthetic_files

from gru4rec.errors import UserError
from gru4rec.eval.benchmark import load_config, run

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench-data")
    train, test = synthetic_files(d, n_sessions=400, n_items=60, seed=11)
    return d, train, test


def write_config(path, data_dir, models: str, tie_modes: str = '["standard", "conservative"]') -> str:
    path.write_text(
        f"""
[benchmark]
tie_modes = {tie_modes}
max_k = 20
device = "cpu"
score_batch_size = 32
[[dataset]]
name = "tiny"
train = "{data_dir / "train.parquet"}"
test = "{data_dir / "test.parquet"}"
{models}
"""
    )
    return str(path)


BASELINES = "\n".join(
    f'[[model]]\nkind = "{k}"' for k in ("pop", "spop", "itemknn", "bprmf", "sknn", "vsknn")
)
BASELINES = BASELINES.replace('kind = "bprmf"', 'kind = "bprmf"\noptions = { epochs = 2 }')


def pop_reference(train, test, top_n=100):
    """POP Recall@k / MRR@k in standard and conservative modes with plain Python."""
    supp = Counter(train["item_id"].to_list())
    known = set(supp)
    order = list(dict.fromkeys(train.sort(["session_id", "time"], maintain_order=True)["item_id"].to_list()))
    top = sorted(order, key=lambda it: (-supp[it], order.index(it)))[:top_n]
    score = {it: supp[it] / (supp[it] + 1) for it in top}
    sessions: dict[int, list[int]] = {}
    for s, it in zip(test["session_id"].to_list(), test["item_id"].to_list(), strict=True):
        if it in known:
            sessions.setdefault(s, []).append(it)
    out = {m: Counter() for m in ("standard", "conservative")}
    n = 0
    for items in sessions.values():
        for target in items[1:]:
            n += 1
            t = score.get(target, 0.0)
            greater = sum(1 for it in known if score.get(it, 0.0) > t)
            equal = sum(1 for it in known if score.get(it, 0.0) == t)
            for mode, rank in (("standard", greater + 1), ("conservative", greater + equal)):
                for k in (1, 5, 20):
                    if rank <= k:
                        out[mode][f"recall@{k}"] += 1
                        out[mode][f"mrr@{k}"] += 1 / rank
    return {m: {k: v / n for k, v in c.items()} for m, c in out.items()}, n


def test_baselines_benchmark_cli(tmp_path, data, cli):
    d, train, test = data
    cfg = write_config(tmp_path / "b.toml", d, BASELINES)
    proc = cli("eval", "benchmark", "--config", cfg, "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    names = [r["model"] for r in results["results"]]
    assert names == ["POP", "S-POP", "Item-KNN", "BPR-MF", "SKNN", "V-SKNN"]

    want, n = pop_reference(train, test)
    pop = results["results"][0]["metrics"]
    for mode in ("standard", "conservative"):
        assert pop[mode]["n"] == n
        for key in ("recall@1", "recall@5", "recall@20", "mrr@5", "mrr@20"):
            assert pop[mode][key] == pytest.approx(want[mode].get(key, 0.0), abs=1e-12), (mode, key)

    for r in results["results"]:
        for mode in ("standard", "conservative"):
            m = r["metrics"][mode]
            recalls = [m[f"recall@{k}"] for k in range(1, 21)]
            assert recalls == sorted(recalls) and m["recall@1"] == pytest.approx(m["mrr@1"])
        # Conservative ranks are never better than standard ones.
        assert r["metrics"]["conservative"]["recall@20"] <= r["metrics"]["standard"]["recall@20"] + 1e-12

    report = (out / "report.md").read_text()
    assert "| Method | Recall@20 | MRR@20 | NDCG@20 | ΔRecall@20 | ΔMRR@20 |" in report
    best = max(results["results"], key=lambda r: r["metrics"]["standard"]["recall@20"])
    for r in results["results"]:
        row = next(line for line in report.splitlines() if line.startswith(f"| {r['model']} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == f"{r['metrics']['standard']['recall@20']:.4f}"
        if r is best:
            assert cells[4] == "best"
        else:
            rel = 100 * (r["metrics"]["standard"]["recall@20"] / best["metrics"]["standard"]["recall@20"] - 1)
            assert cells[4] == f"{rel:+.1f}%"
    png = (out / "curves_tiny.png").read_bytes()
    assert png.startswith(PNG) and len(png) > 10_000
    assert "](curves_tiny.png)" in report


def test_gru4rec_trained_exported_and_scored(tmp_path, data, capsys, monkeypatch):
    """A preset trained inside the benchmark, exported to ONNX and scored; PyTorch evaluation agrees."""
    from gru4rec import checkpoint as ckpt_io
    from gru4rec.eval.pipeline import ort_provider
    from gru4rec.evaluate import evaluate
    from gru4rec.score import ort_backend

    # As on a machine without a usable CUDA EP: "auto" falls back to the CPU with a notice.
    monkeypatch.setattr(ort_backend, "cuda_usable", lambda: False)
    ort_provider.cache_clear()

    d, _, test = data
    models = """
[[model]]
name = "GRU4Rec"
kind = "gru4rec"
preset = "demo"
params = { n_epochs = 2, layers = [24], n_sample = 16, batch_size = 16 }
[[model]]
kind = "itemknn"
"""
    out = tmp_path / "out"
    results = run(load_config(write_config(tmp_path / "g.toml", d, models)), out, progress=False)
    ort_provider.cache_clear()  # later tests resolve the provider of their own machine
    # scored in two tie modes, but the CPU notice is printed once
    assert capsys.readouterr().err.count("notice: CUDA is not available") == 1
    g = results["results"][0]
    assert g["model"] == "GRU4Rec" and not g["baseline"] and len(g["history"]) == 2
    ck = ckpt_io.load(out / "models" / "tiny-gru4rec.pt")
    for mode in ("standard", "conservative"):
        ref = evaluate(ck.model, ck.items, test, cutoffs=(5, 20), mode=mode)
        for key in ("recall@5", "recall@20", "mrr@20"):
            assert g["metrics"][mode][key] == pytest.approx(ref[key], abs=2e-3), (mode, key)
        assert g["metrics"][mode]["n"] == ref["n"]
    assert g["latency"]["step_ms_p50"] > 0 and g["latency"]["n_steps"] > 0
    for kind in ("latency", "training"):
        data_png = (out / g["plots"][kind]).read_bytes()
        assert data_png.startswith(PNG) and len(data_png) > 10_000
    report = (out / "report.md").read_text()
    assert re.search(r"\| \*\*GRU4Rec\*\* \| 0\.\d{4} \|", report)  # bold, not "GRU4Rec (GRU4Rec)"
    assert f"]({g['plots']['latency']})" in report and f"]({g['plots']['training']})" in report


def test_model_filter_and_bad_configs(tmp_path, data):
    d = data[0]
    cfg = load_config(write_config(tmp_path / "c.toml", d, BASELINES))
    results = run(cfg, tmp_path / "o", only={"pop", "itemknn"}, progress=False)
    assert [r["model"] for r in results["results"]] == ["POP", "Item-KNN"]
    with pytest.raises(UserError, match="no .dataset, model. pair"):
        run(cfg, tmp_path / "o2", only={"nothing"}, progress=False)
    with pytest.raises(UserError, match="kind must be"):
        load_config(write_config(tmp_path / "x.toml", d, '[[model]]\nkind = "lstm"'))
    with pytest.raises(UserError, match="tie_modes"):
        load_config(write_config(tmp_path / "y.toml", d, BASELINES, '["optimistic"]'))
    with pytest.raises(UserError, match="unknown dataset"):
        load_config(write_config(tmp_path / "z.toml", d, '[[model]]\nkind = "pop"\ndatasets = ["nope"]'))
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "missing.toml")


def test_demo_and_shared_configs_parse():
    demo = load_config("eval/configs/demo.toml")
    assert {m.kind for m in demo.models} == {"gru4rec", "pop", "spop", "itemknn", "bprmf", "sknn", "vsknn"}
    shared = load_config("eval/configs/benchmark-shared.toml")
    assert [d.name for d in shared.datasets] == ["rsc15_100k", "diginetica"]


def test_shared_data_baselines(tmp_path, shared_data):
    """Baselines on ../shared/data/rsc15_100k: S-POP and Item-KNN in the range the literature reports."""
    cfg = load_config("eval/configs/benchmark-shared.toml")
    cfg.datasets = [ds for ds in cfg.datasets if ds.name == "rsc15_100k"]
    results = run(cfg, tmp_path / "o", only={"pop", "spop", "itemknn", "sknn"}, progress=False)
    m = {r["model"]: r["metrics"]["standard"] for r in results["results"]}
    assert (
        m["POP"]["recall@20"] < m["S-POP"]["recall@20"] < m["Item-KNN"]["recall@20"] < m["SKNN"]["recall@20"]
    )
    assert 0.3 < m["Item-KNN"]["recall@20"] < 0.7
