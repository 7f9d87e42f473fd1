# Entry points for a fresh machine. `make quickstart` (main job) and `make test` (tests) set up first.
PYTHON ?= python3

.PHONY: setup quickstart serve test test-gpu lint bench

# torch: keep the one installed; where there is none, take the CPU build (never a multi-GB CUDA one).
setup:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "torch==2.13.0"
	$(PYTHON) -m pip install -e ".[test]"

quickstart: setup
	PYTHON=$(PYTHON) bash examples/run_quickstart.sh

serve: setup
	$(PYTHON) -m rollout serve

test: setup
	$(PYTHON) -m pytest -q tests

test-gpu:
	PYTHONPATH=. $(PYTHON) -m pytest -q tests/gpu tests/multi_gpu

lint:
	$(PYTHON) -m ruff check .

bench:
	PYTHONPATH=. $(PYTHON) examples/offline_throughput.py
