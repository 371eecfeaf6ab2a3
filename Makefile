# prefixlm: `make demo` and `make test` are the quickstart; both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# XLA's C++ INFO lines off (warnings stay): with the AOT extras installed, the CUDA plugin logs
# "could not find cuda drivers" on every start on a machine without a GPU.
export TF_CPP_MIN_LOG_LEVEL ?= 1
# ACCEL=cpu (default), cuda or aot:
#   cuda  adds requirements-cuda.txt (jax[cuda12]) and takes torch from the PyTorch CPU index
#         (PyPI's Linux torch would pull several GB of CUDA wheels that only export/lm-eval use).
#         The index is probed first (TORCH_INDEX_TIMEOUT seconds): unreachable, set-up stops at
#         once saying so, instead of pip retrying every package for an hour. TORCH_INDEX= (empty)
#         takes torch from PyPI instead; TORCH_INDEX=URL names a mirror.
#   aot   the CPU set plus requirements-aot.txt: the TPU and GPU compilers for --dry_run=aot and
#         tests/compile/test_aot.py (`make test` installs them as well).
# TPU VMs are set up by launch/tpu_vm.sh setup.
ACCEL ?= cpu
ifeq ($(filter $(ACCEL),cpu cuda aot),)
$(error ACCEL=$(ACCEL): expected cpu or cuda, or aot for the AOT compilers (TPU VMs: launch/tpu_vm.sh setup))
endif
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_INDEX_TIMEOUT ?= 15
# pip's own limits, so a mirror that stops answering mid-install fails in minutes, not hours.
PIP_NET := --timeout 30 --retries 2
PIP_ACCEL_FLAGS := $(if $(filter cuda,$(ACCEL)),$(PIP_NET) $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) -r requirements-cuda.txt)
STAMP := $(VENV)/.installed$(if $(filter cuda,$(ACCEL)),-cuda)
AOT_STAMP := $(VENV)/.installed-aot
TORCH_INDEX_DOWN = make setup ACCEL=cuda: the PyTorch CPU index $(TORCH_INDEX) did not answer \
  within $(TORCH_INDEX_TIMEOUT) s (network or proxy?). Fix the connection, name a mirror with \
  TORCH_INDEX=URL, or take torch from PyPI (several GB of CUDA wheels) with TORCH_INDEX=

.PHONY: setup test lint demo prefix-counts bench clean

setup: $(STAMP) $(if $(filter aot,$(ACCEL)),$(AOT_STAMP))

# Reinstall only when the pinned requirements change.
$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml setup.py prefixlm_lm_eval_hook.py $(if $(filter cuda,$(ACCEL)),requirements-cuda.txt)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
ifeq ($(ACCEL),cuda)
ifneq ($(TORCH_INDEX),)
	@$(PY) -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=$(TORCH_INDEX_TIMEOUT))" \
	  "$(TORCH_INDEX)/" 2>/dev/null || { echo "$(TORCH_INDEX_DOWN)"; exit 2; }
endif
endif
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_ACCEL_FLAGS) -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	# also installs prefixlm_lm_eval.pth (setup.py): `lm_eval --model prefixlm` in this venv
	$(PY) -m pip install -q --no-deps -e .
ifeq ($(ACCEL),cuda)
	$(PY) -c "import jax; print('jax', jax.__version__, jax.devices())"
endif
	touch $(STAMP)

# The AOT compilers (requirements-aot.txt), with --no-deps: their pins would fight the CPU set.
$(AOT_STAMP): requirements-aot.txt | $(STAMP)
	$(PY) -m pip install -q --no-deps -r requirements-aot.txt
	touch $(AOT_STAMP)

# CI runs this: the compile tests need the AOT compilers, so test installs them too. Two
# pytest-xdist workers, one test file each at a time (loadfile keeps a file's module fixtures in
# one process); PYTEST_WORKERS=0 runs in one process.
PYTEST_WORKERS ?= 2
test: setup $(AOT_STAMP)
	$(PY) -m ruff check prefixlm configs tests bench
	$(PY) -m pytest -q $(if $(filter-out 0,$(PYTEST_WORKERS)),-n $(PYTEST_WORKERS) --dist loadfile)

lint: setup
	$(PY) -m ruff check prefixlm configs tests bench

prefix-counts: setup
	$(PY) -m prefixlm.plots prefix-counts --tokenizer llama3 --output out/prefix_counts

# Demo: the embedded offline corpus (built once into data/demo), two runs of the demo config on
# the CPU (prefix_norm and its ce baseline, each evaluated in the loop at steps 0, 100 and 200 on
# 20 fixed documents per task), the study report comparing them, the HF export and the plots.
# Rerunning resumes the finished runs at once (rm -rf runs/demo to train again).
DEMO_RUN := runs/demo/prefix_norm
# The demo is a CPU run unless set up with ACCEL=cuda: with only the AOT compilers installed
# (`make test` adds them), jax would otherwise try the CUDA plugin and libtpu at start-up and
# print their tracebacks on a machine that has neither.
demo prefix-counts: export JAX_PLATFORMS ?= $(if $(filter cuda,$(ACCEL)),,cpu)
DEMO_BASE := runs/demo/ce
demo: setup prefix-counts
	$(PY) -c "from prefixlm.data import corpus; print(corpus.prepare_demo())"
	$(PY) -m prefixlm.main --config=configs/prefix_norm.py:demo --workdir=$(DEMO_RUN)
	$(PY) -m prefixlm.main --config=configs/ce.py:demo --workdir=$(DEMO_BASE)
	$(PY) -m prefixlm.train summary $(DEMO_RUN)
	$(PY) -m prefixlm.report $(DEMO_BASE) $(DEMO_RUN) --baseline $(DEMO_BASE) --output out/demo/report
	$(PY) -m prefixlm.export --workdir $(DEMO_RUN) --output $(DEMO_RUN)/hf --overwrite
	$(PY) -m prefixlm.plots metrics $(DEMO_BASE) $(DEMO_RUN) --output out/demo
	$(PY) -m prefixlm.plots targets --word " personality" --output out/demo
	@echo "demo done: runs $(DEMO_RUN) and $(DEMO_BASE), report out/demo/report/REPORT.md,"
	@echo "HF export $(DEMO_RUN)/hf, plots out/demo/*.png and out/prefix_counts/prefix_counts.png"

# The tables in the README: loss cost, train step, data, evaluation (each prints a markdown table).
bench: setup
	$(PY) bench/loss.py
	$(PY) bench/step.py
	$(PY) bench/data.py
	$(PY) bench/eval.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache out
