"""Everything of the ffn ops that the LibTorch stable ABI leaves to Python.

The schemas and the CPU/CUDA kernels are registered in C++ (csrc/ops.cpp,
csrc/cpu/ops.cpp, csrc/cuda/ops.cpp) on the stable ABI. Here:
- the public ops' composite kernels: layer_norm/rms_norm/add_layer_norm/
  add_rms_norm/gelu_ffn/relu_ffn/swiglu/geglu/reglu are
  CompositeImplicitAutograd over an internal `_<op>_fwd` (as aten::layer_norm
  over aten::native_layer_norm), so they need no autograd or fake kernel of
  their own;
- fake kernels for every op that has backend kernels, so torch.compile and
  FakeTensor can trace them (same shapes, dtypes and strides as the real ones);
- autograd for the internal forward ops; their backward calls only registered
  `_*_bwd` ops, so AOTAutograd traces the backward too;
- the autocast rules of the internal forward ops, and ffn_stats's Autograd
  kernel (it runs below autograd: statistics never require grad).
"""

import math
import sys
import weakref

import torch
from torch.autograd import forward_ad

from .activations import ACTIVATIONS, GATED_OPS, GELU_APPROXIMATIONS
from .telemetry import STAT_FIELDS

_lib = "ffn::"
# Kernels registered from Python (autograd, composites, autocast rules).
_impl_lib = torch.library.Library("ffn", "IMPL")
_BELOW_AUTOGRAD = torch._C._after_autograd_keyset


def _register_autograd(name, backward, setup_context):
    """What torch.library.register_autograd(name, backward, setup_context=...) registers, without
    the per-call cost of its generality (schema defaults filled in and return counts checked in
    Python, keyword-only arguments): a Python kernel at the Autograd key that runs an
    autograd.Function around the op's backend kernel, so eager autograd, torch.compile and
    AOTAutograd see the same thing. As there, setup_context gets every argument, the defaults the
    dispatcher dropped filled back in, and backward returns a gradient for each."""
    op = getattr(torch.ops.ffn, name).default
    defaults = tuple(argument.default_value for argument in op._schema.arguments)

    def forward(ctx, *args_and_keyset):
        *args, keyset = args_and_keyset
        with torch._C._AutoDispatchBelowAutograd():
            output = op.redispatch(keyset & _BELOW_AUTOGRAD, *args)
        ctx.n_args = len(args)
        setup_context(ctx, (*args, *defaults[len(args):]), output)
        return output

    def backward_of_args(ctx, *grads):
        ctx.needs_input_grad = ctx.needs_input_grad[:ctx.n_args]  # without the keyset's
        return (*backward(ctx, *grads)[:ctx.n_args], None)

    function = type(f"Ffn{name}Backward", (torch.autograd.Function,),
                    {"forward": staticmethod(forward), "backward": staticmethod(backward_of_args)})

    def autograd_kernel(keyset, *args):
        if _autograd_records(*args):
            if torch._C._are_functorch_transforms_active():
                _refuse_functorch_autograd(name)
            return function.apply(*args, keyset)
        _refuse_forward_ad(name, args)
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & _BELOW_AUTOGRAD, *args)

    _impl_lib.impl(name, autograd_kernel, "Autograd", with_keyset=True)


def _autograd_records(*args):
    """Whether autograd records an op call on these arguments: grad mode on and a tensor among them
    requiring grad (None and non-tensor arguments count as not)."""
    return torch.is_grad_enabled() and torch._C._any_requires_grad(*args)


def _refuse_functorch_autograd(name):
    """Under torch.func's differentiating transforms (grad, vjp, jacrev, hessian) autograd.Function
    needs a setup_context that works from inside an op's Autograd kernel, which PyTorch does not
    offer (its own torch.library.custom_op ops fail the same way). autograd.Function.apply would
    raise here with a message about setup_context; this one says what to do instead."""
    raise RuntimeError(
        f"ffn.{name}: torch.func transforms that differentiate (grad, vjp, jacrev, hessian) are not supported "
        "by the ffn ops; use torch.autograd.grad or .backward() (torch.autograd.functional.jacobian for "
        "Jacobians); torch.vmap works")


def _refuse_forward_ad(name, args):
    """The ops have no forward-mode formulas: below autograd a dual input's tangent would be
    dropped and the output come back without one, a silently wrong jvp. (Where an input requires
    grad, autograd.Function refuses forward mode itself.) The dual level is looked up first, so
    calls outside torch.autograd.forward_ad / torch.func.jvp cost nothing more."""
    if getattr(forward_ad, "_current_level", -1) < 0:
        return
    if any(isinstance(a, torch.Tensor) and forward_ad.unpack_dual(a).tangent is not None for a in args):
        raise RuntimeError(
            f"ffn.{name} got an input with a forward-mode tangent (torch.autograd.forward_ad, "
            "torch.func.jvp): the ffn ops have backward formulas only; use reverse mode (backward, "
            "torch.autograd.grad)")


