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

# Demo: the embedded offline corpus (built once into data/demo), then a few minutes of the
# prefix_norm demo config on the CPU; rerunning resumes and finishes at once (rm -rf runs/demo).
DEMO_RUN := runs/demo/prefix_norm
demo: setup prefix-counts
	$(PY) -c "from prefixlm.data import corpus; print(corpus.prepare_demo())"
	$(PY) -m prefixlm.main --config=configs/prefix_norm.py:demo --workdir=$(DEMO_RUN)
	$(PY) -m prefixlm.train summary $(DEMO_RUN)
	# --- lead: evaluation / export / plots of $(DEMO_RUN) go here ---

bench: setup
	$(PY) bench/loss.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache out
