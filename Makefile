# `make demo`: create .venv if missing, then run the demo pipeline (dvc repro) on the bundled sample.
# `make test`: create .venv if missing, then run the test suite.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
STAMP  := $(VENV)/.installed
export PATH := $(abspath $(VENV))/bin:$(PATH)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test env clean-demo

env: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	test -d .git || (git init -q && git add -A && git commit -qm "ercflow checkout" || true)
	dvc repro
	dvc metrics show
	cat reports/report.md

test: $(STAMP)
	python -m pytest -q -ra -n 2 --dist loadfile tests

clean-demo:
	rm -rf data models results reports
