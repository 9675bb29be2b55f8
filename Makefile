# ember: the two commands that set up a fresh machine are `make serve` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
EXTRAS := gateway,pipeline,export,triton,dev
STAMP := $(VENV)/.installed-stamp
NODE_STAMP := client/js/node_modules/.installed-stamp

.PHONY: serve test check export engines bench install node clean-exports test-gpu

install: $(STAMP)

# Versions are pinned in pyproject.toml only. open_clip_torch is installed without its dependencies:
# we need only the CLIP BPE merges it ships (a CUDA torchvision would come with it otherwise).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[$(EXTRAS)]'
	$(VENV)/bin/pip install --quiet --no-deps $$($(PY) -c "import tomllib; d=tomllib.load(open('pyproject.toml','rb')); print(' '.join(d['tool']['ember']['no-deps']))")
	$(PY) -c "import numpy, sys; sys.exit(0 if numpy.__version__ < '2' else 'numpy must be < 2 for the Triton Python backend')"
	touch $@

node: $(NODE_STAMP)

$(NODE_STAMP): client/js/package.json
	cd client/js && npm install --no-audit --no-fund --silent
	touch $@

# Gateway + Triton + demo models (built and exported on first run). Ctrl-C stops both.
serve: $(STAMP)
	$(PY) -m ember.serve

test: $(STAMP) $(NODE_STAMP)
	$(PY) -m pytest -q -ra

test-gpu: $(STAMP)
	RUN_GPU=1 $(PY) -m pytest -q -ra tests/gpu

check: $(STAMP)
	$(VENV)/bin/ruff check src tests export benchmarks client model_repository
	$(VENV)/bin/mypy src/ember/gateway src/ember/endpoints
	$(PY) -m ember.specs.check

export: $(STAMP)
	$(PY) -m export onnx

# TensorRT engines for this GPU (inside the NGC Triton image): fal presets + the dynamic profile, fp16.
engines: $(STAMP)
	$(PY) -m export engines --precision fp16 --dynamic

PRESET ?= lcm_demo
bench: $(STAMP)
	$(PY) -m benchmarks.run --preset $(PRESET)

clean-exports:
	rm -rf var/export
