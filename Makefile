# Two commands set everything up on a fresh machine (Python 3.11+, Node 20 with npm):
#   make demo   - local Azurite + stand-in A1111 + the worker over sample jobs; images land in ./out
#   make test   - the whole test suite (what CI runs)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint bench clean promtool

# promtool (Debian's prometheus package) checks /metrics and the alert rules; setup installs it where
# it can (apt-get as root, or with sudo that asks no password: CI runners, containers), elsewhere
# `make promtool` says how and the tests that need it skip unless CI=true.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
CAN_APT := $(shell command -v apt-get >/dev/null 2>&1 && { [ "$$(id -u)" = 0 ] || sudo -n true 2>/dev/null; } && echo yes)

setup: $(VENV)/.installed node_modules/.installed $(if $(CAN_APT),promtool)

promtool:
	@command -v promtool >/dev/null 2>&1 || { \
	  if [ -n "$(CAN_APT)" ]; then \
	    $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 || \
	      { $(SUDO) apt-get update -qq && \
	        $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }; \
	  else \
	    echo "promtool is missing: install Debian's prometheus package (apt-get install prometheus)" >&2; \
	    exit 1; \
	  fi; }
	@promtool --version 2>&1 | head -1

$(VENV)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --require-hashes -r requirements.lock
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e '.[tools,dev]'
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

demo: setup
	$(PY) -m sidecar demo

test: setup
	$(PY) -m pytest

lint: setup
	$(PY) -m ruff check sidecar a1111 tests scripts
	$(PY) -m mypy
	$(VENV)/bin/lint-imports

bench: setup
	$(PY) -m sidecar bench

clean:
	rm -rf $(VENV) node_modules out bench-report .pytest_cache .mypy_cache .ruff_cache .import_linter_cache .grimp_cache
