"""Bad input gets a clear error naming the argument and what was expected."""

import math
import re

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch._subclasses.fake_tensor import FakeTensorMode

import ffn
from ffn.activations import GATED_OPS
from test_outputs import public_calls


def norm_args(d=8, dtype=torch.float32):
    return torch.randn(3, d, dtype=dtype), torch.ones(d, dtype=dtype), torch.zeros(d, dtype=dtype)


def ffn_args(gated, d=8, d_ff=6, dtype=torch.float32):
    rows_in = 2 * d_ff if gated else d_ff
    return (torch.randn(3, d, dtype=dtype), torch.randn(rows_in, d, dtype=dtype), torch.randn(rows_in, dtype=dtype),
            torch.randn(d, d_ff, dtype=dtype), torch.randn(d, dtype=dtype))


FFN_OPS = ("gelu_ffn", "relu_ffn", *GATED_OPS)
NORM_OPS = ("layer_norm", "rms_norm")
# Names of the FFN arguments in messages: gelu_ffn's and the gated family's.
ARG_NAMES = {False: ("x", "w1", "b1", "w2", "b2"), True: ("x", "w_gate_up", "b_gate_up", "w_down", "b_down")}


def call_ffn(op, args):
    return getattr(torch.ops.ffn, op)(*args)


def raises(*fragments, exc=RuntimeError):
    """pytest.raises whose message must contain every fragment (in order)."""
    return pytest.raises(exc, match=".*".join(re.escape(f) for f in fragments))


@pytest.fixture(params=["cpu", "meta", "fake"])
def kernels(request):
    """Which kernels check the arguments: the real CPU ones; or the fake kernels alone, as on the
    meta device (tensors made inside the test land there) and under FakeTensorMode (torch.compile's
    tracing), where a shape the real kernels reject must not trace to a result."""
    if request.param == "cpu":
        yield
        return
    context = torch.device("meta") if request.param == "meta" else FakeTensorMode()
    with context:
        yield


# ----------------------------------------------------------------------------- norms
@pytest.mark.parametrize("op", NORM_OPS)
def test_norm_weight_wrong_size(op, kernels):
    x, w, b = norm_args()
    with raises(f"ffn.{op}: weight must have shape [8], got [9]"):
        getattr(torch.ops.ffn, op)(x, torch.ones(9), b)
    with raises(f"ffn.{op}: bias must have shape [8], got [8, 1]"):
        getattr(torch.ops.ffn, op)(x, w, b[:, None])
    with raises(f"ffn.{op}: weight must have shape [8], got [1]"):
        getattr(torch.ops.ffn, op)(x, torch.ones(1), None)  # no broadcasting


@pytest.mark.parametrize("op", NORM_OPS)
def test_norm_last_dim_mismatch(op, kernels):
    _, w, b = norm_args(8)
    with raises(f"ffn.{op}: weight must have shape [5]"):
        getattr(torch.ops.ffn, op)(torch.randn(2, 3, 5), w, None)
    with raises(f"ffn.{op}: bias must have shape [5]"):
        getattr(torch.ops.ffn, op)(torch.randn(2, 3, 5), None, b)


@pytest.mark.parametrize("dtype", (torch.int64, torch.int32, torch.bool, torch.complex64))
@pytest.mark.parametrize("op", NORM_OPS)
def test_norm_bad_input_dtype(op, dtype, kernels):
    x = torch.ones(3, 8, dtype=dtype)
    with raises(f"ffn.{op}: x must be float64, float32, float16 or bfloat16, got"):
        getattr(torch.ops.ffn, op)(x, None, None)


@pytest.mark.parametrize("op", NORM_OPS)
def test_norm_mixed_parameter_dtypes(op, kernels):
    x, w, b = norm_args()
    norm = getattr(torch.ops.ffn, op)
    with raises(f"ffn.{op}: weight must have x's dtype (Float), got Long"):
        norm(x, w.long(), None)
    with raises(f"ffn.{op}: weight must have x's dtype (Float), got BFloat16"):
        norm(x, w.bfloat16(), None)  # only float32 parameters may differ from a half x
    with raises(f"ffn.{op}: bias must have x's dtype (Double), got Float"):
        norm(x.double(), None, b)
    with raises(f"ffn.{op}: weight must have x's dtype (BFloat16) or float32, got Half"):
        norm(x.bfloat16(), w.half(), None)
    with raises(f"ffn.{op}: bias must have weight's dtype (Float), got BFloat16"):
        norm(x.bfloat16(), w, b.bfloat16())


