"""Config checking of `eval nightly` and `eval benchmark`: every bad key is a UserError naming the file,
the table and the key, found when the config is loaded (or, for the benchmark's input files, before
the first dataset is read), never a traceback and never after the work is done.

These tests need no model: the nightly configs take their figures from a metrics JSON, and the
benchmark runs only POP on a tiny synthetic dataset.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gru4rec.errors import UserError
from gru4rec.eval import benchmark, nightly

# ---------------------------------------------------------------- nightly


@pytest.fixture
def files(tmp_path) -> Path:
    """Inputs a nightly config may name: test and train files (never read at load) and a metrics JSON."""
    for name in ("test.parquet", "train.parquet", "model.onnx"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "metrics.json").write_text(json.dumps({
        "metrics": {"recall@20": 0.5, "mrr@20": 0.2, "n": 10}, "tie_mode": "standard",
        "latency": {"step_ms_p50": 1.0, "step_ms_p95": 2.0, "ms_per_1k_events": 3.0, "n_steps": 100},
    }))  # fmt: skip
    return tmp_path


def nightly_toml(d: Path, snippet: str = "", source: str = "model") -> Path:
    """A valid nightly config with `snippet` appended: bare keys land in [nightly], tables follow it.
    source: "model" scores test with a model file, "metrics_json" takes an earlier metrics JSON."""
    src = {
        "model": f'test = "{d}/test.parquet"\nmodel = "{d}/model.onnx"',
        "metrics_json": f'metrics_json = "{d}/metrics.json"',
    }[source]
    path = d / "nightly.toml"
    path.write_text(f'[nightly]\nhistory = "{d}/h.parquet"\nout = "{d}/out"\n{src}\n{snippet}\n')
    return path


TOL = "[nightly.tolerances]\n"
TRAIN = '[nightly.train]\ntrain = "{d}/train.parquet"\n'
LIST_OF_METRICS = (
    "metrics must be a list of distinct metric names recall@K, mrr@K or ndcg@K (K from 1 to 1000), got"
)

NIGHTLY_BAD = [
    # (appended TOML, what the message must say after the file name)
    ('cutoffs = ["a"]', '[nightly] cutoffs must be a non-empty list of distinct integers between 1 and 1000, got ["a"]'),
    ("cutoffs = 20", "[nightly] cutoffs must be a non-empty list of distinct integers between 1 and 1000, got 20"),
    ("cutoffs = [0, 5]", "[nightly] cutoffs must be a non-empty list of distinct integers between 1 and 1000"),
    ("cutoffs = [5000]", "[nightly] cutoffs must be a non-empty list of distinct integers between 1 and 1000"),
    ('tie_mode = "optimistic"', "[nightly] tie_mode must be one of standard, conservative, median, got"),
    ("batch_size = 0", "[nightly] batch_size must be an integer >= 1, got 0"),
    ("bogus = 1", "unknown key 'bogus' in [nightly] (known: history, out, test, model, metrics_json,"),
    (TOL + 'metrics = ["recall@x"]', f'[nightly.tolerances] {LIST_OF_METRICS} ["recall@x"]'),
    (TOL + 'metrics = ["recal@20"]', f'[nightly.tolerances] {LIST_OF_METRICS} ["recal@20"]'),
    (TOL + 'metrics = "recall@20"', f'[nightly.tolerances] {LIST_OF_METRICS} "recall@20"'),
    (TOL + 'metrics = ["recall@20", "recall@20"]', f"[nightly.tolerances] {LIST_OF_METRICS}"),
    (TOL + 'latency = ["events_per_s"]', "[nightly.tolerances] latency must be a list of distinct values from ms_per_1k_events, full_step_ms_p50"),
    (TOL + 'metric_drop_abs = "x"', '[nightly.tolerances] metric_drop_abs must be a number >= 0, got "x"'),
    (TOL + "latency_rise_rel = -0.1", "[nightly.tolerances] latency_rise_rel must be a number >= 0, got -0.1"),
    (TOL + 'compare_best = "no"', '[nightly.tolerances] compare_best must be true or false, got "no"'),
    (TOL + "latency_window = 0", "[nightly.tolerances] latency_window must be an integer >= 1, got 0"),
    (TOL + "metric_drop = 0.1", "unknown key 'metric_drop' in [nightly.tolerances] (known: metrics, latency,"),
    ("tolerances = 3", "[nightly.tolerances] must be a table, got 3"),
    (TRAIN + 'device = "gpu"', '[nightly.train] device must be one of auto, cpu, cuda (or cuda:N), got "gpu"'),
    (TRAIN + 'params = "n_epochs=1"', '[nightly.train] params must be a table such as { key = value }, got "n_epochs=1"'),
    (TRAIN + 'seed = "x"', '[nightly.train] seed must be an integer between 0 and 4294967295, got "x"'),
    (TRAIN + "top_k = 0", "[nightly.train] top_k must be an integer >= 1, got 0"),
    (TRAIN + 'preset = "rsc16"', "[nightly.train] preset must be one of rsc15,"),
    (TRAIN + "params = { n_epoch = 1 }", "unknown key 'n_epoch' in [nightly.train] params (known: loss, layers,"),
    (TRAIN + 'params = { n_epochs = "x" }', "[nightly.train] params: parameter n_epochs: expected an integer"),
    (TRAIN + "params = { n_epochs = 0 }", "[nightly.train] params: parameter n_epochs: must be >= 1"),
    (TRAIN + "trian = 1", "unknown key 'trian' in [nightly.train] (known: train, preset, params, device, seed,"),
    ('[nightly.train]\ntrain = "{d}/nope.parquet"', "[nightly.train] train: file not found: "),
    ('[nightly.train]\npreset = "demo"', "[nightly.train] needs 'train'"),
    ('[train]\ntrain = "x"', "unknown table [train] (known: [nightly]); did you mean [nightly.train]?"),
    ("[tolerances]\nmetric_drop_abs = 0.1", "unknown table [tolerances] (known: [nightly]); did you mean [nightly.tolerances]?"),
    ('[nightli]\nhistory = "x"', "unknown table [nightli] (known: [nightly])"),
]  # fmt: skip


@pytest.mark.parametrize(("snippet", "words"), NIGHTLY_BAD)
def test_nightly_bad_config_names_file_table_and_key(files, snippet, words):
    path = nightly_toml(files, snippet.replace("{d}", str(files)))
    with pytest.raises(UserError) as e:
        nightly.load_config(path)
    message = str(e.value)
    assert message.startswith(f"{path}: "), message
    assert words in message, message
    for internal in ("__init__", "--cutoffs", "KeyError", "needs 'history'"):
        assert internal not in message


def test_nightly_train_and_metrics_json_exclude_each_other(files):
    with pytest.raises(UserError, match=r"metrics_json and a \[nightly.train\] table exclude each other"):
        nightly.load_config(nightly_toml(files, TRAIN.replace("{d}", str(files)), source="metrics_json"))


def test_nightly_not_a_table_and_missing_tables(files):
    path = files / "n.toml"
    path.write_text("nightly = 3\n")
    with pytest.raises(UserError, match=r"n\.toml: \[nightly\] must be a table, got 3$"):
        nightly.load_config(path)
    path.write_text("")
    with pytest.raises(
        UserError, match=r"needs a \[nightly\] table \(see eval/configs/nightly\.example\.toml\)"
    ):
        nightly.load_config(path)


def test_nightly_missing_inputs_at_load(files):
    """With metrics_json the model is a label; scored from a file, it and the test file must exist now."""
    missing = f'model = "{files}/gone.onnx"'
    assert nightly.load_config(nightly_toml(files, missing, "metrics_json")).model == files / "gone.onnx"
    path = nightly_toml(files)
    path.write_text(path.read_text().replace("model.onnx", "gone.onnx"))
    with pytest.raises(UserError, match=r"\[nightly\] model: file not found: .*gone\.onnx"):
        nightly.load_config(path)
    (files / "test.parquet").unlink()
    with pytest.raises(UserError, match=r"\[nightly\] test: file not found: .*test\.parquet"):
        nightly.load_config(nightly_toml(files))


def test_nightly_tie_mode_must_match_metrics_json(files):
    """The JSON's tie mode used to win silently over the config's; now a difference is an error."""
    with pytest.raises(
        UserError, match=r"tie_mode is 'conservative' but .*metrics\.json was scored in tie mode 'standard'"
    ):
        nightly.load_config(nightly_toml(files, 'tie_mode = "conservative"', "metrics_json"))
    data = json.loads((files / "metrics.json").read_text())
    (files / "metrics.json").write_text(json.dumps({**data, "tie_mode": "median"}))
    with pytest.raises(UserError, match=r"tie_mode is 'standard' \(the default\) but"):
        nightly.load_config(nightly_toml(files, "", "metrics_json"))
    assert (
        nightly.load_config(nightly_toml(files, 'tie_mode = "median"', "metrics_json")).tie_mode == "median"
    )


def test_nightly_valid_train_config_and_metric_cutoffs(files):
    train = TRAIN.replace("{d}", str(files)) + 'preset = "demo"\nparams = { n_epochs = 1, layers = [8] }\n'
    path = nightly_toml(
        files, f'cutoffs = [5]\n{train}device = "cpu"\nseed = 3\n{TOL}metrics = ["recall@50", "mrr@10"]'
    )
    cfg = nightly.load_config(path)
    assert cfg.train.preset == "demo" and cfg.train.params == {"n_epochs": 1, "layers": [8]}
    assert cfg.train.seed == 3 and cfg.train.device == "cpu"
    assert cfg.cutoffs == (5, 10, 50)  # the compared metrics' cut-offs are added


def test_nightly_unusable_outputs_fail_before_any_work(files):
    """history / out that cannot be written are refused before the run; nothing is created."""
    (files / "out").write_text("a file where the out folder should be")
    with pytest.raises(UserError, match="output folder path is an existing file"):
        nightly.run(nightly.load_config(nightly_toml(files, "", "metrics_json")))
    assert not (files / "h.parquet").exists()
    (files / "out").unlink()
    (files / "h.parquet").mkdir()
    with pytest.raises(UserError, match="output path is a directory"):
        nightly.run(nightly.load_config(nightly_toml(files, "", "metrics_json")))
    assert not (files / "out").exists()


def test_nightly_bad_config_through_cli(files, run):
    path = nightly_toml(files, TOL + 'compare_best = "no"')
    code, out, err = run("eval", "nightly", "--config", path)
    assert code == 2 and out == ""
    assert err.splitlines() == [
        f'error: {path}: [nightly.tolerances] compare_best must be true or false, got "no"'
    ]
    assert sorted(p.name for p in files.iterdir()) == ["metrics.json", "model.onnx", "nightly.toml", "test.parquet",
                                                       "train.parquet"]  # fmt: skip


def test_nightly_help_states_exit_codes_and_config_docs(run):
    code, out, _ = run("eval", "nightly", "--help")
    text = " ".join(out.split())
    assert code == 0
    assert "0 no regression; 1 regression" in text and "2 bad input or config" in text
    assert "eval/configs/nightly.example.toml" in text and "median of the last" in text


# ---------------------------------------------------------------- benchmark


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from gru4rec.synth import generate

    d = tmp_path_factory.mktemp("cfg-data")
    train, test = generate(n_sessions=120, n_items=40, seed=3)
    train.write_parquet(d / "train.parquet")
    test.write_parquet(d / "test.parquet")
    return d


DS = '[[dataset]]\nname = "{name}"\ntrain = "{d}/train.parquet"\ntest = "{d}/test.parquet"\n'


def bench_toml(path: Path, d: Path, snippet: str = "") -> Path:
    """A valid benchmark config with `snippet` right after [benchmark] (bare keys land there); one
    dataset and a POP model are added unless the snippet has its own."""
    modes = "" if "tie_modes" in snippet else 'tie_modes = ["standard"]\n'
    text = f"[benchmark]\n{modes}{snippet}\n"
    if "dataset]" not in snippet:
        text += DS.format(name="tiny", d=d)
    if "[[model]]" not in snippet:
        text += '[[model]]\nkind = "pop"\n'
    path.write_text(text)
    return path


M = "[[model]]\n"
GRU = '[[model]]\nkind = "gru4rec"\n'
ONE_DS = DS.format(name="tiny", d="{d}")

BENCH_BAD = [
    # (TOML after [benchmark], what the message must say after the file name)
    ("max_k = 10", "[benchmark] max_k must be an integer between 20 and 1000, got 10"),
    ("max_k = 0", "[benchmark] max_k must be an integer between 20 and 1000, got 0"),
    ('max_k = "x"', '[benchmark] max_k must be an integer between 20 and 1000, got "x"'),
    ('device = "gpu"', '[benchmark] device must be one of auto, cpu, cuda (or cuda:N), got "gpu"'),
    ("score_batch_size = 0", "[benchmark] score_batch_size must be an integer >= 1, got 0"),
    ('tie_modes = "standard"', "[benchmark] tie_modes must be a non-empty list of distinct values from standard,"),
    ('tie_mode = "standard"', "unknown key 'tie_mode' in [benchmark] (known: tie_modes, max_k, device,"),
    ('[dataset]\nname = "a"', "dataset must be written as [[dataset]] tables (one per entry), got"),
    (ONE_DS + 'tset = "x"', "unknown key 'tset' in [[dataset]] #1 (known: name, train, test)"),
    (ONE_DS + ONE_DS, "[[dataset]] name 'tiny' is used twice"),
    (DS.format(name="a b", d="{d}") + DS.format(name="a-b", d="{d}"), "[[dataset]] name 'a-b' and 'a b' would share plot files"),
    ('[[dataset]]\nname = 3\ntrain = "a"\ntest = "b"', "[[dataset]] #1 name must be a non-empty string, got 3"),
    ('[[dataset]]\nname = "x"\ntrain = "a"', "[[dataset]] #1 needs 'test'"),
    (M + 'kind = "pop"\noptions = "x"', '[[model]] #1 options must be a table such as { key = value }, got "x"'),
    (M + 'kind = "pop"\noption = { top_n = 5 }', "unknown key 'option' in [[model]] #1 (known: kind, name, datasets,"),
    (M + 'kind = "bprmf"\noptions = { epoch = 3 }', "unknown key 'epoch' in [[model]] #1 options (known: factors, epochs,"),
    (M + 'kind = "bprmf"\noptions = { epochs = "3" }', '[[model]] #1 options epochs must be an integer >= 1, got "3"'),
    (M + 'kind = "bprmf"\noptions = { score_dtype = "int8" }', "[[model]] #1 options score_dtype must be one of float32, float64"),
    (M + 'kind = "sknn"\noptions = { similarity = "euclid" }', "[[model]] #1 options: unknown SKNN similarity 'euclid'"),
    (M + 'kind = "pop"\ndatasets = "s"', '[[model]] #1 datasets must be a non-empty list of distinct strings, got "s"'),
    (M + 'kind = "pop"\ndatasets = ["nope"]', "[[model]] 'POP' datasets names unknown dataset(s) ['nope'] (the [[dataset]] names: tiny)"),
    (M + 'kind = "lstm"', '[[model]] #1 kind must be one of gru4rec, pop, spop, itemknn, bprmf, sknn, vsknn, got "lstm"'),
    (M + 'name = "x"', "[[model]] #1 needs 'kind'"),
    (M + 'kind = "pop"\npreset = "rsc15"', "[[model]] #1 preset is a GRU4Rec key; a pop baseline takes options"),
    (M + 'kind = "pop"\n' + M + 'kind = "pop"', "[[model]] name 'POP' is used twice"),
    (GRU, "[[model]] #1 GRU4Rec model 'GRU4Rec' needs onnx, checkpoint or preset / params"),
    (GRU + 'preset = "rsc16"', "[[model]] #1 preset must be one of rsc15,"),
    (GRU + "params = { n_epoch = 1 }", "unknown key 'n_epoch' in [[model]] #1 params (known: loss,"),
    (GRU + "params = { dropout_p_hidden = 1.5 }", "[[model]] #1 params: parameter dropout_p_hidden"),
    (GRU + 'onnx = "m.onnx"\npreset = "rsc15"', "[[model]] #1 takes either onnx / checkpoint"),
    (GRU + 'onnx = "m.pt"', '[[model]] #1 onnx must be a .onnx file, got "m.pt"'),
    (GRU + 'options = { k = 1 }\nonnx = "m.onnx"', "[[model]] #1 options is for baselines"),
    ("[models]\nx = 1", "unknown table [models] (known: [benchmark], [[dataset]], [[model]])"),
]  # fmt: skip


@pytest.mark.parametrize(("snippet", "words"), BENCH_BAD)
def test_benchmark_bad_config_names_file_table_and_key(tmp_path, data, snippet, words):
    path = bench_toml(tmp_path / "b.toml", data, snippet.replace("{d}", str(data)))
    with pytest.raises(UserError) as e:
        benchmark.load_config(path)
    message = str(e.value)
    assert message.startswith(f"{path}: "), message
    assert words in message, message
    assert "__init__" not in message and "KeyError" not in message


def test_benchmark_dataset_must_be_an_array_of_tables(tmp_path):
    path = tmp_path / "b.toml"
    path.write_text('dataset = 3\n[[model]]\nkind = "pop"\n')
    with pytest.raises(UserError) as e:
        benchmark.load_config(path)
    assert str(e.value) == f"{path}: dataset must be written as [[dataset]] tables (one per entry), got 3"


def test_benchmark_checks_every_input_before_the_first_dataset(tmp_path, data):
    """A missing file of the second dataset stops the run before the first one is read or anything written."""
    two = (
        DS.format(name="first", d=data)
        + f'[[dataset]]\nname = "second"\ntrain = "{data}/train.parquet"\ntest = "{tmp_path}/gone.parquet"\n'
    )
    cfg = benchmark.load_config(bench_toml(tmp_path / "b.toml", data, two))
    with pytest.raises(UserError, match=r"gone\.parquet: file not found \(test data of dataset 'second'\)"):
        benchmark.run(cfg, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    # a model restricted to the first dataset does not need the second one's files
    cfg.models[0].datasets = ["first"]
    assert [r["dataset"] for r in benchmark.run(cfg, tmp_path / "out", progress=False)["results"]] == [
        "first"
    ]


def test_benchmark_unusable_out_and_missing_model_files(tmp_path, data):
    cfg = benchmark.load_config(bench_toml(tmp_path / "b.toml", data))
    (tmp_path / "out").write_text("")
    with pytest.raises(UserError, match="output folder path is an existing file"):
        benchmark.run(cfg, tmp_path / "out", progress=False)
    gru = f'[[model]]\nkind = "gru4rec"\nonnx = "{tmp_path}/none.onnx"\n[[model]]\nkind = "pop"'
    cfg = benchmark.load_config(bench_toml(tmp_path / "g.toml", data, gru))
    with pytest.raises(UserError, match=r"none\.onnx: ONNX model not found"):
        benchmark.run(cfg, tmp_path / "o2", progress=False)
    assert not (tmp_path / "o2").exists()


def test_benchmark_unknown_model_selection_through_cli(tmp_path, data, run):
    path = bench_toml(tmp_path / "b.toml", data, M + 'kind = "pop"\n' + M + 'kind = "vsknn"')
    code, out, err = run(
        "eval", "benchmark", "--config", path, "--out", tmp_path / "out", "--models", "pop,vsknnn"
    )
    assert code == 2 and out == ""
    assert err.splitlines() == [f"error: --models: no model 'vsknnn' in {path} (kinds: pop, vsknn)"]
    code, _, err = run("eval", "benchmark", "--config", path, "--out", tmp_path / "out", "--models", " , ")
    assert code == 2 and err.startswith("error: --models ' , ' names no model")
    assert not (tmp_path / "out").exists()


def test_benchmark_bad_config_through_cli_writes_nothing(tmp_path, data, run):
    path = bench_toml(tmp_path / "b.toml", data, "max_k = 10")
    code, out, err = run("eval", "benchmark", "--config", path, "--out", tmp_path / "out")
    assert (code, out) == (2, "")
    assert err.splitlines() == [
        f"error: {path}: [benchmark] max_k must be an integer between 20 and 1000, got 10"
    ]
    assert not (tmp_path / "out").exists()


def test_baselines_models_option_errors_name_the_option(tmp_path, data, run):
    cases = {
        "": "error: --models '' names no model",
        "pop,vsknnn": "error: --models: unknown baseline 'vsknnn'",
    }
    for models, words in cases.items():
        inputs = ("--train", data / "train.parquet", "--test", data / "test.parquet")
        code, out, err = run("eval", "baselines", *inputs, "--models", models, "--out", tmp_path / "out")
        assert code == 2 and len(err.splitlines()) == 1 and err.startswith(words), err
        assert "check the config" not in err
    assert not (tmp_path / "out").exists()


def test_benchmark_models_help_states_default(run):
    code, out, _ = run("eval", "benchmark", "--help")
    assert code == 0 and "Default: all models of the config." in " ".join(out.split())


def test_rerun_into_same_folder_removes_only_its_own_stale_plots(tmp_path, data, run):
    """A second run with fewer datasets leaves no plot of the first behind, and counts only its own."""
    out = tmp_path / "out"
    first, second = DS.format(name="first", d=data), DS.format(name="second", d=data)
    code, stdout, err = run(
        "eval", "benchmark", "--config", bench_toml(tmp_path / "a.toml", data, first + second), "--out", out
    )
    assert code == 0, err
    assert "and 2 plots (2 results)" in stdout
    assert {p.name for p in out.glob("*.png")} == {"curves_first.png", "curves_second.png"}
    for mine in ("notes.png", "curves_old.txt", "my_curves_x.png"):  # not the report's names: kept
        (out / mine).write_text("user file")
    code, stdout, err = run(
        "eval", "benchmark", "--config", bench_toml(tmp_path / "b.toml", data, first), "--out", out
    )
    assert code == 0, err
    assert "and 1 plots (1 results)" in stdout
    kept = ["curves_first.png", "curves_old.txt", "my_curves_x.png", "notes.png", "report.md", "results.json"]
    assert sorted(p.name for p in out.iterdir()) == kept


def test_report_labels_gru4rec_once():
    from gru4rec.eval.report import benchmark_markdown

    m = {"recall@20": 0.5, "mrr@20": 0.2}
    rows = [
        {"model": name, "baseline": baseline, "kind": kind, "dataset": "d", "metrics": {"standard": m}}
        for name, baseline, kind in (
            ("GRU4Rec (rsc15 preset)", False, "gru4rec"),
            ("Mine", False, "gru4rec"),
            ("POP", True, "pop"),
        )
    ]
    info = dict.fromkeys(("n_train_events", "n_train_sessions", "n_items", "n_predictions", "n_test_sessions",
                          "n_unknown_dropped"), 1)  # fmt: skip
    results = {"headline_mode": "standard", "tie_modes": ["standard"], "created": "now", "host": "h",
               "versions": {}, "datasets": {"d": info}, "results": rows, "plots": {"d": {"curves": "c.png"}}}  # fmt: skip
    lines = benchmark_markdown(results).splitlines()
    assert any(line.startswith("| **GRU4Rec (rsc15 preset)** | 0.5000 |") for line in lines)
    assert any(line.startswith("| **Mine** (GRU4Rec) | 0.5000 |") for line in lines)
    assert any(line.startswith("| POP | 0.5000 |") for line in lines)
    assert "preset) (GRU4Rec)" not in "\n".join(lines)
