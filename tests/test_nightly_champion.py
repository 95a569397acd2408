"""Champion vs challenger: both scored on the same test sessions; promotion all files or none.

Planted cases: a challenger trained on shuffled items (sequence signal destroyed) against a properly
trained champion must lose (exit 1, champion files byte for byte unchanged); a properly trained
challenger against a random-weight champion must be promoted (previous champion kept as *.previous).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import nightly_config, synthetic_files
from test_replay import make_model
from test_score import export_model

from gru4rec.bundle import load_bundle
from gru4rec.eval.promote import bundle_files

PARAMS = "{ n_epochs = 1, layers = [16], n_sample = 16, batch_size = 16 }"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from gru4rec.eval.pipeline import export_onnx, train_gru4rec

    d = tmp_path_factory.mktemp("champ")
    train, test = synthetic_files(d, n_sessions=600, n_items=100, seed=21)
    rng = np.random.default_rng(0)  # the same item counts, the order of the clicks destroyed
    train.with_columns(item_id=pl.Series(rng.permutation(train["item_id"].to_numpy()))).write_parquet(
        d / "shuffled.parquet"
    )
    params = {"n_epochs": 2, "layers": [16], "n_sample": 16, "batch_size": 16}
    train_gru4rec(train, "demo", params, d / "good.pt", "cpu", 2)
    export_onnx(d / "good.pt", d / "good" / "model.onnx")
    return d


def config(tmp_path, d, champion, train="train.parquet") -> str:
    body = f"""test = "{d / "test.parquet"}"
batch_size = 4
[nightly.train]
train = "{d / train}"
preset = "demo"
params = {PARAMS}
device = "cpu"
seed = 3
[nightly.champion]
model = "{champion}"
promote = true
"""
    return str(nightly_config(tmp_path, body))


def install(src_onnx, dst_onnx):
    dst_onnx.parent.mkdir(parents=True, exist_ok=True)
    for s, t in zip(bundle_files(src_onnx), bundle_files(dst_onnx), strict=True):
        shutil.copyfile(s, t)


def snapshot(onnx) -> dict:
    return {p.name: p.read_bytes() for p in onnx.parent.iterdir()}


def test_worse_challenger_exits_1_and_champion_is_untouched(tmp_path, data, run):
    champion = tmp_path / "prod" / "model.onnx"
    install(data / "good" / "model.onnx", champion)
    before = snapshot(champion)
    code, out, err = run("eval", "nightly", "--config", config(tmp_path, data, champion, "shuffled.parquet"))
    assert code == 1, err
    assert "is worse than the champion's" in err and f"the champion {champion} stays" in err
    assert snapshot(champion) == before  # byte for byte, and no *.previous or temporary files
    hist = pl.read_parquet(tmp_path / "h.parquet")
    assert hist["role"].to_list() == ["challenger", "champion"]
    assert hist["status"].to_list() == ["regression", "champion"]
    chal, champ = hist.row(0, named=True), hist.row(1, named=True)
    assert (
        chal["test_fingerprint"] == champ["test_fingerprint"]
        and chal["n_predictions"] == champ["n_predictions"]
    )
    assert chal["recall@20"] < champ["recall@20"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Challenger vs champion (same test sessions)" in report


def test_better_challenger_is_promoted_and_previous_kept(tmp_path, data, run):
    champion = tmp_path / "prod" / "model.onnx"
    items = load_bundle(data / "good" / "model.onnx").items
    weak = export_model(make_model(len(items), seed=9), items, tmp_path, 20)  # random weights
    install(Path(weak), champion)
    before = snapshot(champion)
    code, out, err = run("eval", "nightly", "--config", config(tmp_path, data, champion))
    assert code == 0, err
    assert f"is now the champion {champion}" in out
    promoted = tmp_path / "out" / "model.onnx"
    for new, dst in zip(bundle_files(promoted), bundle_files(champion), strict=True):
        assert dst.read_bytes() == new.read_bytes()
        previous = dst.with_name(dst.name + ".previous")
        assert previous.read_bytes() == before[dst.name]
    assert load_bundle(champion).meta["export_id"] == load_bundle(promoted).meta["export_id"]
    assert sorted(p.name for p in champion.parent.iterdir()) == sorted(
        [*before, *(n + ".previous" for n in before)]
    )  # no temporary files left
    hist = pl.read_parquet(tmp_path / "h.parquet")
    assert hist["status"].to_list() == ["promoted", "champion"]
    assert hist["recall@20"][0] > hist["recall@20"][1]
    assert "# Nightly evaluation — PROMOTED" in (tmp_path / "out" / "report.md").read_text()


def test_failed_promotion_leaves_champion_whole(tmp_path, data, monkeypatch):
    """A rename failing half way (the evaluation graph is in place, the serving graph not) is rolled back."""
    import os

    from gru4rec.errors import UserError
    from gru4rec.eval import promote

    champion = tmp_path / "prod" / "model.onnx"
    install(data / "good" / "model.onnx", champion)
    before = snapshot(champion)
    items = load_bundle(champion).items
    (tmp_path / "c").mkdir()
    challenger = Path(export_model(make_model(len(items), seed=4), items, tmp_path / "c", 20))
    assert snapshot(challenger)["m.onnx"] != before["model.onnx"]
    failed = []
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(dst) == str(champion) and not failed:  # the last file of the bundle, once
            failed.append(dst)
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(promote.os, "replace", failing_replace)
    with pytest.raises(UserError, match="promotion failed, champion left as it was"):
        promote.promote_bundle(challenger, champion)
    monkeypatch.undo()
    after = {k: v for k, v in snapshot(champion).items() if not k.endswith(".previous")}
    assert failed and after == before and load_bundle(champion).meta["export_id"]
