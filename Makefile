# The two commands: `make test` (what CI runs) and `bash launch/train_tiny_cpu.sh` (the main job).
PY := .venv/bin/python

.PHONY: setup test lint format bench

setup:
	bash scripts/setup_venv.sh

test: setup
	$(PY) -m pytest tests

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench: setup
	$(PY) tools/bench/future_kl.py
