# erofs-mount: `make run` mounts the bundled demo image, `make test` runs the suite.
# Both install what they need first (Debian 12, as root): see scripts/setup.sh.
VENV   := .venv
PY     := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test test-fast run bench clean

setup:
	@bash scripts/setup.sh

test: setup
	@bash scripts/run-tests.sh $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q tests/unit $(PYTEST_ARGS)

run: setup
	@bash scripts/demo.sh

bench: setup
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis bench/work
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
