"""The distributed checks of tests/test_distributed.py, run on CPU with gloo.

    python tests/dist_worker.py OUT_DIR WORLD [WORLD ...]

imports torch and ffn once, then for each world size forks that many ranks
(gloo, a file:// rendezvous, OMP_NUM_THREADS=1) that run every check; rank 0
writes OUT_DIR/world<WORLD>.json:

    {"checks": {name: {"ok": bool, "err": float, "tol": float, "detail": str}},
     "losses": {mode: {"one": [...], "dist": [...], "max_abs": float, "max_rel": float}}}

Each op check builds the same global inputs on every rank (same seed), runs the
op on DTensors with the given placements and the plain op on the full tensors,
and compares the forward outputs and the gradients (full_tensor()); where the
placements are the ones the op's strategy takes as they are, it also asserts
that forward and backward moved no data (CommDebugMode) and checks the
placements of the results. A norm whose x is sharded on the normalized dim
is redistributed, as torch's own F.layer_norm is (same output placements).
The training checks run a small model of ffn modules for a few SGD steps in
one process (the reference, computed on every rank) and distributed (FSDP2
fp32, FSDP2 bf16 params / fp32 reduce, tensor parallel with and without
sequence parallel) and compare the losses.
"""

import copy
import json
import math
import os
import sys
import tempfile
import time
import traceback

os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402

import ffn  # noqa: E402  (first: `import ffn` must not load torch.distributed.tensor)

IMPORT = {"ffn_loads_dtensor": "torch.distributed.tensor" in sys.modules}

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: E402
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module, distribute_tensor  # noqa: E402
from torch.distributed.tensor.debug import CommDebugMode  # noqa: E402
from torch.distributed.tensor.parallel import SequenceParallel, parallelize_module  # noqa: E402

from ffn.distributed import FFNParallel, fsdp_shard_placement, gate_up_placement  # noqa: E402

IMPORT["registered_on_dtensor_import"] = ffn.distributed._registered
OPS = torch.ops.ffn
R, P = Replicate(), Partial()
TOL = 2e-5  # float32: sums split across ranks, added in another order
SS = gate_up_placement


# The op checks a 4-process run repeats (the 2-process run does them all): every op, forward
# and backward, in its main layouts, and the refusals.
CORE = {
    "layer_norm/xS(1)", "rms_norm/xS(0)", "layer_norm/xS(2)-redistributed", "rms_norm/inference-mode",
    "_layer_norm_fwd/xS1", "_layer_norm_bwd/xS1", "_rms_norm_fwd/xS1", "_rms_norm_bwd/no-weight-grad",
    "gelu_ffn/tp", "gelu_ffn/dp-xS(1)", "gelu_ffn/refuse-d_model", "swiglu/tp", "geglu/tp", "reglu/dp-xS1",
    "geglu/inference-mode-tp", "_gelu_ffn_fwd/tp", "_gelu_ffn_bwd/tp", "_gated_ffn_fwd/dp-xS1",
    "_gated_ffn_bwd/tp", "_gated_ffn_bwd/tp-mask", "forward_with_preact/tp/SwiGLU",
    "gated_activation/silu/_S(2, 2)", "gated_activation/gelu/S(1)", "gated_activation/refuse-plain-last-dim",
    "_gated_activation_bwd/SS", "bias_gelu/tanh/xS2-biasS0", "bias_gelu/none/xS1", "_bias_gelu_bwd/xS0",
    "ffn_stats/gathered", "add_layer_norm/xS(1)", "add_rms_norm/xS(0)", "_add_rms_norm_fwd/xS1",
    "_rms_norm_bwd/grad_s-xS1", "add_rms_norm/xS(2)-redistributed", "_rms_norm_bwd/xS2-redistributed",
    "relu_ffn/tp", "_relu_ffn_fwd/tp", "_relu_ffn_bwd/tp", "geglu/tanh-tp",
}


class Checks:
    def __init__(self, mesh, full=True):
        self.mesh = mesh
        self.full = full
        self.results = {}
        self.losses = {}

    def record(self, name, err, tol, detail=""):
        ok = bool(err <= tol) if not math.isnan(err) else False
        self.results[name] = {"ok": ok, "err": float(err), "tol": tol, "detail": detail}

    def fail(self, name, detail):
        self.results[name] = {"ok": False, "err": float("nan"), "tol": 0.0, "detail": detail}

    def run(self, name, fn, *args, **kwargs):
        if not self.full and name not in CORE:
            return
        try:
            fn(self, name, *args, **kwargs)
        except Exception:
            self.fail(name, traceback.format_exc(limit=6)[-3000:])


