"""gelu_ffn, swiglu, geglu, reglu and the elementwise pieces (gated_activation,
bias_gelu) against the eager composites in ffn.reference: forward and backward
over shapes, dtypes and optional biases, gradcheck, double backward,
bit-exactness of the float32 activations, determinism."""

import concurrent.futures
import itertools
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

import ffn
from ffn.activations import ACTIVATION_NAMES, ACTIVATIONS, GATED_OPS, gelu_activation
from helpers import (
    DTYPES,
    HALF_DTYPES,
    SHORT,
    assert_accurate,
    assert_agrees_with_cpu,
    assert_same_across_threads,
    grads,
    on_cpu,
    randn,
    run_three_ways,
)


@dataclass(frozen=True)
class FfnCase:
    name: str
    gated: bool
    approximate: str = "none"

    def _call(self, ops, x, w_in, b_in, w_out, b_out):
        extra = () if self.name == "relu_ffn" else (self.approximate,)
        return getattr(ops, self.name)(x, w_in, b_in, w_out, b_out, *extra)

    def ours(self, *inputs):
        return self._call(torch.ops.ffn, *inputs)

    def ref(self, *inputs):
        return self._call(ffn.reference, *inputs)

    @property
    def activation(self):
        """The gated op's activation string (as taken by _gated_ffn_fwd and gated_activation)."""
        if self.name == "geglu":
            return gelu_activation(self.approximate)
        return GATED_OPS[self.name]

    @property
    def internal(self):
        """(the internal op's name without _fwd/_bwd, its arguments after the tensors)."""
        if self.gated:
            return "gated_ffn", (self.activation,)
        return self.name, (() if self.name == "relu_ffn" else (self.approximate,))

    def __str__(self):
        return self.name if self.approximate == "none" else f"{self.name}-{self.approximate}"


FFNS = [
    FfnCase("gelu_ffn", gated=False),
    FfnCase("gelu_ffn", gated=False, approximate="tanh"),
    FfnCase("relu_ffn", gated=False),
    *(FfnCase(op, gated=True) for op in GATED_OPS),
    FfnCase("geglu", gated=True, approximate="tanh"),
]
SWIGLU = next(c for c in FFNS if c.name == "swiglu")
BIASES = {"bias": (True, True), "nobias": (False, False), "bias_in": (True, False), "bias_out": (False, True)}
D_FF = 19  # odd: the elementwise passes run their tail code


def ffn_inputs(case, lead, d, dtype, device, biases=(True, True), d_ff=D_FF, d_out=None,
               requires_grad=False):
    """x [*lead, d], w_in [(2*)d_ff, d], b_in, w_out [d_out, d_ff], b_out with O(1) activations."""
    d_out = d if d_out is None else d_out
    rows_in = 2 * d_ff if case.gated else d_ff
    kw = {"dtype": dtype, "device": device, "requires_grad": requires_grad}
    x = randn(*lead, d, **kw)
    w_in = randn(rows_in, d, scale=d**-0.5, **kw)
    b_in = randn(rows_in, scale=0.5, **kw) if biases[0] else None
    w_out = randn(d_out, d_ff, scale=d_ff**-0.5, **kw)
    b_out = randn(d_out, scale=0.5, **kw) if biases[1] else None
    return x, w_in, b_in, w_out, b_out


def check_ffn(case, inputs, with_grad=False):
    x, w_in, _, w_out, _ = inputs
    out_shape = (*x.shape[:-1], w_out.shape[0])
    grad_out = torch.randn(out_shape, dtype=x.dtype, device=x.device) if with_grad else None
    (ours, theirs, ref), grads = run_three_ways(case.ours, case.ref, inputs, grad_out)
    assert ours.shape == out_shape
    # (longest sum, number of values rounded to the dtype in it) per result: the hidden
    # activations, the pre-activation gradients (F_in of them per row) are stored in the dtype.
    d, d_ff, d_out, f_in, rows = x.shape[-1], w_out.shape[1], w_out.shape[0], w_in.shape[0], x[..., 0].numel()
    sums = {
        "output": (max(d, d_ff), d_ff),
        "grad_x": (max(d_out, f_in), f_in),
        "grad_w_in": (rows, rows),
        "grad_b_in": (rows, rows),
        "grad_w_out": (rows, rows),
        "grad_b_out": (rows, 1),
    }
    # (name, ours, torch's, float64 reference) per result.
    results = [("output", ours, theirs, ref)]
    for name, g in zip(("grad_x", "grad_w_in", "grad_b_in", "grad_w_out", "grad_b_out"), grads or ()):
        if g is not None:
            results.append((name, *g))
    if x.device.type != "cpu":
        check_against_cpu(case.ours, inputs, grad_out, results, grads,
                          {name: dict(terms=terms, rounded_terms=rounded) for name, (terms, rounded) in sums.items()})
    for name, ours_r, theirs_r, ref_r in results:
        terms, rounded = sums[name]
        assert_accurate(ours_r, ref_r, theirs_r, terms=terms, rounded_terms=rounded, name=name)


