# streamer: `make run` serves (embedded Postgres), `make test` checks everything.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Python dependencies come from uv.lock, installed by uv (from PyPI, into a venv of its own).
UV_VERSION := 0.13.9
UV_HOME := .uv
UV := $(UV_HOME)/bin/uv
UV_SYNC := UV_PROJECT_ENVIRONMENT=$(VENV) UV_PYTHON_DOWNLOADS=never \
	$(UV) sync --locked --extra dev --python $(PYTHON) --quiet
# Debian's browser and driver: the browser tests use these paths and never download their own.
CHROMIUM := /usr/bin/chromium
CHROMEDRIVER := /usr/bin/chromedriver
NGINX := /usr/sbin/nginx
# Debian's Redis: a fleet's broker in the fleet's tests and `make example` (never the service).
REDIS := /usr/bin/redis-server
# The browser client's one source is client/ (an npm package). The service serves a copy at
# /static for pages without a build step; the copy is committed, so that an installed
# package has it too, and make refreshes it (js-test fails if it was edited by hand).
CLIENT_FILES := streamer-client.js streamer-client.d.ts
SERVED := $(addprefix streamer/static/,$(CLIENT_FILES))
APP := examples/sveltekit
APP_INPUTS := $(shell find $(APP)/src -type f 2>/dev/null) $(addprefix $(APP)/,package.json \
	svelte.config.js vite.config.ts tsconfig.json)
# The app installs the client as a project would: the tarball `npm pack` makes of client/
# (only what its package.json ships), under the fixed name the app's package.json names. The
# app's lock holds no checksum for it: npm would serve a changed client stale from its cache.
PACKED := $(APP)/packed/streamer-client.tgz
PACKAGE_FILES := client/package.json client/README.md client/LICENSE \
	$(addprefix client/src/,$(CLIENT_FILES))
# apt-get as root, or through sudo; sudo drops the environment, so env passes it through.
# A package's system service (nginx, redis) is never started: where no policy-rc.d says so
# already, one that refuses every start is put in place for the install and removed after.
APT_INSTALL = SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	if [ ! -e /usr/sbin/policy-rc.d ]; then \
		printf '\#!/bin/sh\nexit 101\n' | $$SUDO tee /usr/sbin/policy-rc.d >/dev/null; \
		$$SUDO chmod +x /usr/sbin/policy-rc.d; \
		trap '$$SUDO rm -f /usr/sbin/policy-rc.d' EXIT; \
	fi; \
	$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends

.DEFAULT_GOAL := help
.PHONY: help install run demo example app test lint format pytest js-deps js-test browser-deps net-deps \
	nginx-deps broker-deps lock bench soak clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

$(UV):
	$(PYTHON) -m venv $(UV_HOME)
	$(UV_HOME)/bin/pip install --quiet uv==$(UV_VERSION)

$(STAMP): uv.lock pyproject.toml | $(UV)
	$(UV_SYNC)
	touch $(STAMP)

install: $(STAMP) $(SERVED) ## create .venv and install streamer with its dev tools, from uv.lock

lock: | $(UV) ## update uv.lock after a change of pyproject.toml's dependencies
	$(UV) lock --python $(PYTHON)

streamer/static/%: client/src/%
	cp $< $@

# The package ships the repository's license (js-test fails if the copy was edited by hand).
client/LICENSE: LICENSE
	cp $< $@

$(PACKED): $(PACKAGE_FILES) | js-deps
	mkdir -p $(@D)
	rm -f $(@D)/streamer-client-*.tgz
	cd client && npm pack --ignore-scripts --silent --pack-destination ../$(@D) >/dev/null
	mv $(@D)/streamer-client-*.tgz $@

run: install ## run the service (embedded Postgres unless DATABASE_URL is set)
	$(BIN)/streamer serve

demo: install ## embedded Postgres + simulated file processor + live demo page
	$(BIN)/streamer demo

example: install nginx-deps broker-deps app ## nginx (HTTP/2) on https://127.0.0.1:8443, two streamer nodes as one fleet through Redis, the SvelteKit app
	exec $(BIN)/python -m examples.stack

