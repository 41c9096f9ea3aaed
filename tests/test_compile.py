"""torch.library.opcheck for every op (public, internal forward/backward, elementwise),
and Transformer sublayers built from the modules, or from the ops, under
torch.compile(fullgraph=True)."""

import itertools

import pytest
import torch

import ffn
from ffn.activations import ACTIVATION_NAMES, GATED_OPS, GELU_APPROXIMATIONS
from helpers import randn

# opcheck and torch.compile trace and compile: seconds per test.
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight:UserWarning")]


def rg(t):
    return t.requires_grad_()


def norm_samples(device):
    """(x, weight, bias, eps): every optional-argument pattern, mixed precision, float64,
    frozen parameters with a non-contiguous x."""
    def sample(x_dtype, p_dtype, with_w, with_b, eps=1e-5):
        x = rg(randn(2, 3, 16, dtype=x_dtype, device=device))
        w = rg(randn(16, dtype=p_dtype, device=device)) if with_w else None
        b = rg(randn(16, dtype=p_dtype, device=device)) if with_b else None
        return x, w, b, eps

    f32, bf16 = torch.float32, torch.bfloat16
    return [
        sample(f32, f32, True, True), sample(f32, f32, True, False), sample(f32, f32, False, True),
        sample(f32, f32, False, False), sample(bf16, f32, True, True), sample(torch.float64, torch.float64, True, True),
        (rg(randn(16, 4, device=device).t()), randn(16, device=device), randn(16, device=device), 1e-3),
    ]


def ffn_samples(gated, device):
    """(x, w_in, b_in, w_out, b_out): float32 with biases, bfloat16 without, frozen weights."""
    d, d_ff = 12, 10
    rows_in = 2 * d_ff if gated else d_ff

    def sample(dtype, with_bias):
        kw = {"dtype": dtype, "device": device}
        return (rg(randn(2, 3, d, **kw)), rg(randn(rows_in, d, **kw)), rg(randn(rows_in, **kw)) if with_bias else None,
                rg(randn(d, d_ff, **kw)), rg(randn(d, **kw)) if with_bias else None)

    frozen = (rg(randn(5, d, device=device)), randn(rows_in, d, device=device), randn(rows_in, device=device),
              randn(d, d_ff, device=device), None)
    return [sample(torch.float32, True), sample(torch.bfloat16, False), frozen]


def opcheck(op, args):
    torch.library.opcheck(op, args)


# The public ops are CompositeImplicitAutograd over the internal ones: one sample
# each checks the composition; the internal ops, which have the kernels, get them all.
@pytest.mark.parametrize("op", ("layer_norm", "rms_norm"))
def test_opcheck_norms(op, device):
    samples = norm_samples(device)
    opcheck(getattr(torch.ops.ffn, op), samples[0])
    for args in samples:
        opcheck(getattr(torch.ops.ffn, f"_{op}_fwd"), args)


@pytest.mark.parametrize("op", ("layer_norm", "rms_norm"))
def test_opcheck_norm_backward_ops(op, device):
    for x, w, b, eps in [norm_samples(device)[i] for i in (0, 3, 4)]:
        x, w, b = (None if t is None else t.detach() for t in (x, w, b))
        y, *stats = getattr(torch.ops.ffn, f"_{op}_fwd")(x, w, b, eps)
        for weight_grad, bias_grad in itertools.product((False, True), repeat=2):
            if (weight_grad and w is None) or (bias_grad and b is None):
                continue
            opcheck(getattr(torch.ops.ffn, f"_{op}_bwd"),
                    (torch.randn_like(y), x, *stats, w, b, weight_grad, bias_grad))


@pytest.mark.parametrize("op", ("gelu_ffn", "relu_ffn", *GATED_OPS))
def test_opcheck_ffns(op, device):
    samples = ffn_samples(op in GATED_OPS, device)
    # keep_preact=False, the public ops' call without autograd: on inputs that need no gradient.
    detached = [tuple(None if t is None else t.detach() for t in args) for args in samples]
    if op == "gelu_ffn":
        opcheck(torch.ops.ffn.gelu_ffn, (*samples[0], "tanh"))
        for args, approximate in itertools.product(samples, ("none", "tanh")):
            opcheck(torch.ops.ffn._gelu_ffn_fwd, (*args, approximate))
        for args in detached:
            opcheck(torch.ops.ffn._gelu_ffn_fwd, (*args, "none", False))
    elif op == "relu_ffn":
        opcheck(torch.ops.ffn.relu_ffn, samples[0])
        for args in samples:
            opcheck(torch.ops.ffn._relu_ffn_fwd, args)
        for args in detached:
            opcheck(torch.ops.ffn._relu_ffn_fwd, (*args, False))
    else:
        opcheck(getattr(torch.ops.ffn, op), samples[0])
        if op == "geglu":
            opcheck(torch.ops.ffn.geglu, (*samples[0], "tanh"))
        for args in samples:
            opcheck(torch.ops.ffn._gated_ffn_fwd, (*args, GATED_OPS[op]))
        for args in detached:
            opcheck(torch.ops.ffn._gated_ffn_fwd, (*args, GATED_OPS[op], False))


