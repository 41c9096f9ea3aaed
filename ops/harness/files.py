"""Files of a run: atomic writes (a process killed mid-write leaves the previous file, or
none, in place, never a truncated one; a failed write names its file), checksums, and the
run directory's lock."""

import errno
import fcntl
import hashlib
import os
from pathlib import Path

LOCK_FILE = ".lock"


def atomic_write(path, write):
    """Calls write(f) on a binary temporary file beside `path`, flushes it to disk, then
    renames it over `path`. An OSError (a full disk) names `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise naming(e, path) from e
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path, text):
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_torch_save(obj, path):
    """torch.save through atomic_write: a run killed mid-save keeps the previous file intact."""
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))


def naming(error, path):
    """`error` (an OSError) with `path` as its file name, which Python's own write errors lack
    ("[Errno 28] No space left on device" alone names nothing)."""
    if error.filename is not None:
        return error
    return type(error)(error.errno, error.strerror or str(error), str(path))


def sha256(path, chunk=1 << 22):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class RunLock:
    """An exclusive fcntl.flock on <run_dir>/.lock, holding the pid of its owner, for as long
    as a run writes the directory. The kernel drops the lock when its process exits, however it
    exits, so a lock file left by a dead process does not block."""

    def __init__(self, run_dir):
        self.path = Path(run_dir) / LOCK_FILE
        self.file = None

    def acquire(self):
        """Takes the lock; SystemExit naming the holder if another process has it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            raise SystemExit(f"ab: {self.path.parent} is in use by another run (pid {holder}, lock {self.path}): "
                             "wait for it to finish, or give another --name or --out") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self.file = f
        return self

    def release(self):
        if self.file is not None:
            self.file.close()  # closing the descriptor releases the flock
            self.file = None
