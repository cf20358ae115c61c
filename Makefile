# mpboot front door. Every target sets up .venv first (pip install -e '.[test]', smpmgr).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: all setup demo demo-qemu test test-slow bench clean

all: test

# smpmgr (a stock SMP client the tests drive) pins smpclient[all], whose bumble 0.0.228
# conflicts with ours (0.0.236); its serial flows use neither, so it goes in with --no-deps
# and pyproject's test extra lists the rest of what it needs.
$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip install --quiet --no-deps smpmgr==0.19.1
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" bash tools/demo.sh

# The same story on the emulated Cortex-M3 (needs gcc-arm-none-eabi, libnewlib-arm-none-eabi,
# qemu-system-arm and the MicroPython source: docs/PORTING.md).
demo-qemu: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" bash tools/demo.sh qemu

test: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -n auto

test-slow: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -n auto -m slow

bench: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python tools/bench_verify.py
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python tools/bench_trust.py
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python tools/bench_signing.py
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python tools/bench_update.py
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python tools/bench_smp.py
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python tools/bench_compress.py
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python tools/bench_zephyr.py
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python tools/bench_ble.py
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python tools/bench_provision.py
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python tools/bench_qemu.py
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python tools/bench_stages.py
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python tools/bench_fleet.py
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python tools/bench_station.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