def _err(a, b):
    a, b = a.detach().double(), b.detach().double()
    if a.shape != b.shape:
        return float("inf")
    if a.numel() == 0:
        return 0.0
    return ((a - b).abs().max() / (1.0 + b.abs().max())).item()


def _full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def _tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _places(t):
    return tuple(t.placements) if isinstance(t, DTensor) else None


# ----------------------------------------------------------------------------- op checks
def check_op(c, name, fn, inputs, placements, *, grad=True, quiet=False, out_placements=None,
             grad_placements=None, tol=TOL):
    """fn(*tensors) on DTensors (placements[i] for inputs[i]; None inputs stay None) vs on the
    full tensors; forward outputs and gradients. quiet: neither pass may communicate."""
    mesh = c.mesh
    float_in = [t is not None and t.is_floating_point() for t in inputs]
    ref_in = [t.clone().requires_grad_(grad and f) if t is not None else None for t, f in zip(inputs, float_in)]
    dt_in = [None if t is None else distribute_tensor(t, mesh, [p]) for t, p in zip(inputs, placements)]
    for t, f in zip(dt_in, float_in):
        if t is not None and grad and f:
            t.requires_grad_(True)
    ref_out = _tuple(fn(*ref_in))
    with CommDebugMode() as comm_fwd:
        dt_out = _tuple(fn(*dt_in))
    errs, detail = [], []
    for o, r in zip(dt_out, ref_out):
        errs.append(_err(_full(o), r))
    detail.append(f"out placements {[_places(o) for o in dt_out]}")
    if out_placements is not None:
        got = [_places(o) for o in dt_out]
        want = [tuple(p) for p in out_placements]
        if got[:len(want)] != want:
            errs.append(float("inf"))
            detail.append(f"expected out placements {want}")
    if quiet and comm_fwd.get_total_counts():
        errs.append(float("inf"))
        detail.append(f"forward communicated: {dict(comm_fwd.get_comm_counts())}")
    if grad:
        torch.manual_seed(1234)
        diff = [i for i, r in enumerate(ref_out) if r.requires_grad]
        gs = [torch.randn_like(ref_out[i]) for i in diff]
        torch.autograd.backward([ref_out[i] for i in diff], gs)
        dt_gs = []
        for i, g in zip(diff, gs):
            pl = [R if isinstance(p, Partial) else p for p in dt_out[i].placements]
            dt_gs.append(distribute_tensor(g, mesh, pl))
        with CommDebugMode() as comm_bwd:
            torch.autograd.backward([dt_out[i] for i in diff], dt_gs)
        got_grad_pl = []
        for t, r in zip(dt_in, ref_in):
            if r is not None and r.requires_grad:
                errs.append(_err(_full(t.grad), r.grad))
                got_grad_pl.append(_places(t.grad))
        detail.append(f"grad placements {got_grad_pl}")
        if grad_placements is not None and got_grad_pl != [tuple(p) for p in grad_placements]:
            errs.append(float("inf"))
            detail.append(f"expected grad placements {[tuple(p) for p in grad_placements]}")
        if quiet and comm_bwd.get_total_counts():
            errs.append(float("inf"))
            detail.append(f"backward communicated: {dict(comm_bwd.get_comm_counts())}")
    c.record(name, max(errs), tol, "; ".join(detail))


def check_redistributed_like_torch(c, name, fn, inputs, placements, n_out=1):
    """An x sharded on the normalized dim: DTensor redistributes it for the op, to the layout it
    gives torch's own F.layer_norm of that x (the op's n_out outputs are placed so), and the
    outputs and gradients are the plain op's."""
    x = distribute_tensor(inputs[0], c.mesh, [placements[0]])
    want = _places(F.layer_norm(x, x.shape[-1:]))
    check_op(c, name, fn, inputs, placements, out_placements=[want] * n_out)