def check_against_cpu(ours_fn, inputs, grad_out, results, grads, bounds):
    """(c) of helpers: ours_fn's `results` (name, ours, torch's, reference; output first, then
    the gradients that `grads`, per input, has) against its CPU kernels on the same inputs."""
    cpu_out, cpu_grads = on_cpu(ours_fn, inputs, grad_out)
    cpu_results = [cpu_out] + [c for g, c in zip(grads or (), cpu_grads or ()) if g is not None]
    for (name, ours_r, _, ref_r), cpu_r in zip(results, cpu_results, strict=True):
        assert_agrees_with_cpu(ours_r, cpu_r, ref_r, name=name, **bounds[name])


@pytest.mark.parametrize("dtype", DTYPES, ids=SHORT.get)
@pytest.mark.parametrize("d", (1, 7, 64, 127, 4097))
@pytest.mark.parametrize("case", FFNS, ids=str)
def test_ffn_forward_backward(case, d, dtype, device):
    check_ffn(case, ffn_inputs(case, (5,), d, dtype, device, requires_grad=True), with_grad=True)


@pytest.mark.parametrize("with_bias", (True, False), ids=("bias", "nobias"))
@pytest.mark.parametrize("dtype", DTYPES, ids=SHORT.get)
@pytest.mark.parametrize("d_ff", (37, 96))
@pytest.mark.parametrize("case", FFNS, ids=str)
def test_ffn_hidden_widths(case, d_ff, dtype, with_bias, device):
    """d_ff a multiple of every dtype's 128-bit word (the CUDA elementwise passes' vectorized
    path) and not (their scalar path, as D_FF), with 3-d x."""
    inputs = ffn_inputs(case, (2, 3), 64, dtype, device, (with_bias, with_bias), d_ff=d_ff, requires_grad=True)
    check_ffn(case, inputs, with_grad=True)


@pytest.mark.parametrize("biases", [BIASES[k] for k in ("nobias", "bias_in", "bias_out")],
                         ids=("nobias", "bias_in", "bias_out"))
@pytest.mark.parametrize("dtype", DTYPES, ids=SHORT.get)
@pytest.mark.parametrize("case", FFNS, ids=str)
def test_ffn_optional_biases(case, dtype, biases, device):
    check_ffn(case, ffn_inputs(case, (9,), 64, dtype, device, biases, requires_grad=True), with_grad=True)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=SHORT.get)
@pytest.mark.parametrize("case", FFNS, ids=str)
def test_ffn_many_rows_half(case, dtype, device):
    """Enough rows and width for the half-precision comparison with torch to be sharp
    (e.g. ReGLU's gradient mask where z + b is near 0)."""
    check_ffn(case, ffn_inputs(case, (256,), 64, dtype, device, d_ff=64, requires_grad=True), with_grad=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=SHORT.get)
@pytest.mark.parametrize("case", FFNS, ids=str)
def test_ffn_preactivation_is_linear(case, dtype, device):
    """The saved pre-activation is F.linear(x, w_in, b_in) to the bit: the bias is added
    inside the GEMM's accumulation, not after a rounded x w_in^T."""
    x, w_in, b_in, w_out, b_out = ffn_inputs(case, (2, 8), 32, dtype, device)
    op, static = case.internal
    _out, preact = getattr(torch.ops.ffn, f"_{op}_fwd")(x, w_in, b_in, w_out, b_out, *static)
    expected = torch.nn.functional.linear(x.reshape(-1, 32), w_in, b_in)
    torch.testing.assert_close(preact, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=SHORT.get)
@pytest.mark.parametrize("case", FFNS, ids=str)
def test_ffn_without_preact_same_output(case, dtype, device):
    """keep_preact=False (no backward to come; a plain FFN then writes its activation over the
    pre-activation): the output is the same to the bit, for every layout, and the pre-activation
    comes back as an empty [0] tensor."""
    op, static = case.internal
    fwd = getattr(torch.ops.ffn, f"_{op}_fwd")
    for kind in FFN_SHAPES:
        inputs = shaped_ffn_inputs(case, kind, dtype, device)
        out, preact = fwd(*inputs, *static)
        out_over_preact, no_preact = fwd(*inputs, *static, False)
        assert torch.equal(out_over_preact, out), kind
        assert no_preact.shape == (0,) and no_preact.dtype == dtype, kind
    # Odd widths: the kernels' tail code writes over the pre-activation too.
    for d_ff in (1, 3, 33):
        inputs = ffn_inputs(case, (5,), 24, dtype, device, d_ff=d_ff)
        assert torch.equal(fwd(*inputs, *static, False)[0], fwd(*inputs, *static)[0]), d_ff


