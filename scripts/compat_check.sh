#!/usr/bin/env bash
# make compat-check: the one wheel of `make wheel`, not rebuilt, installed into a
# venv per torch and tested there. Builds nothing.
#
#   scripts/compat_check.sh WHEEL DIR SPEC...    e.g. scripts/compat_check.sh dist/ffn-*.whl build/compat torch==2.11.0
#
# DIR/<spec>/venv is kept between runs (each torch is installed once: 2.11.0 is
# the GPU machine's CUDA 13.0 build from PyPI, 2.13.0 the CPU build and 2.14.1 the
# CUDA build on this machine's disk). The tests run from DIR/<spec>/run, so
# `import ffn` is the installed wheel, never this checkout's ops/. PYTEST_ARGS
# passes options to pytest. Prints one line per torch with pytest's counts and
# fails if any torch failed.
set -uo pipefail
wheel=${1:?the wheel (make wheel)}
dir=${2:?work directory}
shift 2
root=$(cd "$(dirname "$0")/.." && pwd)
wheel=$(cd "$(dirname "$wheel")" && pwd)/$(basename "$wheel")
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
export FFN_DATA_DIR=${FFN_DATA_DIR:-$root/data/cache}

summary=()
status=0
for spec in "$@"; do
  leg=$dir/${spec//==/-}
  venv=$leg/venv
  mkdir -p "$leg"
  if [ ! -f "$venv/.deps" ] || [ "$root/requirements.txt" -nt "$venv/.deps" ]; then
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    # No pip cache: a CUDA torch from PyPI is about 3 GB of wheels, which the cache would keep a
    # second copy of beside the 5 GB venv; a failed install is removed, so it leaves no space taken.
    if ! "$venv/bin/python" -m pip install --quiet --no-cache-dir "$spec" -r "$root/requirements.txt"; then
      rm -rf "$venv"
      summary+=("$spec: install failed ($(df -Ph "$dir" | awk 'NR == 2 {print $4}') free under $dir afterwards)")
      status=1
      continue
    fi
    touch "$venv/.deps"
  fi
  "$venv/bin/python" -m pip install --quiet --no-deps --force-reinstall "$wheel"
  version=$("$venv/bin/python" -c 'import torch; print(torch.__version__)')
  echo "compat-check: torch $version, $(basename "$wheel")"
  rm -rf "$leg/run" && mkdir -p "$leg/run"
  log=$leg/pytest.log
  (cd "$leg/run" && "$venv/bin/python" -m pytest -q -p no:cacheprovider --rootdir "$root" \
     -c "$root/pyproject.toml" ${PYTEST_ARGS:-} "$root/tests") 2>&1 | tee "$log"
  code=${PIPESTATUS[0]}
  [ "$code" = 0 ] || status=1
  summary+=("torch $version: $(grep -E '^(=+ )?[0-9]+ (passed|failed)' "$log" | tail -1 | tr -d '=' | xargs) (exit $code)")
done
echo
echo "compat-check, one wheel ($(basename "$wheel")):"
printf '  %s\n' "${summary[@]}"
exit $status
