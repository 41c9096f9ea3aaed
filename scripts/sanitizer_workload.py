"""A short CUDA workload that launches every ffn kernel, forward and backward, in
every row policy of the norm launchers, for compute-sanitizer (memcheck,
racecheck, synccheck) under scripts/gpu_check.py:

    compute-sanitizer --tool memcheck --error-exitcode 1 python scripts/sanitizer_workload.py [--quick]

--quick keeps one dtype and the policy boundaries only (racecheck is slow).
Results are checked against the CPU kernels, so a kernel that runs clean but
computes garbage fails here too.
"""

import argparse
import sys

import torch

import ffn  # registers torch.ops.ffn

# (rows, d) per 16-bit policy of csrc/cuda/norm.cu: sub-warp rows, a warp,
# several warps, 1024 threads, long rows in shared memory, long rows re-read,
# the backward column kernel; with row tails.
NORM_SHAPES = [(67, 24), (300, 100), (9, 513), (4, 4096), (2, 8192), (3, 8200), (2, 16392), (2, 60000)]
QUICK_NORM_SHAPES = [(67, 24), (9, 513), (3, 8200), (2, 60000)]


def check(name, got, want, dtype):
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-3, torch.float64: 1e-9}[dtype]
    for g, w in zip(got, want):
        if g is None and w is None:
            continue
        torch.testing.assert_close(g.cpu().to(torch.float64), w.to(torch.float64), rtol=tol,
                                   atol=tol * (1 + w.abs().max().item()), msg=lambda m: f"{name}: {m}")


def run_case(fn, args_cpu, dtype, name):
    """fn forward and backward on CUDA and on CPU, compared."""
    outs = []
    for device in ("cuda", "cpu"):
        args = [a.detach().to(device).requires_grad_(a.is_floating_point()) if isinstance(a, torch.Tensor) else a
                for a in args_cpu]
        y = fn(*args)
        y.backward(torch.ones_like(y) * 0.5 + torch.arange(y.numel(), device=device).reshape(y.shape) % 3)
        outs.append([y] + [a.grad if isinstance(a, torch.Tensor) else None for a in args])
    torch.cuda.synchronize()
    check(name, outs[0], outs[1], dtype)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("sanitizer_workload: no CUDA device")
    dtypes = [torch.bfloat16] if args.quick else [torch.bfloat16, torch.float32, torch.float16]
    g = torch.Generator().manual_seed(0)
    shapes = QUICK_NORM_SHAPES if args.quick else NORM_SHAPES
    for dtype in dtypes:
        for rows, d in shapes:
            x = torch.randn(rows, d, generator=g).to(dtype)
            w = (1 + 0.1 * torch.randn(d, generator=g)).to(dtype)
            b = (0.1 * torch.randn(d, generator=g)).to(dtype)
            run_case(lambda x, w, b: torch.ops.ffn.layer_norm(x, w, b, 1e-5), [x, w, b], dtype, f"layer_norm {dtype} {rows}x{d}")
            run_case(lambda x, w: torch.ops.ffn.rms_norm(x, w, None, 1e-6), [x, w], dtype, f"rms_norm {dtype} {rows}x{d}")
            r = torch.randn(rows, d, generator=g).to(dtype)
            for op in ("add_layer_norm", "add_rms_norm"):  # the fused add, zero-centered weight, in-place backward
                run_case(lambda x, r, w, b, op=op: sum(getattr(torch.ops.ffn, op)(x, r, w, b, 1e-5, 1.0, True)),
                         [x, r, w, b], dtype, f"{op} {dtype} {rows}x{d}")
        rows, d, f = (33, 64, 136) if args.quick else (129, 96, 264)
        x = torch.randn(rows, d, generator=g).to(dtype)
        w1, b1 = (0.1 * torch.randn(f, d, generator=g)).to(dtype), (0.1 * torch.randn(f, generator=g)).to(dtype)
        w2, b2 = (0.1 * torch.randn(d, f, generator=g)).to(dtype), (0.1 * torch.randn(d, generator=g)).to(dtype)
        wgu = (0.1 * torch.randn(2 * f, d, generator=g)).to(dtype)
        run_case(lambda *a: torch.ops.ffn.gelu_ffn(*a), [x, w1, b1, w2, b2], dtype, f"gelu_ffn {dtype}")
        run_case(lambda *a: torch.ops.ffn.relu_ffn(*a), [x, w1, b1, w2, b2], dtype, f"relu_ffn {dtype}")
        run_case(lambda x, wgu, w2: torch.ops.ffn.geglu(x, wgu, None, w2, None, "tanh"), [x, wgu, w2], dtype,
                 f"geglu tanh {dtype}")
        for op in ffn.activations.GATED_OPS:
            run_case(lambda x, wgu, w2: getattr(torch.ops.ffn, op)(x, wgu, None, w2, None), [x, wgu, w2], dtype, f"{op} {dtype}")
        z = torch.randn(rows, 2 * f, generator=g).to(dtype)
        z[1, 0] = 40.0  # an outlier row for the second telemetry pass
        for act in ffn.activations.ACTIVATION_NAMES:
            stats = torch.ops.ffn.ffn_stats(x.cuda(), z.cuda(), act, True, 0.05, 3.0, 6.0)
            want = torch.ops.ffn.ffn_stats(x, z, act, True, 0.05, 3.0, 6.0)
            torch.testing.assert_close(stats.cpu(), want, rtol=1e-4, atol=1e-4, msg=lambda m: f"ffn_stats {act}: {m}")
    print("sanitizer_workload: every kernel ran and matched the CPU kernels")


if __name__ == "__main__":
    main()
