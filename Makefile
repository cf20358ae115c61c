# mpboot front door. Every target sets up .venv first (pip install -e '.[test]').
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: all setup demo test test-slow bench clean

all: test

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" bash tools/demo.sh

test: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -n auto

test-slow: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -n auto -m slow

bench: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python tools/bench_verify.py
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python tools/bench_update.py
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python tools/bench_smp.py
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python tools/bench_ble.py
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python tools/bench_provision.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
