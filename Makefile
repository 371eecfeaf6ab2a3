# prefixlm: `make demo` and `make test` are the quickstart; both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test lint demo prefix-counts bench clean

setup: $(STAMP)

# Reinstall only when the pinned requirements change.
$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

test: setup
	$(PY) -m ruff check prefixlm configs tests bench
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check prefixlm configs tests bench

prefix-counts: setup
	$(PY) -m prefixlm.plots prefix-counts --tokenizer llama3 --output out/prefix_counts

demo: setup prefix-counts

bench: setup
	$(PY) bench/loss.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache out
