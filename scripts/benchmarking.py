"""What the benchmark scripts share: the timer, the tables, the environment record and the result files.

    from benchmarking import Report, environment, make_timer, markdown_table

Timing (measure(make_timer(device), fns, ...)) gives the median seconds of each function:
- CPU: torch.utils.benchmark.Timer, one per function, with num_threads set to torch's current
  thread count (Timer defaults to 1 thread). The functions are interleaved: each repetition
  ("round") calls Timer.blocked_autorange on every function once, in a rotating order, so load
  from other processes on a shared machine hits them alike; the median is over every timed block
  of every round (Measurement.merge normalizes blocks to seconds per call). Cost of doing this on
  top of Timer: blocked_autorange first estimates its block size by running the function untimed
  (this is also its warmup), so a function slower than the round's time slice runs twice per
  round, once timed; the wall-clock budget below counts that. Measured on this project's 2-core
  CPU machine, 20 rounds of a 1024x1024 matmul (~85 ms) and a 4096x512 layer_norm (~12 ms): the
  medians agree with a plain perf_counter loop within 4% (matmul) and 1% (layer_norm), at ~4x
  its wall time (8 s vs 2 s). Interleaving is kept for what it buys on a shared machine.
- CUDA: CUDA events recorded on the current stream around each call, with the L2 cache flushed
  (a 256 MiB buffer zeroed, larger than any current GPU's L2) before each call, so small inputs
  are not served from L2; same interleaved rounds, one timed call per function per round.
  torch.utils.benchmark.Timer does not flush L2 and times blocks of calls, hence the events.

Both: `warmup` untimed calls of each function first; then as many rounds as fit the budget
(wall-clock seconds per measurement, estimated from the first round), at least min_reps and at
most max_reps, or exactly `reps` rounds.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

# The project's one markdown table (a '|' in a cell escaped), shared with the harness report.
from ffn.harness.tables import markdown_table
from torch.utils import benchmark as torch_benchmark

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MIB = 2**20


# ----------------------------------------------------------------------------- timing
class CpuTimer:
    """Interleaved torch.utils.benchmark.Timer.blocked_autorange rounds (see the module docstring)."""

    def __init__(self, num_threads=None):
        self.num_threads = num_threads or torch.get_num_threads()

    def sync(self):
        pass

    def start(self, fns, budget, max_reps):
        # One function's time slice in one round: max_reps rounds of every function fill the budget.
        self.slice = budget / (max(max_reps, 1) * len(fns))
        self.timers = [torch_benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=self.num_threads) for fn in fns]
        self.measurements = [[] for _ in fns]

    def time(self, i):
        self.measurements[i].append(self.timers[i].blocked_autorange(min_run_time=self.slice))

    def medians(self):
        return [torch_benchmark.Measurement.merge(ms)[0].median for ms in self.measurements]

    def samples(self):
        return [sum(len(m.raw_times) for m in ms) for ms in self.measurements]


class CudaTimer:
    """CUDA events around each call on the current stream, with an L2 flush before each call."""

    def __init__(self, flush_bytes=256 * MIB):
        self.flush_buffer = torch.empty(flush_bytes, dtype=torch.uint8, device="cuda")

    def sync(self):
        torch.cuda.synchronize()

    def start(self, fns, budget, max_reps):
        self.fns = fns
        self.events = [[] for _ in fns]

    def time(self, i):
        stream = torch.cuda.current_stream()
        self.flush_buffer.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        self.fns[i]()
        end.record(stream)
        self.events[i].append((start, end))

    def _seconds(self):
        torch.cuda.synchronize()
        return [[s.elapsed_time(e) / 1e3 for s, e in pairs] for pairs in self.events]

    def medians(self):
        return [statistics.median(times) for times in self._seconds()]

    def samples(self):
        return [len(pairs) for pairs in self.events]


def make_timer(device):
    return CudaTimer() if str(device).startswith("cuda") else CpuTimer()


def measure(timer, fns, *, warmup=3, budget=1.0, min_reps=7, max_reps=100, reps=None):
    """(median seconds of each fn, rounds): warmup, then interleaved rounds sized to the budget.

    The budget is wall-clock seconds of rounds, estimated from the first one, so on CPU it includes
    blocked_autorange's untimed block-size estimates."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    timer.sync()
    timer.start(fns, budget, reps or max_reps)
    r = 0
    while True:
        start = time.perf_counter()
        for k in range(len(fns)):
            timer.time((r + k) % len(fns))
        r += 1
        if reps is None:
            timer.sync()
            reps = int(min(max_reps, max(min_reps, budget / max(time.perf_counter() - start, 1e-9))))
        if r >= reps:
            return timer.medians(), reps