browser-deps: ## install Debian's chromium and chromium-driver for the browser tests
	@if [ ! -x $(CHROMIUM) ] || [ ! -x $(CHROMEDRIVER) ]; then \
		echo "installing chromium and chromium-driver (apt-get)"; \
		$(APT_INSTALL) chromium chromium-driver >/dev/null; \
	fi
	@test -x $(CHROMIUM) && test -x $(CHROMEDRIVER)

nginx-deps: ## install Debian's nginx (run by the example and its test, never as the system service)
	@if [ ! -x $(NGINX) ]; then \
		echo "installing nginx (apt-get)"; \
		$(APT_INSTALL) nginx >/dev/null; \
	fi
	@test -x $(NGINX) && command -v openssl >/dev/null

broker-deps: ## install Debian's redis-server (run by the fleet's tests and example, never as the system service)
	@if [ ! -x $(REDIS) ]; then \
		echo "installing redis-server (apt-get)"; \
		$(APT_INSTALL) redis-server >/dev/null; \
	fi
	@test -x $(REDIS)

net-deps: ## install Debian's iproute2 (`ss`, which a test reads the listen backlog with)
	@if ! command -v ss >/dev/null; then \
		echo "installing iproute2 (apt-get)"; \
		$(APT_INSTALL) iproute2 >/dev/null; \
	fi
	@command -v ss >/dev/null

js-deps: ## install Node.js and npm (Debian's) when missing
	@if ! command -v node >/dev/null; then \
		echo "installing nodejs (apt-get)"; \
		$(APT_INSTALL) nodejs >/dev/null; \
	fi
	@if ! command -v npm >/dev/null; then \
		echo "installing npm (apt-get)"; \
		$(APT_INSTALL) npm >/dev/null; \
	fi

$(APP)/node_modules/.installed: $(APP)/package-lock.json $(PACKED) | js-deps
	cd $(APP) && npm ci --no-audit --no-fund --loglevel=error
	@for name in $(CLIENT_FILES); do \
		cmp -s client/src/$$name $(APP)/node_modules/streamer-client/src/$$name || { \
			echo "$(APP) installed a streamer-client other than $(PACKED)'s"; exit 1; }; \
	done
	touch $@

# Built only when an input changed: type-checked against the client's types, then built.
$(APP)/build/.built: $(APP)/node_modules/.installed $(APP_INPUTS)
	cd $(APP) && npm run --silent check && npm run --silent build >/dev/null
	touch $@

app: $(APP)/build/.built ## build the SvelteKit example (npm ci from its lock, svelte-check, vite build)

lint: $(STAMP) ## ruff (lint and format check) and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP) ## format the code
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

js-test: js-deps $(SERVED) client/LICENSE ## the client package's tests (Node's own runner)
	@for name in $(CLIENT_FILES); do \
		cmp -s client/src/$$name streamer/static/$$name || { \
			echo "streamer/static/$$name differs from client/src/$$name: edit client/src/"; \
			exit 1; }; \
	done
	@cmp -s LICENSE client/LICENSE || { echo "client/LICENSE differs from LICENSE"; exit 1; }
	cd client && npm test --silent

# The suite runs once per change source (STREAMER_SOURCE, tests/conftest.py); the wal pass
# leaves out the files that never touch one (test_wal_source.py sets up wal by itself).
SOURCE_FREE := test_auth.py test_dispatch.py test_client_types.py test_migrations.py \
	test_wal_source.py

pytest: install browser-deps nginx-deps broker-deps net-deps app
	$(BIN)/python -m pytest -q
	STREAMER_SOURCE=wal $(BIN)/python -m pytest -q $(addprefix --ignore=tests/,$(SOURCE_FREE))

test: lint js-test pytest ## everything: lint, type checks, client tests, the test suite

bench: install broker-deps ## benchmarks into bench/results/ (not in make test); BENCH_ARGS=--quick
	$(BIN)/python -m bench.run $(BENCH_ARGS)

soak: install ## the long form of the fault tests
	STREAMER_SOAK=1 $(BIN)/python -m pytest -q -m soak tests/

clean: ## remove the venvs, caches, the app's build and the embedded database
	rm -rf $(VENV) $(UV_HOME) .streamer .mypy_cache .ruff_cache .pytest_cache
	rm -rf $(APP)/node_modules $(APP)/build $(APP)/.svelte-kit $(APP)/packed
