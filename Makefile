# The two commands of the README: `make run` and `make test`. Both install
# what is missing first (uv included), so they work on a fresh machine.
.DEFAULT_GOAL := help
SHELL := /bin/bash

# uv from PATH, else the copy pip installs for this user, run as a module.
UV := $(shell command -v uv 2>/dev/null || echo "python3 -m uv")
VENV := .venv
export UV_PYTHON_DOWNLOADS := never

.PHONY: help install run test lint format bench clean

help:
	@echo "make run      install, then run the main job (embedded default without Redis)"
	@echo "make test     install, then run the whole test suite"
	@echo "make install  create .venv with adaptive-worker and adaptive-worker-client (client/)"
	@echo "make lint     ruff"
	@echo "make bench    benchmarks (results go to BENCHMARKS.md by hand)"

$(VENV)/.installed: pyproject.toml client/pyproject.toml uv.lock
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || \
		python3 -m pip install --quiet --user uv || \
		python3 -m pip install --quiet --user --break-system-packages uv
	$(UV) sync --locked --all-packages
	@touch $@

# The t-digest compiled: its C one-sample kernel and mypyc (see
# worker/engine/native.py). A failed build only means the pure Python
# module is used: same results.
$(VENV)/.native: $(VENV)/.installed worker/engine/tdigest.py worker/engine/_tdigest_kernel.c
	-$(VENV)/bin/python -m worker.engine.native build
	@touch $@

install: $(VENV)/.installed $(VENV)/.native

run: install
	$(VENV)/bin/adaptive-worker run

test: install
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: install
	$(VENV)/bin/python -m bench.learn

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis

# Interop with the real NeMo Relay runtime (optional dependency): a separate
# venv with nemo-relay and this project, used by tests/test_interop.py and
# bench/vs_relay.py. Our dependencies come from uv.lock, as in .venv.
RELAY_VENV := .venv-relay
RELAY_VERSION := 0.10.4

.PHONY: relay-venv interop bench-relay

$(RELAY_VENV)/.installed: pyproject.toml client/pyproject.toml uv.lock
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || \
		python3 -m pip install --quiet --user uv || \
		python3 -m pip install --quiet --user --break-system-packages uv
	$(UV) venv --allow-existing --quiet $(RELAY_VENV)
	$(UV) export --locked --no-dev --no-emit-project --no-emit-workspace --no-hashes --quiet \
		--format requirements-txt -o $(RELAY_VENV)/requirements.txt
	$(UV) pip install --quiet --python $(RELAY_VENV)/bin/python \
		-r $(RELAY_VENV)/requirements.txt nemo-relay==$(RELAY_VERSION) -e ./client -e .
	@touch $@

relay-venv: $(RELAY_VENV)/.installed

interop: install relay-venv
	$(VENV)/bin/python -m pytest -m interop $(PYTEST_ARGS)

bench-relay: install relay-venv
	$(VENV)/bin/python -m bench.vs_relay $(BENCH_ARGS)