@pytest.mark.parametrize("case", FFNS, ids=str)
def test_public_ffns_keep_preact_only_when_autograd_records(case, device):
    """The public ops ask their internal op for the pre-activation only when autograd records the
    call (its backward needs it): not under no_grad or inference_mode, nor when nothing requires
    grad. Either way the output is the same."""
    from torch.utils._python_dispatch import TorchDispatchMode

    op, _ = case.internal
    internal = getattr(torch.ops.ffn, f"_{op}_fwd").default

    class KeepPreactSeen(TorchDispatchMode):
        keep_preact = None

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is internal:  # the mode sees trailing default arguments dropped
                self.keep_preact = args[-1] if isinstance(args[-1], bool) else True
            return func(*args, **(kwargs or {}))

    inputs = ffn_inputs(case, (3, 4), 16, torch.float32, device)
    outputs = {}
    # Under inference_mode the mode sees the public op itself (its composite runs below the mode):
    # there, is_grad_enabled() is False, the composite's test, as under no_grad.
    for name, context, requires_grad, expected in (
        ("no_grad", torch.no_grad, True, False),
        ("inference_mode", torch.inference_mode, True, None),
        ("nothing requires grad", torch.enable_grad, False, False),
        ("autograd records", torch.enable_grad, True, True),
    ):
        leaves = [None if t is None else t.detach().requires_grad_(requires_grad) for t in inputs]
        with context(), KeepPreactSeen() as seen:
            outputs[name] = case.ours(*leaves)
        assert seen.keep_preact is expected, name
    for name, out in outputs.items():
        assert torch.equal(out.detach(), outputs["autograd records"].detach()), name


@pytest.mark.parametrize("case", FFNS, ids=str)
def test_ffn_without_preact_refuses_autograd(case, device):
    op, static = case.internal
    x, *params = ffn_inputs(case, (3,), 8, torch.float32, device)
    with pytest.raises(RuntimeError, match=rf"ffn\._{op}_fwd: keep_preact=False keeps no pre-activation"):
        getattr(torch.ops.ffn, f"_{op}_fwd")(x.requires_grad_(), *params, *static, False)


def shaped_ffn_inputs(case, kind, dtype, device):
    d = 24
    if kind == "3d":
        return ffn_inputs(case, (2, 3), d, dtype, device)
    if kind == "4d":
        return ffn_inputs(case, (2, 2, 3), d, dtype, device)
    if kind == "0rows":
        return ffn_inputs(case, (0,), d, dtype, device)
    if kind == "0rows-3d":
        return ffn_inputs(case, (2, 0), d, dtype, device)
    if kind == "d_out":  # down projection to another width
        return ffn_inputs(case, (2, 3), d, dtype, device, d_out=13)
    if kind == "d_ff-1":  # enough rows for the rows-long gradient sums to be judged
        return ffn_inputs(case, (64,), d, dtype, device, d_ff=1)
    if kind == "noncontiguous":  # transposed x, transposed/sliced weights, strided biases
        x, w_in, b_in, w_out, b_out = ffn_inputs(case, (6,), d, dtype, device)
        return (
            x.t().contiguous().t(),
            w_in.t().contiguous().t(),
            torch.stack([b_in, b_in]).t()[:, 0],
            torch.cat([w_out, w_out], dim=1)[:, ::2],
            torch.stack([b_out, b_out]).t()[:, 1],
        )
    if kind == "sliced-x":
        x, *rest = ffn_inputs(case, (8,), 2 * d, dtype, device)
        w_in = randn(rest[0].shape[0], d, dtype=dtype, device=device, scale=d**-0.5)
        return (x[::2, ::2], w_in, *rest[1:])
    raise ValueError(kind)


FFN_SHAPES = ("3d", "4d", "0rows", "0rows-3d", "d_out", "d_ff-1", "noncontiguous", "sliced-x")


# Layouts are dtype-independent above the kernels' two code paths: float32 and half.
LAYOUT_DTYPES = (torch.float32, torch.bfloat16)


@pytest.mark.parametrize("kind", FFN_SHAPES)
@pytest.mark.parametrize("dtype", LAYOUT_DTYPES, ids=SHORT.get)
@pytest.mark.parametrize("case", FFNS, ids=str)
def test_ffn_shapes_forward_backward(case, dtype, kind, device):
    inputs = [None if t is None else t.requires_grad_() for t in shaped_ffn_inputs(case, kind, dtype, device)]
    if kind in ("noncontiguous", "sliced-x"):
        assert not inputs[0].is_contiguous()
    check_ffn(case, inputs, with_grad=True)


@pytest.mark.parametrize("case", FFNS, ids=str)
def test_ffn_expanded_grad_out(case, device):
    """The zero-stride output gradient of out.sum()."""
    inputs = ffn_inputs(case, (3, 4), 16, torch.float32, device, requires_grad=True)
    grad_out = torch.ones((), device=device).expand(3, 4, 16)
    (ours, theirs, ref), grads = run_three_ways(case.ours, case.ref, inputs, grad_out)
    for name, (g, g_torch, g_ref) in zip(("grad_x", "grad_w_in", "grad_b_in", "grad_w_out", "grad_b_out"), grads):
        assert_accurate(g, g_ref, g_torch, terms=2 * D_FF, rounded_terms=2 * D_FF, name=name)


def subsets(names):
    for k in range(1, len(names) + 1):
        yield from itertools.combinations(names, k)


ALL_ARGS = ("x", "w_in", "b_in", "w_out", "b_out")
SUBSET_CASES = [(True, s) for s in subsets(ALL_ARGS)] + [(False, s) for s in subsets(("x", "w_in", "w_out"))]


