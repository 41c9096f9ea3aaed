"""How much ffn_stats (per-layer FFN telemetry) costs next to the FFN forward it describes.

Prints the median time of: the gated FFN forward (_gated_ffn_fwd: two GEMMs and
the fused activation pass), that activation pass alone (gated_activation),
ffn_stats on the forward's pre-activation, and the same statistics in plain
PyTorch (ffn.telemetry.reference_stats, float64) for comparison. Timed with the
benchmarks' shared timer (scripts/benchmarking.py: torch.utils.benchmark.Timer on
CPU, CUDA events with an L2 flush on CUDA), the four interleaved.

d_ff defaults to ffn.harness.model.gated_d_ff(d, 4d): the gated width with the parameters
of a 4d GELU FFN, as the harness's gated models use.

    python scripts/bench_telemetry.py                       # CPU, 4096 tokens, d=256, d_ff=gated_d_ff(256, 1024)=682
    python scripts/bench_telemetry.py --device cuda --tokens 16384 --d 1024 --dtype bfloat16
    python scripts/bench_telemetry.py --quick --json /tmp/telemetry.json   # smoke-sized; also writes .md
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/benchmarking.py, also when imported from elsewhere

import ffn  # noqa: E402,F401  (registers torch.ops.ffn)
from benchmarking import Report, environment, fmt_ms, log, make_timer, markdown_table, measure  # noqa: E402
from ffn.activations import ACTIVATION_NAMES  # noqa: E402
from ffn.harness.model import gated_d_ff  # noqa: E402
from ffn.telemetry import ffn_stats, reference_stats, summarize  # noqa: E402

HEADERS = ["what", "median ms", "x forward", "reps"]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--tokens", type=int, default=None, help="default 4096 (quick: 256)")
    parser.add_argument("--d", type=int, default=None, help="default 256 (quick: 64)")
    parser.add_argument("--d-ff", type=int, default=None, help="default ffn.harness.model.gated_d_ff(d, 4d)")
    parser.add_argument("--activation", default="silu", choices=ACTIVATION_NAMES)
    parser.add_argument("--repeats", type=int, default=None, help="fixed interleaved repetitions (default: sized by --budget)")
    parser.add_argument("--budget", type=float, default=None, help="wall-clock seconds of repetitions (default 3, quick 0.2)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="smoke-sized: 256 tokens, d=64, short budget")
    parser.add_argument("--json", help="result file (default: none written)")
    parser.add_argument("--markdown", help="table file (default: next to --json, .md)")
    args = parser.parse_args(argv)
    args.tokens = args.tokens or (256 if args.quick else 4096)
    args.d = args.d or (64 if args.quick else 256)
    args.d_ff = args.d_ff or gated_d_ff(args.d, 4 * args.d)
    args.budget = args.budget if args.budget is not None else (0.2 if args.quick else 3.0)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    make = dict(device=args.device, dtype=dtype)
    x = torch.randn(args.tokens, args.d, **make) + 0.2
    w_gate_up = torch.randn(2 * args.d_ff, args.d, **make) / args.d**0.5
    b_gate_up = torch.randn(2 * args.d_ff, **make) * 0.1
    w_down = torch.randn(args.d, args.d_ff, **make) / args.d_ff**0.5

    def forward():
        return torch.ops.ffn._gated_ffn_fwd(x, w_gate_up, b_gate_up, w_down, None, args.activation)

    _out, preact = forward()
    impls = {
        "_gated_ffn_fwd (2 GEMMs + act)": forward,
        "  of which the activation pass": lambda: torch.ops.ffn.gated_activation(preact, args.activation),
        "ffn_stats (fused telemetry)": lambda: ffn_stats(x, preact, args.activation, True),
        "reference_stats (plain PyTorch)": lambda: reference_stats(x, preact, args.activation, True),
    }
    with torch.no_grad():
        times, reps = measure(make_timer(args.device), list(impls.values()), warmup=1 if args.quick else 3,
                              budget=args.budget, min_reps=3, max_reps=10 if args.quick else 50, reps=args.repeats)

    where = f"{args.device}" + (f" ({torch.get_num_threads()} threads)" if args.device == "cpu" else "")
    title = (f"ffn_stats vs gated FFN forward on {where}, {args.dtype}, tokens={args.tokens}, "
             f"d={args.d}, d_ff={args.d_ff}, activation={args.activation}")
    env = environment("cpu" if args.device == "cpu" else "cuda", argv)
    report = Report(title, vars(args), env, args.json, args.markdown)
    section = report.section("Median time", HEADERS, "x forward: the row's time / _gated_ffn_fwd's.")
    t_forward = times[0]
    for name, t in zip(impls, times):
        report.add_row(section, [name, fmt_ms(t), f"{t / t_forward:.3f}", reps], echo=False,
                       record={"kind": "telemetry", "what": name.strip(), "seconds": t, "over_forward": t / t_forward, "reps": reps})
    summary = summarize(ffn_stats(x, preact, args.activation, True))
    report.env["summary"] = summary
    log(title)
    log(markdown_table(HEADERS, section["rows"]))
    log("summary:", ", ".join(f"{k}={v:.4g}" for k, v in summary.items()))
    report.save()
    if report.json_path or report.markdown_path:
        log("wrote", " and ".join(p for p in (report.json_path, report.markdown_path) if p))
    return report.as_json()


if __name__ == "__main__":
    main()
