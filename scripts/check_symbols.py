"""Fails unless the ffn binary in a wheel (or a .so) is a stable-ABI one.

    python scripts/check_symbols.py dist/ffn-*.whl      (what `make wheel` runs)

A binary built on the LibTorch stable ABI calls libtorch only through its C shim
(aoti_torch_*, torch_*): none of its undefined dynamic symbols may be a C++
symbol of at::, c10::, torch:: or caffe2::, and it may need no torch library
but libtorch_cpu (which holds the shim): not libc10, libtorch, libtorch_python,
libtorch_cuda or libc10_cuda, whose C++ ABI changes with every release. Prints
what it checked; exits 1 naming the offending symbols or libraries.
"""

import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

TORCH_CXX_SYMBOL = re.compile(r"^(at|c10|torch|caffe2)::")
ALLOWED_TORCH_LIBRARIES = {"libtorch_cpu.so"}


def binaries(path, workdir):
    """(name, path on disk) of each extension binary in a wheel (extracted under workdir), or the .so itself."""
    path = Path(path)
    if path.suffix != ".whl":
        return [(path.name, path)]
    out = Path(workdir) / path.stem
    with zipfile.ZipFile(path) as wheel:
        names = [n for n in wheel.namelist() if n.endswith(".so")]
        for name in names:
            wheel.extract(name, out)
    return [(name, out / name) for name in names]


def undefined_cxx_torch_symbols(so):
    listing = subprocess.run(["nm", "-D", "--undefined-only", "--demangle", str(so)], check=True,
                             capture_output=True, text=True).stdout
    symbols = [line.split(None, 1)[1] for line in listing.splitlines() if line.strip().startswith("U ")]
    return sorted(s for s in symbols if TORCH_CXX_SYMBOL.match(s)), len(symbols)


def needed_libraries(so):
    dynamic = subprocess.run(["readelf", "-d", str(so)], check=True, capture_output=True, text=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", dynamic)


def main(paths):
    with tempfile.TemporaryDirectory(prefix="ffn-symbols-") as workdir:
        return check(paths, workdir)


def check(paths, workdir):
    failed = False
    found = [b for path in paths for b in binaries(path, workdir)]
    if not found:
        print("check_symbols: no extension binary found in", " ".join(paths))
        return 1
    for name, so in found:
        bad, total = undefined_cxx_torch_symbols(so)
        needed = needed_libraries(so)
        torch_libs = [lib for lib in needed if re.match(r"lib(torch|c10)", lib)]
        bad_libs = [lib for lib in torch_libs if lib not in ALLOWED_TORCH_LIBRARIES]
        print(f"check_symbols: {name}: {total} undefined dynamic symbols, {len(bad)} libtorch C++ ones; "
              f"needs {', '.join(needed)}")
        for symbol in bad:
            print(f"  libtorch C++ symbol: {symbol}")
        for lib in bad_libs:
            print(f"  needs {lib}: only {', '.join(sorted(ALLOWED_TORCH_LIBRARIES))} is allowed")
        failed |= bool(bad or bad_libs)
    if failed:
        print("check_symbols: FAILED: the binary is tied to one torch release (use the stable ABI only)")
        return 1
    print("check_symbols: OK (stable ABI only)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