@pytest.mark.parametrize(
    "with_bias,subset", SUBSET_CASES,
    ids=[("bias:" if b else "nobias:") + "+".join(s) for b, s in SUBSET_CASES],
)
@pytest.mark.parametrize("case", [FFNS[0], FFNS[2]], ids=str)
def test_ffn_backward_grad_subsets(case, with_bias, subset, device):
    """Every needs_input_grad pattern (frozen weights, frozen input, ...)."""
    inputs = ffn_inputs(case, (3, 4), 16, torch.float32, device, (with_bias, with_bias))
    for name, t in zip(ALL_ARGS, inputs):
        if t is not None:
            t.requires_grad_(name in subset)
    check_ffn(case, inputs, with_grad=True)


@pytest.mark.parametrize("case", FFNS, ids=str)
def test_ffn_backward_op_grad_mask(case, device):
    """The backward op returns [0] tensors for the gradients nobody asked for."""
    x, w_in, b_in, w_out, b_out = ffn_inputs(case, (3,), 8, torch.float32, device)
    op, act = case.internal
    fwd, bwd = getattr(torch.ops.ffn, f"_{op}_fwd"), getattr(torch.ops.ffn, f"_{op}_bwd")
    _out, preact = fwd(x, w_in, b_in, w_out, b_out, *act)
    grad_out = torch.ones(3, 8, device=device)
    full = bwd(grad_out, x, preact, w_in, w_out, *act, [True] * 5)
    singles = [[i == j for j in range(5)] for i in range(5)]
    for mask in singles + [[not m for m in single] for single in singles]:
        got = bwd(grad_out, x, preact, w_in, w_out, *act, list(mask))
        for wanted, g, ref in zip(mask, got, full):
            if wanted:
                torch.testing.assert_close(g, ref, rtol=0, atol=0)
            else:
                assert g.shape == (0,)


@pytest.mark.parametrize("biases", (BIASES["bias"], BIASES["nobias"]), ids=("bias", "nobias"))
@pytest.mark.parametrize("case", FFNS, ids=str)
def test_ffn_gradcheck(case, biases, device):
    inputs = ffn_inputs(case, (2, 3), 5, torch.float64, device, biases, d_ff=4, requires_grad=True)
    assert torch.autograd.gradcheck(case.ours, inputs)


@pytest.mark.parametrize("case", FFNS, ids=str)
def test_ffn_double_backward_raises(case, device):
    inputs = ffn_inputs(case, (3,), 5, torch.float64, device, d_ff=4, requires_grad=True)
    (gx,) = torch.autograd.grad(case.ours(*inputs).pow(2).sum(), inputs[0], create_graph=True)
    op = case.internal[0]
    with pytest.raises(RuntimeError, match=f"double backward through {op} is not supported"):
        gx.sum().backward()


def test_ffn_saves_only_input_and_preactivation():
    """Saved for backward: x, the pre-activation and the (parameter) weights; not the hidden tensor."""
    case = SWIGLU
    x, w_in, b_in, w_out, b_out = ffn_inputs(case, (64,), 32, torch.float32, "cpu", requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        case.ours(x, w_in, b_in, w_out, b_out)
    activations = [t for t in saved if t.data_ptr() not in (w_in.data_ptr(), w_out.data_ptr())]
    assert sorted(t.shape for t in activations) == sorted([x.shape, torch.Size([64, 2 * D_FF])])


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64), ids=SHORT.get)
@pytest.mark.parametrize("case", [FFNS[0], SWIGLU], ids=str)
def test_ffn_bias_grads_over_many_rows(case, dtype, device):
    """The bias gradients are column sums over all rows. Over thousands of rows (odd widths for
    the vector tails) they are as accurate as torch's, and the same bits for 1 and 2 threads
    whichever gradients are asked for; the other gradients are the same bits whether or not the
    biases' are computed (on CPU the backward pass sums them as it goes)."""
    inputs = ffn_inputs(case, (3, 1000), 20, dtype, device, d_ff=37, requires_grad=True)
    check_ffn(case, inputs, with_grad=True)
    grad_out = randn(3, 1000, 20, dtype=dtype, device=device)

    def input_grads(wanted):  # per input, its gradient when only the inputs named require grad
        leaves = [None if t is None else t.detach().requires_grad_(name in wanted)
                  for name, t in zip(ALL_ARGS, inputs)]
        return grads(case.ours(*leaves), leaves, grad_out)
    assert_same_across_threads(lambda: input_grads(ALL_ARGS)[2::2])
    everything = input_grads(ALL_ARGS)
    alone = [input_grads(("b_in",))[2], input_grads(("b_out",))[4]]
    assert_equal_results([alone], [everything[2::2]])
    without_biases = input_grads(("x", "w_in", "w_out"))
    assert_equal_results([without_biases[0:2] + without_biases[3:4]], [everything[0:2] + everything[3:4]])


def ffn_call(case, rows, d_ff, dtype, inference):
    """A function giving case.ours' forward and every gradient (forward only in inference mode)
    on inputs drawn now, in this thread."""
    inputs = ffn_inputs(case, (rows,), 24, dtype, "cpu", d_ff=d_ff, requires_grad=not inference)
    grad_out = randn(rows, 24, dtype=dtype)

    def results():
        if inference:
            with torch.inference_mode():
                return (case.ours(*inputs),)
        out = case.ours(*inputs)
        return (out.detach(), *torch.autograd.grad(out, inputs, grad_out))
    return results


