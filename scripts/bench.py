#!/usr/bin/env python3
"""Benchmarks of the ffn ops against PyTorch, on CPU or CUDA. It prints figures; it is not a test.

    python scripts/bench.py --device cpu [--dtype bfloat16] [--quick]
    python scripts/bench.py --device cuda [--quick] [--tag part1 --rows 16384]

CPU: rms_norm / layer_norm against torch's native F.rms_norm / F.layer_norm (add_rms_norm, the
fused residual add, against `s = x + residual; F.rms_norm(s)`), and
gelu_ffn / swiglu against the eager composite in ffn.reference, forward (under no_grad) and
forward+backward (gradients of x and every parameter), each also against torch.compile of that
torch code and with the ffn op's call compiled (unless --no-compile), plus the activation bytes
each FFN saves for backward.

CUDA: the device's copy bandwidth (x.clone()), then the norms against torch eager
and torch.compile of the eager code (time, GB/s, % of copy bandwidth, speedup), and the FFNs
against eager, torch.compile and the same GEMMs alone, with peak memory.

Definitions used in every table:
- time: median over interleaved repetitions, after warmup, measured by scripts/benchmarking.py
  (its docstring has the details). Each repetition runs every implementation, in a rotating
  order, so load from other processes hits them alike. CPU: torch.utils.benchmark.Timer
  (blocked_autorange, with torch's thread count). CUDA: CUDA events around each call on the
  current stream, with the L2 cache flushed before each call (so small tensors are not served
  from L2). reps: the number of repetitions.
- GB/s: bytes / time, where bytes = what the op must read and write at least: every input
  once and every output once, intermediates excluded.
    norm fwd:      read x and the parameters, write y              (saved mean/rstd excluded: rows*4 B)
    norm fwd+bwd:  fwd + read dy, x and the weight, write dx and the parameter gradients
    add_rms_norm:  as the norm, plus: read the residual and write s (fwd); read the gradient of s (bwd)
    ffn fwd:       read x, weights, biases, write out
    ffn fwd+bwd:   fwd + read dout, x, weights, write dx and the weight/bias gradients
  The same byte count divides every implementation's time, so GB/s ratios equal speedups.
- % copy (CUDA): GB/s / the copy bandwidth measured by x.clone() (read + write) in the same run.
- compiled (CPU): torch.compile (Inductor, dynamic=False, a fresh cache per shape) of the torch
  code ("torch compiled") and of the call of the ffn op ("ffn compiled": the op is opaque to
  Inductor, so this is the op plus Dynamo's guards, what a compiled model that calls it gets),
  compiled before timing and timed in the same interleaved rounds as the eager pair. "speedup vs
  compiled" = torch compiled time / the faster of ffn and ffn compiled: >= 1.00 means ffn is at
  least as fast as what a torch.compile user has without it.
- saved activations: bytes of the tensors autograd saves for backward during the forward,
  counted with torch.autograd.graph.saved_tensors_hooks, deduplicated by storage (a view of a
  saved tensor costs nothing extra). Parameters (and views of them) are left out and shown
  separately: the module holds them anyway. x counts: in a block it is the norm's output.
- FFN shapes: gelu_ffn has d_ff = 4d and biases (GPT style); swiglu has no biases and its
  d_ff follows --gated-width, recorded in each row's "d_ff rule" column:
    llama (default): 8d/3 rounded UP to a multiple of 64 (llama_d_ff). This deliberately
      differs from the harness's rule, ffn.harness.model.gated_d_ff: these are the GEMM-friendly
      widths that LLaMA-style models run, and the shapes of earlier bench/results files. It has
      the parameters of a bias-free 4d GELU FFN only up to the rounding (+3.1% at d=512, +0.2% at d=4096).
    matched: ffn.harness.model.gated_d_ff(d, 4d, bias=False), the one rule used wherever parameter
      parity with the GELU FFN is meant (the harness's models): 2/3 of 4d, within 1%.
- peak memory (CUDA): torch.cuda.max_memory_allocated() during one fwd+bwd minus what was
  allocated before it (inputs and parameters), so it counts activations, gradients and workspace.
- GEMM-only (CUDA): the matmuls the ffn op issues (2 forward, 4 backward) on preallocated
  operands of the same shapes and layouts, and nothing else.

Targets are printed as PASS/MISS next to each row and summarized at the end.
Results go to bench/results/<device>-<YYYY-MM-DD>[-<tag>].json and .md (or --json/--markdown),
rewritten after every shape, so a run that is cut off keeps what it measured. --quick runs a
smoke-sized subset and writes nothing unless given a path.

A full CUDA run compiles two torch.compile graphs (inference, training) per norm shape: 64
compilations, several minutes. To fit it into shorter sessions, split it, e.g.
    --ops rms_norm layer_norm --dtype bfloat16 --tag norms-bf16
    --ops rms_norm layer_norm --dtype float32 --tag norms-fp32
    --ops gelu_ffn swiglu --tag ffn
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/benchmarking.py, also when imported from elsewhere

import ffn  # noqa: E402,F401  (registers torch.ops.ffn)
from benchmarking import (  # noqa: E402
    MIB, Report, default_json_path, environment, fmt_ms, fmt_num, fmt_ratio, log, make_timer, measure, verdict,
)
from ffn import reference  # noqa: E402
from ffn.harness.model import gated_d_ff  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
NORM_OPS = ("rms_norm", "layer_norm", "add_rms_norm")
FFN_OPS = ("gelu_ffn", "swiglu")


# ----------------------------------------------------------------------------- shapes and ops
def llama_d_ff(d: int) -> int:
    """8d/3 rounded UP to a multiple of 64: the LLaMA-style gated width, GEMM-friendly. The benchmark's
    deliberate exception to ffn.harness.model.gated_d_ff (the module docstring says why)."""
    return 64 * math.ceil(8 * d / 3 / 64)


# --gated-width: the rule that sets swiglu's d_ff from d, by name (the "d_ff rule" column).
GATED_WIDTH_RULES = {
    "llama": ("8d/3 up to 64", llama_d_ff),
    "matched": ("gated_d_ff(d, 4d)", lambda d: gated_d_ff(d, 4 * d, bias=False)),
}


def bench_d_ff(op: str, d: int, gated_width: str = "llama") -> tuple[int, str]:
    """(d_ff, the rule's name for the tables): 4d for gelu_ffn, the --gated-width rule for swiglu."""
    if op == "gelu_ffn":
        return 4 * d, "4d"
    name, rule = GATED_WIDTH_RULES[gated_width]
    return rule(d), name


def ffn_shapes_note(cfg):
    name = GATED_WIDTH_RULES[cfg.gated_width][0]
    why = ("LLaMA-style, GEMM-friendly; not ffn.harness.model.gated_d_ff" if cfg.gated_width == "llama"
           else "ffn.harness.model.gated_d_ff: the parameters of a bias-free 4d GELU FFN within 1%")
    return f"gelu_ffn: d_ff = 4d, with biases; swiglu: d_ff = {name} ({why}), no biases."


def norm_case(op, rows, d, dtype, device):
    """(inputs, parameters, ffn fn, torch fn); rms_norm has a weight, layer_norm weight and bias,
    add_rms_norm x, a residual and a weight (and returns (y, s))."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, d, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
    w = (1 + 0.1 * torch.randn(d, generator=g)).to(device=device, dtype=dtype)
    if op == "add_rms_norm":
        residual = torch.randn(rows, d, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
        ffn_fn = lambda x, r, w: torch.ops.ffn.add_rms_norm(x, r, w, None, 1e-6)  # noqa: E731

        def torch_fn(x, r, w):
            s = x + r
            return F.rms_norm(s, (s.shape[-1],), w, 1e-6), s

        return [x, residual, w], [w], ffn_fn, torch_fn
    if op == "rms_norm":
        params = [w]
        ffn_fn = lambda x, w: torch.ops.ffn.rms_norm(x, w, None, 1e-6)  # noqa: E731
        torch_fn = lambda x, w: F.rms_norm(x, (x.shape[-1],), w, 1e-6)  # noqa: E731
    else:
        b = (0.1 * torch.randn(d, generator=g)).to(device=device, dtype=dtype)
        params = [w, b]
        ffn_fn = lambda x, w, b: torch.ops.ffn.layer_norm(x, w, b, 1e-5)  # noqa: E731
        torch_fn = lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)  # noqa: E731
    return [x, *params], params, ffn_fn, torch_fn


def liger_norm(op):
    """Liger-Kernel's norm with the signature of norm_case's torch fn, or None when it is not importable."""
    try:
        if op == "rms_norm":
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        elif op == "add_rms_norm":
            from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction
        else:
            from liger_kernel.ops.layer_norm import LigerLayerNormFunction
    except Exception:  # noqa: BLE001 - not installed, or no Triton for this device
        return None
    if op == "rms_norm":
        return lambda x, w: LigerRMSNormFunction.apply(x, w, 1e-6)  # noqa: E731
    if op == "add_rms_norm":
        return lambda x, r, w: LigerFusedAddRMSNormFunction.apply(x, r, w, 1e-6)  # noqa: E731
    return lambda x, w, b: LigerLayerNormFunction.apply(x, w, b, 1e-5)  # noqa: E731


def norm_grad_out(op, inputs):
    """The output gradient(s) of a norm case: dy, and for add_rms_norm also the gradient of s."""
    dy = torch.randn_like(inputs[0])
    return (dy, torch.randn_like(dy)) if op == "add_rms_norm" else dy


def norm_bytes(rows, d, elt, n_params, with_backward, fused_add=False):
    # x (and the residual) read; y (and s) written; parameters read.
    fwd = (4 if fused_add else 2) * rows * d * elt + n_params * d * elt
    if not with_backward:
        return fwd
    # dy (and the gradient of s), x read; dx written; weight read; parameter gradients written.
    return fwd + (4 if fused_add else 3) * rows * d * elt + d * elt + n_params * d * elt


def ffn_case(op, tokens, d, dtype, device, gated_width="llama"):
    """(inputs, parameters, ffn fn, eager fn, d_ff, d_ff rule): gelu_ffn with biases, swiglu without."""
    d_ff, rule = bench_d_ff(op, d, gated_width)
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale):
        return (scale * torch.randn(*shape, generator=g)).to(device=device, dtype=dtype)

    x = rand(tokens, d, scale=1.0)
    if op == "gelu_ffn":
        params = [rand(d_ff, d, scale=d**-0.5), rand(d_ff, scale=0.1), rand(d, d_ff, scale=d_ff**-0.5), rand(d, scale=0.1)]
        ffn_fn = lambda x, w1, b1, w2, b2: torch.ops.ffn.gelu_ffn(x, w1, b1, w2, b2)  # noqa: E731
        eager_fn = lambda x, w1, b1, w2, b2: reference.gelu_ffn(x, w1, b1, w2, b2)  # noqa: E731
    else:
        params = [rand(2 * d_ff, d, scale=d**-0.5), rand(d, d_ff, scale=d_ff**-0.5)]
        ffn_fn = lambda x, wgu, wd: torch.ops.ffn.swiglu(x, wgu, None, wd, None)  # noqa: E731
        eager_fn = lambda x, wgu, wd: reference.swiglu(x, wgu, None, wd, None)  # noqa: E731
    return [x, *params], params, ffn_fn, eager_fn, d_ff, rule


def ffn_cost(tokens, d, d_ff, gated, elt, biases, with_backward):
    """(bytes, flops) of an FFN: bytes as in the module docstring, flops of the GEMMs."""
    n_in = 2 * d_ff if gated else d_ff
    weights = (n_in * d + d * d_ff) * elt
    bias_bytes = (n_in + d) * elt if biases else 0
    fwd_bytes = tokens * d * elt + weights + bias_bytes + tokens * d * elt
    fwd_flops = 2 * tokens * d * n_in + 2 * tokens * d_ff * d
    if not with_backward:
        return fwd_bytes, fwd_flops
    bwd_bytes = 2 * tokens * d * elt + weights + tokens * d * elt + weights + bias_bytes
    return fwd_bytes + bwd_bytes, 3 * fwd_flops


def forward_only(fn, inputs):
    def run():
        with torch.no_grad():
            fn(*inputs)

    return run


def forward_backward(fn, inputs, grad_out):
    def run():
        out = fn(*inputs)
        torch.autograd.grad(out, inputs, grad_out)

    return run


def pass_runner(with_backward, inputs, grad_inputs, grad_out):
    """fn -> a callable that runs fn's forward under no_grad, or its forward+backward."""
    if with_backward:
        return lambda fn: forward_backward(fn, grad_inputs, grad_out)
    return lambda fn: forward_only(fn, inputs)


def requiring_grad(tensors):
    return [t.detach().requires_grad_(True) for t in tensors]


def saved_activation_bytes(fn, inputs, params):
    """Bytes autograd saves for backward in one forward, deduplicated by storage, parameters excluded."""
    param_storages = {p.untyped_storage().data_ptr() for p in params}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*inputs)
    del out
    return sum(saved.values())