# "none"/"tanh": gelu_ffn's approximate; "plain relu": relu_ffn; the rest: the gated activations.
@pytest.mark.parametrize("activation", (*GELU_APPROXIMATIONS, "plain relu", *ACTIVATION_NAMES))
def test_opcheck_ffn_backward_ops(activation, device):
    gated = activation in ACTIVATION_NAMES
    name = "_gated_ffn" if gated else "_relu_ffn" if activation == "plain relu" else "_gelu_ffn"
    fwd, bwd = getattr(torch.ops.ffn, name + "_fwd"), getattr(torch.ops.ffn, name + "_bwd")
    static = () if name == "_relu_ffn" else (activation,)
    x, w_in, b_in, w_out, b_out = (None if t is None else t.detach() for t in ffn_samples(gated, device)[0])
    out, preact = fwd(x, w_in, b_in, w_out, b_out, *static)
    for grad_mask in ([True] * 5, [True, False, False, True, True], [False, True, True, False, False],
                      [False, False, False, True, False]):
        opcheck(bwd, (torch.randn_like(out), x, preact, w_in, w_out, *static, grad_mask))


@pytest.mark.parametrize("activation", ACTIVATION_NAMES)
def test_opcheck_gated_activation(activation, device):
    for dtype in (torch.float32, torch.bfloat16):
        gate_up = randn(2, 3, 20, dtype=dtype, device=device)
        opcheck(torch.ops.ffn.gated_activation, (rg(gate_up.clone()), activation))
        opcheck(torch.ops.ffn._gated_activation_bwd, (randn(2, 3, 10, dtype=dtype, device=device), gate_up, activation))
    opcheck(torch.ops.ffn.gated_activation, (rg(randn(2, 3, 40, device=device))[:, :, ::2], activation))


@pytest.mark.parametrize("approximate", ("none", "tanh"))
def test_opcheck_bias_gelu(approximate, device):
    for dtype in (torch.float32, torch.bfloat16):
        x, bias = randn(2, 3, 10, dtype=dtype, device=device), randn(10, dtype=dtype, device=device)
        opcheck(torch.ops.ffn.bias_gelu, (rg(x.clone()), rg(bias.clone()), approximate))
        grad = torch.randn_like(x)
        for with_bias, bias_grad in ((True, True), (True, False), (False, False)):
            opcheck(torch.ops.ffn._bias_gelu_bwd, (grad, x, bias if with_bias else None, approximate, bias_grad))
    opcheck(torch.ops.ffn.bias_gelu, (rg(randn(3, 2, 10, device=device)).transpose(0, 1), None, approximate))


# ----------------------------------------------------------------------------- torch.compile
class Block(torch.nn.Module):
    """A pre-norm FFN sublayer: x + ffn(norm(x))."""

    def __init__(self, design, d=32, d_ff=48, backend="ffn"):
        super().__init__()
        if design == "rmsnorm-swiglu":
            self.norm = ffn.RMSNorm(d, eps=1e-6, backend=backend)
            self.mlp = ffn.SwiGLU(d, d_ff, backend=backend)
        else:
            self.norm = ffn.LayerNorm(d, backend=backend)
            self.mlp = ffn.GeluFFN(d, d_ff, backend=backend)

    def forward(self, x):
        return x + self.mlp(self.norm(x))


def run_block(block, x):
    x = x.detach().clone().requires_grad_()
    out = block(x)
    grads = torch.autograd.grad(out.pow(2).sum(), [x, *block.parameters()])
    return out, grads


def skip_without_inductor(device):
    if device == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            pytest.skip("torch.compile's inductor needs triton on CUDA")


@pytest.mark.parametrize("dynamic", (False, True), ids=("static", "dynamic"))
@pytest.mark.parametrize("design", ("rmsnorm-swiglu", "layernorm-gelu"))
def test_compiled_block_matches_eager(design, dynamic, device):
    skip_without_inductor(device)
    torch._dynamo.reset()
    block = Block(design).to(device)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # norm weights/biases away from 1/0
    compiled = torch.compile(block, fullgraph=True, dynamic=dynamic)
    shapes = [(4, 8, 32), (3, 5, 32)] if dynamic else [(4, 8, 32)]
    for i, shape in enumerate(shapes):
        x = randn(*shape, device=device)
        # The second shape must reuse the dynamic graph: no recompilation.
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            out, grads = run_block(compiled, x)
        out_eager, grads_eager = run_block(block, x)
        torch.testing.assert_close(out, out_eager)
        for g, g_eager in zip(grads, grads_eager):
            torch.testing.assert_close(g, g_eager)


def ops_block(x, norm_w, norm_b, w_gate_up, w_down):
    """The ops themselves, without the modules: layer_norm, rms_norm and swiglu in one graph."""
    h = torch.ops.ffn.layer_norm(x, norm_w, norm_b, 1e-5)
    h = torch.ops.ffn.rms_norm(h, norm_w, None, 1e-6)
    return x + torch.ops.ffn.swiglu(h, w_gate_up, None, w_down, None)


def test_compiled_ops_match_eager(device):
    """Widths on the CUDA kernels' vectorized paths (d, d_ff multiples of 128-bit words)."""
    skip_without_inductor(device)
    torch._dynamo.reset()
    d, d_ff = 256, 352
    inputs = (randn(8, 16, d, device=device), randn(d, device=device, shift=1.0), randn(d, device=device),
              randn(2 * d_ff, d, device=device, scale=d**-0.5), randn(d, d_ff, device=device, scale=d_ff**-0.5))
    grad_out = randn(8, 16, d, device=device)

    def run(fn):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        out = fn(*leaves)
        return out, torch.autograd.grad(out, leaves, grad_out)

    out, grads = run(torch.compile(ops_block, fullgraph=True))
    out_eager, grads_eager = run(ops_block)
    torch.testing.assert_close(out, out_eager)
    for g, g_eager in zip(grads, grads_eager, strict=True):
        torch.testing.assert_close(g, g_eager)