def test_ffn_temporaries_reused_between_calls_and_threads():
    """On CPU the FFN ops keep their temporaries (hidden activation, its gradient, the
    pre-activation's gradient, and without autograd the pre-activation) in per-thread buffers
    between calls. Each call gives the same bits whether the calls before it were larger,
    smaller, of another dtype or in inference mode, and while other threads run FFNs at the same
    time (the ops release the GIL)."""
    specs = [(case, rows, d_ff, dtype, inference)
             for case in (SWIGLU, FFNS[0])
             for rows, d_ff, dtype, inference in ((300, 96, torch.float32, True), (64, 48, torch.float32, False),
                                                  (300, 96, torch.float32, False), (7, 19, torch.float64, False),
                                                  (300, 96, torch.bfloat16, False), (64, 48, torch.float32, True))]
    calls = [ffn_call(*spec) for spec in specs]
    first = [call() for call in calls]
    for case, rows, d_ff, dtype, _ in specs[1:3]:  # accurate, not only repeatable
        check_ffn(case, ffn_inputs(case, (rows,), 24, dtype, "cpu", d_ff=d_ff), with_grad=True)
    assert_equal_results([call() for call in reversed(calls)][::-1], first)
    orders = [list(range(i, len(calls))) + list(range(i)) for i in range(4)]
    with concurrent.futures.ThreadPoolExecutor(len(orders)) as pool:
        for order, results in zip(orders, pool.map(lambda order: [calls[i]() for i in order * 3], orders)):
            assert_equal_results(results, [first[i] for i in order * 3])


# Run in a fresh process (the limit is read once per process): a no_grad gelu_ffn whose
# pre-activation is [8192, 1024] float32, 32 MiB, a block glibc maps anew on every allocation;
# then forward and backward of it and of a SwiGLU. Prints the minor page faults per no_grad call,
# those of one call after ffn.release_cpu_scratch(), and a digest of every output and gradient.
SCRATCH_PROBE = """
import hashlib, resource, torch, ffn
torch.manual_seed(0)
torch.set_num_threads(1)
x = torch.randn(8192, 32, requires_grad=True)
w1, b1 = torch.randn(1024, 32, requires_grad=True), torch.randn(1024, requires_grad=True)
w2, w_gate_up = torch.randn(32, 1024, requires_grad=True), torch.randn(2048, 32, requires_grad=True)
calls = [lambda: torch.ops.ffn.gelu_ffn(x, w1, b1, w2, None), lambda: torch.ops.ffn.swiglu(x, w_gate_up, None, w2, None)]
with torch.no_grad():
    calls[0]()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        calls[0]()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4
    ffn.release_cpu_scratch()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    calls[0]()
    faults_after_release = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
digest = hashlib.sha256()
for call in calls:
    out = call()
    for t in (out, *torch.autograd.grad(out, (x, w1, b1, w2) if call is calls[0] else (x, w_gate_up, w2),
                                        torch.randn_like(out))):
        digest.update(t.detach().numpy().tobytes())
print(faults, faults_after_release, digest.hexdigest())
"""


def run_scratch_probe(limit_mb):
    env = {k: v for k, v in os.environ.items() if k != "FFN_CPU_SCRATCH_LIMIT_MB"}
    if limit_mb is not None:
        env["FFN_CPU_SCRATCH_LIMIT_MB"] = limit_mb
    return subprocess.run([sys.executable, "-c", SCRATCH_PROBE], env=env, capture_output=True, text=True,
                          timeout=300)


def test_ffn_scratch_limit():
    """FFN_CPU_SCRATCH_LIMIT_MB sets the largest temporary a thread keeps (default 128 MiB; 0 keeps
    none). The results are the same bits whatever it is; by default a 32 MiB pre-activation of a
    no_grad forward is not faulted in again on every call, until ffn.release_cpu_scratch() frees
    it; a value that is not a whole number of MiB is refused, naming the variable."""
    kept, none_kept = run_scratch_probe(None), run_scratch_probe("0")
    assert kept.returncode == 0 and none_kept.returncode == 0, kept.stderr[-2000:] + none_kept.stderr[-2000:]
    (kept_faults, released_faults, kept_digest), (fresh_faults, _, fresh_digest) = (
        p.stdout.split() for p in (kept, none_kept))
    assert kept_digest == fresh_digest
    if float(fresh_faults) < 16:
        pytest.skip(f"this allocator keeps a freed 32 MiB block mapped ({fresh_faults} faults per call)")
    assert float(kept_faults) <= float(fresh_faults) / 8, (kept_faults, fresh_faults)
    assert float(released_faults) >= float(fresh_faults) / 2, (released_faults, fresh_faults)
    for bad in ("lots", "-1", "1.5"):
        refused = run_scratch_probe(bad)
        assert refused.returncode != 0
        assert "FFN_CPU_SCRATCH_LIMIT_MB must be a whole number of MiB, 0 or more" in refused.stderr, bad