def _stat_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _rows(x):
    return math.prod(x.shape[:-1])


def _check_devices(op, x, **tensors):
    """The C++ ops' device check, repeated here for the meta device: with x on one
    device and another tensor on "meta", the dispatcher picks the Meta kernel (this
    fake) and it would hand back an uninitialized tensor on x's device."""
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise RuntimeError(
                f"ffn.{op}: {name} is on {t.device} but x is on {x.device}; "
                "all tensors must be on the same device"
            )


# The C++ ops' argument checks (csrc/common.cpp, norm.cpp, ffn.cpp), repeated for the fake kernels:
# on the meta device and under FakeTensorMode (torch.compile's tracing) only the fakes run, and
# without these they would give a result shape for arguments the real kernels reject. Same
# messages; torch._check keeps them valid for symbolic sizes.
_C10_DTYPE_NAMES = {
    torch.float64: "Double", torch.float32: "Float", torch.float16: "Half", torch.bfloat16: "BFloat16",
    torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
    torch.bool: "Bool", torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble",
}
_FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _dtype_name(dtype):
    return _C10_DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def _fail_unless(condition, op, message):
    torch._check(condition, lambda: f"ffn.{op}: {message()}")


def _check_input(op, name, x):
    _fail_unless(x.dim() >= 1, op, lambda: f"{name} must have at least 1 dimension (features last), got a 0-dim tensor")
    _fail_unless(x.dtype in _FLOAT_DTYPES, op,
                 lambda: f"{name} must be float64, float32, float16 or bfloat16, got {_dtype_name(x.dtype)}")


def _check_vector_param(op, name, param, x, size, allow_float32):
    if param is None:
        return
    _fail_unless(param.dim() == 1 and param.shape[0] == size, op,
                 lambda: f"{name} must have shape [{size}], got {list(param.shape)}")
    half_x = x.dtype in (torch.float16, torch.bfloat16)
    _fail_unless(param.dtype == x.dtype or (allow_float32 and half_x and param.dtype == torch.float32), op,
                 lambda: f"{name} must have x's dtype ({_dtype_name(x.dtype)})"
                         f"{' or float32' if allow_float32 and half_x else ''}, got {_dtype_name(param.dtype)}")


def _check_linear_weight(op, name, weight, x, rows, cols):
    _fail_unless(weight.dim() == 2, op,
                 lambda: f"{name} must be a 2-D [out_features, in_features] weight, got shape {list(weight.shape)}")
    _fail_unless(weight.shape[1] == cols and (rows is None or weight.shape[0] == rows), op,
                 lambda: f"{name} must have shape [{'*' if rows is None else rows}, {cols}], got {list(weight.shape)}")
    _fail_unless(weight.dtype == x.dtype, op,
                 lambda: f"{name} must have x's dtype ({_dtype_name(x.dtype)}), got {_dtype_name(weight.dtype)} "
                         "(cast the weights, or run under torch.autocast)")


def _check_norm_args(op, x, weight, bias, eps, weight_offset):
    """norm_forward's checks after x's (and residual's): parameters, weight_offset, eps."""
    d = x.shape[-1]
    _check_vector_param(op, "weight", weight, x, d, allow_float32=True)
    _check_vector_param(op, "bias", bias, x, d, allow_float32=True)
    if weight is not None and bias is not None:
        _fail_unless(bias.dtype == weight.dtype, op, lambda: f"bias must have weight's dtype "
                                                             f"({_dtype_name(weight.dtype)}), got {_dtype_name(bias.dtype)}")
    _fail_unless(math.isfinite(weight_offset), op, lambda: f"weight_offset must be a finite number, got {weight_offset:g}")
    _fail_unless(weight_offset == 0 or weight is not None, op,
                 lambda: f"weight_offset ({weight_offset:g}) scales a weight, but weight is None")
    _fail_unless(math.isfinite(eps) and eps >= 0, op, lambda: f"eps must be a finite number >= 0, got {eps:g}")


def _check_gelu_approximate(op, approximate):
    _fail_unless(approximate in GELU_APPROXIMATIONS, op,
                 lambda: f"approximate must be 'none' or 'tanh' (as in F.gelu), got '{approximate}'")


def _check_gated_activation(op, activation):
    names = list(ACTIVATIONS)
    expected = ", ".join(f"'{n}'" for n in names[:-1]) + f" or '{names[-1]}'"
    _fail_unless(activation in ACTIVATIONS, op, lambda: f"activation must be {expected}, got '{activation}'")


def _empty_grad(t, size, param):
    """A parameter gradient: `size` elements in the parameter's dtype, or [0] when not asked for."""
    dtype = param.dtype if param is not None else t.dtype
    return t.new_empty((size,), dtype=dtype)


def _run_backward_op(op, *args):
    """Runs one of the _*_bwd ops, which the backward formulas call. Outside create_graph it runs
    below autograd: its Autograd kernel only refuses double backward, and skipping it saves a
    Python redispatch per call. Under create_graph it goes through that kernel (and refuses)."""
    if torch.is_grad_enabled():
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


