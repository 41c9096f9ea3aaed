"""The norm options of SPEC "Norm options": zero-centered gamma (weight_offset), the
fused residual add + norm (add_layer_norm, add_rms_norm) and the in-place backward
(in_place_backward), for both norms.

weight_offset is judged against the float64 reference and, to the bit, against the
plain op with the weight (weight + offset) formed in float32 (what Gemma's RMSNorm
computes). The fused add + norms must give the unfused pair's numbers to the bit:
s = x + residual as torch rounds it, y = norm(s), and in backward the gradients of
x, residual, weight and bias that autograd computes for `s = x + residual; y = norm(s)`.
"""

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ffn
from helpers import HALF_DTYPES, NORM_DTYPE_IDS, NORM_DTYPES, SHORT, assert_accurate, randn, run_three_ways

pytestmark = pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight:UserWarning")

NORMS = ("layer_norm", "rms_norm")

EPS = {"layer_norm": 1e-5, "rms_norm": 1e-6}
# Tails, one warp, several warps and (on CUDA) the long-row kernels.
DIMS = (1, 7, 64, 127, 4097, 16385)


def rows_for(d):
    return max(3, min(33, 65536 // d))


def params(d, dtype, device, with_bias=True):
    w = randn(d, dtype=dtype, device=device, scale=0.3, requires_grad=True)
    b = randn(d, dtype=dtype, device=device, scale=0.5, requires_grad=True) if with_bias else None
    return w, b


def op(name):
    return getattr(torch.ops.ffn, name)


# ----------------------------------------------------------------------------- weight_offset
@pytest.mark.parametrize("dtypes", NORM_DTYPES, ids=NORM_DTYPE_IDS)
@pytest.mark.parametrize("d", (7, 64, 4097))
@pytest.mark.parametrize("name", NORMS)
def test_weight_offset_against_float64(name, d, dtypes, device):
    x_dtype, p_dtype = dtypes
    x = randn(rows_for(d), d, dtype=x_dtype, device=device, scale=2.0, shift=0.5, requires_grad=True)
    w, b = params(d, p_dtype, device)
    grad_out = torch.randn(x.shape, device=device).to(x_dtype)
    (ours, theirs, ref), grads = run_three_ways(
        lambda x, w, b: op(name)(x, w, b, EPS[name], 1.0),
        lambda x, w, b: getattr(ffn.reference, name)(x, w, b, EPS[name], 1.0),
        (x, w, b), grad_out)
    assert ours.dtype == x_dtype
    rows = x.shape[0]
    assert_accurate(ours, ref, theirs, terms=d)
    for g_name, (g, g_theirs, g_ref), terms in zip(("grad_x", "grad_weight", "grad_bias"), grads, (d, rows, rows)):
        # grad_x cancels: its rounding errors scale with its terms, about |g| * rstd <= 4 here.
        scale = 4 * g_ref.abs().max().item() if g_name == "grad_x" else None
        assert_accurate(g, g_ref, g_theirs, terms=terms, name=g_name, scale=scale)


@pytest.mark.parametrize("dtypes", NORM_DTYPES, ids=NORM_DTYPE_IDS)
@pytest.mark.parametrize("name", NORMS)
def test_weight_offset_is_the_float32_weight_plus_offset(name, dtypes, device):
    """x_hat * (1 + w) with 1 + w formed in float32 (float64 for float64): Gemma's RMSNorm,
    TransformerEngine's zero_centered_gamma. Forward and gradients to the bit."""
    x_dtype, p_dtype = dtypes
    d = 200
    x = randn(9, d, dtype=x_dtype, device=device, scale=2.0, requires_grad=True)
    w, b = params(d, p_dtype, device)
    acc = torch.float64 if x_dtype == torch.float64 else torch.float32
    grad_out = torch.randn(x.shape, device=device).to(x_dtype)

    y = op(name)(x, w, b, EPS[name], 1.0)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), grad_out)
    scale = (w.detach().to(acc) + 1).requires_grad_()
    b_acc = b.detach().to(acc).requires_grad_()
    y_plain = op(name)(x, scale, b_acc, EPS[name])
    gx_plain, gs_plain, gb_plain = torch.autograd.grad(y_plain, (x, scale, b_acc), grad_out)
    assert torch.equal(y, y_plain)
    assert torch.equal(gx, gx_plain)
    assert torch.equal(gw, gs_plain.to(gw.dtype)) and gw.dtype == w.dtype
    assert torch.equal(gb, gb_plain.to(gb.dtype))