def assert_equal_results(results, expected):
    for got, want in zip(results, expected, strict=True):
        for a, b in zip(got, want, strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)


# ----------------------------------------------------------------------------- elementwise pieces
GATED_ACTS = ACTIVATION_NAMES
ELEMENTWISE_DIMS = (1, 7, 64, 127, 4097, 16384)


def check_elementwise(ours_fn, ref_fn, inputs, with_grad=False, grad_out=None):
    x = inputs[0]
    if with_grad:
        out_shape = ref_fn(*[None if t is None else t.detach() for t in inputs]).shape
        grad_out = torch.randn(out_shape, dtype=x.dtype, device=x.device)
    (ours, theirs, ref), grads = run_three_ways(ours_fn, ref_fn, inputs, grad_out)
    results = [("output", ours, theirs, ref)]
    for name, g in zip(("grad_x", "grad_bias"), grads or ()):
        if g is not None:
            results.append((name, *g))
    # The bias gradient sums grad_x (rounded to the dtype) over rows.
    rows = x[..., 0].numel()
    bounds = {name: dict(terms=rows, rounded_terms=rows) if name == "grad_bias" else {} for name, *_ in results}
    if x.device.type != "cpu":
        check_against_cpu(ours_fn, inputs, grad_out, results, grads, bounds)
    for name, ours_r, theirs_r, ref_r in results:
        assert_accurate(ours_r, ref_r, theirs_r, name=name, **bounds[name])


def gated_activation_fns(act):
    return (lambda gu: torch.ops.ffn.gated_activation(gu, act),
            lambda gu: ffn.reference.gated_activation(gu, act))


