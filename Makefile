# The two commands: `make test` (what CI runs) and `bash launch/train_tiny_cpu.sh` (the main job).
# CI also runs `make test-multinode`: two Ray nodes on this machine, ~4 minutes on 2 cores.
PY := .venv/bin/python

.PHONY: setup test test-multinode lint format bench

setup:
	bash scripts/setup_venv.sh

test: setup
	$(PY) -m pytest tests -m "not multinode"

test-multinode: setup
	$(PY) -m pytest tests/test_multinode.py -m multinode

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench: setup
	$(PY) tools/bench/future_kl.py
