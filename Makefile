# Benchmarks (see bench/RESULTS.md). The venv is the project's (./scripts/bootstrap.sh makes it).
PYTHON ?= .venv/bin/python

.PHONY: bench bench-quick

bench:
	scripts/bootstrap.sh
	$(PYTHON) -m bench.run --full

bench-quick:
	scripts/bootstrap.sh
	$(PYTHON) -m bench.run --quick
