"""Puts the extension binary of a wheel into a package directory (what `make build` does).

    python scripts/wheel_binary.py dist/ffn-*.whl ops

Each ffn/_C*.so of the wheel is written beside the Python sources under a temporary
name and renamed into place, so a process that has the old binary loaded keeps its
mapping (writing over a loaded library would crash it); stale binaries of other
names (an older build's _C.cpython-*.so) are removed, so `import ffn._C` finds the
wheel's.
"""

import os
import sys
import zipfile
from pathlib import Path


def main(wheel, package_dir):
    package_dir = Path(package_dir)
    with zipfile.ZipFile(wheel) as archive:
        binaries = [n for n in archive.namelist() if n.startswith("ffn/_C") and n.endswith(".so")]
        if not binaries:
            sys.exit(f"wheel_binary: {wheel} holds no ffn/_C*.so")
        keep = set()
        for name in binaries:
            target = package_dir / Path(name).name
            tmp = target.with_name(target.name + ".tmp")
            tmp.write_bytes(archive.read(name))
            os.replace(tmp, target)
            keep.add(target.name)
    for stale in package_dir.glob("_C*.so"):
        if stale.name not in keep:
            stale.unlink()
    print(f"wheel_binary: {', '.join(sorted(keep))} from {Path(wheel).name} in {package_dir}/")


if __name__ == "__main__":
    main(*sys.argv[1:])
