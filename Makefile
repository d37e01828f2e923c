# The two commands a newcomer runs (README): `make demo` and `make test`.
.PHONY: setup demo test bench

setup:
	./scripts/setup

demo: setup
	.venv/bin/rtqa demo

test: setup
	.venv/bin/python -m pytest -q

bench: setup
	.venv/bin/python benchmarks/ingest.py
