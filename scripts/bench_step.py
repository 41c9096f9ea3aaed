#!/usr/bin/env python3
"""How long the training step and the norm + FFN sublayer take: ffn against torch, eager and
torch.compile, on CPU.

The issue's speed tables (workloads and implementations: step_workloads.py). Each row times its four
implementations in paired rounds (benchmarking.paired_rounds): every round runs each of them once,
back to back in a rotating order. The ms columns are medians over the rounds; "best ffn / torch
compiled" takes the faster ffn implementation (eager or compiled, by median, named in brackets) and
gives the median over rounds of its time over that round's torch.compile of plain PyTorch, with the
quartiles of the per-round ratios (<= 1.00: ffn is at least as fast as what a user gets by turning
on torch.compile). Pairing by round is what
makes the ratio hold on a VM whose speed drifts by tens of percent from one minute to the next.

    python scripts/bench_step.py                         # both tables, A and B
    python scripts/bench_step.py --workload step --designs B --rounds 30
    python scripts/bench_step.py --quick                 # smoke run: one small row of each
    python scripts/bench_step.py --combine run1.json run2.json   # several runs' rounds, pooled

Compile time is not timed: every compiled function is called (warm-up) before the rounds. It prints
figures; it is not a test.
"""

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import ffn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmarking import environment, markdown_table, paired_rounds  # noqa: E402
from step_workloads import IMPLS, STEP_SHAPES, SUBLAYER_SHAPES, step_fn, sublayer_fn, sublayer_width  # noqa: E402


def time_row(fns, args):
    """Seconds per call by implementation and round."""
    torch._dynamo.reset()
    return dict(zip(IMPLS, paired_rounds(fns, rounds=args.rounds, sample_seconds=args.sample_seconds)))


def best_ffn_ratios(seconds):
    """(the faster ffn implementation by its median, its per-round ratios over torch compiled)."""
    best = min(("ffn", "ffn+compile"), key=lambda impl: statistics.median(seconds[impl]))
    return best, [f / tc for f, tc in zip(seconds[best], seconds["torch+compile"])]


def combined_rows(paths):
    """(workload, design, shape) -> seconds by implementation, the rounds of every run in `paths`
    (JSON written by --json) one after another."""
    rows = {}
    for path in paths:
        for row in json.loads(Path(path).read_text())["rows"]:
            seconds = rows.setdefault((row["workload"], row["design"], row["shape"]), {impl: [] for impl in IMPLS})
            for impl in IMPLS:
                seconds[impl] += row["seconds"][impl]
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=("sublayer", "step", "both"), default="both")
    parser.add_argument("--designs", default="A,B")
    parser.add_argument("--step-shapes", default=",".join(f"{d}x{b}" for d, b in STEP_SHAPES),
                        help="d_model x batch of the step rows")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=20, help="paired rounds per row")
    parser.add_argument("--sample-seconds", type=float, default=0.05,
                        help="about how long one timed sample (back-to-back calls of one implementation) takes")
    parser.add_argument("--quick", action="store_true", help="smoke-sized: one small row per table")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--combine", nargs="+", type=Path, default=None, metavar="RUN_JSON",
                        help="time nothing: the table of these runs' rounds pooled (per row, every run's rounds; "
                             "the faster ffn and the ratios taken over them all)")
    args = parser.parse_args(argv)
    sublayer_shapes = SUBLAYER_SHAPES
    if args.quick:
        sublayer_shapes, args.step_shapes, args.seq, args.layers = SUBLAYER_SHAPES[:1], "32x2", 16, 1
        args.rounds, args.sample_seconds = 3, 0.01
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment("cpu", sys.argv if argv is None else argv)
    headers = ["workload", "design", "shape", *(f"{impl} ms" for impl in IMPLS),
               "best ffn / torch compiled [quartiles]"]
    rows, records = [], []
    designs = args.designs.split(",")

    def add(workload, design, shape, seconds):
        best, ratios = best_ffn_ratios(seconds)
        ms = {impl: 1e3 * statistics.median(s) for impl, s in seconds.items()}
        q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
        median = statistics.median(ratios)
        rows.append([workload, design, shape, *(f"{ms[i]:.2f}" for i in IMPLS),
                     f"{median:.3f} [{q1:.3f}, {q3:.3f}] ({best})"])
        records.append({"workload": workload, "design": design, "shape": shape, "rounds": len(ratios), "ms": ms,
                        "best_ffn": best, "best_ffn_over_torch_compiled": median, "ratio_quartiles": [q1, q3],
                        "ratios": ratios, "seconds": seconds})
        print(" | ".join(str(c) for c in rows[-1]), flush=True)

    if args.combine:
        print(f"# the rounds of {len(args.combine)} runs pooled: {', '.join(str(p) for p in args.combine)}")
        for (workload, design, shape), seconds in combined_rows(args.combine).items():
            add(workload, design, shape, seconds)
    else:
        print(f"# torch {torch.__version__}, ffn {ffn.__version__} ({env.get('git_commit', '?')}), "
              f"{torch.get_num_threads()} threads, CPU; median ms over {args.rounds} paired rounds")
        if args.workload in ("sublayer", "both"):
            for design in designs:
                for d, d_ff, n in sublayer_shapes:
                    add("sublayer fwd+bwd", design, f"d {d}, d_ff {sublayer_width(design, d, d_ff)}, {n} rows",
                        time_row([sublayer_fn(impl, d, d_ff, n, design) for impl in IMPLS], args))
        if args.workload in ("step", "both"):
            for shape in args.step_shapes.split(","):
                d_model, batch = (int(v) for v in shape.split("x"))
                for design in designs:
                    add("step fwd+bwd+AdamW", design,
                        f"d {d_model}, batch {batch}, seq {args.seq}, {args.layers} layers",
                        time_row([step_fn(impl, design, d_model, batch, args.seq, args.layers) for impl in IMPLS],
                                 args))
    print()
    print(markdown_table(headers, rows))
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "rows": records}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