@pytest.mark.parametrize("dtype", DTYPES, ids=SHORT.get)
@pytest.mark.parametrize("d_ff", ELEMENTWISE_DIMS)
@pytest.mark.parametrize("act", GATED_ACTS)
def test_gated_activation(act, d_ff, dtype, device):
    gate_up = randn(max(2, 8192 // d_ff), 2 * d_ff, dtype=dtype, device=device, scale=2.0, requires_grad=True)
    check_elementwise(*gated_activation_fns(act), (gate_up,), with_grad=True)


def test_relu_gate_gradient_at_zero_and_nan_follows_torch(device):
    """threshold_backward: no gradient where the gate is <= 0 (0 included); a NaN gate
    passes its gradient through. The CPU kernels are vectorized: use a full register."""
    gate = torch.tensor([-1.0, 0.0, float("nan"), 2.0] * 4, device=device)
    gate_up = torch.cat([gate, torch.full_like(gate, 3.0)]).view(1, -1)
    ours, theirs = (gate_up.clone().requires_grad_() for _ in range(2))
    torch.ops.ffn.gated_activation(ours, "relu").sum().backward()
    d_ff = gate.numel()
    (torch.relu(theirs[:, :d_ff]) * theirs[:, d_ff:]).sum().backward()
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("act", GATED_ACTS)
def test_gated_activation_float32_matches_torch(act, device):
    """float32 results within assert_close's default tolerance of torch's act(gate) * up
    (on CPU they are bit-exact: test_gated_activation_float32_bit_exact)."""
    gate_up = randn(64, 2 * 256, device=device, scale=3.0)
    torch.testing.assert_close(torch.ops.ffn.gated_activation(gate_up, act),
                               ffn.reference.gated_activation(gate_up, act))


def test_elementwise_misaligned(device):
    """bfloat16 tensors starting 2 bytes past a 16-byte boundary, where the CUDA kernels
    cannot use 128-bit accesses."""
    x = randn(4 * 64 + 1, dtype=torch.bfloat16, device=device, scale=2.0)[1:].view(4, 64)
    bias = randn(65, dtype=torch.bfloat16, device=device)[1:]
    gate_up = randn(4 * 128 + 1, dtype=torch.bfloat16, device=device, scale=2.0)[1:].view(4, 128)
    for t in (x, bias, gate_up):
        assert t.data_ptr() % 16 != 0
    check_elementwise(*bias_gelu_fns("none"), (x.requires_grad_(), bias.requires_grad_()), with_grad=True)
    check_elementwise(*gated_activation_fns("silu"), (gate_up.requires_grad_(),), with_grad=True)


def elementwise_input(kind, last, dtype, device):
    if kind == "3d":
        return randn(2, 3, last, dtype=dtype, device=device, scale=2.0)
    if kind == "4d":
        return randn(2, 2, 3, last, dtype=dtype, device=device, scale=2.0)
    if kind == "0rows":
        return randn(0, last, dtype=dtype, device=device)
    if kind == "transposed":
        return randn(last, 5, dtype=dtype, device=device, scale=2.0).t()
    if kind == "sliced":
        return randn(8, 2 * last, dtype=dtype, device=device, scale=2.0)[::2, ::2]
    raise ValueError(kind)


ELEMENTWISE_SHAPES = ("3d", "4d", "0rows", "transposed", "sliced")


@pytest.mark.parametrize("kind", ELEMENTWISE_SHAPES)
@pytest.mark.parametrize("dtype", LAYOUT_DTYPES, ids=SHORT.get)
@pytest.mark.parametrize("act", GATED_ACTS)
def test_gated_activation_shapes(act, dtype, kind, device):
    gate_up = elementwise_input(kind, 2 * 37, dtype, device).requires_grad_()
    assert gate_up.is_contiguous() == (kind not in ("transposed", "sliced"))
    check_elementwise(*gated_activation_fns(act), (gate_up,), with_grad=True)


def bias_gelu_fns(approximate):
    return (lambda x, b: torch.ops.ffn.bias_gelu(x, b, approximate),
            lambda x, b: ffn.reference.bias_gelu(x, b, approximate))


@pytest.mark.parametrize("with_bias", (True, False), ids=("bias", "nobias"))
@pytest.mark.parametrize("dtype", DTYPES, ids=SHORT.get)
@pytest.mark.parametrize("d", ELEMENTWISE_DIMS)
@pytest.mark.parametrize("approximate", ("none", "tanh"))
def test_bias_gelu(approximate, d, dtype, with_bias, device):
    x = randn(max(2, 8192 // d), d, dtype=dtype, device=device, scale=2.0, requires_grad=True)
    bias = randn(d, dtype=dtype, device=device, requires_grad=True) if with_bias else None
    check_elementwise(*bias_gelu_fns(approximate), (x, bias), with_grad=True)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=SHORT.get)
def test_bias_gelu_bias_grad_over_many_rows(dtype, device):
    """The bias gradient sums 100K rows (on CPU in the backward pass itself, in row chunks of 1600
    rows, each summed as a cascade of row blocks): as accurate as torch's sum, whose cascade
    keeps the rounding error growing with log(rows) rather than rows."""
    x = randn(100_000, 20, dtype=dtype, device=device, scale=2.0, requires_grad=True)
    bias = randn(20, dtype=dtype, device=device, requires_grad=True)
    check_elementwise(*bias_gelu_fns("none"), (x, bias), with_grad=True)


@pytest.mark.parametrize("kind", ELEMENTWISE_SHAPES)
@pytest.mark.parametrize("dtype", LAYOUT_DTYPES, ids=SHORT.get)
@pytest.mark.parametrize("approximate", ("none", "tanh"))
def test_bias_gelu_shapes(approximate, dtype, kind, device):
    x = elementwise_input(kind, 37, dtype, device).requires_grad_()
    bias = randn(2, 37, dtype=dtype, device=device)[1].requires_grad_()
    check_elementwise(*bias_gelu_fns(approximate), (x, bias), with_grad=True)


def test_elementwise_expanded_grad_out(device):
    """The zero-stride output gradients of .sum()."""
    gate_up = randn(4, 2 * 24, device=device, scale=2.0, requires_grad=True)
    check_elementwise(*gated_activation_fns("silu"), (gate_up,), grad_out=torch.ones((), device=device).expand(4, 24))
    x, bias = randn(4, 24, device=device, requires_grad=True), randn(24, device=device, requires_grad=True)
    check_elementwise(*bias_gelu_fns("none"), (x, bias), grad_out=torch.ones((), device=device).expand(4, 24))


@pytest.mark.parametrize("subset", (("x",), ("bias",), ("x", "bias")), ids="+".join)
@pytest.mark.parametrize("approximate", ("none", "tanh"))
def test_bias_gelu_grad_subsets(approximate, subset, device):
    x = randn(6, 40, device=device, scale=2.0, requires_grad="x" in subset)
    bias = randn(40, device=device, requires_grad="bias" in subset)
    check_elementwise(*bias_gelu_fns(approximate), (x, bias), with_grad=True)


# Widths with whole AVX2/AVX-512 float vectors and every tail length.
EXACT_SIZES = (1, 3, 7, 8, 15, 16, 17, 64, 127, 4097)


# ATen's float32 activation kernels have a vectorized loop and a scalar one
# (std::exp, std::erf) for what a row leaves over, and F.gelu(approximate="none")
# on a contiguous float32 tensor runs oneDNN's GELU instead; these differ in the
# last bit. Ours runs ATen's vectorized formulas on every element, tails included:
# it is compared with ATen's vectorized loop on the same values, laid out as a
# non-contiguous view (no oneDNN) whose rows are whole numbers of vectors.
def vector_rows(t):
    """t's values at the start of row 0 of a non-contiguous [2, width] view, width whole vectors."""
    width = -(-t.numel() // 64) * 64  # whole AVX2/AVX-512 float vectors
    view = torch.zeros(2, 2 * width)[:, :width]
    view[0, :t.numel()] = t.flatten()
    return view


def aten_vectorized(fn, t):
    return fn(vector_rows(t))[0, :t.numel()].view(t.shape)


def assert_matches_aten(ours, expected, msg):
    torch.testing.assert_close(ours, expected, rtol=0, atol=0, msg=msg)


@pytest.mark.parametrize("act", GATED_ACTS)
def test_gated_activation_float32_matches_aten(act):
    """float32 gated activations use ATen's formulas: act(gate) * up, to the bit."""
    for d_ff in EXACT_SIZES:
        gate, up = randn(5, d_ff, scale=3.0), randn(5, d_ff)
        ours = torch.ops.ffn.gated_activation(torch.cat([gate, up], dim=-1), act)
        expected = aten_vectorized(ACTIVATIONS[act].fn, gate) * up
        assert_matches_aten(ours, expected, msg=f"d_ff={d_ff}")


@pytest.mark.parametrize("approximate", ("none", "tanh"))
def test_bias_gelu_float32_matches_aten(approximate):
    """float32 bias_gelu is ATen's gelu(x + bias), to the bit."""
    gelu = lambda t: torch.nn.functional.gelu(t, approximate=approximate)  # noqa: E731
    for d in EXACT_SIZES:
        x, bias = randn(5, d, scale=3.0), randn(d)
        assert_matches_aten(torch.ops.ffn.bias_gelu(x, bias, approximate), aten_vectorized(gelu, x + bias),
                            msg=f"d={d}")
        assert_matches_aten(torch.ops.ffn.bias_gelu(x, None, approximate), aten_vectorized(gelu, x),
                            msg=f"d={d}, no bias")


def ulp_error(got, exact):
    """|got - exact| in units of the float32 spacing at the float64 `exact`."""
    spacing = torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(2.0 ** -126))) - 23)
    return (got.double() - exact).abs() / spacing


def test_float32_erf_gelu_gradient_is_as_accurate_as_aten():
    """The float32 erf GELU's derivative takes exp(-x^2/2) from the erf's own exp (activation.h), so
    its gradients are not ATen's to the bit: against float64 they err (in ulps) as ATen's vectorized
    kernel's do, same mean, median and maximum, over [-20, 20] densely and N(0, 9) samples. Its
    values are ATen's to the bit."""
    x = torch.cat([torch.linspace(-20, 20, 1 << 17), randn(1 << 15, scale=3.0)])
    fn = ACTIVATIONS["gelu"].fn
    gate_up = torch.cat([x, torch.ones_like(x)]).view(1, -1).requires_grad_()
    ours = torch.ops.ffn.gated_activation(gate_up, "gelu").flatten()
    ours.sum().backward()
    ours_grad = gate_up.grad.flatten()[:x.numel()]
    view = vector_rows(x).requires_grad_()  # ATen's vectorized loop, as in aten_vectorized
    theirs = fn(view)
    theirs.sum().backward()
    theirs, theirs_grad = theirs[0, :x.numel()].detach(), view.grad[0, :x.numel()]
    x64 = x.double().requires_grad_()
    fn(x64).sum().backward()
    assert torch.equal(ours.detach(), theirs)
    ours_err, aten_err = ulp_error(ours_grad, x64.grad), ulp_error(theirs_grad, x64.grad)
    assert ours_err.max() <= aten_err.max() * 1.001, "max ulp error"
    assert ours_err.mean() <= aten_err.mean() * 1.01, "mean ulp error"
    assert ours_err.median() <= aten_err.median() + 0.25, "median ulp error"


@pytest.mark.parametrize("act", GATED_ACTS)
def test_gated_activation_gradcheck(act, device):
    gate_up = randn(2, 3, 10, dtype=torch.float64, device=device, scale=2.0, requires_grad=True)
    assert torch.autograd.gradcheck(lambda gu: torch.ops.ffn.gated_activation(gu, act), (gate_up,))


@pytest.mark.parametrize("with_bias", (True, False), ids=("bias", "nobias"))
@pytest.mark.parametrize("approximate", ("none", "tanh"))
def test_bias_gelu_gradcheck(approximate, with_bias, device):
    x = randn(2, 3, 6, dtype=torch.float64, device=device, scale=2.0, requires_grad=True)
    bias = randn(6, dtype=torch.float64, device=device, requires_grad=True) if with_bias else None
    assert torch.autograd.gradcheck(lambda x, b: torch.ops.ffn.bias_gelu(x, b, approximate), (x, bias))


def test_elementwise_double_backward_raises(device):
    gate_up = randn(3, 8, dtype=torch.float64, device=device, requires_grad=True)
    (g,) = torch.autograd.grad(torch.ops.ffn.gated_activation(gate_up).pow(2).sum(), gate_up, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward through gated_activation is not supported"):
        g.sum().backward()
    x = randn(3, 8, dtype=torch.float64, device=device, requires_grad=True)
    (g,) = torch.autograd.grad(torch.ops.ffn.bias_gelu(x, None).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward through bias_gelu is not supported"):
        g.sum().backward()


# ----------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("case", [FFNS[0], SWIGLU], ids=str)
def test_ffn_weight_grads_deterministic(case):
    """Weight and bias gradients are bit-identical run to run and for 1 vs 2 threads."""
    inputs = ffn_inputs(case, (512,), 64, torch.float32, "cpu", d_ff=48, requires_grad=True)
    grad_out = torch.randn(512, 64)

    def param_grads():
        return torch.autograd.grad(case.ours(*inputs), inputs[1:], grad_out)

    assert_same_across_threads(param_grads)


def test_bias_gelu_bias_grad_deterministic():
    x = randn(2000, 40, scale=2.0)
    bias = randn(40, requires_grad=True)
    grad = torch.randn_like(x)
    assert_same_across_threads(lambda: torch.autograd.grad(torch.ops.ffn.bias_gelu(x, bias), bias, grad))