# ----------------------------------------------------------------------------- norms
def _like_x(x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake(_lib + "_layer_norm_fwd")
def _layer_norm_fwd_fake(x, weight, bias, eps, weight_offset=0.0, in_place_backward=False, op="layer_norm"):
    _check_devices(op, x, weight=weight, bias=bias)
    _check_input(op, "x", x)
    _check_norm_args(op, x, weight, bias, eps, weight_offset)
    stats = x.shape[:-1]
    return _like_x(x), x.new_empty(stats, dtype=_stat_dtype(x)), x.new_empty(stats, dtype=_stat_dtype(x))


@torch.library.register_fake(_lib + "_rms_norm_fwd")
def _rms_norm_fwd_fake(x, weight, bias, eps, weight_offset=0.0, in_place_backward=False, op="rms_norm"):
    _check_devices(op, x, weight=weight, bias=bias)
    _check_input(op, "x", x)
    _check_norm_args(op, x, weight, bias, eps, weight_offset)
    return _like_x(x), x.new_empty(x.shape[:-1], dtype=_stat_dtype(x))


def _check_residual(op, x, residual):
    _check_devices(op, x, residual=residual)
    _check_input(op, "x", x)
    _fail_unless(residual.shape == x.shape and residual.dtype == x.dtype, op,
                 lambda: f"residual must have x's shape {list(x.shape)} and dtype {_dtype_name(x.dtype)}, "
                         f"got {list(residual.shape)} of {_dtype_name(residual.dtype)}")


@torch.library.register_fake(_lib + "_add_layer_norm_fwd")
def _add_layer_norm_fwd_fake(x, residual, weight, bias, eps, weight_offset=0.0, in_place_backward=False):
    _check_residual("add_layer_norm", x, residual)
    y, mean, rstd = _layer_norm_fwd_fake(x, weight, bias, eps, weight_offset, op="add_layer_norm")
    return y, _like_x(x), mean, rstd


@torch.library.register_fake(_lib + "_add_rms_norm_fwd")
def _add_rms_norm_fwd_fake(x, residual, weight, bias, eps, weight_offset=0.0, in_place_backward=False):
    _check_residual("add_rms_norm", x, residual)
    y, rstd = _rms_norm_fwd_fake(x, weight, bias, eps, weight_offset, op="add_rms_norm")
    return y, _like_x(x), rstd


def _norm_bwd_fake(op, grad_y, x, stats, weight, bias, weight_grad, bias_grad, grad_s):
    _check_devices(op, x, **{"the output gradient": grad_y, "grad_s": grad_s}, **stats, weight=weight, bias=bias)
    d = x.shape[-1]
    return (
        _like_x(x),
        _empty_grad(x, d if weight_grad else 0, weight),
        _empty_grad(x, d if bias_grad else 0, bias),
    )


@torch.library.register_fake(_lib + "_layer_norm_bwd")
def _layer_norm_bwd_fake(grad_y, x, mean, rstd, weight, bias, weight_grad, bias_grad, weight_offset=0.0,
                         grad_s=None):
    return _norm_bwd_fake("layer_norm", grad_y, x, {"mean": mean, "rstd": rstd}, weight, bias, weight_grad,
                          bias_grad, grad_s)


@torch.library.register_fake(_lib + "_rms_norm_bwd")
def _rms_norm_bwd_fake(grad_y, x, rstd, weight, bias, weight_grad, bias_grad, weight_offset=0.0, grad_s=None):
    return _norm_bwd_fake("rms_norm", grad_y, x, {"rstd": rstd}, weight, bias, weight_grad, bias_grad, grad_s)


@torch.library.register_fake(_lib + "_layer_norm_bwd_")
def _layer_norm_bwd_in_place_fake(grad_y, x, mean, rstd, weight, bias, weight_grad, bias_grad, weight_offset=0.0,
                                  grad_s=None):
    return _norm_bwd_fake("_layer_norm_bwd_", grad_y, x, {"mean": mean, "rstd": rstd}, weight, bias, weight_grad,
                          bias_grad, grad_s)[1:]


@torch.library.register_fake(_lib + "_rms_norm_bwd_")
def _rms_norm_bwd_in_place_fake(grad_y, x, rstd, weight, bias, weight_grad, bias_grad, weight_offset=0.0,
                                grad_s=None):
    return _norm_bwd_fake("_rms_norm_bwd_", grad_y, x, {"rstd": rstd}, weight, bias, weight_grad, bias_grad,
                          grad_s)[1:]


def _save_options(ctx, static):
    """The norm ops' arguments after the tensors: eps, weight_offset, in_place_backward."""
    _eps, ctx.weight_offset, ctx.in_place_backward = static
    ctx.n_static = len(static)


def _references(grad):
    """Everything that can reach grad's memory, counted: Python references to the tensor, weak
    references to it, C++ references to its TensorImpl, and references to its storage (views,
    .data, a kept untyped_storage())."""
    return (sys.getrefcount(grad), weakref.getweakrefcount(grad), grad._use_count(),
            torch._C._storage_Use_Count(grad.untyped_storage()._cdata))


# type(ctx) of each norm's backward -> _references() of an output gradient that nothing but autograd
# holds, as _can_overwrite sees it there; measured once, by _measure_sole_owner_references.
_SOLE_OWNER_REFERENCES = {}
_sole_owner_measured = False


def _measure_sole_owner_references():
    """Runs each norm's backward on an output gradient that only autograd holds (made by autograd
    from (y * c).sum()), with _can_overwrite recording _references() there. What they are depends
    on the torch version (torch 2.11's engine keeps its own reference to the gradients it hands a
    Python backward, later versions drop it: one more C++ and one more Python reference on 2.11)
    and on the Python frames in between, so they are measured, not assumed. Torch function and
    dispatch modes and autocast are off: nothing the caller set up may hold these gradients."""
    global _sole_owner_measured
    _sole_owner_measured = True
    ops = torch.ops.ffn
    with (torch.enable_grad(), torch.autocast("cpu", enabled=False), torch._C.DisableTorchFunction(),
          torch._C._DisableTorchDispatch()):
        x = torch.arange(2.0, device="cpu").view(1, 2).requires_grad_()
        c = torch.ones(1, 2, device="cpu")
        for y, *_ in (ops._layer_norm_fwd(x, None, None, 1e-5, 0.0, True),
                      ops._rms_norm_fwd(x, None, None, 1e-5, 0.0, True),
                      ops._add_layer_norm_fwd(x, c, None, None, 1e-5, 0.0, True),
                      ops._add_rms_norm_fwd(x, c, None, None, 1e-5, 0.0, True)):
            y.grad_fn._ffn_measure_references = True
            torch.autograd.grad((y * c).sum(), x)


def _can_overwrite(ctx, grad, like):
    """Whether backward may write grad_x into `grad`, the output gradient autograd handed to ctx's
    backward: only when nothing but autograd's hand-off can reach it. A plain, contiguous tensor of
    x's shape and dtype that owns its whole storage, and whose _references() are exactly those of a
    gradient only autograd holds: anything else that holds it or its memory (a tensor hook, a grad_fn
    pre- or post-hook, a module's full backward hook, a user Function that passes it on and keeps
    it, the caller of .backward(), autograd.grad capturing it, another consumer, a view, a weak
    reference) adds a reference. Never while tracing (torch.compile reuses dead buffers itself) or
    under create_graph."""
    if not (type(grad) is torch.Tensor and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and not grad._is_view() and grad.is_contiguous()
            and grad.dtype == like.dtype and grad.shape == like.shape
            and grad.untyped_storage().nbytes() == grad.numel() * grad.element_size()):
        return False
    references = _references(grad)
    if getattr(ctx, "_ffn_measure_references", False):
        _SOLE_OWNER_REFERENCES[type(ctx)] = references
        return False
    if not _sole_owner_measured:
        _measure_sole_owner_references()
    return references == _SOLE_OWNER_REFERENCES.get(type(ctx))


def _norm_grads(ctx, bwd_op, bwd_in_place_op, grad_y, x, stats, weight, bias, grad_s=None):
    """(grad_x, grad_weight, grad_bias) of the norm of x (grad_s added to grad_x); grad_x is
    grad_y itself, overwritten, with in_place_backward when _can_overwrite(grad_y)."""
    need_w, need_b = ctx.needs_input_grad[ctx.n_inputs - 2:ctx.n_inputs]
    args = (x, *stats, weight, bias, need_w, need_b, ctx.weight_offset, grad_s)
    if ctx.in_place_backward and _can_overwrite(ctx, grad_y, x):
        gw, gb = _run_backward_op(bwd_in_place_op, grad_y, *args)
        gx = grad_y
    else:
        gx, gw, gb = _run_backward_op(bwd_op, grad_y, *args)
    return gx, gw if need_w else None, gb if need_b else None


def _norm_setup_context(ctx, inputs, output):
    x, weight, bias, *static = inputs
    _y, *stats = output
    ctx.mark_non_differentiable(*stats)
    ctx.set_materialize_grads(False)  # no zero gradients built for the statistics
    ctx.save_for_backward(x, weight, bias, *stats)
    ctx.n_inputs = 3  # x, weight, bias
    _save_options(ctx, static)


def _make_norm_backward(bwd_op, bwd_in_place_op):
    def backward(ctx, grad_y, *_grad_stats):
        if grad_y is None:
            return (None,) * (3 + ctx.n_static)
        x, weight, bias, *stats = ctx.saved_tensors
        gx, gw, gb = _norm_grads(ctx, bwd_op, bwd_in_place_op, grad_y, x, stats, weight, bias)
        return (gx if ctx.needs_input_grad[0] else None, gw, gb, *(None,) * ctx.n_static)

    return backward


_register_autograd(
    "_layer_norm_fwd", _make_norm_backward(torch.ops.ffn._layer_norm_bwd, torch.ops.ffn._layer_norm_bwd_),
    setup_context=_norm_setup_context,
)
_register_autograd(
    "_rms_norm_fwd", _make_norm_backward(torch.ops.ffn._rms_norm_bwd, torch.ops.ffn._rms_norm_bwd_),
    setup_context=_norm_setup_context,
)


# Fused residual add + norm: s = x + residual, y = norm(s). Backward saves s (an output)
# and runs the norm's backward op on it with grad_s added to its grad_x, which is then
# the gradient of both x and residual.
def _add_norm_setup_context(ctx, inputs, output):
    _x, _residual, weight, bias, *static = inputs
    _y, s, *stats = output
    ctx.mark_non_differentiable(*stats)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(s, weight, bias, *stats)
    ctx.n_inputs = 4  # x, residual, weight, bias
    _save_options(ctx, static)


def _make_add_norm_backward(bwd_op, bwd_in_place_op):
    def backward(ctx, grad_y, grad_s, *_grad_stats):
        need_x, need_residual = ctx.needs_input_grad[:2]
        gw = gb = None
        if grad_y is None:
            gx = grad_s  # y unused: s = x + residual passes grad_s through
        else:
            s, weight, bias, *stats = ctx.saved_tensors
            gx, gw, gb = _norm_grads(ctx, bwd_op, bwd_in_place_op, grad_y, s, stats, weight, bias, grad_s)
        return (gx if need_x else None, gx if need_residual else None, gw, gb, *(None,) * ctx.n_static)

    return backward


_register_autograd(
    "_add_layer_norm_fwd",
    _make_add_norm_backward(torch.ops.ffn._layer_norm_bwd, torch.ops.ffn._layer_norm_bwd_),
    setup_context=_add_norm_setup_context,
)
_register_autograd(
    "_add_rms_norm_fwd",
    _make_add_norm_backward(torch.ops.ffn._rms_norm_bwd, torch.ops.ffn._rms_norm_bwd_),
    setup_context=_add_norm_setup_context,
)


# ----------------------------------------------------------------------------- FFNs
def _ffn_fwd_fake(op, x, w_in, b_in, w_out, b_out, gated, keep_preact):
    names = ("w_gate_up", "b_gate_up", "w_down", "b_down") if gated else ("w1", "b1", "w2", "b2")
    _check_devices(op, x, **dict(zip(names, (w_in, b_in, w_out, b_out))))
    _check_input(op, "x", x)
    _check_linear_weight(op, names[0], w_in, x, None, x.shape[-1])
    if gated:
        _fail_unless(w_in.shape[0] % 2 == 0, op, lambda: "w_gate_up must have an even number of rows "
                                                         f"([2*d_ff, d]: gate rows, then up rows), got {w_in.shape[0]}")
    _check_linear_weight(op, names[2], w_out, x, None, w_in.shape[0] // 2 if gated else w_in.shape[0])
    _check_vector_param(op, names[1], b_in, x, w_in.shape[0], allow_float32=False)
    _check_vector_param(op, names[3], b_out, x, w_out.shape[0], allow_float32=False)
    return (
        x.new_empty((*x.shape[:-1], w_out.shape[0])),
        x.new_empty((_rows(x), w_in.shape[0]) if keep_preact else (0,)),
    )


@torch.library.register_fake(_lib + "_gelu_ffn_fwd")
def _gelu_ffn_fwd_fake(x, w1, b1, w2, b2, approximate, keep_preact=True):
    _check_gelu_approximate("gelu_ffn", approximate)
    return _ffn_fwd_fake("gelu_ffn", x, w1, b1, w2, b2, gated=False, keep_preact=keep_preact)


@torch.library.register_fake(_lib + "_relu_ffn_fwd")
def _relu_ffn_fwd_fake(x, w1, b1, w2, b2, keep_preact=True):
    return _ffn_fwd_fake("relu_ffn", x, w1, b1, w2, b2, gated=False, keep_preact=keep_preact)


@torch.library.register_fake(_lib + "_gated_ffn_fwd")
def _gated_ffn_fwd_fake(x, w_gate_up, b_gate_up, w_down, b_down, activation, keep_preact=True):
    _check_gated_activation("_gated_ffn_fwd", activation)
    spec = ACTIVATIONS.get(activation)
    op = spec.gated_op if spec is not None and spec.gated_op else "_gated_ffn_fwd"
    return _ffn_fwd_fake(op, x, w_gate_up, b_gate_up, w_down, b_down, gated=True, keep_preact=keep_preact)


def _ffn_bwd_fake(op, grad_out, x, preact, w_in, w_out, grad_mask):
    gated = op == "_gated_ffn_bwd"
    _check_devices(op, x, **{"the output gradient": grad_out, "preact": preact,
                             ("w_gate_up" if gated else "w1"): w_in, ("w_down" if gated else "w2"): w_out})
    shapes = (x.shape, w_in.shape, w_in.shape[:1], w_out.shape, w_out.shape[:1])
    return tuple(x.new_empty(shape if needed else (0,)) for shape, needed in zip(shapes, grad_mask))


@torch.library.register_fake(_lib + "_gelu_ffn_bwd")
def _gelu_ffn_bwd_fake(grad_out, x, preact, w1, w2, approximate, grad_mask):
    return _ffn_bwd_fake("_gelu_ffn_bwd", grad_out, x, preact, w1, w2, grad_mask)


@torch.library.register_fake(_lib + "_relu_ffn_bwd")
def _relu_ffn_bwd_fake(grad_out, x, preact, w1, w2, grad_mask):
    return _ffn_bwd_fake("_relu_ffn_bwd", grad_out, x, preact, w1, w2, grad_mask)


@torch.library.register_fake(_lib + "_gated_ffn_bwd")
def _gated_ffn_bwd_fake(grad_out, x, preact, w_gate_up, w_down, activation, grad_mask):
    return _ffn_bwd_fake("_gated_ffn_bwd", grad_out, x, preact, w_gate_up, w_down, grad_mask)


def _make_ffn_setup_context(name):
    def setup_context(ctx, inputs, output):
        x, w_in, _b_in, w_out, _b_out, *activation, keep_preact = inputs  # relu_ffn has no activation argument
        if not keep_preact:
            raise RuntimeError(
                f"ffn.{name}: keep_preact=False keeps no pre-activation for backward, but autograd is "
                "recording this call; pass keep_preact=True (the default) when gradients are needed")
        _out, preact = output
        ctx.mark_non_differentiable(preact)
        # Else autograd fills a zero gradient for the pre-activation, as large as it is,
        # on every backward (about 3% of a CPU FFN step).
        ctx.set_materialize_grads(False)
        # x and the pre-activation; the weights are parameters, held anyway.
        ctx.save_for_backward(x, preact, w_in, w_out)
        ctx.activation = activation

    return setup_context


def _make_ffn_backward(bwd_op):
    def backward(ctx, grad_out, _grad_preact):
        if grad_out is None:
            return (None,) * (6 + len(ctx.activation))
        x, preact, w_in, w_out = ctx.saved_tensors
        grad_mask = list(ctx.needs_input_grad[:5])
        grads = _run_backward_op(bwd_op, grad_out, x, preact, w_in, w_out, *ctx.activation, grad_mask)
        # None for the activation and keep_preact (trimmed to the arguments the call passed).
        return (*(g if needed else None for g, needed in zip(grads, grad_mask)), *(None,) * (len(ctx.activation) + 1))

    return backward


_register_autograd(
    "_gelu_ffn_fwd",
    _make_ffn_backward(torch.ops.ffn._gelu_ffn_bwd),
    setup_context=_make_ffn_setup_context("_gelu_ffn_fwd"),
)
_register_autograd(
    "_relu_ffn_fwd",
    _make_ffn_backward(torch.ops.ffn._relu_ffn_bwd),
    setup_context=_make_ffn_setup_context("_relu_ffn_fwd"),
)
_register_autograd(
    "_gated_ffn_fwd",
    _make_ffn_backward(torch.ops.ffn._gated_ffn_bwd),
    setup_context=_make_ffn_setup_context("_gated_ffn_fwd"),
)


# ----------------------------------------------------------------------------- elementwise pieces
@torch.library.register_fake(_lib + "gated_activation")
def _gated_activation_fake(gate_up, activation="silu"):
    _check_input("gated_activation", "gate_up", gate_up)
    _check_gated_activation("gated_activation", activation)
    _fail_unless(gate_up.shape[-1] % 2 == 0, "gated_activation",
                 lambda: f"gate_up's last dimension must be even ([..., 2*d_ff]: gate, then up), got {gate_up.shape[-1]}")
    return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))


