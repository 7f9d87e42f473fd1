# Entry points for a fresh machine. `make quickstart` (main job) and `make test` (tests) set up first.
PYTHON ?= python3

TORCH_PIN ?= /tmp/rollout-torch-pin.txt

.PHONY: setup setup-verl quickstart serve test test-gpu lint bench

# torch: keep the one installed; where there is none, take the CPU build (never a multi-GB CUDA one).
setup:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "torch==2.13.0"
	$(PYTHON) -m pip install -e ".[test]"

# verl and its dependencies, resolved by uv against a pinned set (pip's resolver backtracks over
# verl's graph for many minutes) with the installed torch pinned so that nothing replaces it.
setup-verl: setup
	$(PYTHON) -m pip install -q uv
	$(PYTHON) -c "import torch; print('torch==' + torch.__version__)" > $(TORCH_PIN)
	$(PYTHON) -m uv pip install --python $(PYTHON) -e ".[test,verl]" -c integrations/verl/constraints.txt -c $(TORCH_PIN)

quickstart: setup
	PYTHON=$(PYTHON) bash examples/run_quickstart.sh

serve: setup
	$(PYTHON) -m rollout serve

test: setup-verl
	$(PYTHON) -m pytest -q tests

test-gpu:
	PYTHONPATH=. $(PYTHON) -m pytest -q tests/gpu tests/multi_gpu

lint:
	$(PYTHON) -m ruff check .

bench:
	PYTHONPATH=. $(PYTHON) examples/offline_throughput.py