def paired_rounds(fns, *, rounds, sample_seconds=0.05, warmup=2):
    """Seconds per call of each fn in each round: [fn][round], for ratios between functions paired by
    round. Each round times every fn once (a sample of as many back-to-back calls as fill about
    sample_seconds, timed with perf_counter), in a rotating order, so the fns of one round run
    within a fraction of a second of each other. On a VM whose speed drifts by tens of percent
    between minutes, the ratio of two fns within a round keeps what the drift would blur in their
    separate medians: take the median of the per-round ratios (CPU; no device sync)."""
    calls = []
    for fn in fns:
        for _ in range(warmup):
            fn()
        start = time.perf_counter()
        fn()
        calls.append(max(1, round(sample_seconds / max(time.perf_counter() - start, 1e-9))))
    seconds = [[] for _ in fns]
    for r in range(rounds):
        for k in range(len(fns)):
            i = (r + k) % len(fns)
            start = time.perf_counter()
            for _ in range(calls[i]):
                fns[i]()
            seconds[i].append((time.perf_counter() - start) / calls[i])
    return seconds


# ----------------------------------------------------------------------------- environment
def git_commit():
    """(commit, dirty): FFN_GIT_COMMIT overrides it (a copy without .git)."""
    override = os.environ.get("FFN_GIT_COMMIT")
    if override:
        return override, None
    try:
        run = lambda *args: subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()  # noqa: E731
        return run("rev-parse", "HEAD"), bool(run("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return "unknown", None


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device, argv=None):
    commit, dirty = git_commit()
    env = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "git_dirty": dirty,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "hostname": platform.node(),
        "argv": sys.argv[1:] if argv is None else list(argv),
    }
    if device == "cpu":
        env.update(
            device_name=cpu_model(),
            cpu_capability=torch.backends.cpu.get_cpu_capability(),
            threads=torch.get_num_threads(),
            cpu_count=os.cpu_count(),
        )
    else:
        props = torch.cuda.get_device_properties(0)
        env.update(
            device_name=torch.cuda.get_device_name(0),
            compute_capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            allow_tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
        )
    return env


def slug(name):
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def default_json_path(env, device, prefix="", tag=None):
    """bench/results/<prefix><device>-<YYYY-MM-DD>[-<tag>].json; <device> is cpu or the GPU's name."""
    name = "cpu" if device == "cpu" else slug(env["device_name"])
    stem = f"{prefix}{name}-{datetime.date.today().isoformat()}" + (f"-{tag}" if tag else "")
    return str(RESULTS / f"{stem}.json")


# ----------------------------------------------------------------------------- tables
def markdown_row(row):
    """One row of markdown_table: what a benchmark prints as each row is measured."""
    return markdown_table([""] * len(row), [row]).splitlines()[-1]


def verdict(ok):
    return "PASS" if ok else "MISS"


def fmt_ms(seconds):
    return "n/a" if seconds is None else f"{seconds * 1e3:.3f}"


def fmt_ratio(r):
    return "n/a" if r is None else f"{r:.2f}x"


def fmt_num(v, digits=1):
    return "n/a" if v is None else f"{v:.{digits}f}"


def log(*args):
    print(*args, flush=True)


class Report:
    """Sections (title, headers, rows, notes), records and targets; prints and writes them.

    json_path / markdown_path: where save() writes (None: not written)."""

    def __init__(self, title, config, env, json_path=None, markdown_path=None):
        self.title, self.config, self.env = title, config, env
        self.json_path = json_path
        self.markdown_path = markdown_path or (str(Path(json_path).with_suffix(".md")) if json_path else None)
        self.sections, self.records, self.targets = [], [], []

    def section(self, title, headers, notes=""):
        s = {"title": title, "headers": headers, "rows": [], "notes": notes}
        self.sections.append(s)
        return s

    def add_row(self, section, row, record=None, echo=True):
        """Appends a row to a section (printed as it comes when echo) and its record to the results."""
        section["rows"].append(row)
        if echo:
            log(markdown_row(row))
        if record is not None:
            self.records.append(record)

    def target(self, name, ok, detail):
        self.targets.append({"target": name, "pass": bool(ok), "detail": detail})

    def markdown(self):
        env = self.env
        out = [f"# {self.title}", ""]
        out.append(
            f"torch {env['torch']}, CUDA {env['cuda']}, commit {env['git_commit']}"
            + (" (uncommitted changes)" if env.get("git_dirty") else "")
            + f", {env['timestamp']}"
        )
        out.append("")
        out += [f"- {k}: {v}" for k, v in env.items() if k not in ("torch", "cuda", "git_commit", "timestamp", "device_name")]
        out.append("")
        for s in self.sections:
            out += [f"## {s['title']}", ""]
            if s["notes"]:
                out += [s["notes"], ""]
            out += [markdown_table(s["headers"], s["rows"]), ""]
        if self.targets:
            passed = sum(t["pass"] for t in self.targets)
            out += [f"## Targets: {passed}/{len(self.targets)} pass", ""]
            out += [f"- {verdict(t['pass'])} {t['target']}: {t['detail']}" for t in self.targets]
        return "\n".join(out).rstrip("\n") + "\n"

    def as_json(self):
        return {"environment": self.env, "config": self.config, "results": self.records, "targets": self.targets}

    def save(self):
        """(Re)writes the result files; call it after every shape so a cut-off run keeps what it measured."""
        for path, text in ((self.json_path, lambda: json.dumps(self.as_json(), indent=1)), (self.markdown_path, self.markdown)):
            if path:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                tmp = Path(path).with_name(Path(path).name + ".tmp")
                tmp.write_text(text())
                tmp.replace(path)