@torch.library.register_fake(_lib + "_gated_activation_bwd")
def _gated_activation_bwd_fake(grad, gate_up, activation):
    _check_devices("_gated_activation_bwd", gate_up, **{"the output gradient": grad})
    return gate_up.new_empty(gate_up.shape)


def _gated_activation_setup_context(ctx, inputs, output):
    gate_up, activation = inputs
    ctx.save_for_backward(gate_up)
    ctx.activation = activation


def _gated_activation_backward(ctx, grad):
    (gate_up,) = ctx.saved_tensors
    return _run_backward_op(torch.ops.ffn._gated_activation_bwd, grad, gate_up, ctx.activation), None


_register_autograd(
    "gated_activation",
    _gated_activation_backward,
    setup_context=_gated_activation_setup_context,
)


@torch.library.register_fake(_lib + "bias_gelu")
def _bias_gelu_fake(x, bias, approximate="none"):
    _check_devices("bias_gelu", x, bias=bias)
    _check_input("bias_gelu", "x", x)
    _check_gelu_approximate("bias_gelu", approximate)
    _check_vector_param("bias_gelu", "bias", bias, x, x.shape[-1], allow_float32=False)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake(_lib + "_bias_gelu_bwd")
def _bias_gelu_bwd_fake(grad, x, bias, approximate, bias_grad):
    _check_devices("_bias_gelu_bwd", x, **{"the output gradient": grad}, bias=bias)
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        x.new_empty((x.shape[-1] if bias_grad else 0,)),
    )


