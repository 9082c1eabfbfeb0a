# The README's two commands: `make run` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Pinned dependencies (with hashes): requirements.lock for the image, requirements-dev.lock
# (runtime + dev) for make run/test. Regenerate both with `make lock` after editing pyproject.
LOCK     := requirements.lock
DEV_LOCK := requirements-dev.lock
LOCK_TOOLS := var/lock-tools
UV_VERSION := 0.13.9
# Extra settings file for `make run`, on top of var/dev.env (e.g. ENV_FILE=var/simulator.env).
ENV_FILE ?=

.PHONY: run test lint typecheck unit bench demo clean lock browser promtool screenshots

$(STAMP): pyproject.toml $(DEV_LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --require-hashes -r $(DEV_LOCK)
	$(BIN)/pip install --quiet --no-deps -e .
	$(BIN)/python tests/check_env.py pyproject.toml
	touch $(STAMP)

## Pin every dependency again from pyproject.toml (uv pip compile, universal, with hashes).
lock:
	test -x $(LOCK_TOOLS)/bin/uv || { $(PYTHON) -m venv $(LOCK_TOOLS) \
		&& $(LOCK_TOOLS)/bin/pip install --quiet uv==$(UV_VERSION); }
	$(LOCK_TOOLS)/bin/uv pip compile pyproject.toml --universal --python-version 3.11 \
		--generate-hashes --quiet -o $(LOCK)
	$(LOCK_TOOLS)/bin/uv pip compile pyproject.toml --extra dev --universal --python-version 3.11 \
		--generate-hashes --quiet -o $(DEV_LOCK)

## Set up and start `receiver serve` on 127.0.0.1:8000 (SQLite + ./var/archive).
run: $(STAMP)
	$(BIN)/receiver dev-env var/dev.env
	$(BIN)/receiver serve --env-file var/dev.env $(if $(ENV_FILE),--env-file $(ENV_FILE)) \
		--host 127.0.0.1 --port 8000

## Set up and run the whole suite: lint, type check, tests.
test: $(STAMP) browser promtool lint typecheck unit

lint: $(STAMP)
	$(BIN)/ruff check receiver tests bench
	$(BIN)/ruff format --check receiver tests bench
	$(BIN)/cfn-lint infra/receiver.yaml
	$(BIN)/lint-imports
	$(BIN)/hadolint Dockerfile

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q

## Headless Chromium for the console's browser tests (Debian's chromium and chromium-driver),
## installed when missing and possible (root + apt-get); without it those tests fail, loudly.
browser:
	@{ command -v chromium >/dev/null && command -v chromedriver >/dev/null; } \
		|| { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq \
		&& DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver \
		>/dev/null; } \
		|| echo "chromium or chromedriver missing: the console's browser tests will fail"

## promtool (Debian's prometheus package) for the alert rules' tests (tests/test_monitoring.py),
## installed when missing and possible (root + apt-get); without it those tests fail, loudly.
## Only promtool is used: the tests never start the Prometheus server the package also brings.
promtool:
	@command -v promtool >/dev/null \
		|| { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq \
		&& DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		prometheus >/dev/null; } \
		|| echo "promtool missing: the alert rules' tests will fail"

## Run the demo, then photograph the console (overview, a job) with the tests' browser into docs/.
screenshots: $(STAMP) browser
	$(BIN)/python -m tests.console_screenshots docs

## Run the benchmarks (a few minutes) and print the table; installs rclone (a baseline) via apt
## when missing and possible, otherwise that baseline is skipped.
bench: $(STAMP)
	@command -v rclone >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& apt-get update -qq && apt-get install -y -qq rclone >/dev/null; } \
		|| echo "rclone not installed: its baseline will be skipped"
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache

## Start receiver and the provider simulator, run jobs on all four providers, show the archive.
demo: $(STAMP)
	$(BIN)/receiver demo --workdir var/demo
