"""How much ffn_stats (per-layer FFN telemetry) costs next to the FFN forward it describes.

Prints the median time of: the gated FFN forward (_gated_ffn_fwd: two GEMMs and
the fused activation pass), that activation pass alone (gated_activation),
ffn_stats on the forward's pre-activation, and the same statistics in plain
PyTorch (ffn.telemetry.reference_stats, float64) for comparison.

    python scripts/bench_telemetry.py                       # CPU, 4096 tokens, d=256, d_ff=683
    python scripts/bench_telemetry.py --device cuda --tokens 16384 --d 1024 --d-ff 2736 --dtype bfloat16
"""

import argparse
import statistics
import time

import torch

import ffn
from ffn.telemetry import ffn_stats, reference_stats, summarize


def median_ms(fn, device, repeats, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--d-ff", type=int, default=683)
    parser.add_argument("--activation", default="silu", choices=["silu", "gelu", "gelu_tanh", "relu"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args()
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
    with torch.no_grad():
        t_forward = median_ms(forward, args.device, args.repeats)
        t_activation = median_ms(
            lambda: torch.ops.ffn.gated_activation(preact, args.activation), args.device, args.repeats
        )
        t_stats = median_ms(lambda: ffn_stats(x, preact, args.activation, True), args.device, args.repeats)
        t_reference = median_ms(
            lambda: reference_stats(x, preact, args.activation, True), args.device, max(3, args.repeats // 4)
        )

    where = f"{args.device}" + (f" ({torch.get_num_threads()} threads)" if args.device == "cpu" else "")
    print(f"ffn_stats vs gated FFN forward on {where}, {args.dtype}, tokens={args.tokens}, "
          f"d={args.d}, d_ff={args.d_ff}, activation={args.activation}")
    print(f"{'':36s}{'median ms':>10s}{'x forward':>11s}")
    for name, t in [
        ("_gated_ffn_fwd (2 GEMMs + act)", t_forward),
        ("  of which the activation pass", t_activation),
        ("ffn_stats (fused telemetry)", t_stats),
        ("reference_stats (plain PyTorch)", t_reference),
    ]:
        print(f"{name:36s}{t:10.3f}{t / t_forward:11.3f}")
    summary = summarize(ffn_stats(x, preact, args.activation, True))
    print("summary:", ", ".join(f"{k}={v:.4g}" for k, v in summary.items()))


if __name__ == "__main__":
    main()