@pytest.mark.parametrize("eps", (-1e-5, math.nan, math.inf, -math.inf))
@pytest.mark.parametrize("op", NORM_OPS)
def test_norm_bad_eps(op, eps, kernels):
    x, w, b = norm_args()
    with raises(f"ffn.{op}: eps must be a finite number >= 0, got"):
        getattr(torch.ops.ffn, op)(x, w, b, eps)


@pytest.mark.parametrize("op", NORM_OPS)
def test_norm_0dim_input(op, kernels):
    with raises(f"ffn.{op}: x must have at least 1 dimension"):
        getattr(torch.ops.ffn, op)(torch.tensor(1.0), None, None)


@pytest.mark.parametrize("op", NORM_OPS)
def test_add_norm_residual_mismatch(op, kernels):
    x, w, b = norm_args()
    add = getattr(torch.ops.ffn, f"add_{op}")
    with raises(f"ffn.add_{op}: residual must have x's shape [3, 8] and dtype Float, got [3, 7] of Float"):
        add(x, torch.randn(3, 7), w, b)
    with raises(f"ffn.add_{op}: residual must have x's shape [3, 8] and dtype Float, got [3, 8] of Double"):
        add(x, torch.randn(3, 8, dtype=torch.float64), w, b)
    with raises(f"ffn.add_{op}: weight must have shape [8], got [9]"):
        add(x, torch.randn(3, 8), torch.ones(9), b)


# ----------------------------------------------------------------------------- FFNs
@pytest.mark.parametrize("op", FFN_OPS)
def test_ffn_last_dim_mismatch(op, kernels):
    gated = op in GATED_OPS
    x, w_in, b_in, w_out, b_out = ffn_args(gated)
    x_, w_in_, b_in_, w_out_, b_out_ = ARG_NAMES[gated]
    rows_in = w_in.shape[0]
    with raises(f"ffn.{op}: {w_in_} must have shape [*, 9], got [{rows_in}, 8]"):
        call_ffn(op, (torch.randn(3, 9), w_in, b_in, w_out, b_out))
    with raises(f"ffn.{op}: {w_out_} must have shape [*, 6], got [8, 5]"):
        call_ffn(op, (x, w_in, b_in, w_out[:, :5], b_out))


@pytest.mark.parametrize("op", FFN_OPS)
def test_ffn_bias_wrong_size(op, kernels):
    gated = op in GATED_OPS
    x, w_in, b_in, w_out, b_out = ffn_args(gated)
    _, _, b_in_, _, b_out_ = ARG_NAMES[gated]
    with raises(f"ffn.{op}: {b_in_} must have shape [{w_in.shape[0]}], got [5]"):
        call_ffn(op, (x, w_in, b_in[:5], w_out, b_out))
    with raises(f"ffn.{op}: {b_out_} must have shape [8], got [1, 8]"):
        call_ffn(op, (x, w_in, b_in, w_out, b_out[None]))


@pytest.mark.parametrize("op", FFN_OPS)
def test_ffn_weight_not_2d(op, kernels):
    gated = op in GATED_OPS
    x, w_in, b_in, w_out, b_out = ffn_args(gated)
    w_in_ = ARG_NAMES[gated][1]
    with raises(f"ffn.{op}: {w_in_} must be a 2-D [out_features, in_features] weight, got shape"):
        call_ffn(op, (x, w_in[None], b_in, w_out, b_out))


@pytest.mark.parametrize("dtype", (torch.int64, torch.int32, torch.bool))
@pytest.mark.parametrize("op", FFN_OPS)
def test_ffn_integer_dtypes(op, dtype, kernels):
    gated = op in GATED_OPS
    x, w_in, b_in, w_out, b_out = ffn_args(gated)
    with raises(f"ffn.{op}: x must be float64, float32, float16 or bfloat16, got"):
        call_ffn(op, (x.to(dtype), w_in.to(dtype), b_in.to(dtype), w_out.to(dtype), b_out.to(dtype)))
    with raises(f"ffn.{op}: {ARG_NAMES[gated][1]} must have x's dtype (Float), got"):
        call_ffn(op, (x, w_in.to(dtype), b_in, w_out, b_out))


