"""Training metrics: the metrics log (metrics.jsonl and TensorBoard), the paired
telemetry overhead, the seconds spent in torch.compile, and the CPU memory count of a
training step.

metrics.jsonl is appended one record a line. A process killed, or a disk filled, in the
middle of a line leaves a torn last line: readers drop it and say so, a resume rewrites the
file without it, and a failed append is undone and names the file."""

import errno
import functools
import json
import math
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from .files import atomic_write_text, naming

SKIP_TIMING_STEPS = 3  # first steps carry one-off costs (allocator, thread pools)


class _CompileClock:
    """Accumulates the seconds of every torch.compile compilation (Dynamo's outermost one:
    AOTAutograd and Inductor within it, and a backward compiled on its first run)."""

    def __init__(self):
        from torch._dynamo.callback import callback_handler

        self.wall = self.cpu = 0.0
        self._started_at = None
        callback_handler.register_start_callback(self._start)
        callback_handler.register_end_callback(self._end)

    def _start(self, args):
        self._started_at = time.perf_counter(), time.process_time()

    def _end(self, args):
        wall, cpu = self._started_at
        self.wall += time.perf_counter() - wall
        self.cpu += time.process_time() - cpu


@functools.cache
def _compile_clock():
    return _CompileClock()


def compile_seconds():
    """(wall, CPU) seconds this process has spent in torch.compile since its first call, the CPU
    time its own (Inductor's C++ compiler runs in child processes: in the wall time only)."""
    clock = _compile_clock()
    return clock.wall, clock.cpu


def read_records(path, quiet=False):
    """The records of a metrics.jsonl. A torn last line (an interrupted append) is dropped,
    with a note on stderr unless quiet; a bad line elsewhere is an error naming the line."""
    lines = Path(path).read_text(errors="replace").splitlines(keepends=True)
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except ValueError:
            if number < len(lines) and line.endswith("\n"):
                raise SystemExit(f"ab: {path}, line {number}: not a JSON record ({line[:60]!r})") from None
            if not quiet:
                print(f"ab: {path}: ignored its torn last line ({len(line)} bytes, an interrupted write)",
                      file=sys.stderr)
    return records


def records_by_kind(path):
    """kind -> design label -> its records in order; empty when there is no metrics.jsonl."""
    by_kind = defaultdict(lambda: defaultdict(list))
    for r in read_records(path) if Path(path).exists() else []:
        by_kind[r["kind"]][r["design"]].append(r)
    return by_kind


class MetricsLog:
    """metrics.jsonl (one JSON record a line) and TensorBoard scalars, written by rank 0."""

    def __init__(self, run_dir, env):
        self.path = run_dir / "metrics.jsonl"
        self.run_dir = run_dir
        self.env = env
        self.writer = None

    def open_design(self, label, start_step):
        if not self.env.main:
            return
        from torch.utils.tensorboard import SummaryWriter

        if self.path.exists():
            # Resuming: the records this design logged after its checkpoint will be logged again
            # (and a torn last line, from a run that died mid-append, goes).
            kept = [r for r in read_records(self.path) if r["design"] != label or r["step"] < start_step]
            atomic_write_text(self.path, "".join(_line(r) for r in kept))
        self.writer = SummaryWriter(str(self.run_dir / "tb" / label), purge_step=start_step or None)

    def close_design(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def record(self, label, step, kind, **values):
        if not self.env.main:
            return
        self._append(_line({"design": label, "step": step, "kind": kind, **values}))
        if kind == "train":
            self.writer.add_scalar("loss/train", values["loss"], step)
            self.writer.add_scalar("lr", values["lr"], step)
        elif kind == "eval":
            self.writer.add_scalar("loss/val", values["val_loss"], step)
        elif kind in ("telemetry", "optim", "outliers"):
            for key, value in values.items():
                if key != "layer" and isinstance(value, float) and math.isfinite(value):
                    self.writer.add_scalar(f"{kind}/layer{values['layer']}/{key}", value, step)

    def _append(self, line):
        """Appends one line whole or not at all: a failed write (a full disk) is cut back off,
        so no later reader meets half a record, and the error names the file."""
        data = line.encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            start = os.fstat(fd).st_size
            try:
                written = os.write(fd, data)
                if written != len(data):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # a short write: the disk is full
            except OSError as e:
                os.ftruncate(fd, start)
                raise naming(e, self.path) from e
        finally:
            os.close(fd)


def _line(record):
    return json.dumps(record, allow_nan=True) + "\n"


def paired_overhead(times, telemetry_steps, skip=SKIP_TIMING_STEPS):
    """Median over telemetry steps of (its time / the mean time of the plain steps on either
    side) - 1: pairing with neighbours cancels slow drifts of a shared machine's load."""
    ratios = [times[i] / ((times[i - 1] + times[i + 1]) / 2)
              for i in range(max(skip, 1), len(times) - 1)
              if telemetry_steps[i] and not telemetry_steps[i - 1] and not telemetry_steps[i + 1]]
    return statistics.median(ratios) - 1 if ratios else None


def cpu_step_memory(model, x, y):
    """Bytes a training step holds on CPU (no allocator statistics there): parameters,
    gradients and the two AdamW moments, plus the tensors the forward saves for backward."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(x, y)
    del loss
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return 4 * param_bytes + sum(storages.values())