def check_refused(c, name, fn, inputs, placements, match):
    dt_in = [None if t is None else distribute_tensor(t, c.mesh, [p]) for t, p in zip(inputs, placements)]
    try:
        fn(*dt_in)
    except Exception as e:  # noqa: BLE001
        msg = str(e)
        c.record(name, 0.0 if match in msg else 1.0, 0.5, msg.splitlines()[0][:300])
        return
    c.record(name, 1.0, 0.5, "no error raised")


def op_checks(c):
    n = c.mesh.size()
    torch.manual_seed(0)
    B, T, d, ff = 2 * n, 2 * n, 8, 4 * n
    x3 = torch.randn(B, T, d)
    x2 = torch.randn(2 * n + 1, d)  # rows that do not divide evenly
    w, b = torch.randn(d), torch.randn(d)

    # ---- norms: public op (autograd -> _*_fwd/_*_bwd), sequence/batch sharded, weights replicated
    for op in ("layer_norm", "rms_norm"):
        f = getattr(OPS, op)
        for pl in (Shard(0), Shard(1), R):
            c.run(f"{op}/x{pl}", check_op, f, [x3, w, b], [pl, R, R], quiet=True, out_placements=[[pl]],
                  grad_placements=[[pl], [P if pl != R else R], [P if pl != R else R]])
        c.run(f"{op}/no-affine/xS1", check_op, lambda x, f=f: f(x, None, None), [x3], [Shard(1)], quiet=True)
        c.run(f"{op}/weight-only/xS0", check_op, lambda x, w, f=f: f(x, w, None), [x3, w], [Shard(0), R], quiet=True)
        c.run(f"{op}/rows-uneven/xS0", check_op, f, [x2, w, b], [Shard(0), R, R], quiet=True)
        c.run(f"{op}/weight-sharded-gathered", check_op, f, [x3, w, b], [Shard(1), Shard(0), R])
        c.run(f"{op}/xS(2)-redistributed", check_redistributed_like_torch, f, [x3, w, b], [Shard(2), R, R])
        with torch.inference_mode():  # the public op itself reaches DTensor
            c.run(f"{op}/inference-mode", check_op, f, [x3, w, b], [Shard(1), R, R], grad=False, quiet=True)
            c.run(f"{op}/inference-mode-xS(2)-redistributed", check_op, f, [x3, w, b], [Shard(2), R, R],
                  grad=False)

    # ---- norm internal ops called directly
    for op, n_stats in (("_layer_norm", 2), ("_rms_norm", 1)):
        fwd, bwd = getattr(OPS, op + "_fwd"), getattr(OPS, op + "_bwd")
        c.run(f"{op}_fwd/xS1", check_op, lambda x, w, b, fwd=fwd: fwd(x, w, b, 1e-5), [x3, w, b], [Shard(1), R, R],
              grad=False, quiet=True, out_placements=[[Shard(1)]] * (1 + n_stats))
        _y, *stats = fwd(x3, w, b, 1e-5)
        g = torch.randn_like(x3)
        c.run(f"{op}_bwd/xS1", check_op, lambda g, x, *rest, bwd=bwd: bwd(g, x, *rest, True, True),
              [g, x3, *stats, w, b], [Shard(1)] * (2 + n_stats) + [R, R], grad=False, quiet=True,
              out_placements=[[Shard(1)], [P], [P]])
        c.run(f"{op}_bwd/xS2-redistributed", check_op, lambda g, x, *rest, bwd=bwd: bwd(g, x, *rest, True, True),
              [g, x3, *stats, w, b], [Shard(2), Shard(2)] + [R] * n_stats + [R, R], grad=False)
        c.run(f"{op}_bwd/no-weight-grad", check_op, lambda g, x, *rest, bwd=bwd: bwd(g, x, *rest, False, False),
              [g, x3, *stats, w, b], [Shard(0)] * (2 + n_stats) + [R, R], grad=False, quiet=True,
              out_placements=[[Shard(0)], [R], [R]])

    # ---- fused residual add + norm (public op: autograd -> _add_*_fwd, and _*_bwd with grad_s),
    # zero-centered weight; the internal ops directly
    res3 = torch.randn(B, T, d)
    for op in ("layer_norm", "rms_norm"):
        f = getattr(OPS, "add_" + op)
        fn = lambda x, r, w, b, f=f: f(x, r, w, b, 1e-5, 1.0)  # noqa: E731
        for pl in (Shard(0), Shard(1)):
            c.run(f"add_{op}/x{pl}", check_op, fn, [x3, res3, w, b], [pl, pl, R, R], quiet=True,
                  out_placements=[[pl], [pl]], grad_placements=[[pl], [pl], [P], [P]])
        c.run(f"add_{op}/xS(2)-redistributed", check_redistributed_like_torch, fn, [x3, res3, w, b],
              [Shard(2), Shard(2), R, R], n_out=2)
        with torch.inference_mode():
            c.run(f"add_{op}/inference-mode", check_op, fn, [x3, res3, w, b], [Shard(1), Shard(1), R, R],
                  grad=False, quiet=True)
        fwd = getattr(OPS, f"_add_{op}_fwd")
        n_out = 4 if op == "layer_norm" else 3
        c.run(f"_add_{op}_fwd/xS1", check_op, lambda x, r, w, b, fwd=fwd: fwd(x, r, w, b, 1e-5, 1.0),
              [x3, res3, w, b], [Shard(1), Shard(1), R, R], grad=False, quiet=True,
              out_placements=[[Shard(1)]] * n_out)
        _y, s3, *stats = fwd(x3, res3, w, b, 1e-5, 1.0)
        bwd = getattr(OPS, f"_{op}_bwd")
        g, gs = torch.randn_like(x3), torch.randn_like(x3)
        c.run(f"_{op}_bwd/grad_s-xS1", check_op,
              lambda g, x, *rest, bwd=bwd: bwd(g, x, *rest[:-3], rest[-3], rest[-2], True, True, 1.0, rest[-1]),
              [g, s3, *stats, w, b, gs], [Shard(1)] * (2 + len(stats)) + [R, R, Shard(1)], grad=False, quiet=True,
              out_placements=[[Shard(1)], [P], [P]])

    # ---- FFNs
    w1, b1, w2, b2 = torch.randn(ff, d) / 3, torch.randn(ff), torch.randn(d, ff) / 3, torch.randn(d)
    wgu, bgu = torch.randn(2 * ff, d) / 3, torch.randn(2 * ff)
    tp_gelu = [R, Shard(0), Shard(0), Shard(1), R]
    tp_gated = [R, SS(0), SS(0), Shard(1), R]
    gelu = lambda x, w1, b1, w2, b2: OPS.gelu_ffn(x, w1, b1, w2, b2, "tanh")  # noqa: E731
    c.run("gelu_ffn/tp", check_op, gelu, [x3, w1, b1, w2, b2], tp_gelu, quiet=True, out_placements=[[P]],
          grad_placements=[[P], [Shard(0)], [Shard(0)], [Shard(1)], [R]])
    c.run("gelu_ffn/tp-no-bias", check_op, lambda x, w1, w2: OPS.gelu_ffn(x, w1, None, w2, None),
          [x3, w1, w2], [R, Shard(0), Shard(1)], quiet=True)
    for pl in (Shard(0), Shard(1)):
        c.run(f"gelu_ffn/dp-x{pl}", check_op, gelu, [x3, w1, b1, w2, b2], [pl, R, R, R, R], quiet=True,
              out_placements=[[pl]], grad_placements=[[pl], [P], [P], [P], [P]])
    c.run("gelu_ffn/dp-rows-uneven", check_op, gelu, [x2, w1, b1, w2, b2], [Shard(0), R, R, R, R], quiet=True)
    c.run("gelu_ffn/sp-input-gathered", check_op, gelu, [x3, w1, b1, w2, b2], [Shard(1), *tp_gelu[1:]])
    c.run("gelu_ffn/refuse-d_model", check_refused, gelu, [x3, w1, b1, w2, b2], [Shard(2), R, R, R, R], "contracts")
    c.run("relu_ffn/tp", check_op, OPS.relu_ffn, [x3, w1, b1, w2, b2], tp_gelu, quiet=True, out_placements=[[P]],
          grad_placements=[[P], [Shard(0)], [Shard(0)], [Shard(1)], [R]])
    c.run("relu_ffn/dp-xS0", check_op, OPS.relu_ffn, [x3, w1, b1, w2, b2], [Shard(0), R, R, R, R], quiet=True,
          out_placements=[[Shard(0)]], grad_placements=[[Shard(0)], [P], [P], [P], [P]])
    with torch.inference_mode():
        c.run("relu_ffn/inference-mode-tp", check_op, OPS.relu_ffn, [x3, w1, b1, w2, b2], tp_gelu, grad=False,
              quiet=True)
    c.run("geglu/tanh-tp", check_op, lambda x, wgu, bgu, w2, b2: OPS.geglu(x, wgu, bgu, w2, b2, "tanh"),
          [x3, wgu, bgu, w2, b2], tp_gated, quiet=True, out_placements=[[P]],
          grad_placements=[[P], [SS(0)], [SS(0)], [Shard(1)], [R]])
    for op in ffn.activations.GATED_OPS:
        f = getattr(OPS, op)
        c.run(f"{op}/tp", check_op, f, [x3, wgu, bgu, w2, b2], tp_gated, quiet=True, out_placements=[[P]],
              grad_placements=[[P], [SS(0)], [SS(0)], [Shard(1)], [R]])
        c.run(f"{op}/tp-no-bias", check_op, lambda x, wgu, w2, f=f: f(x, wgu, None, w2, None), [x3, wgu, w2],
              [R, SS(0), Shard(1)], quiet=True)
        c.run(f"{op}/dp-xS1", check_op, f, [x3, wgu, bgu, w2, b2], [Shard(1), R, R, R, R], quiet=True,
              grad_placements=[[Shard(1)], [P], [P], [P], [P]])
        c.run(f"{op}/tp-plain-shard-gate_up-redistributed", check_op, f, [x3, wgu, bgu, w2, b2],
              [R, Shard(0), Shard(0), Shard(1), R])
        with torch.inference_mode():
            c.run(f"{op}/inference-mode-tp", check_op, f, [x3, wgu, bgu, w2, b2], tp_gated, grad=False, quiet=True)
    with torch.inference_mode():
        c.run("gelu_ffn/inference-mode-tp", check_op, gelu, [x3, w1, b1, w2, b2], tp_gelu, grad=False, quiet=True)
    with torch.no_grad():  # the composite runs above DTensor: _*_fwd with keep_preact=False reaches it
        c.run("gelu_ffn/no-grad-tp", check_op, gelu, [x3, w1, b1, w2, b2], tp_gelu, grad=False, quiet=True)
        c.run("swiglu/no-grad-tp", check_op, OPS.swiglu, [x3, wgu, bgu, w2, b2], tp_gated, grad=False, quiet=True)

    # ---- FFN internal ops directly (pre-activation placement; backward op)
    for name, (wi, bi, pin) in (("_gelu_ffn", (w1, b1, Shard(0))), ("_relu_ffn", (w1, b1, Shard(0))),
                                ("_gated_ffn", (wgu, bgu, SS(0)))):
        gated = name == "_gated_ffn"
        fwd, bwd = getattr(OPS, name + "_fwd"), getattr(OPS, name + "_bwd")
        if name == "_relu_ffn":  # no activation argument
            fwd = lambda x, wi, bi, w2, b2, act, *keep, f=fwd: f(x, wi, bi, w2, b2, *keep)  # noqa: E731
            bwd = lambda g, x, pre, wi, w2, act, mask, f=bwd: f(g, x, pre, wi, w2, mask)  # noqa: E731
        act = "silu" if gated else "none"
        pre_tp = SS(1) if gated else Shard(1)
        c.run(f"{name}_fwd/tp", check_op, lambda x, wi, bi, w2, b2, fwd=fwd, act=act: fwd(x, wi, bi, w2, b2, act),
              [x3, wi, bi, w2, b2], [R, pin, pin, Shard(1), R], quiet=True, out_placements=[[P], [pre_tp]])
        c.run(f"{name}_fwd/tp-no-preact", check_op,
              lambda x, wi, bi, w2, b2, fwd=fwd, act=act: fwd(x, wi, bi, w2, b2, act, False),
              [x3, wi, bi, w2, b2], [R, pin, pin, Shard(1), R], grad=False, quiet=True,
              out_placements=[[P], [R]])
        c.run(f"{name}_fwd/dp-xS1", check_op,
              lambda x, wi, bi, w2, b2, fwd=fwd, act=act: fwd(x, wi, bi, w2, b2, act),
              [x3, wi, bi, w2, b2], [Shard(1), R, R, R, R], quiet=True)
        _out, pre = fwd(x3, wi, bi, w2, b2, act)
        g = torch.randn(B, T, d)
        mask = [True] * 5
        c.run(f"{name}_bwd/tp", check_op,
              lambda g, x, pre, wi, w2, bwd=bwd, act=act: bwd(g, x, pre, wi, w2, act, mask),
              [g, x3, pre, wi, w2], [R, R, pre_tp, pin, Shard(1)], grad=False, quiet=True,
              out_placements=[[P], [pin], [pin], [Shard(1)], [R]])
        c.run(f"{name}_bwd/tp-mask", check_op,
              lambda g, x, pre, wi, w2, bwd=bwd, act=act: bwd(g, x, pre, wi, w2, act, [False, True, False, True, False]),
              [g, x3, pre, wi, w2], [R, R, pre_tp, pin, Shard(1)], grad=False, quiet=True,
              out_placements=[[R], [pin], [R], [Shard(1)], [R]])
        x2d = x3.reshape(-1, d)
        _o2, pre2 = fwd(x2d, wi, bi, w2, b2, act)
        c.run(f"{name}_bwd/dp-rows", check_op,
              lambda g, x, pre, wi, w2, bwd=bwd, act=act: bwd(g, x, pre, wi, w2, act, mask),
              [g.reshape(-1, d), x2d, pre2, wi, w2], [Shard(0), Shard(0), Shard(0), R, R], grad=False, quiet=True,
              out_placements=[[Shard(0)], [P], [P], [P], [P]])

    # ---- forward_with_preact of tensor-parallel modules: the pre-activation's placement is exact
    for cls in (ffn.GeluFFN, ffn.SwiGLU):
        def fwp(c, nm, cls=cls):
            torch.manual_seed(3)
            m = cls(d, ff, bias=True)
            ref_out, ref_pre = m.forward_with_preact(x3)
            parallelize_module(m, c.mesh, FFNParallel())
            out, pre = m.forward_with_preact(distribute_tensor(x3, c.mesh, [R]))
            c.record(nm, max(_err(out.full_tensor(), ref_out), _err(pre.full_tensor(), ref_pre)), TOL,
                     f"out {out.placements} preact {pre.placements}")
        c.run(f"forward_with_preact/tp/{cls.__name__}", fwp)

    # ---- gated_activation, bias_gelu, ffn_stats
    gu = torch.randn(B, T, 2 * ff)
    for act in ffn.activations.GATED_OPS.values():  # silu, gelu, relu
        f = lambda g, act=act: OPS.gated_activation(g, act)  # noqa: E731
        for pl in (Shard(0), Shard(1), SS(2)):
            c.run(f"gated_activation/{act}/{pl}", check_op, f, [gu], [pl], quiet=True,
                  out_placements=[[Shard(2) if pl == SS(2) else pl]], grad_placements=[[pl]])
    c.run("gated_activation/refuse-plain-last-dim", check_refused, OPS.gated_activation, [gu], [Shard(2)],
          "split_factor=2")
    c.run("_gated_activation_bwd/SS", check_op, lambda g, gu: OPS._gated_activation_bwd(g, gu, "silu"),
          [torch.randn(B, T, ff), gu], [Shard(2), SS(2)], grad=False, quiet=True, out_placements=[[SS(2)]])
    xb, bb = torch.randn(B, T, 4 * n), torch.randn(4 * n)
    for approx in ("none", "tanh"):
        f = lambda x, b, approx=approx: OPS.bias_gelu(x, b, approx)  # noqa: E731
        c.run(f"bias_gelu/{approx}/xS1", check_op, f, [xb, bb], [Shard(1), R], quiet=True,
              grad_placements=[[Shard(1)], [P]])
        c.run(f"bias_gelu/{approx}/xS2-biasS0", check_op, f, [xb, bb], [Shard(2), Shard(0)], quiet=True,
              out_placements=[[Shard(2)]], grad_placements=[[Shard(2)], [Shard(0)]])
    c.run("bias_gelu/no-bias/xS2", check_op, lambda x: OPS.bias_gelu(x, None), [xb], [Shard(2)], quiet=True)
    c.run("_bias_gelu_bwd/xS0", check_op, lambda g, x, b: OPS._bias_gelu_bwd(g, x, b, "none", True),
          [torch.randn_like(xb), xb, bb], [Shard(0), Shard(0), R], grad=False, quiet=True,
          out_placements=[[Shard(0)], [P]])
    _o, pre = OPS._gated_ffn_fwd(x3, wgu, bgu, w2, b2, "silu")
    c.run("ffn_stats/gathered", check_op, lambda x, p: OPS.ffn_stats(x, p, "silu", True), [x3, pre],
          [Shard(0), SS(1)], grad=False, out_placements=[[R]], tol=1e-9)