@pytest.mark.parametrize("op", FFN_OPS)
def test_ffn_mixed_dtypes(op, kernels):
    gated = op in GATED_OPS
    _, w_in_, b_in_, w_out_, b_out_ = ARG_NAMES[gated]
    x, w_in, b_in, w_out, b_out = ffn_args(gated)
    with raises(f"ffn.{op}: {w_in_} must have x's dtype (BFloat16), got Float", "autocast"):
        call_ffn(op, (x.bfloat16(), w_in, b_in, w_out, b_out))
    with raises(f"ffn.{op}: {w_out_} must have x's dtype (Float), got Double"):
        call_ffn(op, (x, w_in, b_in, w_out.double(), b_out))
    with raises(f"ffn.{op}: {b_in_} must have x's dtype (Float), got Half"):
        call_ffn(op, (x, w_in, b_in.half(), w_out, b_out))
    bf = [t.bfloat16() for t in (x, w_in, b_in, w_out)]
    with raises(f"ffn.{op}: {b_out_} must have x's dtype (BFloat16), got Float"):
        call_ffn(op, (*bf, b_out))  # unlike the norms' parameters: a linear bias takes x's dtype


@pytest.mark.parametrize("op", FFN_OPS)
def test_ffn_0dim_input(op, kernels):
    gated = op in GATED_OPS
    _, w_in, b_in, w_out, b_out = ffn_args(gated)
    with raises(f"ffn.{op}: x must have at least 1 dimension"):
        call_ffn(op, (torch.tensor(1.0), w_in, b_in, w_out, b_out))


@pytest.mark.parametrize("op", GATED_OPS)
def test_gated_odd_rows(op, kernels):
    x, w_in, b_in, w_out, b_out = ffn_args(True)
    with raises(f"ffn.{op}: w_gate_up must have an even number of rows", "got 11"):
        call_ffn(op, (x, w_in[:11], b_in[:11], w_out, b_out))


def test_gelu_ffn_bad_approximate(kernels):
    with raises("ffn.gelu_ffn: approximate must be 'none' or 'tanh' (as in F.gelu), got 'erf'"):
        torch.ops.ffn.gelu_ffn(*ffn_args(False), "erf")


def test_gated_ffn_bad_approximate(kernels):
    with raises("ffn.geglu: approximate must be 'none' or 'tanh' (as in F.gelu), got 'erf'"):
        torch.ops.ffn.geglu(*ffn_args(True), "erf")
    for op in [g for g, act in GATED_OPS.items() if act != "gelu"]:  # swiglu, reglu: no GELU gate
        with raises(f'ffn.{op}: approximate applies to GELU gates (geglu) only; expected "none", got "tanh"'):
            getattr(torch.ops.ffn, op)(*ffn_args(True), "tanh")


def test_gated_ffn_bad_activation(kernels):
    with raises("ffn._gated_ffn_fwd: activation must be 'silu', 'gelu', 'gelu_tanh' or 'relu', got 'swish'"):
        torch.ops.ffn._gated_ffn_fwd(*ffn_args(True), "swish")


# ----------------------------------------------------------------------------- elementwise pieces
def test_gated_activation_errors(kernels):
    with raises("ffn.gated_activation: activation must be 'silu', 'gelu', 'gelu_tanh' or 'relu', got 'tanh'"):
        torch.ops.ffn.gated_activation(torch.randn(3, 8), "tanh")
    with raises("ffn.gated_activation: gate_up's last dimension must be even", "got 7"):
        torch.ops.ffn.gated_activation(torch.randn(3, 7))
    with raises("ffn.gated_activation: gate_up must have at least 1 dimension"):
        torch.ops.ffn.gated_activation(torch.tensor(1.0))
    with raises("ffn.gated_activation: gate_up must be float64, float32, float16 or bfloat16, got Long"):
        torch.ops.ffn.gated_activation(torch.ones(3, 8, dtype=torch.long))