@pytest.mark.parametrize("name", NORMS)
def test_weight_offset_default_and_gradcheck(name, device):
    x = randn(2, 3, 7, dtype=torch.float64, device=device, shift=0.5, requires_grad=True)
    w, b = params(7, torch.float64, device)
    assert torch.equal(op(name)(x, w, b), op(name)(x, w, b, EPS[name], 0.0))
    assert torch.autograd.gradcheck(lambda x, w, b: op(name)(x, w, b, EPS[name], 1.0), (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w, b: op(name)(x, w, b, EPS[name], -0.25), (x, w, b))


# ----------------------------------------------------------------------------- fused residual add
def unfused(name, x, residual, w, b, eps, offset):
    s = x + residual
    return op(name)(s, w, b, eps, offset), s


def fused_and_unfused_grads(name, x, residual, w, b, offset, grad_y, grad_s):
    """(fused outputs and gradients, unfused ones): gradients of <y, grad_y> + <s, grad_s>."""
    results = []
    for fn in (lambda *a: op("add_" + name)(*a), lambda *a: unfused(name, *a)):
        leaves = [t if t is None else t.detach().requires_grad_() for t in (x, residual, w, b)]
        y, s = fn(*leaves, EPS[name], offset)
        outs = [(y, grad_y), (s, grad_s)]
        outs = [(o, g) for o, g in outs if g is not None]
        wanted = [t for t in leaves if t is not None]
        grads = torch.autograd.grad([o for o, _ in outs], wanted, [g for _, g in outs], allow_unused=True)
        results.append((y, s, grads))
    return results


@pytest.mark.parametrize("offset", (0.0, 1.0))
@pytest.mark.parametrize("dtypes", NORM_DTYPES, ids=NORM_DTYPE_IDS)
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("name", NORMS)
def test_add_norm_equals_the_unfused_pair(name, d, dtypes, offset, device):
    x_dtype, p_dtype = dtypes
    shape = (rows_for(d), d)
    x = randn(*shape, dtype=x_dtype, device=device, scale=2.0, shift=0.5)
    residual = randn(*shape, dtype=x_dtype, device=device, scale=3.0)
    w, b = params(d, p_dtype, device)
    grad_y = torch.randn(shape, device=device).to(x_dtype)
    grad_s = torch.randn(shape, device=device).to(x_dtype)
    (y, s, grads), (y_ref, s_ref, grads_ref) = fused_and_unfused_grads(
        name, x, residual, w, b, offset, grad_y, grad_s)
    assert s.dtype == x_dtype and y.dtype == x_dtype
    assert torch.equal(s, s_ref), "s"
    assert torch.equal(y, y_ref), "y"
    for g_name, g, g_ref in zip(("x", "residual", "weight", "bias"), grads, grads_ref, strict=True):
        assert g.dtype == g_ref.dtype and torch.equal(g, g_ref), f"grad of {g_name}"


@pytest.mark.parametrize("used", ("y", "s"))
@pytest.mark.parametrize("name", NORMS)
def test_add_norm_one_output_used(name, used, device):
    """Only y or only s reaches the loss: the other output's gradient is None (not zeros)."""
    x = randn(5, 24, device=device)
    residual = randn(5, 24, device=device)
    w, b = params(24, torch.float32, device)
    g = torch.randn(5, 24, device=device)
    (_, _, grads), (_, _, grads_ref) = fused_and_unfused_grads(
        name, x, residual, w, b, 0.0, g if used == "y" else None, g if used == "s" else None)
    for got, want in zip(grads, grads_ref, strict=True):
        assert (got is None) == (want is None)
        if got is not None:
            assert torch.equal(got, want)
    if used == "s":  # s = x + residual: grad_s passes straight through
        assert torch.equal(grads[0], g) and torch.equal(grads[1], g)


@pytest.mark.parametrize("name", NORMS)
def test_add_norm_shapes_and_layouts(name, device):
    """3-D, non-contiguous x and residual, no parameters, and 0 rows."""
    x = randn(4, 3, 16, device=device).transpose(0, 1)
    residual = randn(3, 4, 16, device=device)
    y, s = op("add_" + name)(x, residual, None, None)
    y_ref, s_ref = getattr(ffn.reference, "add_" + name)(x, residual)
    assert y.shape == s.shape == x.shape and y.is_contiguous() and s.is_contiguous()
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)
    torch.testing.assert_close(y, y_ref)
    empty = randn(0, 16, device=device)
    y0, s0 = op("add_" + name)(empty, empty, *params(16, torch.float32, device))
    assert y0.shape == s0.shape == (0, 16)


