# Two set-up commands on a fresh machine: `make demo` and `make test`. Both create .venv and install into it.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OUT ?= demo-out
# Test processes (pytest-xdist): each takes a whole group at a time (a module, or the modules sharing a costly
# session fixture), in collection order, where tests/conftest.py puts the modules that drive the CLI or a server
# first. A test keeps about one core busy on average.
TEST_PROCESSES ?= 2
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 180
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test bench ui browser clean

$(STAMP): requirements.txt constraints.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -c constraints.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

# Headless Chromium (Debian package) for the UI end-to-end test.
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

demo: install
	$(VENV)/bin/structxlip demo --out $(OUT)

test: install browser
	$(PY) -m pytest -q -n $(TEST_PROCESSES) --dist loadgroup --no-loadscope-reorder

bench: install
	$(PY) -m benchmarks.run

ui: install
	$(VENV)/bin/prefect server start --host 127.0.0.1

clean:
	rm -rf $(OUT) .pytest_cache