def test_bias_gelu_errors(kernels):
    x = torch.randn(3, 8)
    with raises("ffn.bias_gelu: approximate must be 'none' or 'tanh' (as in F.gelu), got 'erf'"):
        torch.ops.ffn.bias_gelu(x, None, "erf")
    with raises("ffn.bias_gelu: bias must have shape [8], got [7]"):
        torch.ops.ffn.bias_gelu(x, torch.zeros(7))
    with raises("ffn.bias_gelu: bias must have x's dtype (BFloat16), got Float"):
        torch.ops.ffn.bias_gelu(x.bfloat16(), torch.zeros(8))
    with raises("ffn.bias_gelu: x must have at least 1 dimension"):
        torch.ops.ffn.bias_gelu(torch.tensor(1.0), None)
    with raises("ffn.bias_gelu: x must be float64, float32, float16 or bfloat16, got Int"):
        torch.ops.ffn.bias_gelu(torch.ones(3, 8, dtype=torch.int32), None)


# ----------------------------------------------------------------------------- devices
OTHER_DEVICES = ["meta"] + (["cuda"] if torch.cuda.is_available() else [])


def device_cases():
    """(op name, callable(args), args, index of the argument to move, its name in messages)."""
    x, w, b = norm_args()
    for op in NORM_OPS:
        fn = getattr(torch.ops.ffn, op)
        for i, name in ((1, "weight"), (2, "bias")):
            yield op, fn, (x, w, b), i, name
    for op in FFN_OPS:
        gated = op in GATED_OPS
        for i in range(1, 5):
            yield op, getattr(torch.ops.ffn, op), ffn_args(gated), i, ARG_NAMES[gated][i]
    yield "bias_gelu", torch.ops.ffn.bias_gelu, (x, b), 1, "bias"


DEVICE_CASES = list(device_cases())


@pytest.mark.parametrize("other", OTHER_DEVICES)
@pytest.mark.parametrize("case", DEVICE_CASES, ids=[f"{c[0]}-{c[4]}" for c in DEVICE_CASES])
def test_tensors_on_different_devices(case, other):
    op, fn, args, i, name = case
    moved = list(args)
    moved[i] = moved[i].to(other)
    with raises(f"ffn.{op}: {name} is on {other}", "but x is on cpu", "same device"):
        fn(*moved)
    # And the other way round: x on the other device, the rest where it was.
    moved = [args[0].to(other), *args[1:]]
    with raises(f"ffn.{op}: ", f"is on cpu but x is on {other}", "same device"):
        fn(*moved)


@pytest.mark.parametrize("op", NORM_OPS + FFN_OPS)
def test_all_on_meta_works(op):
    """The meta device (shape inference, deferred init) runs the ops when every tensor is there."""
    args = norm_args() if op in NORM_OPS else ffn_args(op in GATED_OPS)
    out = getattr(torch.ops.ffn, op)(*[t.to("meta") for t in args])
    assert out.device.type == "meta" and out.shape == (3, 8)


# ----------------------------------------------------------------------------- modules
def test_module_input_shape_mismatch():
    with raises("LayerNorm: expected input with trailing shape (4, 8), got (2, 8, 4)", exc=ValueError):
        ffn.LayerNorm((4, 8))(torch.randn(2, 8, 4))
    with raises("RMSNorm: expected input with trailing shape (16,), got (2, 8)", exc=ValueError):
        ffn.RMSNorm(16)(torch.randn(2, 8))


def test_module_bad_backend():
    with raises("backend must be 'ffn' or 'torch', got 'triton'", exc=ValueError):
        ffn.SwiGLU(8, 16, backend="triton")


def test_from_linear_mismatched_layers():
    gate, up, down = torch.nn.Linear(8, 16), torch.nn.Linear(8, 12), torch.nn.Linear(16, 8)
    with raises("gate and up must be nn.Linear layers of the same shape", exc=ValueError):
        ffn.SwiGLU.from_linear(gate, up, down)
    with raises("gate/up and down must all have biases or all have none", exc=ValueError):
        ffn.SwiGLU.from_linear(gate, torch.nn.Linear(8, 16), torch.nn.Linear(16, 8, bias=False))