@pytest.mark.parametrize("name", NORMS)
def test_add_norm_gradcheck(name, device):
    x = randn(2, 3, 7, dtype=torch.float64, device=device, requires_grad=True)
    residual = randn(2, 3, 7, dtype=torch.float64, device=device, shift=0.5, requires_grad=True)
    w, b = params(7, torch.float64, device)
    for offset in (0.0, 1.0):
        assert torch.autograd.gradcheck(lambda *a: op("add_" + name)(*a, EPS[name], offset), (x, residual, w, b))


@pytest.mark.parametrize("name", NORMS)
def test_add_norm_outputs_own_their_storage(name, device):
    """y may be added into in place under autograd; s is saved for backward (like
    torch.exp's output), so modifying it in place is autograd's usual error."""
    x, residual = randn(3, 8, device=device, requires_grad=True), randn(3, 8, device=device)
    y, s = op("add_" + name)(x, residual, *params(8, torch.float32, device))
    for t in (y, s):
        assert t._base is None and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    y += 1
    (y.square().sum() + s.sum()).backward()
    assert x.grad is not None
    y, s = op("add_" + name)(x, residual, None, None)
    s += 1
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (y.sum() + s.sum()).backward()


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=SHORT.get)
@pytest.mark.parametrize("name", NORMS)
def test_add_norm_autocast_cpu_leaves_norms_alone(name, dtype):
    """Under CPU autocast the norms (fused or not) run in their input's dtype, as torch's do."""
    x, residual = randn(4, 16), randn(4, 16)
    w, b = params(16, torch.float32, "cpu")
    with torch.autocast("cpu", dtype=dtype):
        y, s = op("add_" + name)(x, residual, w, b)
    assert y.dtype == s.dtype == torch.float32
    y_ref, s_ref = unfused(name, x, residual, w, b, EPS[name], 0.0)
    assert torch.equal(y, y_ref) and torch.equal(s, s_ref)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", NORMS)