# ----------------------------------------------------------------------------- training
class Block(nn.Module):
    def __init__(self, norm, ffn_module):
        super().__init__()
        self.norm, self.ffn = norm, ffn_module

    def forward(self, x):
        return x + self.ffn(self.norm(x))


class Net(nn.Module):
    def __init__(self, d, ff):
        super().__init__()
        self.blocks = nn.ModuleList([
            Block(ffn.LayerNorm(d), ffn.GeluFFN(d, ff, bias=True)),
            Block(ffn.RMSNorm(d, eps=1e-6), ffn.SwiGLU(d, ff, bias=True)),
            Block(ffn.RMSNorm(d, eps=1e-6, bias=True), ffn.GeGLU(d, ff, bias=False)),
        ])
        self.norm = ffn.LayerNorm(d)
        self.head = nn.Linear(d, d)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


STEPS, LR = 4, 0.2


def _data(n, d, steps, batch, seq):
    torch.manual_seed(7)
    return [(torch.randn(batch, seq, d), torch.randn(batch, seq, d)) for _ in range(steps)]


def _reference(net, data):
    net = copy.deepcopy(net)
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    losses, grads = [], None
    for i, (x, y) in enumerate(data):
        loss = F.mse_loss(net(x), y)
        loss.backward()
        if i == 0:
            grads = {k: p.grad.clone() for k, p in net.named_parameters()}
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, grads


