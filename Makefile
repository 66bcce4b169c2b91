# The two quick-start commands (README): `make demo` and `make test`. Both set up .venv themselves.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: setup demo test test-fast lint typecheck bench docs clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# The web UI's session player (asciinema-player, from npm) goes into a git-ignored folder. Without npm the
# UI still works and replays sessions as plain text.
UI_VENDOR := ui/static/vendor
$(UI_VENDOR)/.built: ui/package.json ui/package-lock.json
	@if command -v npm >/dev/null && (cd ui && npm ci --no-audit --no-fund --loglevel=error); then \
	  mkdir -p $(UI_VENDOR) && \
	  cp ui/node_modules/asciinema-player/dist/bundle/asciinema-player.min.js \
	     ui/node_modules/asciinema-player/dist/bundle/asciinema-player.css $(UI_VENDOR)/ && touch $@; \
	else echo "npm or the npm registry is not available: the web UI replays sessions as plain text"; fi

setup: $(BIN)/.installed $(UI_VENDOR)/.built

# make demo PORT=8444 SANDBOX_PORT=8445 IDP_PORT=8446: each given port is passed to `kubegate demo`.
demo: setup
	$(BIN)/kubegate demo $(if $(PORT),--port $(PORT)) $(if $(SANDBOX_PORT),--sandbox-port $(SANDBOX_PORT)) $(if $(IDP_PORT),--idp-port $(IDP_PORT))

# The import layers ([tool.importlinter] in pyproject.toml) are checked on .typecheck/, the committed link
# tree of the source folders under their installed names (lint-imports cannot follow the editable install).
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	PYTHONPATH=.typecheck $(BIN)/lint-imports --no-cache

# mypy checks the package as installed, kubegate.* ([tool.mypy] in pyproject.toml: mypy_path .typecheck/,
# packages = kubegate); naming folders (`mypy core`) would check them again as `core.*`.
typecheck: setup
	$(BIN)/mypy

# The whole suite in two processes at once (unless PYTEST_ARGS names what to run): the end-to-end and
# sandbox tests mostly wait (for processes, streams, timeouts) while the unit and adversarial tests use the
# CPU, so side by side they take the time of the longer half (CI must stay under 30 minutes). The first
# half's output is printed when both are done; either failing fails the target.
test: lint typecheck
ifeq ($(strip $(PYTEST_ARGS)),)
	@log=$$(mktemp); \
	$(BIN)/pytest tests/e2e tests/sandbox > $$log 2>&1 & first=$$!; \
	$(BIN)/pytest tests/unit tests/adversarial; second=$$?; \
	wait $$first; first=$$?; \
	echo; echo "== tests/e2e tests/sandbox =="; cat $$log; rm -f $$log; \
	test $$first -eq 0 && test $$second -eq 0
else
	$(BIN)/pytest $(PYTEST_ARGS)
endif

# Everything but the tests marked `slow` (streams held open past 90 s), without lint and type checks: the
# quick loop while developing. `make test` (and CI) still runs them all.
test-fast: setup
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

docs: setup
	$(BIN)/mkdocs build --strict

bench: setup
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .kubegate .pytest_cache .mypy_cache .ruff_cache ui/node_modules $(UI_VENDOR)
