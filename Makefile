# Two commands on a fresh machine: `make demo` (set up + run the end-to-end demo) and `make test`.
PY := .venv/bin/python

.PHONY: setup demo test lint format stack clean

setup:
	bash scripts/setup.sh

demo: setup
	$(PY) scripts/demo.py $(DEMO_ARGS)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

lint:
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

format:
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .

# run redis + SeaweedFS + API + worker in the foreground until Ctrl-C (for poking with lorp-jobs)
stack: setup
	$(PY) -m service.devstack

clean:
	rm -rf .stack demo-out .pytest_cache .mypy_cache .ruff_cache