def _bias_gelu_setup_context(ctx, inputs, output):
    x, bias, approximate = inputs
    ctx.save_for_backward(x, bias)
    ctx.approximate = approximate


def _bias_gelu_backward(ctx, grad):
    x, bias = ctx.saved_tensors
    need_x, need_b = ctx.needs_input_grad[:2]
    gx, gb = _run_backward_op(torch.ops.ffn._bias_gelu_bwd, grad, x, bias, ctx.approximate, need_b)
    return gx if need_x else None, gb if need_b else None, None


_register_autograd(
    "bias_gelu", _bias_gelu_backward, setup_context=_bias_gelu_setup_context
)


# ----------------------------------------------------------------------------- telemetry
@torch.library.register_fake(_lib + "ffn_stats")
def _ffn_stats_fake(ffn_input, preact, activation, gated, near_zero=None, large=None, outlier=None):
    # The thresholds do not change the result's shape; they are passed only when the caller gave them.
    return preact.new_empty((len(STAT_FIELDS),), dtype=torch.float64)


# ----------------------------------------------------------------------------- double backward
# The backward ops have no derivatives of their own: say so instead of letting
# autograd silently treat them as constants.
def _no_double_backward(name):
    def backward(ctx, *grads):
        raise RuntimeError(
            f"ffn: double backward through {name} is not supported "
            "(use the torch reference ops in ffn.reference for higher-order gradients)"
        )

    return backward


