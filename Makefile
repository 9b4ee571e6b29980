# Two commands on a fresh machine: `make demo` (set up + run the end-to-end demo) and `make test`.
PY := .venv/bin/python

.PHONY: setup demo test lint format stack clean bench-quality

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

# issue #7 quality benchmark (real models from PyPI, long: see benchmarks/quality/run.py), e.g.
# make bench-quality QUALITY_ARGS="--models smollm2 --methods lorp,shortgpt,streamline,sleb"
bench-quality: setup
	$(PY) benchmarks/quality/run.py $(QUALITY_ARGS)

# run redis + SeaweedFS + API + workers in the foreground until Ctrl-C (for poking with lorp-jobs):
# WORKERS CPU workers (-Q cpu), GPU_WORKERS GPU workers (-Q gpu)
WORKERS ?= 1
GPU_WORKERS ?= 0
stack: setup
	$(PY) -m devstack --workers $(WORKERS) --gpu-workers $(GPU_WORKERS)

clean:
	rm -rf .stack demo-out .pytest_cache .mypy_cache .ruff_cache