def _record_losses(c, mode, one, dist_losses, tol, grad_err=None):
    max_abs = max(abs(a - b) for a, b in zip(one, dist_losses))
    max_rel = max(abs(a - b) / abs(a) for a, b in zip(one, dist_losses))
    c.losses[mode] = {"one": one, "dist": dist_losses, "max_abs": max_abs, "max_rel": max_rel}
    if grad_err is not None:
        c.losses[mode]["first_step_grad_err"] = grad_err
    c.record(f"train/{mode}", max(max_rel, grad_err or 0.0), tol, f"losses one {one} dist {dist_losses}")


def train_fsdp(c, name, bf16):
    n, rank = c.mesh.size(), dist.get_rank()
    d, ff = 16, 4 * n
    torch.manual_seed(0)
    net = Net(d, ff)
    data = _data(n, d, STEPS, 2 * n, 4)
    one, ref_grads = _reference(net, data)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else torch.float32, reduce_dtype=torch.float32)
    for block in net.blocks:
        fully_shard(block, mesh=c.mesh, mp_policy=policy)
    fully_shard(net, mesh=c.mesh, mp_policy=policy)
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    losses, grad_err = [], 0.0
    for i, (x, y) in enumerate(data):
        xs, ys = x.chunk(n)[rank], y.chunk(n)[rank]  # this rank's share of the global batch
        out = net(xs)
        loss = F.mse_loss(out.float(), ys)
        loss.backward()
        if i == 0:
            for k, p in net.named_parameters():
                grad_err = max(grad_err, _err(p.grad.full_tensor(), ref_grads[k]))
        opt.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / n)
    _record_losses(c, name, one, losses, 2e-2 if bf16 else TOL, grad_err)


