# kubetune: every target does its own set-up (virtual environment, packages, test components).
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
# Extra pytest arguments, e.g. `make test PYTEST_ARGS="-m 'not slow'"` or `make test-fast`.
PYTEST_ARGS ?=

# Debian packages the tests run for real: Prometheus (server and promtool) and Lua (Argo CD health check).
SYSTEM_COMMANDS := prometheus promtool lua5.4 lua5.1
SYSTEM_PACKAGES := prometheus lua5.4 lua5.1

.PHONY: help install system-deps image-deps images tools model test test-fast lint generate demo bench clean

help:  ## List the targets.
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

install: $(INSTALLED)  ## Create .venv with kubetune and every dependency (constraints.txt pins them).

$(INSTALLED): pyproject.toml constraints.txt scripts/install-deepspeed.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[operator,trainer,dev,bench]'
	scripts/install-deepspeed.sh $(VENV)
	touch $@

system-deps:  ## Install the Debian packages the tests use, when any is missing.
	@for c in $(SYSTEM_COMMANDS); do command -v $$c >/dev/null || missing=1; done; \
	if [[ -n "$${missing:-}" ]]; then \
	  echo "installing $(SYSTEM_PACKAGES)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(SYSTEM_PACKAGES); \
	fi

# What `make images` builds with: podman (chroot isolation: no cgroups, no user namespaces needed) and a base
# image made with mmdebstrap, as no image registry is needed.
IMAGE_COMMANDS := podman buildah mmdebstrap
IMAGE_PACKAGES := podman buildah mmdebstrap

image-deps:  ## Install the Debian packages that build and run the images, when any is missing.
	@for c in $(IMAGE_COMMANDS); do command -v $$c >/dev/null || missing=1; done; \
	if [[ -n "$${missing:-}" ]]; then \
	  echo "installing $(IMAGE_PACKAGES)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(IMAGE_PACKAGES); \
	fi

images: install image-deps  ## Build ghcr.io/kubetune/kubetune-{operator,trainer}:<appVersion> from the two Dockerfiles.
	scripts/build-images.sh

tools: install  ## Build or fetch the test components (Kubernetes binaries, training operator, kwok, helm).
	hack/install-tools.sh

model: install  ## Download and convert SmolLM2-135M-Instruct once (~/.cache/kubetune/models); reused when its checksums verify.
	$(BIN)/python -m kubetune_trainer.pretrained

LINTED := operator trainer-image tests bench

lint: install  ## ruff (rules and formatting), mypy (strict) and the import layering contracts.
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/mypy operator/kubetune trainer-image/kubetune_trainer bench
	$(BIN)/lint-imports

generate: install  ## Rebuild every generated file from the API models.
	$(BIN)/kubetune crd > crds/kubetune.io_finetunejobs.yaml
	$(BIN)/kubetune reference > docs/reference.md
	scripts/sync-chart-crd.sh

test: install system-deps image-deps tools lint model  ## Everything: unit, trainer, control-plane and end-to-end tiers.
	$(BIN)/pytest $(PYTEST_ARGS)

test-fast:  ## The same without the slowest tier (multi-process training, end to end).
	$(MAKE) test PYTEST_ARGS="-m 'not slow' $(PYTEST_ARGS)"

# examples/quickstart.yaml reads pvc://models/SmolLM2-135M-Instruct; locally the claim `models` is the
# model cache of `make model`, linked under DEMO_PVC_ROOT.
DEMO_PVC_ROOT := out/pvc

demo: install model  ## The main job: LoRA teaches SmolLM2-135M-Instruct JSON extraction; base vs tuned answers.
	mkdir -p $(DEMO_PVC_ROOT)
	ln -sfn "$$(dirname "$$($(BIN)/python -m kubetune_trainer.pretrained)")" $(DEMO_PVC_ROOT)/models
	$(BIN)/kubetune run -f examples/quickstart.yaml --pvc-root $(DEMO_PVC_ROOT)

# Extra arguments for every benchmark, e.g. `make bench BENCH_ARGS=--quick` for a smoke run.
BENCH_ARGS ?=

bench: install tools  ## Run every benchmark (docs/benchmarks/*.json and plots), then write docs/benchmarks.md.
	$(BIN)/python -m bench.operator_scale $(BENCH_ARGS)
	$(BIN)/python -m bench.trainer_throughput $(BENCH_ARGS)
	$(BIN)/python -m bench.trainer_real $(BENCH_ARGS)
	$(BIN)/python -m bench.gpu_throughput $(BENCH_ARGS)
	$(BIN)/python -m bench.report

clean:  ## Remove the virtual environment and local outputs (caches under ~/.cache/kubetune stay).
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache
