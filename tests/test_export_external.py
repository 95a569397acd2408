"""Export with the weights in ONNX external data (export/external.py): one file beside the graphs,
each tensor stored once, the same scores as a single-file export, and every bundle operation
(load checks, promotion, re-export) treating the weights file as part of the bundle."""

from __future__ import annotations

import shutil

import onnx
import pytest
from test_replay import assert_metrics_equal, make_model, reference_metrics
from test_score import IDS, N_ITEMS, TOP_K, export_model

from gru4rec.bundle import load_bundle
from gru4rec.errors import UserError
from gru4rec.eval.promote import promote_bundle
from gru4rec.items import ItemMap
from gru4rec.score.scorer import ScoreConfig, score


@pytest.fixture(scope="module")
def pair(tiny, tmp_path_factory):
    """test_score's tiny model (items 0..11 tie) exported again, its weights as external data."""
    root = tmp_path_factory.mktemp("external")
    ext = export_model(tiny["model"], ItemMap(IDS), root, TOP_K, external_data=True)
    return {"root": root, "sessions": tiny["sessions"], "single": tiny["onnx"], "ext": ext}


def initializer_bytes(path) -> dict[str, int]:
    model = onnx.load(str(path), load_external_data=False)
    return {
        t.name: int({e.key: e.value for e in t.external_data}.get("length", 0))
        for t in model.graph.initializer
    }


def test_weights_live_once_in_one_file_beside_small_graphs(pair):
    bundle = load_bundle(pair["ext"])
    weights = bundle.weights_path
    assert weights is not None and weights.parent == bundle.onnx_path.parent
    assert weights.name == f"{bundle.meta['export_id']}.weights"
    serving, evaluation = initializer_bytes(bundle.onnx_path), initializer_bytes(bundle.eval_path)
    assert serving["Wy"] == N_ITEMS * 16 * 4 and serving.keys() == evaluation.keys()
    # the two graphs point at the same bytes: the file holds one copy (4 KiB alignment aside)
    assert weights.stat().st_size <= sum(serving.values()) + 4096 * len(serving)
    assert weights.stat().st_size < sum(serving.values()) + sum(evaluation.values())
    assert bundle.onnx_path.stat().st_size < 10_000 and load_bundle(pair["single"]).weights_path is None


@pytest.mark.parametrize("tile", [0, TOP_K])
def test_external_bundle_scores_as_the_brute_force_reference(pair, tiny_reference, tile):
    def cfg():
        return ScoreConfig(batch_size=32, tie_mode="conservative", tile_items=tile)

    report = score(pair["ext"], pair["sessions"], config=cfg(), provider="cpu")
    assert_metrics_equal(report["metrics"], reference_metrics(tiny_reference, "conservative"))
    single = score(pair["single"], pair["sessions"], config=cfg(), provider="cpu")
    assert report["metrics"] == single["metrics"]


def test_missing_or_truncated_weights_are_refused(pair, tmp_path):
    copy = tmp_path / "m.onnx"
    for f in ("m.onnx", "m.eval.onnx", "m.items.parquet"):
        shutil.copyfile(pair["root"] / f, tmp_path / f)
    weights = load_bundle(pair["ext"]).weights_path
    with pytest.raises(UserError, match="weights file not found"):
        load_bundle(copy)
    (tmp_path / weights.name).write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(UserError, match="truncated"):
        load_bundle(copy)
    shutil.copyfile(weights, tmp_path / weights.name)
    assert load_bundle(copy).weights_path == tmp_path / weights.name


def test_cli_names_the_weights_file_and_refuses_a_missing_one(cli, pair, tmp_path):
    for f in ("m.onnx", "m.eval.onnx", "m.items.parquet"):
        shutil.copyfile(pair["root"] / f, tmp_path / f)
    res = cli("score", "--model", str(tmp_path / "m.onnx"), "--sessions", pair["sessions"])
    assert (
        res.returncode == 2
        and res.stderr.count("\n") == 1
        and ".weights: weights file not found" in res.stderr
    )


def test_promotion_carries_the_weights_file_and_drops_stale_ones(pair, tmp_path):
    champion = tmp_path / "champ" / "champion.onnx"
    firsts = []
    for seed in (1, 2, 3):  # three promotions of external bundles
        d = tmp_path / f"c{seed}"
        d.mkdir()
        onnx_path = export_model(make_model(N_ITEMS, seed=seed), ItemMap(IDS), d, TOP_K, external_data=True)
        promote_bundle(load_bundle(onnx_path).onnx_path, champion)
        firsts.append(load_bundle(onnx_path).weights_path.name)
        assert load_bundle(champion).weights_path.name == firsts[-1]
    names = sorted(p.name for p in champion.parent.glob("*.weights"))
    # the champion's and the previous champion's (rollback) weights stay; the first one is gone
    assert names == sorted(firsts[1:])
    prev = champion.with_name("champion.onnx.previous")
    assert prev.is_file()


def test_re_export_replaces_the_old_weights_file(pair, tmp_path):
    model = make_model(N_ITEMS, seed=5)
    export_model(model, ItemMap(IDS), tmp_path, TOP_K, external_data=True)
    first = load_bundle(tmp_path / "m.onnx").weights_path
    export_model(model, ItemMap(IDS), tmp_path, TOP_K, external_data=True)
    second = load_bundle(tmp_path / "m.onnx").weights_path
    assert first != second and second.is_file() and not first.exists()
    export_model(model, ItemMap(IDS), tmp_path, TOP_K, external_data=False)
    assert load_bundle(tmp_path / "m.onnx").weights_path is None and not second.exists()


@pytest.mark.parametrize("which", ["single", "ext"])
def test_tables_are_mapped_from_the_file_as_onnx_reads_them(pair, which):
    """The tiled scorer's reader (graph parsed without the item tables, tables mapped from the file)
    against onnx's own full load: same graph, the same values in every table."""
    from onnx import numpy_helper

    from gru4rec.bundle import companion_paths, load_without_tables
    from gru4rec.score.tiled import item_tables, load_tables

    eval_path = companion_paths(pair[which])[0]
    full = onnx.load(str(eval_path))  # external data loaded too
    stripped = load_without_tables(eval_path, N_ITEMS)
    assert stripped.graph.node == full.graph.node and stripped.metadata_props == full.metadata_props
    names = item_tables(stripped, N_ITEMS)
    assert names and names == item_tables(full, N_ITEMS)
    tables = load_tables(stripped, names, eval_path)
    by_name = {t.name: t for t in full.graph.initializer}
    for name in names:
        expected = numpy_helper.to_array(by_name[name])
        assert tables[name].dtype == expected.dtype and (tables[name] == expected).all(), name
    if which == "single":  # the tables' data is left out of the parsed graph, the rest kept as it is
        kept = {t.name: t for t in stripped.graph.initializer}
        assert all(not kept[n].raw_data for n in names)
        assert all(kept[t.name] == t for t in full.graph.initializer if t.name not in names)