def train_tp(c, name, sequence_parallel):
    n = c.mesh.size()
    d, ff = 16, 4 * n
    torch.manual_seed(0)
    net = Net(d, ff)
    data = _data(n, d, STEPS, 2, 2 * n)  # every rank sees the whole batch
    one, ref_grads = _reference(net, data)
    if sequence_parallel:
        parallelize_module(net, c.mesh, _sp_plan(net, local=True))
        distribute_module(net.head, c.mesh)  # replicated
    else:
        parallelize_module(net, c.mesh, {f"blocks.{i}.ffn": FFNParallel() for i in range(len(net.blocks))})
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    losses, grad_err = [], 0.0
    for i, (x, y) in enumerate(data):
        inp = x.chunk(n, dim=1)[dist.get_rank()] if sequence_parallel else x  # this rank's part of the sequence
        loss = F.mse_loss(_full(net(inp)), y)
        loss.backward()
        if i == 0:
            for k, p in net.named_parameters():
                grad_err = max(grad_err, _err(_full(p.grad), ref_grads[k]))
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    _record_losses(c, name, one, losses, TOL, grad_err)


def _sp_plan(net, local, **ffn_style):
    """Sequence + tensor parallel: the norms SequenceParallel, the FFNs all-gather the sequence and
    reduce-scatter it back. local: the residual stream is each rank's plain [B, T/n, d] shard
    (torchtitan's way, and the README's); else it is a Shard(1) DTensor."""
    plan = {"norm": SequenceParallel(use_local_output=False)}
    for i in range(len(net.blocks)):
        plan[f"blocks.{i}.norm"] = SequenceParallel()
        plan[f"blocks.{i}.ffn"] = FFNParallel(input_layouts=Shard(1), output_layouts=Shard(1), use_local_output=local,
                                              **ffn_style)
    return plan