def _nothing_to_save(ctx, inputs, output):
    pass


for _name in (
    "_layer_norm_bwd",
    "_rms_norm_bwd",
    "_gelu_ffn_bwd",
    "_relu_ffn_bwd",
    "_gated_ffn_bwd",
    "_gated_activation_bwd",
    "_bias_gelu_bwd",
):
    _register_autograd(
        _name, _no_double_backward(_name.strip("_").removesuffix("_bwd")), setup_context=_nothing_to_save
    )


# ----------------------------------------------------------------------------- public composites
# The public ops run their internal forward op and return its first output(s).
# Registered here rather than in C++: a stable-ABI kernel that calls another op
# through the dispatcher sees only an error code when that op raises on torch
# < 2.13, so the argument errors of the internal op would lose their message.
def _composite(name, fn):
    _impl_lib.impl(name, fn, "CompositeImplicitAutograd")


# A Python composite gets the arguments as the caller passed them: the schema's
# defaults are repeated here.
def _norm_composite(fwd, default_eps):
    def composite(x, weight, bias, eps=default_eps, weight_offset=0.0, in_place_backward=False):
        return fwd(x, weight, bias, eps, weight_offset, in_place_backward)[0]

    return composite


def _add_norm_composite(fwd, default_eps):
    def composite(x, residual, weight, bias, eps=default_eps, weight_offset=0.0, in_place_backward=False):
        out = fwd(x, residual, weight, bias, eps, weight_offset, in_place_backward)
        return out[0], out[1]

    return composite


