# Set-up, tests and the paper's pipeline. `make setup && make test` on a fresh clone.
VENV ?= .venv
PY := $(VENV)/bin/python
MHS := $(VENV)/bin/mhs
export MHS_RAW_DIR ?= $(abspath ../shared/data)

.PHONY: setup test test-fast prepare-data clean

setup: $(VENV)/.installed

# torch first, pinned to the CPU build on local disk, so nothing pulls a CUDA build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip "setuptools>=77" wheel
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

prepare-data: setup
	$(MHS) prepare-data

clean:
	rm -rf artifacts .pytest_cache
