# `make demo` and `make test` are the contract: both work on a fresh machine with nothing
# installed by hand. The venv is (re)built when pyproject.toml or the constraints change.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# A CUDA build of torch where there is an NVIDIA GPU, the CPU build elsewhere.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
CONSTRAINTS := $(if $(HAS_GPU),,-c constraints/cpu.txt)
PIP_FLAGS ?= -q --disable-pip-version-check
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test clean

setup: $(STAMP)

# DeepSpeed builds against the torch just installed (no isolated build env, which would pull a
# CUDA torch) and without precompiled ops: it JIT-compiles what it uses.
$(STAMP): pyproject.toml constraints/cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) $(CONSTRAINTS) -e '.[dev,wandb,mimalloc]'
	DS_BUILD_OPS=0 $(PY) -m pip install $(PIP_FLAGS) $(CONSTRAINTS) --no-build-isolation 'deepspeed>=0.16' ninja
	touch $@

# The embedded tiny model wants a higher lr than the defaults (chosen for real models).
DEMO_ARGS ?= optim.lr=3e-3 trainer.max_steps=300

demo: setup
	$(VENV)/bin/orchestrate train $(DEMO_ARGS)

test: setup
	$(VENV)/bin/pytest -q --durations=30 tests

clean:
	rm -rf runs .pytest_cache