# ----------------------------------------------------------------------------- timing
def time_impls(timer, fns, cfg):
    """Median seconds of each fn and the number of interleaved repetitions (scripts/benchmarking.py)."""
    return measure(timer, fns, warmup=cfg.warmup, budget=cfg.budget, min_reps=cfg.min_reps, max_reps=cfg.max_reps, reps=cfg.reps)


def bandwidth(bytes_, seconds):
    return bytes_ / seconds / 1e9


def copy_bandwidth(timer, cfg, numel):
    x = torch.empty(numel, dtype=torch.float32, device=cfg.device).normal_()
    (seconds,), _ = time_impls(timer, [lambda: x.clone()], cfg)
    return bandwidth(2 * x.nbytes, seconds), x.nbytes


def compiled(*fns):
    """torch.compile of each fn, specialized to the shapes it is called with."""
    torch._dynamo.reset()  # a fresh cache per shape: no recompile limit, no dynamic-shape kernels
    return [torch.compile(fn, dynamic=False) for fn in fns]


def try_impl(timer, name, fn, failures):
    """Runs fn once; an implementation that raises (e.g. no CUDA kernel yet, no C++ compiler for
    torch.compile on CPU) is reported n/a."""
    try:
        fn()
        timer.sync()
        return True
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of one implementation must not stop the run
        failures.setdefault(name, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        return False


def measure_available(timer, impls, cfg, failures):
    """Times the implementations that run; {name: seconds or None}."""
    names = [n for n, fn in impls.items() if try_impl(timer, n, fn, failures)]
    if not names:
        return {n: None for n in impls}, 0
    times, reps = time_impls(timer, [impls[n] for n in names], cfg)
    out = dict.fromkeys(impls)
    out.update(zip(names, times))
    return out, reps


def log_failures(failures):
    if failures:
        log("implementations that failed (reported n/a):")
        for name, err in failures.items():
            log(f"  {name}: {err}")


# ----------------------------------------------------------------------------- CPU
CPU_COMPILE_NOTE = (
    "torch compiled = torch.compile (Inductor, a fresh cache and static shapes per shape) of the torch code; ffn compiled = "
    "torch.compile of the ffn op's call (an opaque op to Inductor: what compiling a model that calls it gives). All four are "
    "timed in the same interleaved rounds, compilation done before. speedup vs compiled = torch compiled / the faster of "
    "ffn and ffn compiled."
)


def time_cpu_row(timer, cfg, run, ffn_fn, torch_fn, compiled_fns, case, failures):
    """({ffn, torch, torch_compiled, ffn_compiled: median seconds or None, vs_compiled}, reps) of one
    CPU row: the eager pair, and the compiled pair (torch's, ffn's) when given, in the same rounds.
    vs_compiled: torch compiled over the faster ffn (None without it); a compiled implementation
    that fails is n/a (failures)."""
    impls = {"ffn": run(ffn_fn), "torch": run(torch_fn)}
    if compiled_fns is not None:
        impls["torch_compiled"], impls["ffn_compiled"] = (run(fn) for fn in compiled_fns)
    times, reps = measure_available(timer, impls, cfg, failures)
    t = {k: times.get(k) for k in ("ffn", "torch", "torch_compiled", "ffn_compiled")}
    if t["ffn"] is None or t["torch"] is None:
        raise RuntimeError(f"{case}: the eager implementations failed: {failures}")
    best_ffn = min(v for v in (t["ffn"], t["ffn_compiled"]) if v is not None)
    t["vs_compiled"] = None if t["torch_compiled"] is None else t["torch_compiled"] / best_ffn
    return t, reps


def run_cpu(cfg, report):
    timer = make_timer("cpu")
    dtype = DTYPES[cfg.dtype[0]]
    copy_gbps, copy_bytes = copy_bandwidth(timer, cfg, 2**22 if cfg.quick else 2**26)
    report.env["copy_bandwidth_gbps"] = round(copy_gbps, 2)
    log(f"CPU copy bandwidth (x.clone() of {copy_bytes // MIB} MiB float32, read+write): {copy_gbps:.1f} GB/s")

    failures = {}
    report.env["failures"] = failures
    compile_note = CPU_COMPILE_NOTE if cfg.compile else "Compiled columns n/a (this run: --no-compile)."

    norm_ops = [op for op in cfg.ops if op in NORM_OPS]
    if norm_ops:
        sec = report.section(
            f"Norms vs torch native and torch.compile ({cfg.dtype[0]}, {torch.get_num_threads()} threads)",
            ["op", "pass", "rows x d", "ffn ms", "torch ms", "speedup", "torch compiled ms", "ffn compiled ms",
             "speedup vs compiled", "ffn GB/s", "torch GB/s", "reps", "target"],
            "torch = F.rms_norm / F.layer_norm (add_rms_norm: x + residual, then F.rms_norm). "
            f"{compile_note} Targets: speedup >= 1.00 (at least as fast as torch's native CPU kernel) and "
            "speedup vs compiled >= 1.00.",
        )
        for op in norm_ops:
            for rows in cfg.rows:
                for d in cfg.dims:
                    inputs, params, ffn_fn, torch_fn = norm_case(op, rows, d, dtype, "cpu")
                    grad_inputs = requiring_grad(inputs)
                    dy = norm_grad_out(op, inputs)
                    compiled_fns = compiled(torch_fn, ffn_fn) if cfg.compile else None
                    for pass_name in ("fwd", "fwd+bwd"):
                        bwd = pass_name == "fwd+bwd"
                        run = pass_runner(bwd, inputs, grad_inputs, dy)
                        t, reps = time_cpu_row(timer, cfg, run, ffn_fn, torch_fn, compiled_fns, f"{op} {rows}x{d}", failures)
                        nbytes = norm_bytes(rows, d, inputs[0].element_size(), len(params), bwd, op == "add_rms_norm")
                        speedup = t["torch"] / t["ffn"]
                        ok = speedup >= 1.0 and (t["vs_compiled"] is None or t["vs_compiled"] >= 1.0)
                        row = [op, pass_name, f"{rows}x{d}", fmt_ms(t["ffn"]), fmt_ms(t["torch"]), fmt_ratio(speedup),
                               fmt_ms(t["torch_compiled"]), fmt_ms(t["ffn_compiled"]), fmt_ratio(t["vs_compiled"]),
                               fmt_num(bandwidth(nbytes, t["ffn"])), fmt_num(bandwidth(nbytes, t["torch"])), reps, verdict(ok)]
                        report.add_row(sec, row, {"kind": "norm", "op": op, "pass": pass_name, "dtype": cfg.dtype[0], "rows": rows, "d": d,
                                                  "bytes": nbytes, "reps": reps, "ffn_s": t["ffn"], "torch_s": t["torch"], "speedup": speedup,
                                                  "compile_s": t["torch_compiled"], "ffn_compile_s": t["ffn_compiled"],
                                                  "speedup_vs_compile": t["vs_compiled"]})
                        report.target(f"{op} {pass_name} {rows}x{d} as fast as torch", speedup >= 1.0, f"{speedup:.2f}x")
                        if t["vs_compiled"] is not None:
                            report.target(f"{op} {pass_name} {rows}x{d} as fast as torch.compile", t["vs_compiled"] >= 1.0,
                                          f"{t['vs_compiled']:.2f}x")
                    report.save()

    ffn_ops = [op for op in cfg.ops if op in FFN_OPS]
    if ffn_ops:
        sec = report.section(
            f"FFN ops vs eager composite and torch.compile ({cfg.dtype[0]}, {torch.get_num_threads()} threads)",
            ["op", "pass", "tokens x d x d_ff", "d_ff rule", "ffn ms", "eager ms", "speedup", "torch compiled ms", "ffn compiled ms",
             "speedup vs compiled", "ffn GB/s", "ffn GFLOP/s", "eager GFLOP/s", "reps", "target"],
            f"eager = ffn.reference (F.linear, F.gelu / F.silu * up, F.linear). {ffn_shapes_note(cfg)} {compile_note} "
            "Targets: speedup >= 1.00 and speedup vs compiled >= 1.00.",
        )
        mem = report.section(
            f"FFN activation bytes saved for backward ({cfg.dtype[0]})",
            ["op", "tokens x d x d_ff", "d_ff rule", "ffn MiB", "eager MiB", "ffn/eager", "params MiB (excluded)", "target"],
            "Counted with saved_tensors_hooks, deduplicated by storage, parameters excluded. Target: ffn/eager <= 2/3.",
        )
        for op in ffn_ops:
            for d in cfg.ffn_dims:
                tokens = cfg.ffn_tokens
                inputs, params, ffn_fn, eager_fn, d_ff, rule = ffn_case(op, tokens, d, dtype, "cpu", cfg.gated_width)
                grad_inputs = requiring_grad(inputs)
                dout = torch.randn_like(inputs[0])
                shape = f"{tokens}x{d}x{d_ff}"
                compiled_fns = compiled(eager_fn, ffn_fn) if cfg.compile else None
                for pass_name in ("fwd", "fwd+bwd"):
                    bwd = pass_name == "fwd+bwd"
                    run = pass_runner(bwd, inputs, grad_inputs, dout)
                    t, reps = time_cpu_row(timer, cfg, run, ffn_fn, eager_fn, compiled_fns, f"{op} {shape}", failures)
                    nbytes, flops = ffn_cost(tokens, d, d_ff, op == "swiglu", inputs[0].element_size(), op == "gelu_ffn", bwd)
                    speedup = t["torch"] / t["ffn"]
                    ok = speedup >= 1.0 and (t["vs_compiled"] is None or t["vs_compiled"] >= 1.0)
                    row = [op, pass_name, shape, rule, fmt_ms(t["ffn"]), fmt_ms(t["torch"]), fmt_ratio(speedup),
                           fmt_ms(t["torch_compiled"]), fmt_ms(t["ffn_compiled"]), fmt_ratio(t["vs_compiled"]),
                           fmt_num(bandwidth(nbytes, t["ffn"])), fmt_num(flops / t["ffn"] / 1e9), fmt_num(flops / t["torch"] / 1e9), reps,
                           verdict(ok)]
                    report.add_row(sec, row, {"kind": "ffn", "op": op, "pass": pass_name, "dtype": cfg.dtype[0], "tokens": tokens, "d": d,
                                              "d_ff": d_ff, "d_ff_rule": rule, "bytes": nbytes, "flops": flops, "reps": reps, "ffn_s": t["ffn"],
                                              "eager_s": t["torch"], "speedup": speedup, "compile_s": t["torch_compiled"],
                                              "ffn_compile_s": t["ffn_compiled"], "speedup_vs_compile": t["vs_compiled"]})
                    report.target(f"{op} {pass_name} {shape} as fast as eager", speedup >= 1.0, f"{speedup:.2f}x")
                    if t["vs_compiled"] is not None:
                        report.target(f"{op} {pass_name} {shape} as fast as torch.compile", t["vs_compiled"] >= 1.0,
                                      f"{t['vs_compiled']:.2f}x")
                saved_ffn = saved_activation_bytes(ffn_fn, grad_inputs, grad_inputs[1:])
                saved_eager = saved_activation_bytes(eager_fn, grad_inputs, grad_inputs[1:])
                param_bytes = sum(p.nbytes for p in params)
                ratio = saved_ffn / saved_eager
                ok = ratio <= 2 / 3
                row = [op, shape, rule, fmt_num(saved_ffn / MIB), fmt_num(saved_eager / MIB), f"{ratio:.3f}", fmt_num(param_bytes / MIB),
                       verdict(ok)]
                report.add_row(mem, row, {"kind": "ffn_saved", "op": op, "dtype": cfg.dtype[0], "tokens": tokens, "d": d, "d_ff": d_ff,
                                          "d_ff_rule": rule, "ffn_saved_bytes": saved_ffn, "eager_saved_bytes": saved_eager,
                                          "param_bytes": param_bytes})
                report.target(f"{op} {shape} saved activations <= 2/3 of eager", ok, f"{ratio:.3f}")
                report.save()
    log_failures(failures)


# ----------------------------------------------------------------------------- CUDA
def fits(bytes_needed):
    free, _total = torch.cuda.mem_get_info()
    return bytes_needed < 0.85 * free


def peak_bytes(fn):
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def release():
    gc.collect()
    torch.cuda.empty_cache()


def run_cuda(cfg, report):
    timer = make_timer("cuda")
    copy_gbps, copy_bytes = copy_bandwidth(timer, cfg, 2**26 if cfg.quick else 2**28)
    report.env["copy_bandwidth_gbps"] = round(copy_gbps, 1)
    log(f"copy bandwidth (x.clone() of {copy_bytes // MIB} MiB float32, read+write): {copy_gbps:.1f} GB/s")
    failures = {}
    report.env["failures"] = failures
    release()

    norm_ops = [op for op in cfg.ops if op in NORM_OPS]
    if norm_ops:
        sec = report.section(
            "Norms: ffn vs torch eager vs torch.compile vs Liger-Kernel",
            ["op", "pass", "dtype", "rows x d", "ffn ms", "eager ms", "compile ms", "liger ms", "ffn GB/s", "ffn % copy",
             "eager % copy", "compile % copy", "liger % copy", "vs eager", "vs compile", "vs liger", "target"],
            f"Copy bandwidth {copy_gbps:.0f} GB/s. Targets: ffn >= 90% of copy bandwidth for d >= 4096, >= 80% for "
            "d < 4096, and faster than eager, compile and Liger (when importable; n/a otherwise). fwd runs under "
            "no_grad; fwd+bwd computes dx and the parameter gradients.",
        )
        for dtype_name in cfg.dtype:
            dtype = DTYPES[dtype_name]
            for rows in cfg.rows:
                for d in cfg.dims:
                    elt = torch.tensor([], dtype=dtype).element_size()
                    # x, dy, y, dx and the eager/compiled intermediates: about 8 tensors of x's size.
                    if not fits(8 * rows * d * elt):
                        log(f"skip norms {dtype_name} {rows}x{d}: does not fit in free memory")
                        report.records.append({"kind": "norm", "dtype": dtype_name, "rows": rows, "d": d, "skipped": "memory"})
                        continue
                    for op in norm_ops:
                        try:
                            run_cuda_norm(cfg, report, sec, timer, op, dtype_name, dtype, rows, d, copy_gbps, failures)
                        except torch.OutOfMemoryError:
                            log(f"skip {op} {dtype_name} {rows}x{d}: out of memory")
                            report.records.append({"kind": "norm", "op": op, "dtype": dtype_name, "rows": rows, "d": d, "skipped": "oom"})
                        release()
                        report.save()

    ffn_ops = [op for op in cfg.ops if op in FFN_OPS]
    if ffn_ops:
        sec = report.section(
            "FFN ops: ffn vs eager composite vs torch.compile vs GEMM-only",
            ["op", "pass", "dtype", "tokens x d x d_ff", "d_ff rule", "ffn ms", "eager ms", "compile ms", "GEMM-only ms", "ffn / GEMM",
             "ffn TFLOP/s", "peak MiB ffn", "peak MiB eager", "peak MiB compile", "saved MiB ffn / eager", "target"],
            f"{ffn_shapes_note(cfg)} Targets (fwd+bwd): ffn <= 1.05x GEMM-only, and peak memory below eager's.",
        )
        for dtype_name in cfg.ffn_dtype:
            for op in ffn_ops:
                for d in cfg.ffn_dims:
                    tokens, d_ff, elt = cfg.ffn_tokens, bench_d_ff(op, d, cfg.gated_width)[0], DTYPES[dtype_name].itemsize
                    n_in = 2 * d_ff if op == "swiglu" else d_ff
                    # Weights with their gradients, eager's activations and gradients, the GEMM-only operands.
                    if not fits(elt * (3 * (n_in + d_ff) * d + 8 * tokens * n_in + 6 * tokens * d)):
                        log(f"skip {op} {dtype_name} d={d}: does not fit in free memory")
                        report.records.append({"kind": "ffn", "op": op, "dtype": dtype_name, "d": d, "skipped": "memory"})
                        continue
                    try:
                        run_cuda_ffn(cfg, report, sec, timer, op, dtype_name, DTYPES[dtype_name], tokens, d, failures)
                    except torch.OutOfMemoryError:
                        log(f"skip {op} {dtype_name} d={d}: out of memory")
                        report.records.append({"kind": "ffn", "op": op, "dtype": dtype_name, "d": d, "skipped": "oom"})
                    release()
                    report.save()
    log_failures(failures)


def run_cuda_norm(cfg, report, sec, timer, op, dtype_name, dtype, rows, d, copy_gbps, failures):
    inputs, params, ffn_fn, torch_fn = norm_case(op, rows, d, dtype, cfg.device)
    (compile_fn,) = compiled(torch_fn)
    liger_fn = liger_norm(op)
    grad_inputs = requiring_grad(inputs)
    dy = norm_grad_out(op, inputs)
    for pass_name in ("fwd", "fwd+bwd"):
        bwd = pass_name == "fwd+bwd"
        wrap = pass_runner(bwd, inputs, grad_inputs, dy)
        impls = {f"ffn {op}": wrap(ffn_fn), f"eager {op}": wrap(torch_fn), f"compile {op}": wrap(compile_fn)}
        if liger_fn is not None:
            impls[f"liger {op}"] = wrap(liger_fn)
        times, reps = measure_available(timer, impls, cfg, failures)
        t_ffn, t_eager, t_compile = (times[f"{k} {op}"] for k in ("ffn", "eager", "compile"))
        t_liger = times.get(f"liger {op}")
        nbytes = norm_bytes(rows, d, inputs[0].element_size(), len(params), bwd, op == "add_rms_norm")
        pct = {k: None if t is None else 100 * bandwidth(nbytes, t) / copy_gbps
               for k, t in zip(("ffn", "eager", "compile", "liger"), (t_ffn, t_eager, t_compile, t_liger))}
        vs = {k: None if None in (t_ffn, t) else t / t_ffn
              for k, t in (("eager", t_eager), ("compile", t_compile), ("liger", t_liger))}
        floor = 90 if d >= 4096 else 80
        ok = (pct["ffn"] is not None and pct["ffn"] >= floor and (vs["eager"] or 0) > 1 and (vs["compile"] or 0) > 1
              and (liger_fn is None or (vs["liger"] or 0) > 1))
        row = [op, pass_name, dtype_name, f"{rows}x{d}", fmt_ms(t_ffn), fmt_ms(t_eager), fmt_ms(t_compile), fmt_ms(t_liger),
               fmt_num(None if t_ffn is None else bandwidth(nbytes, t_ffn), 0), fmt_num(pct["ffn"]), fmt_num(pct["eager"]),
               fmt_num(pct["compile"]), fmt_num(pct["liger"]), fmt_ratio(vs["eager"]), fmt_ratio(vs["compile"]),
               fmt_ratio(vs["liger"]), verdict(ok)]
        report.add_row(sec, row, {"kind": "norm", "op": op, "pass": pass_name, "dtype": dtype_name, "rows": rows, "d": d, "bytes": nbytes,
                                  "reps": reps, "ffn_s": t_ffn, "eager_s": t_eager, "compile_s": t_compile, "liger_s": t_liger,
                                  "pct_copy": pct, "speedup_vs_eager": vs["eager"], "speedup_vs_compile": vs["compile"],
                                  "speedup_vs_liger": vs["liger"]})
        report.target(f"{op} {pass_name} {dtype_name} {rows}x{d}: >= {floor}% copy, ahead of eager, compile and Liger", ok,
                      f"{fmt_num(pct['ffn'])}% copy, {fmt_ratio(vs['eager'])} vs eager, {fmt_ratio(vs['compile'])} vs compile, "
                      f"{fmt_ratio(vs['liger'])} vs liger")


def gemm_only(op, inputs, grad_out, d_ff, with_backward):
    """The matmuls the ffn op issues, on preallocated operands of the same shapes and layouts."""
    if op == "gelu_ffn":
        x, w_in, _b_in, w_out, b_out = inputs
    else:
        (x, w_in, w_out), b_out = inputs, None
    h = torch.randn(x.shape[0], d_ff, device=x.device, dtype=x.dtype)
    grad_z = torch.randn(x.shape[0], w_in.shape[0], device=x.device, dtype=x.dtype)

    def run():
        torch.mm(x, w_in.t())
        torch.mm(h, w_out.t()) if b_out is None else torch.addmm(b_out, h, w_out.t())
        if with_backward:
            torch.mm(grad_out, w_out)  # grad_h
            torch.mm(grad_z, w_in)  # grad_x
            torch.mm(grad_z.t(), x)  # grad_w_in
            torch.mm(grad_out.t(), h)  # grad_w_out

    return run


def run_cuda_ffn(cfg, report, sec, timer, op, dtype_name, dtype, tokens, d, failures):
    inputs, params, ffn_fn, eager_fn, d_ff, rule = ffn_case(op, tokens, d, dtype, cfg.device, cfg.gated_width)
    (compile_fn,) = compiled(eager_fn)
    grad_inputs = requiring_grad(inputs)
    dout = torch.randn_like(inputs[0])
    shape = f"{tokens}x{d}x{d_ff}"
    saved = {}
    for name, fn in (("ffn", ffn_fn), ("eager", eager_fn)):
        try:
            saved[name] = saved_activation_bytes(fn, grad_inputs, grad_inputs[1:])
        except torch.OutOfMemoryError:
            raise
        except Exception:  # noqa: BLE001 - reported through try_impl below
            saved[name] = None
    for pass_name in ("fwd", "fwd+bwd"):
        bwd = pass_name == "fwd+bwd"
        wrap = pass_runner(bwd, inputs, grad_inputs, dout)
        impls = {f"ffn {op}": wrap(ffn_fn), f"eager {op}": wrap(eager_fn), f"compile {op}": wrap(compile_fn),
                 f"GEMM-only {op}": gemm_only(op, inputs, dout, d_ff, bwd)}
        times, reps = measure_available(timer, impls, cfg, failures)
        t_ffn, t_eager, t_compile, t_gemm = times.values()
        peaks = {}
        for key, name in (("ffn", f"ffn {op}"), ("eager", f"eager {op}"), ("compile", f"compile {op}")):
            peaks[key] = peak_bytes(impls[name]) if times[name] is not None else None
        _bytes, flops = ffn_cost(tokens, d, d_ff, op == "swiglu", inputs[0].element_size(), op == "gelu_ffn", bwd)
        over_gemm = None if None in (t_ffn, t_gemm) else t_ffn / t_gemm
        row = [op, pass_name, dtype_name, shape, rule, fmt_ms(t_ffn), fmt_ms(t_eager), fmt_ms(t_compile), fmt_ms(t_gemm), fmt_ratio(over_gemm),
               fmt_num(None if t_ffn is None else flops / t_ffn / 1e12), *(fmt_num(None if p is None else p / MIB, 0) for p in peaks.values()),
               f"{fmt_num(None if saved['ffn'] is None else saved['ffn'] / MIB, 0)} / {fmt_num(None if saved['eager'] is None else saved['eager'] / MIB, 0)}"]
        if bwd:
            ok = over_gemm is not None and over_gemm <= 1.05 and peaks["ffn"] is not None and peaks["eager"] is not None and peaks["ffn"] < peaks["eager"]
            row.append(verdict(ok))
            report.target(f"{op} fwd+bwd {dtype_name} {shape}: <= 1.05x GEMM-only, peak below eager", ok,
                          f"{fmt_ratio(over_gemm)} GEMM-only, peak {fmt_num(None if peaks['ffn'] is None else peaks['ffn'] / MIB, 0)} "
                          f"vs {fmt_num(None if peaks['eager'] is None else peaks['eager'] / MIB, 0)} MiB")
        else:
            row.append("-")
        report.add_row(sec, row, {"kind": "ffn", "op": op, "pass": pass_name, "dtype": dtype_name, "tokens": tokens, "d": d, "d_ff": d_ff,
                                  "d_ff_rule": rule, "flops": flops, "reps": reps, "ffn_s": t_ffn, "eager_s": t_eager, "compile_s": t_compile,
                                  "gemm_only_s": t_gemm, "ffn_over_gemm": over_gemm, "peak_bytes": peaks, "saved_bytes": saved})


# ----------------------------------------------------------------------------- main
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), help="norm dtypes (cpu: also the FFN dtype; first one). "
                   "Default: float32 on cpu, bfloat16 float32 on cuda")
    p.add_argument("--ffn-dtype", nargs="+", choices=sorted(DTYPES), help="cuda FFN dtypes (default bfloat16)")
    p.add_argument("--ops", nargs="+", choices=NORM_OPS + FFN_OPS, default=list(NORM_OPS + FFN_OPS))
    p.add_argument("--rows", nargs="+", type=int, help="norm rows (default: 4096 on cpu, 16384 65536 on cuda)")
    p.add_argument("--dims", nargs="+", type=int, help="norm d (default: 512 1024 4096 on cpu, 1024 4096 8192 16384 on cuda)")
    p.add_argument("--ffn-tokens", type=int, help="FFN tokens (default: 4096 on cpu, 16384 on cuda)")
    p.add_argument("--ffn-dims", nargs="+", type=int, help="FFN d (default: 512 1024 4096 on cpu, 4096 on cuda)")
    p.add_argument("--gated-width", choices=sorted(GATED_WIDTH_RULES), default="llama",
                   help="swiglu's d_ff: llama = 8d/3 rounded up to 64 (default; the benchmark's deliberate exception), "
                   "matched = ffn.harness.model.gated_d_ff(d, 4d, bias=False), the harness's parameter-matched width")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="cpu: also time torch.compile of the torch code and of the ffn op's call (default; each shape "
                   "compiles 4 graphs, seconds each); cuda always compares against torch.compile")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: all cores)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls of each implementation first (default 3, quick 1)")
    p.add_argument("--reps", type=int, default=None, help="fixed repetitions (default: sized by --budget)")
    p.add_argument("--min-reps", type=int, default=None, help="default 7 (quick: 3)")
    p.add_argument("--max-reps", type=int, default=None, help="default 100 (quick: 10)")
    p.add_argument("--budget", type=float, default=None, help="wall-clock seconds of repetitions per shape and pass (default 3, quick 0.3)")
    p.add_argument("--quick", action="store_true", help="smoke-sized subset; writes files only when given --json/--markdown")
    p.add_argument("--json", help="result file (default bench/results/<device>-<date>[-<tag>].json)")
    p.add_argument("--markdown", help="table file (default: next to the JSON, .md)")
    p.add_argument("--tag", help="suffix of the default result file names (for runs split by --rows/--dtype/...)")
    p.add_argument("--no-save", action="store_true", help="print only")
    cfg = p.parse_args(argv)

    cpu = cfg.device == "cpu"
    quick = cfg.quick
    cfg.dtype = cfg.dtype or (["float32"] if cpu else (["bfloat16"] if quick else ["bfloat16", "float32"]))
    cfg.ffn_dtype = cfg.ffn_dtype or ([cfg.dtype[0]] if cpu else ["bfloat16"])
    cfg.rows = cfg.rows or ([4096] if cpu else ([16384] if quick else [16384, 65536]))
    cfg.dims = cfg.dims or (([512, 1024] if quick else [512, 1024, 4096]) if cpu else ([1024, 4096] if quick else [1024, 4096, 8192, 16384]))
    cfg.ffn_tokens = cfg.ffn_tokens or (4096 if cpu else (4096 if quick else 16384))
    cfg.ffn_dims = cfg.ffn_dims or (([512] if quick else [512, 1024, 4096]) if cpu else ([1024] if quick else [4096]))
    cfg.warmup = cfg.warmup if cfg.warmup is not None else (1 if quick else 3)
    cfg.min_reps = cfg.min_reps or (3 if quick else 7)
    cfg.max_reps = cfg.max_reps or (10 if quick else 100)
    cfg.budget = cfg.budget if cfg.budget is not None else (0.3 if quick else 3.0)
    if cfg.no_save:
        cfg.json = cfg.markdown = None
    elif not quick and not cfg.json and not cfg.markdown:
        cfg.json = "<default>"  # named in main(), once the device name is known
    if cpu and len(cfg.dtype) > 1:
        p.error("--device cpu takes one --dtype")
    return cfg


