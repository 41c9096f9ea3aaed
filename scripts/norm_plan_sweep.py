#!/usr/bin/env python3
"""Sweeps the row plans of the CUDA norm kernels over the benchmark shapes, so that one GPU lease
yields the data to choose row_plan's table (csrc/cuda/norm.cu) offline.

    python scripts/norm_plan_sweep.py --json OUT/norm_plans.json --markdown OUT/norm_plans.md [--budget 30]
    python scripts/norm_plan_sweep.py --list        # the plans, validated; no GPU needed

A plan is THREADSxWORDS@BLOCKS: threads per row, 128-bit words per thread and resident blocks
per SM of the register kernels (256-thread blocks). The sweep forces each one through the
environment variables FFN_NORM_FORWARD_PLAN / FFN_NORM_BACKWARD_PLAN, which norm.cu reads at
every launch (unset: its automatic row_plan, "auto" below), and times it against auto.

Shapes: scripts/cuda_report.py's BENCH_SHAPES (16384 rows of d = 1024, 4096, 8192, 16384, the
norm shapes of `bench.py --device cuda`), bfloat16 and float32, forward and backward, rms_norm
(with a weight) and layer_norm (weight and bias). Plans per pass, dtype and d: threads per row
T = 1, 2, 4, ... 256, up to the first T that gives each thread at most one word (row_plan never
goes further); for each T the fewest words per thread W of the instantiated ones (1, 2, 4, 8;
backward 16-bit rows: up to 4) that cover the row; blocks per SM B = 1 .. 8 (2048 threads per
SM / 256), of which the device runs those its occupancy calculator allows and refuses the rest
(recorded as refused: the refusals show each kernel's occupancy). Rows too long for any
register plan run the long-row kernels: nothing to sweep. tests/cuda_emu/norm_test.cpp runs
every one of these plans, emulated, against the CPU kernels.

Timing as scripts/bench.py's (scripts/benchmarking.py): CUDA events around each call, L2
flushed before each, the plans of one shape interleaved in rotating rounds, medians; the
forward and backward ops are timed alone (torch.ops.ffn._*_norm_fwd / _bwd). Each plan's
outputs are checked against auto's (the summation order may differ: tolerance of the dtype,
scaled by the outputs' rms, as the emulated tests). --budget is the wall-clock seconds of the
whole sweep, shared among the shapes; the result files are rewritten after every shape, so a
run cut off keeps what it measured. Exit code 0 unless a plan failed or mismatched (refusals
by the occupancy calculator are expected).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/: benchmarking, cuda_report

import cuda_report  # noqa: E402

VARIABLES = {"forward": "FFN_NORM_FORWARD_PLAN", "backward": "FFN_NORM_BACKWARD_PLAN"}
ROW_BLOCK = cuda_report.ROW_BLOCK
MAX_BLOCKS_PER_SM = cuda_report.ARCH_LIMITS["sm_90"]["threads"] // ROW_BLOCK
DTYPES = {"bfloat16": 2, "float32": 4}  # element sizes
OPS = ("rms_norm", "layer_norm")


def max_words(pass_, elt):
    """Words per thread instantiated for the pass and element size (norm.cu's kMax*Words)."""
    limit = cuda_report.MAX_WORDS[pass_]
    return limit if isinstance(limit, int) else limit[elt]


def row_words(d, elt):
    return -(-d * elt // 16)


def check_plan(pass_, elt, d, threads, words_per_thread, blocks=None):
    """Raises ValueError where norm.cu's forced_plan refuses the plan; the device's occupancy limit
    (at most `blocks` resident blocks per SM) is the one check only the device can make, bounded
    here by the threads an SM holds."""
    if threads < 1 or threads & (threads - 1) or threads > ROW_BLOCK:
        raise ValueError(f"threads per row must be a power of two from 1 to {ROW_BLOCK}, got {threads}")
    limit = max_words(pass_, elt)
    if words_per_thread < 1 or words_per_thread & (words_per_thread - 1) or words_per_thread > limit:
        raise ValueError(f"words per thread must be one of the {pass_} instantiations for {elt}-byte rows "
                         f"(up to {limit}), got {words_per_thread}")
    if threads * words_per_thread < row_words(d, elt):
        raise ValueError(f"{threads} threads x {words_per_thread} words cover {threads * words_per_thread} "
                         f"128-bit words, but a row of d = {d} takes {row_words(d, elt)}")
    if blocks is not None and not 1 <= blocks <= MAX_BLOCKS_PER_SM:
        raise ValueError(f"blocks per SM must be from 1 to {MAX_BLOCKS_PER_SM}, got {blocks}")


def plans(pass_, elt, d):
    """[(threads, words per thread, blocks per SM)] the sweep forces for this pass and row (see the
    module docstring), in order; [] where the rows are too long for the register kernels."""
    words, limit = row_words(d, elt), max_words(pass_, elt)
    out = []
    threads = 1
    while threads <= ROW_BLOCK:
        per_thread = 1
        while threads * per_thread < words:
            per_thread *= 2
        if per_thread <= limit:
            out += [(threads, per_thread, b) for b in range(1, MAX_BLOCKS_PER_SM + 1)]
        if threads >= words:
            break
        threads *= 2
    return out


def auto_plan(pass_, elt, d):
    """(threads, words per thread) of row_plan, or None for the long-row kernels."""
    threads, per_thread = cuda_report.row_plan(d, row_words(d, elt), max_words(pass_, elt))
    return (threads, per_thread) if per_thread else None


def plan_text(plan):
    return "auto" if plan is None else f"{plan[0]}x{plan[1]}@{plan[2]}"


def groups(shapes):
    """(pass, dtype, rows, d) of every shape, passes of a shape together."""
    return [(pass_, dtype, rows, d) for dtype in DTYPES for rows, d in shapes for pass_ in VARIABLES]


def list_plans(shapes):
    """Prints every shape's plans after checking each; returns how many there are."""
    total = 0
    for pass_, dtype, rows, d in groups(shapes):
        elt = DTYPES[dtype]
        swept = plans(pass_, elt, d)
        for plan in swept:
            check_plan(pass_, elt, d, *plan)
        auto = auto_plan(pass_, elt, d)
        head = f"{pass_:<8} {dtype:<8} {rows}x{d}:"
        if not swept:
            print(f"{head} long rows (no register plan covers d); auto only")
            continue
        assert auto is not None and any(p[:2] == auto for p in swept), (pass_, dtype, d, auto)
        pairs = sorted({p[:2] for p in swept})
        print(f"{head} auto {auto[0]}x{auto[1]}; {len(swept)} plans: "
              + ", ".join(f"{t}x{w}@1-{MAX_BLOCKS_PER_SM}" for t, w in pairs))
        total += len(swept)
    print(f"{total} plans ({MAX_BLOCKS_PER_SM} blocks per SM at most; the device refuses what its occupancy "
          "calculator does not allow)")
    return total


# ----------------------------------------------------------------------------- on the GPU
def make_case(op, pass_, dtype, rows, d, device):
    """(the op call to time, its outputs' names) for one op and pass; inputs made once."""
    import torch

    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(rows, d, device=device, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(d, device=device, generator=g)).to(dtype)
    b = (0.1 * torch.randn(d, device=device, generator=g)).to(dtype) if op == "layer_norm" else None
    ops = torch.ops.ffn
    if op == "rms_norm":
        forward = lambda: ops._rms_norm_fwd(x, w, None, 1e-6)  # noqa: E731
    else:
        forward = lambda: ops._layer_norm_fwd(x, w, b, 1e-5)  # noqa: E731
    if pass_ == "forward":
        return forward, ("y",)
    stats = forward()[1:]
    dy = torch.randn(rows, d, device=device, generator=g).to(dtype)
    if op == "rms_norm":
        return lambda: ops._rms_norm_bwd(dy, x, *stats, w, None, True, False), ("dx", "dw", "db")
    return lambda: ops._layer_norm_bwd(dy, x, *stats, w, b, True, True), ("dx", "dw", "db")


def close(actual, expected):
    """max |actual - expected| and whether it is within torch.testing's tolerance of their dtype,
    scaled by rms(expected) where the result cancels (as tests/cuda_emu/emu_testing.h)."""
    import torch

    rtol, atol = {torch.bfloat16: (1.6e-2, 1e-5), torch.float32: (1.3e-6, 1e-5)}[expected.dtype]
    a, e = actual.double(), expected.double()
    if e.numel() == 0:
        return 0.0, True
    scale = e.pow(2).mean().sqrt().item()
    diff = (a - e).abs()
    return diff.max().item(), bool((diff <= rtol * (e.abs() + scale) + atol).all())


def sweep_group(op, pass_, dtype_name, rows, d, budget, timer, device="cuda"):
    """Records of auto and every plan of one op, pass and shape. (On the CPU, whose kernels have no
    row plans, it times the same kernel for every plan: what the tests run without a GPU.)"""
    import torch

    from benchmarking import measure

    dtype = getattr(torch, dtype_name)
    elt = DTYPES[dtype_name]
    variable = VARIABLES[pass_]
    fn, names = make_case(op, pass_, dtype, rows, d, device)
    # Read and write: forward x and y; backward dy, x and dx (parameters and statistics are small).
    nbytes = (2 if pass_ == "forward" else 3) * rows * d * elt

    def with_plan(plan):
        if plan is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = plan_text(plan)

    def call(plan):
        def run():
            with_plan(plan)
            return fn()

        return run

    base = {"op": op, "pass": pass_, "dtype": dtype_name, "rows": rows, "d": d}
    records, runnable = [], []
    with_plan(None)
    reference = fn()
    for plan in [None, *plans(pass_, elt, d)]:
        record = dict(base, plan=plan_text(plan), auto=plan is None)
        if plan is not None:
            record.update(threads_per_row=plan[0], words_per_thread=plan[1], blocks_per_sm=plan[2])
        try:
            with_plan(plan)
            out = fn()
            timer.sync()
        except RuntimeError as e:
            message = str(e).splitlines()[0]
            # More blocks than fit on an SM: the occupancy limit, found out by asking.
            record.update(status="refused" if "occupancy calculator allows" in message else "error", error=message)
            records.append(record)
            continue
        finally:
            with_plan(None)
        diffs = [close(o, r) for o, r in zip(out[:len(names)], reference[:len(names)])]
        record["max_abs_diff"] = {n: diff for n, (diff, _ok) in zip(names, diffs)}
        if all(ok for _diff, ok in diffs):
            record["status"] = "measured"
            runnable.append((plan, record))
        else:
            record["status"] = "mismatch"
        records.append(record)
    del reference
    if runnable:
        seconds, reps = measure(timer, [call(plan) for plan, _ in runnable], warmup=2, budget=budget,
                                min_reps=3, max_reps=25)
        with_plan(None)
        auto_seconds = seconds[0] if runnable[0][0] is None else None
        for (plan, record), s in zip(runnable, seconds):
            record.update(ms=s * 1e3, gbps=nbytes / s / 1e9, reps=reps,
                          speedup_vs_auto=None if auto_seconds is None else auto_seconds / s)
    return records


def auto_resolved(records):
    """auto's plan as THREADSxWORDS@BLOCKS: row_plan's, at the most blocks per SM the device ran."""
    first = records[0]
    auto = auto_plan(first["pass"], DTYPES[first["dtype"]], first["d"])
    if auto is None:
        return "long rows"
    ran = [r["blocks_per_sm"] for r in records if not r["auto"] and r["status"] != "refused"
           and (r["threads_per_row"], r["words_per_thread"]) == auto]
    return f"{auto[0]}x{auto[1]}@{max(ran)}" if ran else f"{auto[0]}x{auto[1]}"


def fmt(v, digits=3):
    return "n/a" if v is None else f"{v:.{digits}f}"


def write_tables(report, sections):
    """Rebuilds the report's tables from {(op, pass, dtype, rows, d): records}: one summary row per
    group (auto against the fastest plan), then each group's plans, fastest first."""
    report.sections.clear()
    summary = report.section(
        "Best plan per shape",
        ["op", "pass", "dtype", "rows x d", "auto plan", "auto ms", "best plan", "best ms", "best / auto speedup",
         "plans run", "refused"],
        "auto: row_plan's threads x words at the occupancy calculator's blocks per SM (the most the device ran).")
    for (op, pass_, dtype, rows, d), records in sections.items():
        timed = [r for r in records if r.get("ms") is not None]
        auto = next((r for r in timed if r["auto"]), None)
        best = min((r for r in timed if not r["auto"]), key=lambda r: r["ms"], default=None)
        refused = sum(r["status"] == "refused" for r in records)
        report.add_row(summary, [op, pass_, dtype, f"{rows}x{d}", auto_resolved(records),
                                 fmt(auto and auto["ms"]), best["plan"] if best else "n/a", fmt(best and best["ms"]),
                                 fmt(best and best["speedup_vs_auto"], 2), len(timed) - (auto is not None), refused],
                       echo=False)
    for (op, pass_, dtype, rows, d), records in sections.items():
        sec = report.section(f"{op} {pass_} {dtype} {rows}x{d}",
                             ["plan", "ms", "GB/s", "speedup vs auto", "status", "max |diff| vs auto"])
        for r in sorted(records, key=lambda r: (r.get("ms") is None, r.get("ms") or 0)):
            diff = ", ".join(f"{k} {v:.2g}" for k, v in r.get("max_abs_diff", {}).items())
            report.add_row(sec, [r["plan"], fmt(r.get("ms")), fmt(r.get("gbps"), 1), fmt(r.get("speedup_vs_auto"), 2),
                                 r["status"] if "error" not in r else f"{r['status']}: {r['error']}", diff],
                           echo=False)


def run(args):
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("norm_plan_sweep: no CUDA device (--list shows the plans without one)")
    import ffn  # noqa: F401  (registers torch.ops.ffn)
    from benchmarking import Report, environment, log, make_timer

    deadline = time.monotonic() + args.budget
    env = environment("cuda")
    config = {"shapes": args.shapes, "ops": args.ops, "budget_s": args.budget}
    report = Report("Norm row plan sweep", config, env, json_path=args.json, markdown_path=args.markdown)
    timer = make_timer("cuda")
    todo = [(op, *g) for g in groups(args.shapes) for op in args.ops]
    sections = {}
    failed = False
    for i, (op, pass_, dtype, rows, d) in enumerate(todo):
        key = (op, pass_, dtype, rows, d)
        left = deadline - time.monotonic()
        if left < 0.5:
            report.records.append(dict(zip(("op", "pass", "dtype", "rows", "d"), key), status="not run (budget)"))
            continue
        records = sweep_group(op, pass_, dtype, rows, d, 0.6 * left / (len(todo) - i), timer)
        failed = failed or any(r["status"] in ("error", "mismatch") for r in records)
        report.records += records
        sections[key] = records
        torch.cuda.empty_cache()
        write_tables(report, sections)
        report.save()
        timed = [r for r in records if r.get("ms") is not None and not r["auto"]]
        best = min(timed, key=lambda r: r["ms"], default=None)
        log(f"{op} {pass_} {dtype} {rows}x{d}: {len(records) - 1} plans, "
            + (f"best {best['plan']} {best['ms']:.3f} ms ({fmt(best['speedup_vs_auto'], 2)}x auto)" if best
               else "long rows (auto only)"))
    write_tables(report, sections)
    report.save()
    print(report.markdown())
    return 1 if failed else 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", action="store_true", help="print the plans of every shape, checked; needs no GPU")
    p.add_argument("--json", help="where the records go (with --markdown: the tables)")
    p.add_argument("--markdown", help="where the tables go (default: next to --json)")
    p.add_argument("--budget", type=float, default=30, help="wall-clock seconds for the whole sweep (default 30)")
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    p.add_argument("--dims", nargs="+", type=int, help="d of the rows (default: cuda_report.BENCH_SHAPES')")
    p.add_argument("--rows", type=int, help="rows (default: cuda_report.BENCH_SHAPES')")
    args = p.parse_args(argv)
    args.shapes = [(args.rows or rows, d) for rows, d in cuda_report.BENCH_SHAPES] if not args.dims else \
        [(args.rows or cuda_report.BENCH_SHAPES[0][0], d) for d in args.dims]
    if args.list:
        list_plans(args.shapes)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
