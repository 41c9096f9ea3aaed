"""Under torch.autocast the ops behave like the torch ops they replace: the FFN ops
like nn.Linear-based eager code (lower precision), the norms like F.layer_norm /
F.rms_norm (untouched on CPU, float32 on CUDA), the elementwise pieces like
F.gelu / F.silu (untouched). Each is compared with the eager reference under the
same autocast: output dtype, values, and gradients of float32 leaves."""

import copy

import pytest
import torch

import ffn
from ffn.activations import GATED_OPS
from helpers import assert_accurate, randn

pytestmark = pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight:UserWarning")

AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)


def autocast_check(device, dtype, ours_fn, ref_fn, inputs, terms, rounded_terms=1, lowers=False):
    """ours_fn and ref_fn under the same autocast: same output dtype, values and gradients.

    The float64 reference runs ref_fn on float64 copies of the inputs (autocast
    leaves float64 alone), rounded first to the autocast dtype for the ops that
    autocast runs in it (`lowers`: the FFN ops, like nn.Linear). Their gradients
    of float32 leaves are lower-precision results cast up: judged at the autocast
    dtype's precision. (Ops that autocast runs in float32, like the norms on CUDA,
    see their inputs cast up exactly: no rounding to model.)
    """
    leaves = [[None if t is None else t.detach().clone().requires_grad_() for t in inputs] for _ in range(2)]
    with torch.autocast(device, dtype=dtype):
        ours = ours_fn(*leaves[0])
        theirs = ref_fn(*leaves[1])
    assert ours.dtype == theirs.dtype, f"autocast output dtype {ours.dtype}, torch gives {theirs.dtype}"
    ref_leaves = [None if t is None else (t.to(dtype) if lowers else t).double().requires_grad_() for t in inputs]
    ref = ref_fn(*ref_leaves)
    assert_accurate(ours, ref, theirs, terms=terms, rounded_terms=rounded_terms)

    grad = torch.randn_like(theirs)
    all_grads = [
        torch.autograd.grad(out, [t for t in ts if t is not None], g)
        for out, ts, g in ((ours, leaves[0], grad), (theirs, leaves[1], grad), (ref, ref_leaves, grad.double()))
    ]
    names = [f"grad of input {i}" for i, t in enumerate(inputs) if t is not None]
    for name, leaf, (g_ours, g_theirs, g_ref) in zip(names, [t for t in inputs if t is not None], zip(*all_grads)):
        assert g_ours.dtype == g_theirs.dtype == leaf.dtype, name
        assert_accurate(g_ours, g_ref, g_theirs, terms=terms, rounded_terms=rounded_terms, name=name,
                        precision=dtype if lowers else None)


FFN_CASES = {
    "gelu_ffn": (lambda *a: torch.ops.ffn.gelu_ffn(*a), ffn.reference.gelu_ffn, False),
    "gelu_ffn-tanh": (lambda *a: torch.ops.ffn.gelu_ffn(*a, "tanh"),
                      lambda *a: ffn.reference.gelu_ffn(*a, "tanh"), False),
    "relu_ffn": (torch.ops.ffn.relu_ffn, ffn.reference.relu_ffn, False),
    **{op: (getattr(torch.ops.ffn, op), getattr(ffn.reference, op), True) for op in GATED_OPS},
    "geglu-tanh": (lambda *a: torch.ops.ffn.geglu(*a, "tanh"), lambda *a: ffn.reference.geglu(*a, "tanh"), True),
}


@pytest.mark.parametrize("x_dtype", (torch.float32, torch.bfloat16), ids=("x-f32", "x-bf16"))
@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
@pytest.mark.parametrize("case", FFN_CASES.values(), ids=FFN_CASES.keys())
def test_ffn_ops_run_in_lower_precision(case, dtype, x_dtype, device):
    """float32 weights (and x in float32 or already half): the output comes out in the autocast dtype."""
    ours_fn, ref_fn, gated = case
    d, d_ff = 32, 24
    rows_in = 2 * d_ff if gated else d_ff
    inputs = (randn(2, 5, d, dtype=x_dtype, device=device), randn(rows_in, d, device=device, scale=d**-0.5),
              randn(rows_in, device=device, scale=0.5), randn(d, d_ff, device=device, scale=d_ff**-0.5),
              randn(d, device=device, scale=0.5))
    with torch.autocast(device, dtype=dtype):
        assert ours_fn(*inputs).dtype == dtype
    # Longest sums: over d_ff (or 2 * d_ff) and the 10 rows, of values rounded to the autocast dtype.
    autocast_check(device, dtype, ours_fn, ref_fn, inputs, terms=rows_in, rounded_terms=rows_in, lowers=True)


