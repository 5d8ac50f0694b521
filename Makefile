# streamer: `make run` serves (embedded Postgres), `make test` checks everything.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Debian's browser and driver: the browser test uses these paths and never downloads its own.
CHROMIUM := /usr/bin/chromium
CHROMEDRIVER := /usr/bin/chromedriver
# apt-get as root, or through sudo; sudo drops the environment, so env passes it through.
APT_INSTALL = SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends

.DEFAULT_GOAL := help
.PHONY: help install run demo test lint format pytest js-deps js-test browser-deps bench soak clean

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
	@if [ ! -x $(CHROMIUM) ] || [ ! -x $(CHROMEDRIVER) ]; then \
		echo "installing chromium and chromium-driver (apt-get)"; \
		$(APT_INSTALL) chromium chromium-driver >/dev/null; \
	fi
	@test -x $(CHROMIUM) && test -x $(CHROMEDRIVER)

js-deps: ## install Node.js (Debian's) for the client's unit tests, when node is missing
	@if ! command -v node >/dev/null; then \
		echo "installing nodejs (apt-get)"; \
		$(APT_INSTALL) nodejs >/dev/null; \
	fi

lint: $(STAMP) ## ruff (lint and format check) and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP) ## format the code
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

js-test: js-deps ## the browser client's unit tests (Node's own runner)
	node --test tests/js/

pytest: $(STAMP) browser-deps
	$(BIN)/python -m pytest -q

test: lint js-test pytest ## everything: lint, type checks, client tests, the test suite

$(VENV)/.bench-installed: pyproject.toml $(STAMP)
	$(BIN)/pip install --quiet -e ".[bench]"
	touch $@

bench: $(VENV)/.bench-installed ## benchmarks into bench/results/ (not in make test); BENCH_ARGS=--quick
	$(BIN)/python -m bench.run $(BENCH_ARGS)

soak: $(STAMP) ## the long form of the fault tests
	STREAMER_SOAK=1 $(BIN)/python -m pytest -q -m soak tests/

clean: ## remove the venv, caches and the embedded database
	rm -rf $(VENV) .streamer .mypy_cache .ruff_cache .pytest_cache
