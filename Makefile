# gru4rec: `make demo` runs the pipeline end to end on built-in synthetic data; `make test` runs the tests;
# `make docs` builds the documentation site into site/.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
CLI    := $(VENV)/bin/gru4rec-cli
TORCH_VERSION ?= 2.13.0
# Where torch comes from: empty = pip's default (here, the CPU build on disk); elsewhere pass
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu to avoid PyPI's multi-GB CUDA build.
TORCH_INDEX_URL ?=
STAMP  := $(VENV)/.installed
DEMO   ?= demo_out
PYTEST_ARGS ?=

.PHONY: install demo test test-all bench docs lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# A bare `torch` requirement would pull a multi-GB CUDA build: install the CPU build first.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(PY) -m pip install -q -e '.[dev,mlflow,ray,serve,docs]'
	touch $(STAMP)

demo: install
	$(CLI) data synth $(DEMO)/data --sessions 20000 --items 2000 --seed 7
	$(CLI) train $(DEMO)/data/train.parquet --valid $(DEMO)/data/test.parquet --out $(DEMO)/model.pt --preset demo --overwrite
	$(CLI) export $(DEMO)/model.pt --out $(DEMO)/model.onnx --top-k 20
	$(CLI) score --model $(DEMO)/model.onnx --sessions $(DEMO)/data/test.parquet --out $(DEMO)/recs.parquet --metrics $(DEMO)/metrics.json
	$(CLI) eval benchmark --config eval/configs/demo.toml --out $(DEMO)/report
	@echo "demo finished: see $(DEMO)/"

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest -q --runslow $(PYTEST_ARGS)

bench: install
	$(CLI) bench train --out bench/results/train-latest.json
	$(CLI) bench score --out bench/results/score-latest.json
	$(CLI) bench score-memory --out bench/results/score-memory.json
	$(CLI) bench catalog --out bench/results/catalog-cpu.json
	$(PY) bench/tile_width.py --out bench/results/tile-width-cpu.json
	$(PY) bench/untiled_vs_tiled.py --out bench/results/untiled-vs-tiled-cpu.json
	$(PY) bench/ray_scale.py --out bench/results/ray-score-latest.json
	$(PY) bench/nightly_false_alarms.py --out bench/results/nightly-false-alarms.json
	$(CLI) bench serve --out bench/results/serve-cpu.json

# The measured tables come from bench/results/*.json and the CLI reference from the typer app itself,
# both regenerated on every build, so neither can drift; --strict fails on a broken link.
docs: install
	$(PY) docs/gen_performance.py
	$(VENV)/bin/typer gru4rec.cli utils docs --name gru4rec-cli --title "CLI reference" --output docs/cli.md
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

lint: install
	$(PY) -m ruff check gru4rec train export score eval serve tests bench docs
	$(PY) -m ruff format --check gru4rec train export score eval serve tests bench docs

clean:
	rm -rf $(VENV) $(DEMO) site build dist *.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