_composite("layer_norm", _norm_composite(torch.ops.ffn._layer_norm_fwd.default, 1e-5))
_composite("rms_norm", _norm_composite(torch.ops.ffn._rms_norm_fwd.default, 1e-6))
_composite("add_layer_norm", _add_norm_composite(torch.ops.ffn._add_layer_norm_fwd.default, 1e-5))
_composite("add_rms_norm", _add_norm_composite(torch.ops.ffn._add_rms_norm_fwd.default, 1e-6))
# The FFNs ask for the pre-activation (keep_preact) only when autograd records the call, as its
# backward needs it. When not (no_grad, inference_mode, nothing requires grad), the internal op
# returns none, and a plain FFN writes its activation over it: one [rows, d_ff] buffer fewer to
# allocate and fault in.
_composite("gelu_ffn", lambda x, w1, b1, w2, b2, approximate="none": torch.ops.ffn._gelu_ffn_fwd.default(
    x, w1, b1, w2, b2, approximate, _autograd_records(x, w1, b1, w2, b2))[0])
_composite("relu_ffn", lambda x, w1, b1, w2, b2: torch.ops.ffn._relu_ffn_fwd.default(
    x, w1, b1, w2, b2, _autograd_records(x, w1, b1, w2, b2))[0])


def _gated_composite(op, gate):
    """swiglu/geglu/reglu: _gated_ffn_fwd with the op's gate; approximate="tanh" selects
    the tanh GELU for a GELU gate (as in F.gelu) and is an error for the others."""

    def composite(x, w_gate_up, b_gate_up, w_down, b_down, approximate="none"):
        if gate == "gelu":
            activation = GELU_APPROXIMATIONS.get(approximate)
            if activation is None:
                raise RuntimeError(f"ffn.{op}: approximate must be 'none' or 'tanh' (as in F.gelu), "
                                   f"got '{approximate}'")
        elif approximate != "none":
            raise RuntimeError(f'ffn.{op}: approximate applies to GELU gates (geglu) only; expected "none", '
                               f'got "{approximate}"')
        else:
            activation = gate
        return torch.ops.ffn._gated_ffn_fwd.default(
            x, w_gate_up, b_gate_up, w_down, b_down, activation,
            _autograd_records(x, w_gate_up, b_gate_up, w_down, b_down))[0]

    return composite


