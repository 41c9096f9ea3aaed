#!/usr/bin/env bash
# make compat-check: builds the extension against another torch (default the GPU
# machine's, torch==2.11.0, CUDA 13.0 wheels from PyPI) in its own venv and a
# copy of this tree, then runs the Python tests on the CPU there.
#
#   scripts/compat_check.sh TORCH_SPEC DIR     e.g. scripts/compat_check.sh torch==2.11.0 build/compat
#
# DIR/venv is kept between runs (the wheel is downloaded once); DIR/src is a
# fresh copy of the tracked and untracked-but-not-ignored files. The CUDA
# kernels are compiled for sm_90 only (TORCH_CUDA_ARCH_LIST to change it), when
# nvcc is present. PYTEST_ARGS passes options to pytest.
set -euo pipefail
spec=${1:?torch requirement, e.g. torch==2.11.0}
dir=${2:?work directory}
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
venv=$dir/venv
src=$dir/src

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip setuptools wheel
"$venv/bin/python" -m pip install --quiet "$spec" -r "$root/requirements.txt"
"$venv/bin/python" -c 'import torch; print("compat-check: torch", torch.__version__, "CUDA", torch.version.cuda)'

rm -rf "$src"
mkdir -p "$src"
(cd "$root" && git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$src")
cd "$src"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
MAX_JOBS=${MAX_JOBS:-$(nproc)} "$venv/bin/python" -m pip install --quiet --no-build-isolation --no-deps -e .
export FFN_DATA_DIR=${FFN_DATA_DIR:-$root/data/cache}
"$venv/bin/python" -m pytest -q -p no:cacheprovider ${PYTEST_ARGS:-} tests
