#!/usr/bin/env python3
"""Where the CPU time of a training step goes: ffn against torch, eager and torch.compile.

Profiles (torch.profiler, CPU) two workloads and prints, for each implementation, the
share of self CPU time by kind of op and the ops that take the most:

  sublayer   x + FFN(norm(x)) forward + backward, the norm + FFN sublayer on its own:
             rms_norm + SwiGLU (B) or layer_norm + GELU FFN (A), at the issue's shapes
  step       one fwd + bwd + AdamW step of the harness's TransformerLM (ffn.harness), the
             cpu preset's model by default

Implementations (torch, torch+compile, ffn, ffn+compile) and workloads: step_workloads.py.

Kinds: gemm (mm/addmm/bmm/linear and their backward), ffn (torch.ops.ffn.* kernels),
inductor (Inductor's generated C++ kernels: fused elementwise/reductions), attention (sdpa),
norm/activation (ATen's), elementwise (add, mul, copies, casts, fills), optimizer (AdamW's
foreach ops), other. Elementwise ATen ops are one pass over their tensors each: their count
per step is the "passes over memory" figure beside the time.

    python scripts/profile_step.py                       # both workloads, d 96 and d 256
    python scripts/profile_step.py --workload sublayer --threads 2
    python scripts/profile_step.py --quick --impls ffn,torch      # smoke run, seconds

It prints figures; it is not a test. Timings come from the profiler (which adds overhead
per op: compare shares, and use scripts/bench.py or bench_patch.py for wall times).
"""

import argparse
import os
import sys
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # no profiler start/stop lines

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import ffn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_workloads import IMPLS, SUBLAYER_SHAPES, step_fn, sublayer_fn, sublayer_width  # noqa: E402

GEMM = ("mm", "addmm", "bmm", "linear", "matmul", "baddbmm")
ELEMENTWISE = ("add", "mul", "sub", "div", "copy_", "to", "_to_copy", "fill_", "zero_", "cat", "neg", "sum",
               "clone", "contiguous", "empty_like", "ones_like", "zeros_like", "where", "masked_fill", "embedding",
               "embedding_dense_backward", "index", "scatter", "t", "transpose", "view", "reshape")


def kind_of(name):
    short = name.split("::")[-1]
    if name.startswith("ffn::"):
        return "ffn"
    if "cpp_fused" in name or "graph_" in name and "kernel" in name:
        return "inductor"
    if short in GEMM or short.rstrip("_") in GEMM:
        return "gemm"
    if "attention" in short or "sdpa" in short:
        return "attention"
    if "norm" in short:
        return "norm"
    if any(a in short for a in ("gelu", "silu", "relu", "sigmoid", "tanh", "softmax")):
        return "activation"
    if short.startswith("_foreach") or "adam" in short.lower():
        return "optimizer"
    if short in ELEMENTWISE or short.rstrip("_") in ELEMENTWISE:
        return "elementwise"
    return "other"


def profiled(fn, repeats):
    """(self CPU µs per call by op name, calls per call by op name, total µs per call)."""
    for _ in range(3):
        fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            fn()
    times, calls = defaultdict(float), defaultdict(float)
    for e in prof.key_averages():
        if e.key.startswith("ProfilerStep") or e.self_cpu_time_total == 0 and e.count == 0:
            continue
        times[e.key] += e.self_cpu_time_total / repeats
        calls[e.key] += e.count / repeats
    return times, calls, sum(times.values())


def summarize(label, times, calls, total, top):
    by_kind, passes = defaultdict(float), 0
    for name, t in times.items():
        kind = kind_of(name)
        by_kind[kind] += t
        if kind == "elementwise" and not name.split("::")[-1] in ("view", "reshape", "t", "transpose"):
            passes += calls[name]
    shares = "  ".join(f"{k} {100 * v / total:.0f}%" for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1]))
    print(f"  {label:14s} {total / 1e3:8.2f} ms (profiled)  elementwise ATen calls {passes:5.0f}  | {shares}")
    ranked = sorted(times.items(), key=lambda kv: -kv[1])[:top]
    print("      top: " + ", ".join(f"{n.split('::')[-1]} {100 * t / total:.0f}% ({calls[n]:.0f}x)"
                                    for n, t in ranked))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=("sublayer", "step", "both"), default="both")
    parser.add_argument("--designs", default="A,B")
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--top", type=int, default=6)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--step-shapes", default="96x16,256x8", help="d_model x batch of the step workload")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--quick", action="store_true",
                        help="smoke-sized: the smallest sublayer shape and a 1-layer d 32 step")
    args = parser.parse_args(argv)
    shapes = SUBLAYER_SHAPES[:1] if args.quick else SUBLAYER_SHAPES
    if args.quick:
        args.step_shapes, args.seq, args.layers = "32x2", 16, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    torch._inductor.config.cpp.enable_kernel_profile = True  # Inductor's kernels by name in the profile
    impls = args.impls.split(",")
    print(f"# torch {torch.__version__}, ffn {ffn.__version__}, {torch.get_num_threads()} threads, CPU; "
          f"self CPU time per call from torch.profiler, {args.repeats} calls after 3 warm-up calls")
    if args.workload in ("sublayer", "both"):
        for design in args.designs.split(","):
            for d, d_ff, rows in shapes:
                print(f"\nsublayer {design}: d {d}, d_ff {sublayer_width(design, d, d_ff)}, {rows} rows, fwd+bwd")
                for impl in impls:
                    torch._dynamo.reset()
                    summarize(impl, *profiled(sublayer_fn(impl, d, d_ff, rows, design), args.repeats), args.top)
    if args.workload in ("step", "both"):
        for shape in args.step_shapes.split(","):
            d_model, batch = (int(v) for v in shape.split("x"))
            for design in args.designs.split(","):
                print(f"\nstep {design}: TransformerLM d {d_model}, {args.layers} layers, batch {batch} x seq "
                      f"{args.seq}, fwd+bwd+AdamW")
                for impl in impls:
                    torch._dynamo.reset()
                    summarize(impl, *profiled(step_fn(impl, design, d_model, batch, args.seq, args.layers),
                                              args.repeats), args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