def train_fsdp_tp(c, name):
    """torchtitan's 2-D recipe: tensor + sequence parallel inside a "tp" mesh dim, FSDP2 across "dp"."""
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
    dp, tp = mesh["dp"], mesh["tp"]
    n_dp, n_tp = dp.size(), tp.size()
    d, ff = 16, 4 * n_tp
    torch.manual_seed(0)
    net = Net(d, ff)
    data = _data(world, d, STEPS, 2 * n_dp, 2 * n_tp)
    one, ref_grads = _reference(net, data)
    parallelize_module(net, tp, _sp_plan(net, local=False, replicate_in_bias=True))
    distribute_module(net.head, tp)
    for block in net.blocks:
        fully_shard(block, mesh=dp, shard_placement_fn=fsdp_shard_placement)
    fully_shard(net, mesh=dp, shard_placement_fn=fsdp_shard_placement)
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    losses, grad_err = [], 0.0
    for i, (x, y) in enumerate(data):
        k = dp.get_local_rank()
        xs, ys = x.chunk(n_dp)[k], y.chunk(n_dp)[k]
        loss = F.mse_loss(_full(net(distribute_tensor(xs, tp, [Shard(1)]))), ys)
        loss.backward()
        if i == 0:
            for key, p in net.named_parameters():
                grad_err = max(grad_err, _err(_full(p.grad), ref_grads[key]))
        opt.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean, group=dp.get_group())
        losses.append(mean.item() / n_dp)
    _record_losses(c, name, one, losses, TOL, grad_err)


