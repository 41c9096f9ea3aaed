"""Atomic file writes for the harness: a process killed mid-write leaves the previous
file (or none) in place, never a truncated one."""

import os
from pathlib import Path


def atomic_write(path, write):
    """Calls write(f) on a binary temporary file beside `path`, flushes it to disk, then
    renames it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path, text):
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