for _op, _gate in GATED_OPS.items():
    _composite(_op, _gated_composite(_op, _gate))


# ----------------------------------------------------------------------------- vmap
# torch.vmap over the public ops. Every op works on rows: the norms normalize each row, the FFNs
# and elementwise pieces map each row of x to a row of the output. So when only the row inputs
# (x; and residual for the fused add + norms) are batched, the batch is more rows: the op runs
# once on them, with the batch dimension moved to the front (an unbatched residual expanded to
# it). Batched parameters (per-sample weights, as in model ensembling) run the op once per
# sample, which is what PyTorch's fallback would do, without its "performance drop" warning.
def _vmap_rule(op, row_args):
    def rule(info, in_dims, *args):
        params_batched = any(d is not None for i, d in enumerate(in_dims) if i not in row_args)
        if params_batched:
            samples = [op(*(a if d is None else a.select(d, i) for a, d in zip(args, in_dims)))
                       for i in range(info.batch_size)]
            if isinstance(samples[0], tuple):
                return tuple(torch.stack(outs) for outs in zip(*samples)), (0,) * len(samples[0])
            return torch.stack(samples), 0
        rows = list(args)
        for i in row_args:
            d = in_dims[i]
            rows[i] = (args[i].movedim(d, 0) if d is not None
                       else args[i].expand(info.batch_size, *args[i].shape))
        out = op(*rows)
        return out, (0,) * len(out) if isinstance(out, tuple) else 0

    torch.library.register_vmap(op._name, rule)


for _name, _row_args in (("layer_norm", (0,)), ("rms_norm", (0,)), ("add_layer_norm", (0, 1)),
                         ("add_rms_norm", (0, 1)), ("gelu_ffn", (0,)), ("relu_ffn", (0,)),
                         *((gated, (0,)) for gated in GATED_OPS), ("gated_activation", (0,)),
                         ("bias_gelu", (0,))):
    _vmap_rule(getattr(torch.ops.ffn, _name).default, _row_args)


# ----------------------------------------------------------------------------- autocast
# The FFN ops are linear layers: under autocast they run in its lower precision
# (CPU and CUDA). The norms run in float32 under CUDA autocast and untouched under
# CPU autocast, as torch's own norms; gelu and silu are left alone on both. The
# rules are on the internal forward ops, which the public ops call, so a caller
# of an internal op (for the pre-activation) gets the same casts. Casts follow
# autocast's own: floating tensors on the autocast device, never float64.
def _autocast_rule(op, device_type, to_float32):
    key = torch._C.DispatchKey.AutocastCUDA if device_type == "cuda" else torch._C.DispatchKey.AutocastCPU
    keys = torch._C.DispatchKeySet(key)

    def cast(value, dtype):
        if (isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64
                and value.device.type == device_type):
            return value.to(dtype)
        return value

    def kernel(*args):
        dtype = torch.float32 if to_float32 else torch.get_autocast_dtype(device_type)
        with torch._C._ExcludeDispatchKeyGuard(keys):
            return op(*(cast(arg, dtype) for arg in args))

    _impl_lib.impl(op._name.split("::")[1], kernel, "AutocastCUDA" if device_type == "cuda" else "AutocastCPU")


for _device in ("cpu", "cuda"):
    for _op in (torch.ops.ffn._gelu_ffn_fwd, torch.ops.ffn._relu_ffn_fwd, torch.ops.ffn._gated_ffn_fwd):
        _autocast_rule(_op.default, _device, to_float32=False)
for _op in (torch.ops.ffn._layer_norm_fwd, torch.ops.ffn._rms_norm_fwd, torch.ops.ffn._add_layer_norm_fwd,
            torch.ops.ffn._add_rms_norm_fwd):
    _autocast_rule(_op.default, "cuda", to_float32=True)


# ----------------------------------------------------------------------------- telemetry autograd
# ffn_stats is not differentiable: its Autograd kernel runs the backend kernel
# below autograd, so the stats never require grad (like torch.argmax), even when
# the FFN input they describe does.
def _ffn_stats_below_autograd(*args):
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.ffn.ffn_stats.default(*args)


_impl_lib.impl("ffn_stats", _ffn_stats_below_autograd, "Autograd")