# ----------------------------------------------------------------------------- processes
def worker(rank, world, rdv, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    c = Checks(mesh, full=world == 2)
    t0 = time.perf_counter()
    op_checks(c)
    t_ops = time.perf_counter() - t0
    c.full = True
    c.run("fsdp_fp32", train_fsdp, bf16=False)
    c.run("fsdp_bf16", train_fsdp, bf16=True)
    c.run("tp", train_tp, sequence_parallel=False)
    c.run("tp_sp", train_tp, sequence_parallel=True)
    if world == 4:
        c.run("fsdp_tp", train_fsdp_tp)
    timing = {"ops_s": t_ops, "total_s": time.perf_counter() - t0}
    # Every rank's checks must pass: gather and merge (a failure anywhere is a failure).
    gathered = [None] * world
    dist.all_gather_object(gathered, c.results)
    if rank == 0:
        merged = {}
        for r, res in enumerate(gathered):
            for k, v in res.items():
                if k not in merged or (merged[k]["ok"] and not v["ok"]):
                    merged[k] = dict(v, detail=(f"rank {r}: " if not v["ok"] else "") + v["detail"])
                else:
                    merged[k]["err"] = max(merged[k]["err"], v["err"])
        with open(os.path.join(out_dir, f"world{world}.json"), "w") as f:
            json.dump({"checks": merged, "losses": c.losses, "timing": timing, "import": IMPORT}, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


def main(out_dir, worlds):
    for world in worlds:
        with tempfile.TemporaryDirectory() as tmp:
            mp.start_processes(worker, args=(world, os.path.join(tmp, "rdv"), out_dir), nprocs=world,
                               start_method="fork")


if __name__ == "__main__":
    main(sys.argv[1], [int(w) for w in sys.argv[2:]])
