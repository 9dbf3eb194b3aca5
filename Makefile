# lorarar: `make demo` runs the built-in demo, `make test` the tests. Both set up .venv/ first (idempotent).
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.lorarar-installed
# CPU machines get the local CPU build of torch; a machine with an NVIDIA driver takes pip's default build.
TORCH  ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
PYTEST_ARGS ?=
# nvcc for the CUDA kernels: $CUDACXX, else nvcc on PATH, else the toolkit's default place (CMake's CUDA
# detection reads CUDACXX and otherwise looks only on PATH). Empty: the build goes on without CUDA.
CUDACXX ?= $(firstword $(shell command -v nvcc 2>/dev/null) $(wildcard /usr/local/cuda/bin/nvcc))
ifneq ($(strip $(CUDACXX)),)
export CUDACXX
endif

.PHONY: setup demo test bench bench-report lint mutation mutation-cpp clean
setup: $(STAMP)

$(STAMP): pyproject.toml CMakeLists.txt $(shell find csrc -type f 2>/dev/null)
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" ninja cmake
	$(PY) -m pip install -q --no-build-isolation -e ".[diffusers,triton,test]"
	@touch $@

demo: $(STAMP)
	$(VENV)/bin/lorarar demo

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m pytest -q bench --benchmark-only

# The CPU suite in one run (< 10 min on 2 quiet cores) -> BENCHMARKS.md + docs/benchmarks.png.
# BENCH_REPORT_ARGS=--sdxl adds the SDXL-architecture rows (~12 GB RAM).
BENCH_REPORT_ARGS ?=
bench-report: $(STAMP)
	$(PY) bench/report.py $(BENCH_REPORT_ARGS)

# Every hand-written mutant of tools/mutants.py on a scratch copy (C++ ones rebuild the extension there);
# prints killed/survived and the score (README, "Testing"). MUTATION_ARGS=--python-only or --fast to cut it.
MUTATION_ARGS ?=
mutation: $(STAMP)
	$(PY) tools/mutate.py $(MUTATION_ARGS)

# Generated mutants of the CPU kernels (csrc/cpu_*: every operator and integer literal; each rebuilds the
# extension in a scratch copy). MUTATION_CPP_ARGS="--sample 250 --seed 0" is the README's documented run.
MUTATION_CPP_ARGS ?=
mutation-cpp: $(STAMP)
	$(PY) tools/mutate_cpp.py $(MUTATION_CPP_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check lorarar_kernels python_api tests bench tools

clean:
	rm -rf build $(VENV)
