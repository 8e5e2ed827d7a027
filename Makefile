# Quick start: `make demo` and `make test`; each sets itself up on a fresh machine.
PY_BASE ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vitscope-installed
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist

.PHONY: setup demo lint test bench retrain-bundled clean

setup: $(STAMP) fashion-mnist

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PY_BASE) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1" || $(PY) -m pip install -q torch torchvision
	$(PY) -m pip install -q -e ".[dev,hf,openclip,track]"
	@touch $(STAMP)

# Debian's dataset-fashion-mnist (30 MB of IDX files); skipped quietly where apt is not usable.
.PHONY: fashion-mnist
fashion-mnist:
	@if [ ! -d "$(FMNIST_DIR)" ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist >/dev/null) \
	      || echo "note: could not install dataset-fashion-mnist; using the subset shipped in the package"; \
	  else echo "note: $(FMNIST_DIR) missing and apt-get unavailable; using the subset shipped in the package"; fi; \
	fi

demo: setup
	$(VENV)/bin/vitscope demo

# ruff (lint + format) and mypy on the code; part of `make test`, so CI runs them.
lint: setup
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests benchmarks scripts
	$(VENV)/bin/mypy

# tests/unit: functions and classes in-process; tests/integration: the CLI, subprocesses, DDP, the browser.
test: setup lint
	$(PY) -m pytest -q tests/unit tests/integration; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 1; fi; exit $$rc

bench: setup
	@for f in benchmarks/bench_*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

# Retrain the bundled models from scratch (vitscope pretrain only; resumable), then package them.
retrain-bundled: setup
	scripts/train_bundled.sh

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