@pytest.mark.parametrize("x_dtype", (torch.float32, torch.bfloat16), ids=("x-f32", "x-bf16"))
@pytest.mark.parametrize("with_bias", (False, True), ids=("nobias", "bias"))
@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
@pytest.mark.parametrize("op", ("layer_norm", "rms_norm", "gemma_rms_norm"))
def test_norms_follow_torch(op, dtype, with_bias, x_dtype, device):
    """Like F.layer_norm / F.rms_norm under autocast (on CPU: untouched, float32 stays float32)."""
    d = 64
    inputs = (randn(3, 4, d, dtype=x_dtype, device=device, scale=2.0, shift=1.0),
              randn(d, device=device, shift=1.0), randn(d, device=device) if with_bias else None)
    if op == "gemma_rms_norm":  # the zero-centered weight: scale 1 + weight
        ours, ref = (lambda *a: torch.ops.ffn.rms_norm(*a, 1e-6, 1.0)), (lambda *a: ffn.reference.rms_norm(*a, 1e-6, 1.0))
    else:
        ours, ref = getattr(torch.ops.ffn, op), getattr(ffn.reference, op)
    with torch.autocast(device, dtype=dtype):
        out = ours(*inputs)
    if device == "cpu":
        assert out.dtype == x_dtype
    autocast_check(device, dtype, ours, ref, inputs, terms=d)


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
def test_elementwise_pieces_untouched(dtype, device):
    """gated_activation / bias_gelu are left alone, like F.silu and F.gelu."""
    gate_up = randn(4, 2 * 24, device=device, scale=2.0)
    autocast_check(device, dtype, torch.ops.ffn.gated_activation, ffn.reference.gated_activation,
                   (gate_up,), terms=1)
    x, bias = randn(4, 24, device=device, scale=2.0), randn(24, device=device)
    autocast_check(device, dtype, torch.ops.ffn.bias_gelu, ffn.reference.bias_gelu, (x, bias), terms=1)
    with torch.autocast(device, dtype=dtype):
        assert torch.ops.ffn.bias_gelu(x, bias).dtype == torch.float32


def test_block_under_autocast_matches_eager():
    """A pre-norm RMSNorm + SwiGLU block trained under CPU autocast: the ffn backend is as
    accurate as the torch backend, output and float32 parameter gradients, judged against
    the float64 block (longest sums: 2 * d_ff = 80 values rounded to bfloat16)."""
    blocks = {}
    for backend in ("ffn", "torch"):
        torch.manual_seed(1)
        blocks[backend] = torch.nn.ModuleDict({
            "norm": ffn.RMSNorm(32, eps=1e-6, backend=backend),
            "mlp": ffn.SwiGLU(32, 40, backend=backend),
        })
    blocks["float64"] = copy.deepcopy(blocks["torch"]).double()
    x = randn(4, 8, 32)
    outs = {}
    for backend, block in blocks.items():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=backend != "float64"):
            xb = x.double() if backend == "float64" else x
            out = xb + block["mlp"](block["norm"](xb))
        out.pow(2).mean().backward()
        outs[backend] = out
    assert outs["ffn"].dtype == outs["torch"].dtype == torch.float32
    assert_accurate(outs["ffn"], outs["float64"], outs["torch"], terms=80, rounded_terms=80, precision=torch.bfloat16)
    params = zip(*(block.named_parameters() for block in blocks.values()))
    for (name, p_ours), (_, p_torch), (_, p_ref) in params:
        assert p_ours.grad.dtype == torch.float32
        assert_accurate(p_ours.grad, p_ref.grad, p_torch.grad, terms=80, rounded_terms=80, precision=torch.bfloat16,
                        name=f"grad {name}")


@pytest.mark.parametrize("case", ("gelu_ffn", "gelu_ffn-tanh", "relu_ffn", *GATED_OPS))
def test_internal_forward_ops_autocast_like_the_public_ops(case):
    """Calling _gelu_ffn_fwd / _relu_ffn_fwd / _gated_ffn_fwd directly (for the pre-activation)
    under CPU autocast gives the public op's output bit for bit, in its dtype."""
    gated = case in GATED_OPS
    d, d_ff = 32, 24
    rows_in = 2 * d_ff if gated else d_ff
    x, w_in, b_in = randn(2, 5, d), randn(rows_in, d, scale=d**-0.5), randn(rows_in, scale=0.5)
    w_out, b_out = randn(d, d_ff, scale=d_ff**-0.5), randn(d, scale=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if gated:
            public = getattr(torch.ops.ffn, case)(x, w_in, b_in, w_out, b_out)
            out, preact = torch.ops.ffn._gated_ffn_fwd(x, w_in, b_in, w_out, b_out, GATED_OPS[case])
        elif case == "relu_ffn":
            public = torch.ops.ffn.relu_ffn(x, w_in, b_in, w_out, b_out)
            out, preact = torch.ops.ffn._relu_ffn_fwd(x, w_in, b_in, w_out, b_out)
        else:
            approximate = "tanh" if case == "gelu_ffn-tanh" else "none"
            public = torch.ops.ffn.gelu_ffn(x, w_in, b_in, w_out, b_out, approximate)
            out, preact = torch.ops.ffn._gelu_ffn_fwd(x, w_in, b_in, w_out, b_out, approximate)
    assert public.dtype == out.dtype == preact.dtype == torch.bfloat16
    assert torch.equal(out, public)