def test_add_norm_autocast_cuda_runs_in_float32(name):
    """Under CUDA autocast the norms run in float32 (torch's layer_norm rule), the fused add too."""
    x, residual = randn(4, 16, dtype=torch.bfloat16, device="cuda"), randn(4, 16, dtype=torch.bfloat16, device="cuda")
    w, b = params(16, torch.bfloat16, "cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, s = op("add_" + name)(x, residual, w, b)
        y_plain = op(name)(x.float() + residual.float(), w, b)
    assert y.dtype == s.dtype == torch.float32
    assert torch.equal(s, x.float() + residual.float()) and torch.equal(y, y_plain)


# ----------------------------------------------------------------------------- in-place backward
def grad_capture(t, seen):
    """Records the data pointer of the gradient reaching t (then drops the reference)."""
    t.register_hook(lambda g: seen.append(g.data_ptr()))


@pytest.mark.parametrize("fused", (False, True), ids=("norm", "add-norm"))
@pytest.mark.parametrize("dtypes", [NORM_DTYPES[1], NORM_DTYPES[4]], ids=["f32", "bf16-wf32"])
@pytest.mark.parametrize("name", NORMS)
def test_in_place_backward_writes_grad_x_into_grad_y(name, dtypes, fused, device):
    """Same gradients as the out-of-place backward, and x.grad is the output gradient's own
    buffer (no new activation-sized tensor)."""
    x_dtype, p_dtype = dtypes
    d = 96
    x0 = randn(8, d, dtype=x_dtype, device=device, scale=2.0)
    r0 = randn(8, d, dtype=x_dtype, device=device)
    w0, b0 = params(d, p_dtype, device)
    c = torch.randn(8, d, device=device).to(x_dtype)
    results = []
    for in_place in (False, True):
        x, w, b = (t.detach().requires_grad_() for t in (x0, w0, b0))
        if fused:
            y, s = op("add_" + name)(x, r0, w, b, EPS[name], 1.0, in_place)
        else:
            y = op(name)(x, w, b, EPS[name], 1.0, in_place)
        seen = []
        grad_capture(y, seen)
        (y * c).sum().backward()  # grad_y = c, a fresh tensor only this backward holds
        results.append((x.grad, w.grad, b.grad))
        assert (x.grad.data_ptr() == seen[0]) == in_place
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", NORMS)
def test_in_place_backward_leaves_shared_gradients_alone(name, device):
    """A gradient autograd also passes elsewhere, or one the caller holds, is not overwritten."""
    x = randn(4, 16, device=device, requires_grad=True)
    z = randn(4, 16, device=device, requires_grad=True)
    w, b = params(16, torch.float32, device)
    (op(name)(x, w, b, EPS[name], 0.0, True) + z).backward(torch.ones(4, 16, device=device))
    assert torch.equal(z.grad, torch.ones(4, 16, device=device))  # the add passed one tensor to both
    gx_in_place = x.grad
    x.grad = None
    (op(name)(x, w, b, EPS[name]) + z).backward(torch.ones(4, 16, device=device))
    assert torch.equal(gx_in_place, x.grad)
    g = torch.randn(4, 16, device=device)
    g_copy = g.clone()
    op(name)(x, w, b, EPS[name], 0.0, True).backward(g)
    assert torch.equal(g, g_copy)


# What can still see the output gradient once the norm's backward has run. Each case runs backward
# with dL/dy = c and returns what its observer holds as dL/dy afterwards (None: nothing is left).
class _KeepAndPass(torch.autograd.Function):
    """An identity whose backward keeps the gradient it passes on (user code that logs or clips)."""

    @staticmethod
    def forward(ctx, t, kept):
        ctx.kept = kept
        return t.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.kept.append(grad)
        return grad, None


def _tensor_hook(x, y, c):
    seen = []
    y.register_hook(seen.append)
    (y * c).sum().backward()
    return seen[0]


def _tensor_hook_keeping_a_view(x, y, c):
    seen = []
    y.register_hook(lambda g: seen.append(g[:, 1:]))
    (y * c).sum().backward()
    return torch.cat([c[:, :1], seen[0]], dim=1)


def _weak_reference(x, y, c):
    seen = []
    y.register_hook(lambda g: seen.append(weakref.ref(g)))
    (y * c).sum().backward()
    return seen[0]()


def _grad_fn_pre_hook(x, y, c):
    seen = []
    y.grad_fn.register_prehook(lambda grad_outputs: seen.append(grad_outputs[0]))
    (y * c).sum().backward()
    return seen[0]


def _grad_fn_post_hook(x, y, c):
    seen = []
    y.grad_fn.register_hook(lambda grad_inputs, grad_outputs: seen.append(grad_outputs[0]))
    (y * c).sum().backward()
    return seen[0]


def _retained_grad(x, y, c):
    y.retain_grad()
    (y * c).sum().backward()
    return y.grad


def _user_function(x, y, c):
    kept = []
    (_KeepAndPass.apply(y, kept) * c).sum().backward()
    return kept[0]


class _KeepOutputs(TorchDispatchMode):
    """A dispatch mode that keeps every op's output (a debugging or logging tool)."""

    def __init__(self):
        super().__init__()
        self.outputs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.outputs.append((func, out))
        return out


def _dispatch_mode(x, y, c):
    with _KeepOutputs() as mode:
        (y * c).sum().backward()
    products = [out for func, out in mode.outputs if func is torch.ops.aten.mul.Tensor]
    return products[-1]  # the backward's grad * c, the gradient reaching y


def _passed_by_caller(x, y, c):
    grad = c.clone()
    y.backward(grad)
    return grad


def _asked_of_autograd_grad(x, y, c):
    grad_y, x.grad = torch.autograd.grad((y * c).sum(), (y, x))
    return grad_y


OBSERVERS = {
    "tensor-hook": _tensor_hook, "tensor-hook-keeping-a-view": _tensor_hook_keeping_a_view,
    "weak-reference": _weak_reference, "grad_fn-pre-hook": _grad_fn_pre_hook,
    "grad_fn-post-hook": _grad_fn_post_hook, "retained-grad": _retained_grad, "user-function": _user_function,
    "dispatch-mode": _dispatch_mode, "passed-by-caller": _passed_by_caller,
    "autograd.grad-of-y": _asked_of_autograd_grad,
}


@pytest.mark.parametrize("observer", OBSERVERS)
@pytest.mark.parametrize("fused", (False, True), ids=("norm", "add-norm"))
@pytest.mark.parametrize("name", NORMS)
def test_in_place_backward_is_never_observed(name, fused, observer, device):
    """Whatever still holds the output gradient after backward (a hook, a retained grad, a user
    Function, the caller, autograd.grad) holds dL/dy, not dL/dx written over it; x.grad is the
    out-of-place one. A weak reference finds the gradient gone, as without the flag."""
    x0 = randn(4, 16, device=device, scale=2.0)
    r0 = randn(4, 16, device=device)
    w, b = params(16, torch.float32, device)
    c = randn(4, 16, device=device)
    grads = []
    for in_place in (False, True):
        x = x0.detach().requires_grad_()
        if fused:
            y, _s = op("add_" + name)(x, r0, w, b, EPS[name], 0.0, in_place)
        else:
            y = op(name)(x, w, b, EPS[name], 0.0, in_place)
        seen = OBSERVERS[observer](x, y, c)
        if observer == "weak-reference":
            assert seen is None
        else:
            assert torch.equal(seen, c)
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("module", ("RMSNorm", "LayerNorm", "AddRMSNorm", "AddLayerNorm"))
def test_in_place_backward_module_full_backward_hook(module, device):
    """register_full_backward_hook (it wraps the module's outputs in an identity Function that keeps
    their gradients for the hook): grad_output is dL/dy and grad_input dL/dx, not both dL/dx."""
    norm = getattr(ffn, module)(16, in_place_backward=True, device=device)
    x = randn(4, 16, device=device, requires_grad=True)
    c = randn(4, 16, device=device)
    seen = []
    norm.register_full_backward_hook(lambda mod, grad_in, grad_out: seen.append((grad_in[0].clone(),
                                                                                 grad_out[0].clone())))
    out = norm(x, randn(4, 16, device=device)) if module.startswith("Add") else norm(x)
    y = out[0] if module.startswith("Add") else out
    (y * c).sum().backward()
    grad_in, grad_out = seen[0]
    assert torch.equal(grad_out, c)
    assert torch.equal(grad_in, x.grad)


@pytest.mark.parametrize("name", NORMS)
def test_in_place_backward_one_gradient_for_y_and_s(name, device):
    """((y + s) * 2).sum(): autograd hands the fused norm one tensor as both grad_y and grad_s."""
    x0, r0 = randn(4, 16, device=device, scale=2.0), randn(4, 16, device=device)
    w0, b0 = params(16, torch.float32, device)
    results = []
    for in_place in (False, True):
        x, r, w, b = (t.detach().requires_grad_() for t in (x0, r0, w0, b0))
        y, s = op("add_" + name)(x, r, w, b, EPS[name], 0.0, in_place)
        ((y + s) * 2).sum().backward()
        results.append((x.grad, r.grad, w.grad, b.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("consumer", ("linear", "swiglu"))
def test_in_place_backward_reuses_what_layers_pass(consumer, device):
    """The gradient a layer passes back (nn.Linear's from C++, ffn.SwiGLU's from ffn's Python
    backward) is autograd's alone: x.grad is written into it, with the out-of-place numbers."""
    layer = (torch.nn.Linear(16, 16, device=device) if consumer == "linear"
             else ffn.SwiGLU(16, 32, device=device))
    x0 = randn(4, 16, device=device, scale=2.0)
    grads = []
    for in_place in (False, True):
        norm = ffn.RMSNorm(16, in_place_backward=in_place, device=device)
        x = x0.detach().requires_grad_()
        y = norm(x)
        seen = []
        grad_capture(y, seen)
        layer(y).square().sum().backward()
        assert (x.grad.data_ptr() == seen[0]) == in_place
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1])


def peak_cpu_bytes(fn):
    """The most CPU memory fn holds allocated at once (beyond what it starts with), from the
    profiler's allocation and free events."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("fused", (False, True), ids=("norm", "add-norm"))
@pytest.mark.parametrize("name", NORMS)
def test_in_place_backward_saves_one_activation(name, fused):
    """Measured: the peak of forward + backward is one activation-sized buffer (rows * d * 4 bytes)
    lower with the flag."""
    rows, d = 256, 1024
    x0, r0, c = randn(rows, d), randn(rows, d), randn(rows, d)
    peaks = []
    for in_place in (False, True):
        x = x0.detach().requires_grad_()

        def step():
            y = op("add_" + name)(x, r0, None, None, EPS[name], 0.0, in_place)[0] if fused else \
                op(name)(x, None, None, EPS[name], 0.0, in_place)
            (y * c).sum().backward()

        peaks.append(peak_cpu_bytes(step))
    saved = peaks[0] - peaks[1]
    # Up to 1% off: when the small tensors (statistics, the loss) are freed shifts a little.
    assert abs(saved - rows * d * 4) <= rows * d * 4 // 100, (peaks, saved)


@pytest.mark.slow
@pytest.mark.parametrize("name", NORMS)
def test_in_place_backward_op_and_compile(name, device):
    """opcheck of the in-place backward op; under torch.compile the flag changes nothing."""
    x, residual, w, b, eps, offset = option_samples(device)[0]
    y, s, *stats = op(f"_add_{name}_fwd")(x.detach(), residual.detach(), w.detach(), b.detach(), eps, offset)
    torch.library.opcheck(op(f"_{name}_bwd_"),
                          (torch.randn_like(y), s, *stats, w.detach(), b.detach(), True, True, offset,
                           torch.randn_like(s)))
    fn = lambda x: op(name)(x, w, b, eps, offset, True).square().sum()  # noqa: E731
    (g_eager,) = torch.autograd.grad(fn(x), x)
    (g_compiled,) = torch.autograd.grad(torch.compile(fn, fullgraph=True)(x), x)
    torch.testing.assert_close(g_compiled, g_eager)


def test_in_place_backward_modules():
    norm = ffn.RMSNorm(16, in_place_backward=True)
    assert "in_place_backward=True" in repr(norm)
    x = randn(3, 16, requires_grad=True)
    seen = []
    y = norm(x)
    grad_capture(y, seen)
    (y * 2).sum().backward()
    assert x.grad.data_ptr() == seen[0]
    fused = ffn.AddLayerNorm(16, in_place_backward=True)
    x.grad = None
    y, s = fused(x, randn(3, 16))
    y.sum().backward()
    assert x.grad is not None


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("name", NORMS)
def test_option_errors(name):
    x = randn(3, 8)
    w = randn(8)
    with pytest.raises(RuntimeError, match=rf"ffn\.{name}: weight_offset \(1\) scales a weight, but weight is None"):
        op(name)(x, None, None, 1e-5, 1.0)
    with pytest.raises(RuntimeError, match=rf"ffn\.{name}: weight_offset must be a finite number, got inf"):
        op(name)(x, w, None, 1e-5, float("inf"))
    add = f"add_{name}"
    with pytest.raises(RuntimeError, match=rf"ffn\.{add}: residual must have x's shape \[3, 8\] and dtype Float, "
                                           r"got \[3, 7\] of Float"):
        op(add)(x, randn(3, 7), w, None)
    with pytest.raises(RuntimeError, match=rf"ffn\.{add}: residual must have x's shape \[3, 8\] and dtype Float, "
                                           r"got \[3, 8\] of BFloat16"):
        op(add)(x, randn(3, 8, dtype=torch.bfloat16), w, None)
    with pytest.raises(RuntimeError, match=rf"ffn\.{add}: residual is on meta but x is on cpu"):
        op(add)(x, torch.empty(3, 8, device="meta"), w, None)
    with pytest.raises(RuntimeError, match=rf"ffn\.{add}: eps must be a finite number >= 0"):
        op(add)(x, x, w, None, -1.0)
    with pytest.raises(RuntimeError, match=rf"ffn\.{add}: weight must have shape \[8\]"):
        op(add)(x, x, randn(7), None)
    _, *stats = op(f"_{name}_fwd")(x, w, None, 1e-5)
    with pytest.raises(RuntimeError, match=rf"ffn\._{name}_bwd_: the in-place backward writes grad_x into "
                                           r"grad_y, which must be contiguous"):
        op(f"_{name}_bwd_")(randn(8, 3).t(), x, *stats, w, None, True, False)


# ----------------------------------------------------------------------------- opcheck, compile
def option_samples(device):
    """(x, residual, weight, bias, eps, weight_offset) samples: float32, bf16 x with float32
    parameters, float64, no parameters, and a non-contiguous x."""
    def rg(t):
        return t.requires_grad_()

    f32, bf16 = torch.float32, torch.bfloat16
    return [
        (rg(randn(2, 3, 16, device=device)), rg(randn(2, 3, 16, device=device)), rg(randn(16, device=device)),
         rg(randn(16, device=device)), 1e-5, 1.0),
        (rg(randn(5, 16, dtype=bf16, device=device)), rg(randn(5, 16, dtype=bf16, device=device)),
         rg(randn(16, dtype=f32, device=device)), None, 1e-6, 0.0),
        (rg(randn(4, 16, dtype=torch.float64, device=device)), rg(randn(4, 16, dtype=torch.float64, device=device)),
         rg(randn(16, dtype=torch.float64, device=device)), rg(randn(16, dtype=torch.float64, device=device)), 1e-5,
         1.0),
        (rg(randn(16, 4, device=device).t()), randn(4, 16, device=device), None, None, 1e-3, 0.0),
    ]


@pytest.mark.slow
@pytest.mark.parametrize("name", NORMS)
def test_opcheck_option_ops(name, device):
    for x, residual, w, b, eps, offset in option_samples(device):
        torch.library.opcheck(op(f"_add_{name}_fwd"), (x, residual, w, b, eps, offset))
        if w is not None:
            torch.library.opcheck(op(f"_{name}_fwd"), (x, w, b, eps, offset))
    x, residual, w, b, eps, offset = option_samples(device)[0]
    torch.library.opcheck(op(f"add_{name}"), (x, residual, w, b, eps, offset))
    torch.library.opcheck(op(name), (x, w, b, eps, offset))
    # The backward op with both options: weight_offset and the gradient of s.
    y, s, *stats = op(f"_add_{name}_fwd")(x.detach(), residual.detach(), w.detach(), b.detach(), eps, offset)
    grad_y, grad_s = torch.randn_like(y), torch.randn_like(s)
    torch.library.opcheck(op(f"_{name}_bwd"), (grad_y, s, *stats, w.detach(), b.detach(), True, True, offset, grad_s))


@pytest.mark.slow
def test_compiled_pre_norm_block_with_options_matches_eager(device):
    """A Gemma-style pre-norm residual step under torch.compile(fullgraph=True): the fused
    add + zero-centered RMSNorm, then a tanh GeGLU and a second fused add."""
    d, d_ff = 16, 24
    w1 = randn(d, device=device, scale=0.1, requires_grad=True)
    w2 = randn(d, device=device, scale=0.1, requires_grad=True)
    wgu = randn(2 * d_ff, d, device=device, scale=d**-0.5, requires_grad=True)
    wd = randn(d, d_ff, device=device, scale=d_ff**-0.5, requires_grad=True)

    def block(x, residual):
        h, residual = torch.ops.ffn.add_rms_norm(x, residual, w1, None, 1e-6, 1.0)
        h = torch.ops.ffn.geglu(h, wgu, None, wd, None, "tanh")
        y, residual = torch.ops.ffn.add_layer_norm(h, residual, w2, None, 1e-5, 1.0)
        return y, residual

    x, residual = randn(2, 5, d, device=device, requires_grad=True), randn(2, 5, d, device=device)
    compiled = torch.compile(block, fullgraph=True)
    eager_out = block(x, residual)
    compiled_out = compiled(x, residual)
    for a, b in zip(eager_out, compiled_out):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    loss = lambda out: out[0].square().sum() + out[1].sum()  # noqa: E731
    params = (x, w1, w2, wgu, wd)
    eager_grads = torch.autograd.grad(loss(block(x, residual)), params)
    compiled_grads = torch.autograd.grad(loss(compiled(x, residual)), params)
    for a, b in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- modules
def test_gemma_rms_norm_module():
    norm = ffn.GemmaRMSNorm(32)
    assert torch.equal(norm.weight, torch.zeros(32)) and norm.weight_offset == 1.0 and norm.eps == 1e-6
    with torch.no_grad():
        norm.weight.normal_()
    x = randn(3, 32, dtype=torch.bfloat16)
    # Gemma's own formula (transformers' GemmaRMSNorm).
    xf = x.float()
    expected = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + norm.weight.float())).to(x.dtype)
    torch.testing.assert_close(norm(x), expected, rtol=0, atol=torch.finfo(torch.bfloat16).eps)
    plain_torch = ffn.GemmaRMSNorm(32, backend="torch")
    plain_torch.load_state_dict(norm.state_dict())
    torch.testing.assert_close(plain_torch(x), norm(x), rtol=0, atol=torch.finfo(torch.bfloat16).eps)
    assert list(norm.state_dict()) == ["weight"]
    assert "weight_offset=1.0" in repr(norm)
    with pytest.raises(ValueError, match="weight_offset=1.0 needs a weight"):
        ffn.RMSNorm(8, elementwise_affine=False, weight_offset=1.0)


@pytest.mark.parametrize("backend", ("ffn", "torch"))
@pytest.mark.parametrize("cls,plain", [(ffn.AddLayerNorm, ffn.LayerNorm), (ffn.AddRMSNorm, ffn.RMSNorm)])
def test_add_norm_modules(cls, plain, backend):
    fused, ref = cls(16, backend=backend), plain(16, backend=backend)
    assert list(fused.state_dict()) == list(ref.state_dict())
    with torch.no_grad():
        fused.weight.normal_()
    ref.load_state_dict(fused.state_dict())
    x, residual = randn(2, 3, 16), randn(2, 3, 16)
    y, s = fused(x, residual)
    assert torch.equal(s, x + residual)
    torch.testing.assert_close(y, ref(x + residual), rtol=0, atol=0)
    multi = cls((2, 8), backend=backend)  # several trailing dims, flattened like the plain norm's
    y2, s2 = multi(x.view(2, 3, 2, 8), residual.view(2, 3, 2, 8))
    assert y2.shape == s2.shape == (2, 3, 2, 8)
    with pytest.raises(ValueError, match="residual must have the input's shape"):
        fused(x, residual[:1])