# ----------------------------------------------------------------------------- backward ops
@pytest.mark.parametrize("op", ("_relu_ffn_bwd", "_gelu_ffn_bwd"))
def test_ffn_backward_errors_name_their_op(op):
    """relu_ffn's and gelu_ffn's backward ops share one C++ body: each error names the op called."""
    x, w1, _b1, w2, _b2 = ffn_args(gated=False)
    bwd = getattr(torch.ops.ffn, op)
    approximate = ("none",) if op == "_gelu_ffn_bwd" else ()
    preact, grad, mask = torch.randn(3, 6), torch.randn(3, 8), [True] * 5
    with raises(f"ffn.{op}: the output gradient must have shape [3, 8] and dtype Float, got [3, 7] and Float"):
        bwd(grad[:, :7], x, preact, w1, w2, *approximate, mask)
    with raises(f"ffn.{op}: x must be float64, float32, float16 or bfloat16, got Int"):
        bwd(grad, x.int(), preact, w1, w2, *approximate, mask)


# ----------------------------------------------------------------------------- forward-mode AD
def outputs(result):
    return result if isinstance(result, tuple) else (result,)


# torch.func's first use scripts its decompositions, which warns that torch.jit.script is deprecated
# (a FutureWarning on torch 2.14, a DeprecationWarning on 2.11).
torch_func_scripts = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")


@torch_func_scripts
@pytest.mark.parametrize("name", ["layer_norm", "rms_norm", "add_rms_norm", "gelu_ffn", "relu_ffn", "gated_activation",
                                  "bias_gelu", *GATED_OPS])
def test_forward_mode_ad_refused_not_dropped(name):
    """The ops have no forward-mode formulas. A dual input is refused with an error saying so, rather
    than its tangent dropped (jvp would get no tangent back, or a zero one from torch.func.jvp);
    inputs without tangents give the usual results inside a dual level."""
    _, op, _, args = next(call for call in public_calls("cpu") if call[0] == name)
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    expected = outputs(op(*args))
    with fwAD.dual_level():
        assert all(torch.equal(a, b) for a, b in zip(outputs(op(*args)), expected, strict=True))
        for i, a in enumerate(args):
            if not isinstance(a, torch.Tensor):
                continue
            dual = list(args)
            dual[i] = fwAD.make_dual(a, torch.ones_like(a))
            with raises("got an input with a forward-mode tangent", "use reverse mode"):
                op(*dual)
            # Where another input requires grad, autograd.Function refuses forward mode itself.
            recorded = [t.detach().requires_grad_() if isinstance(t, torch.Tensor) and j != i else t
                        for j, t in enumerate(dual)]
            if any(isinstance(t, torch.Tensor) and t.requires_grad for t in recorded):
                with pytest.raises(NotImplementedError, match="jvp"):
                    op(*recorded)
    x = args[0]
    with raises("got an input with a forward-mode tangent"):
        torch.func.jvp(lambda t: op(t, *args[1:]), (x,), (torch.ones_like(x),))


@torch_func_scripts
@pytest.mark.parametrize("name", ["layer_norm", "rms_norm", "add_rms_norm", "gelu_ffn", "relu_ffn", "gated_activation",
                                  "bias_gelu", *GATED_OPS])
def test_func_transforms_that_differentiate_say_so(name):
    """torch.func.grad / vjp / jacrev are refused with an error naming the ffn op and what to use instead,
    not PyTorch's own message about autograd.Function's setup_context."""
    _, op, _, args = next(call for call in public_calls("cpu") if call[0] == name)
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    x, rest = args[0], args[1:]

    def loss(t):
        return sum(out.sum() for out in outputs(op(t, *rest)))

    refused = ("ffn.", "torch.func transforms that differentiate", "use torch.autograd.grad")
    with raises(*refused):
        torch.func.grad(loss)(x)
    with raises(*refused):
        torch.func.vjp(lambda t: outputs(op(t, *rest))[0], x)
    with raises(*refused):
        torch.func.jacrev(lambda t: outputs(op(t, *rest))[0])(x)
