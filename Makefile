# Set-up, tests and the paper's pipeline. `make setup && make test` on a fresh clone.
VENV ?= .venv
PY := $(VENV)/bin/python
MHS := $(VENV)/bin/mhs
export MHS_RAW_DIR ?= $(abspath ../shared/data)

PROFILE ?= cpu
# Overrides for `mhs reproduce`, e.g. ARGS="judge.backend=openai judge.model=NAME endpoint.base_url=URL"
ARGS ?=

.PHONY: setup test test-fast prepare-data models reproduce-paper bench gpu-check clean

setup: $(VENV)/.installed

# torch first, pinned to the CPU build on local disk, so nothing pulls a CUDA build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip "setuptools>=77" wheel
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# Two pytest workers (pytest-xdist), one per core of the machines this runs on.
test: setup
	$(PY) -m pytest -q -n 2

test-fast: setup
	$(PY) -m pytest -q -n 2 -m "not slow"

prepare-data: setup
	$(MHS) prepare-data

models: setup
	$(MHS) models fetch

# Raw data -> the paper's tables for one profile (PROFILE=cpu|tiny|offline|paper), skipping
# stages that are up to date; prints the tables, the report's path and each stage's time.
reproduce-paper: setup
	$(MHS) reproduce --profile $(PROFILE) $(ARGS)

# Training benchmarks (tiny on the full unified split; cpu profile with FLOP/s vs matmul peak).
bench: setup
	mkdir -p artifacts/bench
	$(PY) scripts/bench_generator.py --out artifacts/bench/tiny_unified.json -- --profile tiny --dataset unified generator.train_subset=null
	$(PY) scripts/bench_generator.py --out artifacts/bench/cpu_esconv_tag.json -- --profile cpu --strategy-tag

# On a GPU machine: the tiny chain on CUDA, paper-profile throughput and the projected paper run
# time, one JSON in artifacts/gpu_check/ (scripts/gpu_check.sh; a few minutes).
gpu-check: setup
	PYTHON=$(PY) scripts/gpu_check.sh

clean:
	rm -rf artifacts .pytest_cache
