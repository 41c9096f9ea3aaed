#!/usr/bin/env python3
"""How long the training step and the norm + FFN sublayer take: ffn against torch, eager and
torch.compile, on CPU.

The issue's speed tables (workloads and implementations: step_workloads.py), measured in one
interleaved run per row (scripts/benchmarking.py): every implementation of a row is timed in each
round, in a rotating order. Each row ends with "best ffn / torch compiled", the faster of ffn eager
and ffn compiled over torch.compile of plain PyTorch (<= 1.00: ffn is at least as fast as what a
user gets by turning on torch.compile).

    python scripts/bench_step.py                         # both tables, A and B
    python scripts/bench_step.py --workload step --designs B --budget 20
    python scripts/bench_step.py --quick                 # smoke run: one small row of each

Compile time is not timed: every compiled function is called (warm-up) before the rounds. It prints
figures; it is not a test.
"""

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import ffn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmarking import environment, fmt_ratio, make_timer, markdown_table, measure  # noqa: E402
from step_workloads import IMPLS, STEP_SHAPES, SUBLAYER_SHAPES, step_fn, sublayer_fn  # noqa: E402


def time_row(fns, args):
    torch._dynamo.reset()
    seconds, rounds = measure(make_timer("cpu"), fns, warmup=args.warmup, budget=args.budget,
                              min_reps=args.min_reps, max_reps=args.max_reps)
    by_impl = dict(zip(IMPLS, seconds))
    best_ffn = min(by_impl["ffn"], by_impl["ffn+compile"])
    return by_impl, best_ffn / by_impl["torch+compile"], rounds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=("sublayer", "step", "both"), default="both")
    parser.add_argument("--designs", default="A,B")
    parser.add_argument("--step-shapes", default=",".join(f"{d}x{b}" for d, b in STEP_SHAPES),
                        help="d_model x batch of the step rows")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--budget", type=float, default=12.0, help="seconds of timed rounds per row")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--min-reps", type=int, default=5)
    parser.add_argument("--max-reps", type=int, default=40)
    parser.add_argument("--quick", action="store_true", help="smoke-sized: one small row per table")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    sublayer_shapes = SUBLAYER_SHAPES
    if args.quick:
        sublayer_shapes, args.step_shapes, args.seq, args.layers = SUBLAYER_SHAPES[:1], "32x2", 16, 1
        args.budget, args.min_reps, args.warmup = 0.5, 2, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment("cpu", sys.argv if argv is None else argv)
    print(f"# torch {torch.__version__}, ffn {ffn.__version__} ({env.get('git_commit', '?')}), "
          f"{torch.get_num_threads()} threads, CPU; median ms over interleaved rounds")
    headers = ["workload", "design", "shape", *(f"{impl} ms" for impl in IMPLS), "best ffn / torch compiled",
               "rounds"]
    rows, records = [], []
    designs = args.designs.split(",")

    def add(workload, design, shape, fns):
        by_impl, ratio, rounds = time_row(fns, args)
        rows.append([workload, design, shape, *(f"{1e3 * by_impl[i]:.2f}" for i in IMPLS), fmt_ratio(ratio), rounds])
        records.append({"workload": workload, "design": design, "shape": shape, "rounds": rounds,
                        "ms": {i: 1e3 * by_impl[i] for i in IMPLS}, "best_ffn_over_torch_compiled": ratio})
        print(" | ".join(str(c) for c in rows[-1]), flush=True)

    if args.workload in ("sublayer", "both"):
        for design in designs:
            for d, d_ff, n in sublayer_shapes:
                width = 4 * d if design == "A" else d_ff
                add("sublayer fwd+bwd", design, f"d {d}, d_ff {width}, {n} rows",
                    [sublayer_fn(impl, d, d_ff, n, design) for impl in IMPLS])
    if args.workload in ("step", "both"):
        for shape in args.step_shapes.split(","):
            d_model, batch = (int(v) for v in shape.split("x"))
            for design in designs:
                add("step fwd+bwd+AdamW", design, f"d {d_model}, batch {batch}, seq {args.seq}, {args.layers} layers",
                    [step_fn(impl, design, d_model, batch, args.seq, args.layers) for impl in IMPLS])
    print()
    print(markdown_table(headers, rows))
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "rows": records}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