def main(argv=None):
    cfg = parse_args(argv)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    if cfg.device == "cpu":
        torch.set_num_threads(cfg.threads or os.cpu_count())
    env = environment(cfg.device)
    if cfg.json == "<default>":
        cfg.json = default_json_path(env, cfg.device, tag=cfg.tag)
    if cfg.json and not cfg.markdown:
        cfg.markdown = str(Path(cfg.json).with_suffix(".md"))

    log(f"device: {env['device_name']} | torch {env['torch']} | CUDA {env['cuda']} | commit {env['git_commit']}"
        + (" (dirty)" if env["git_dirty"] else ""))
    if cfg.device == "cpu":
        log(f"torch threads: {torch.get_num_threads()} (of {os.cpu_count()} cores), CPU capability {env['cpu_capability']}")
    log(f"timing: warmup {cfg.warmup}, interleaved reps (median; {'torch.utils.benchmark.Timer' if cfg.device == 'cpu' else 'CUDA events, L2 flushed'}), "
        f"budget {cfg.budget}s per measurement, swiglu d_ff = {GATED_WIDTH_RULES[cfg.gated_width][0]}"
        + ("; other processes share this machine: expect noise" if cfg.device == "cpu" else ""))

    report = Report(f"ffn benchmark: {env['device_name']} ({cfg.device})", vars(cfg), env, cfg.json, cfg.markdown)
    start = time.time()
    (run_cpu if cfg.device == "cpu" else run_cuda)(cfg, report)
    report.env["elapsed_s"] = round(time.time() - start, 1)
    report.save()

    log("")
    log(report.markdown())
    if cfg.json:
        log(f"wrote {cfg.json} and {cfg.markdown}")
    return report.as_json()


if __name__ == "__main__":
    main()
