"""CUDA kernels of every ffn op, checked against float64 references, the CPU
kernels and torch's own ops; gradcheck, opcheck, CUDA graphs, torch.compile,
determinism of the weight gradients, streams and devices.

Everything here skips without a CUDA device.
"""

import pytest
import torch
import torch.nn.functional as F

import ffn
from ffn import reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
HALF = (torch.bfloat16, torch.float16)
# Row lengths: tails and odd sizes (scalar path), one warp, several warps, whole
# blocks, and the long-row kernels (forward past 16384 bf16 / 8192 fp32
# elements, backward past 8192, and 40000 where the layer_norm parameter
# gradients no longer fit the shared accumulators).
NORM_DIMS = [1, 7, 64, 127, 4097, 8192, 16384, 40000]
NORMS = ["layer_norm", "rms_norm"]
GATED = ["silu", "gelu", "gelu_tanh", "relu"]
DEVICE = "cuda"

# Elementwise tolerances against a float64 reference rounded to the dtype: one
# rounding of the result plus float32 accumulation error.
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}
# Results with GEMMs: max error relative to the largest reference value.
GEMM_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def randn(*shape, dtype=torch.float32, device=DEVICE, scale=1.0, shift=0.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale + shift).to(device=device, dtype=dtype)


def assert_gemm_close(actual, expected):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    err = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    scale = max(expected.double().abs().max().item() if expected.numel() else 0.0, 1.0)
    assert err <= GEMM_TOL[actual.dtype] * scale, f"max error {err} vs scale {scale}"


def leaves(*tensors):
    """Leaf tensors requiring grad that alias the inputs (keeping strides and storage offsets)."""
    return [None if t is None else t.detach().requires_grad_(True) for t in tensors]


def run(fn, inputs, grad_out):
    """fn(*inputs) and the gradients of <out, grad_out> w.r.t. every input that requires grad."""
    out = fn(*inputs)
    wrt = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(out, wrt, grad_out) if wrt else ()
    return out.detach(), list(grads)


def norm_op(kind):
    return getattr(torch.ops.ffn, kind)


def norm_reference(kind):
    return getattr(reference, kind)


def check_norm(kind, x, weight, bias, eps=1e-5, dy=None):
    """ffn on CUDA vs a float64 reference and vs the CPU kernels, forward and backward."""
    dy = randn(*x.shape, dtype=x.dtype) if dy is None else dy
    out, grads = run(norm_op(kind), (*leaves(x, weight, bias), eps), dy)

    def as64(t):
        return None if t is None else t.double()

    ref_out, ref_grads = run(norm_reference(kind), (*leaves(as64(x), as64(weight), as64(bias)), eps), dy.double())
    cpu_inputs = [None if t is None else t.cpu() for t in (x, weight, bias)]
    cpu_out, cpu_grads = run(norm_op(kind), (*leaves(*cpu_inputs), eps), dy.cpu())
    torch.testing.assert_close(out, ref_out.to(out.dtype), **TOL[x.dtype])
    torch.testing.assert_close(out.cpu(), cpu_out, **TOL[x.dtype])
    # Parameter gradients are sums over the rows: absolute error grows with their count.
    rows = max(1, x.numel() // max(x.shape[-1], 1))
    sum_tol = dict(rtol=TOL[x.dtype]["rtol"], atol=TOL[x.dtype]["atol"] * rows**0.5)
    for i, (g, r, c) in enumerate(zip(grads, ref_grads, cpu_grads)):
        tol = TOL[x.dtype] if i == 0 else sum_tol
        torch.testing.assert_close(g, r.to(g.dtype), **tol)
        torch.testing.assert_close(g.cpu(), c, **tol)
    return out, grads


# ----------------------------------------------------------------------------- norms
@pytest.mark.parametrize("d", NORM_DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", NORMS)
def test_norm_matches_reference_and_cpu(kind, dtype, d):
    rows = 3 if d > 1000 else 37
    # A shifted mean: the case where one-pass variance formulas lose digits.
    x = randn(rows, d, dtype=dtype, shift=3.0)
    check_norm(kind, x, randn(d, dtype=dtype, shift=1.0), randn(d, dtype=dtype))


# Long rows whose cached row (forward) or x and dy rows (backward without parameter
# gradients) take just under 48 KiB of dynamic shared memory: the kernels' static
# scratch then pushes the total over the limit a kernel has without opting in.
@pytest.mark.parametrize("dtype,d", [(torch.float32, 12288), (torch.bfloat16, 24576), (torch.float64, 6144),
                                     (torch.bfloat16, 12288), (torch.float64, 3072)])
@pytest.mark.parametrize("kind", NORMS)
def test_norm_long_rows_near_the_default_shared_memory_limit(kind, dtype, d):
    x, w, b = randn(3, d, dtype=dtype, shift=3.0), randn(d, dtype=dtype, shift=1.0), randn(d, dtype=dtype)
    check_norm(kind, x, w, b)
    dy = randn(3, d, dtype=dtype)
    # Frozen weight and bias: backward computes dx only.
    _, (dx,) = run(norm_op(kind), (*leaves(x), w, b, 1e-5), dy)
    _, (ref,) = run(norm_reference(kind), (*leaves(x.double()), w.double(), b.double(), 1e-5), dy.double())
    torch.testing.assert_close(dx, ref.to(dtype), **TOL[dtype])


@pytest.mark.parametrize("kind", NORMS)
def test_norm_matches_torch_ops(kind):
    x, w = randn(5, 4096), randn(4096)
    if kind == "layer_norm":
        b = randn(4096)
        expected = F.layer_norm(x, (4096,), w, b, 1e-5)
        actual = torch.ops.ffn.layer_norm(x, w, b, 1e-5)
    else:
        expected = F.rms_norm(x, (4096,), w, 1e-6)
        actual = torch.ops.ffn.rms_norm(x, w, None, 1e-6)
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("d", [64, 127, 4096, 20000])
@pytest.mark.parametrize("kind", NORMS)
def test_norm_float32_params_with_half_input(kind, dtype, d):
    x = randn(4, d, dtype=dtype)
    _, grads = check_norm(kind, x, randn(d, shift=1.0), randn(d))
    assert [g.dtype for g in grads] == [dtype, torch.float32, torch.float32]


@pytest.mark.parametrize("kind", NORMS)
@pytest.mark.parametrize("affine", ["none", "weight", "bias"])
def test_norm_optional_params(kind, affine):
    d = 96
    x = randn(6, d)
    w = randn(d) if affine == "weight" else None
    b = randn(d) if affine == "bias" else None
    check_norm(kind, x, w, b)


@pytest.mark.parametrize("shape", [(5,), (2, 3, 64), (2, 2, 3, 127), (0, 64), (2, 0, 8)])
@pytest.mark.parametrize("kind", NORMS)
def test_norm_shapes(kind, shape):
    d = shape[-1]
    out, grads = check_norm(kind, randn(*shape), randn(d), randn(d))
    assert out.shape == shape
    if 0 in shape:  # sums over no rows
        assert torch.equal(grads[1], torch.zeros_like(grads[1]))


@pytest.mark.parametrize("kind", NORMS)
def test_norm_non_contiguous_and_misaligned(kind):
    d = 64
    wide = randn(8, d + 1)
    check_norm(kind, wide[:, 1:], randn(d), randn(d))  # non-contiguous view
    # Contiguous but starting 2 bytes past a 16-byte boundary: x, weight and bias.
    flat = randn(8 * d + 1, dtype=torch.bfloat16)
    x = flat[1:].view(8, d)
    params = randn(2 * d + 2, dtype=torch.bfloat16)
    check_norm(kind, x, params[1 : d + 1], params[d + 2 :])
    check_norm(kind, randn(8, d, dtype=torch.bfloat16), params[1 : d + 1], None)


@pytest.mark.parametrize("d", [64, 4096, 16384, 40000])
@pytest.mark.parametrize("kind", NORMS)
def test_norm_weight_grad_deterministic(kind, d):
    rows = 20000 if d == 64 else 300
    x, w, b = randn(rows, d, dtype=torch.bfloat16), randn(d), randn(d)
    dy = randn(rows, d, dtype=torch.bfloat16)
    first = run(norm_op(kind), (*leaves(x, w, b), 1e-5), dy)[1]
    second = run(norm_op(kind), (*leaves(x, w, b), 1e-5), dy)[1]
    for a, b_ in zip(first, second):
        assert torch.equal(a, b_)


@pytest.mark.slow
def test_norm_more_than_2_31_elements():
    rows, d = 2**31 // 4096 + 8, 4096
    need = rows * d * 2 * 4 + (1 << 30)  # x, y, dy, dx in bf16
    if torch.cuda.mem_get_info()[0] < need:
        pytest.skip("not enough GPU memory for a > 2^31-element tensor")
    x = torch.empty(rows, d, device=DEVICE, dtype=torch.bfloat16).normal_()
    w = randn(d, dtype=torch.bfloat16)
    x.requires_grad_(True)
    y = torch.ops.ffn.rms_norm(x, w, None, 1e-6)
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    tail = slice(rows - 8, rows)  # rows past element 2^31
    xt = x.detach()[tail].double().requires_grad_(True)
    yt = reference.rms_norm(xt, w.double(), None, 1e-6)
    (gt,) = torch.autograd.grad(yt, xt, torch.ones_like(yt))
    torch.testing.assert_close(y[tail].detach(), yt.to(y.dtype).detach(), **TOL[torch.bfloat16])
    torch.testing.assert_close(gx[tail], gt.to(gx.dtype), **TOL[torch.bfloat16])


# ----------------------------------------------------------------------------- FFN ops
def ffn_inputs(dtype, d, d_ff, gated, with_bias, lead=(2, 3)):
    w_in = randn(2 * d_ff if gated else d_ff, d, dtype=dtype, scale=d**-0.5)
    w_out = randn(d, d_ff, dtype=dtype, scale=d_ff**-0.5)
    b_in = randn(w_in.shape[0], dtype=dtype) if with_bias else None
    b_out = randn(d, dtype=dtype) if with_bias else None
    return randn(*lead, d, dtype=dtype), w_in, b_in, w_out, b_out


def check_ffn(op, ref, inputs, extra=()):
    x, w_in, b_in, w_out, b_out = inputs
    dy = randn(*x.shape[:-1], w_out.shape[0], dtype=x.dtype)
    out, grads = run(lambda *t: op(*t, *extra), leaves(*inputs), dy)
    ref_out, ref_grads = run(lambda *t: ref(*t, *extra), leaves(*inputs), dy)
    assert_gemm_close(out, ref_out)
    assert len(grads) == len(ref_grads)
    for g, r in zip(grads, ref_grads):
        assert_gemm_close(g, r)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_ffn(dtype, approximate, with_bias):
    for d_ff in (96, 37):  # 37: the elementwise kernels' scalar path
        inputs = ffn_inputs(dtype, 64, d_ff, gated=False, with_bias=with_bias)
        check_ffn(torch.ops.ffn.gelu_ffn, reference.gelu_ffn, inputs, (approximate,))


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["swiglu", "geglu", "reglu"])
def test_gated_ffn(op, dtype, with_bias):
    for d_ff in (96, 37):
        inputs = ffn_inputs(dtype, 64, d_ff, gated=True, with_bias=with_bias)
        check_ffn(getattr(torch.ops.ffn, op), getattr(reference, op), inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ffn_empty_and_cpu_agreement(dtype):
    inputs = ffn_inputs(dtype, 32, 48, gated=True, with_bias=True, lead=(0,))
    check_ffn(torch.ops.ffn.swiglu, reference.swiglu, inputs)
    inputs = ffn_inputs(torch.float32, 32, 48, gated=True, with_bias=True)
    cuda_out = torch.ops.ffn.swiglu(*inputs)
    cpu_out = torch.ops.ffn.swiglu(*[t.cpu() for t in inputs])
    assert_gemm_close(cuda_out.cpu(), cpu_out)


# ----------------------------------------------------------------------------- elementwise pieces
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", GATED)
@pytest.mark.parametrize("shape", [(4, 2 * 96), (3, 5, 2 * 37), (0, 16), (7, 2)])
def test_gated_activation(shape, activation, dtype):
    gate_up = randn(*shape, dtype=dtype, scale=3.0)
    dy = randn(*shape[:-1], shape[-1] // 2, dtype=dtype)
    out, (grad,) = run(lambda t: torch.ops.ffn.gated_activation(t, activation), leaves(gate_up), dy)
    ref_out, (ref_grad,) = run(
        lambda t: reference.gated_activation(t, activation), leaves(gate_up.double()), dy.double()
    )
    torch.testing.assert_close(out, ref_out.to(dtype), **TOL[dtype])
    torch.testing.assert_close(grad, ref_grad.to(dtype), **TOL[dtype])
    cpu_out, (cpu_grad,) = run(
        lambda t: torch.ops.ffn.gated_activation(t, activation), leaves(gate_up.cpu()), dy.cpu()
    )
    torch.testing.assert_close(out.cpu(), cpu_out, **TOL[dtype])
    torch.testing.assert_close(grad.cpu(), cpu_grad, **TOL[dtype])


@pytest.mark.parametrize("activation", GATED)
def test_gated_activation_float32_matches_torch_eager(activation):
    # Same formulas as ATen's CUDA kernels; the product is rounded once either way.
    gate_up = randn(64, 2 * 256, scale=3.0)
    expected = reference.gated_activation(gate_up, activation)
    torch.testing.assert_close(torch.ops.ffn.gated_activation(gate_up, activation), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape", [(4, 96), (2, 3, 37), (0, 8), (5, 1)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_bias_gelu(with_bias, shape, approximate, dtype):
    x = randn(*shape, dtype=dtype, scale=3.0)
    b = randn(shape[-1], dtype=dtype) if with_bias else None
    dy = randn(*shape, dtype=dtype)
    out, grads = run(lambda *t: torch.ops.ffn.bias_gelu(*t, approximate), leaves(x, b), dy)
    ref_out, ref_grads = run(
        lambda *t: reference.bias_gelu(*t, approximate),
        leaves(x.double(), None if b is None else b.double()),
        dy.double(),
    )
    torch.testing.assert_close(out, ref_out.to(dtype), **TOL[dtype])
    rows = max(1, x.numel() // shape[-1])
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        # The bias gradient is a sum over the rows.
        tol = TOL[dtype] if i == 0 else dict(rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] * rows**0.5)
        torch.testing.assert_close(g, r.to(dtype), **tol)


def test_bias_gelu_misaligned():
    flat = randn(4 * 64 + 1, dtype=torch.bfloat16)
    x = flat[1:].view(4, 64)
    b = randn(65, dtype=torch.bfloat16)[1:]
    expected = reference.bias_gelu(x.double(), b.double()).to(x.dtype)
    torch.testing.assert_close(torch.ops.ffn.bias_gelu(x, b), expected, **TOL[torch.bfloat16])


@pytest.mark.slow
def test_gated_activation_more_than_2_31_elements():
    rows, F_ = 2**31 // 8192 + 4, 4096
    need = rows * 2 * F_ * 2 + rows * F_ * 2 + (1 << 30)
    if torch.cuda.mem_get_info()[0] < need:
        pytest.skip("not enough GPU memory for a > 2^31-element tensor")
    gate_up = torch.empty(rows, 2 * F_, device=DEVICE, dtype=torch.bfloat16).normal_()
    h = torch.ops.ffn.gated_activation(gate_up, "silu")
    tail = slice(rows - 4, rows)
    expected = reference.gated_activation(gate_up[tail].double(), "silu").to(h.dtype)
    torch.testing.assert_close(h[tail], expected, **TOL[torch.bfloat16])


# ----------------------------------------------------------------------------- gradcheck, opcheck
def _gradcheck(fn, *inputs):
    assert torch.autograd.gradcheck(fn, leaves(*inputs))


@pytest.mark.parametrize("kind", NORMS)
def test_norm_gradcheck(kind):
    d = 13
    _gradcheck(lambda x, w, b: norm_op(kind)(x, w, b, 1e-5), randn(3, d, dtype=torch.float64),
               randn(d, dtype=torch.float64), randn(d, dtype=torch.float64))


@pytest.mark.parametrize("op", ["gelu_ffn", "gelu_ffn_tanh", "swiglu", "geglu", "reglu"])
def test_ffn_gradcheck(op):
    gated = op not in ("gelu_ffn", "gelu_ffn_tanh")
    inputs = ffn_inputs(torch.float64, 8, 5, gated=gated, with_bias=True, lead=(2, 3))
    if gated:
        fn = getattr(torch.ops.ffn, op)
    else:
        approximate = "tanh" if op.endswith("tanh") else "none"
        fn = lambda *t: torch.ops.ffn.gelu_ffn(*t, approximate)  # noqa: E731
    _gradcheck(fn, *inputs)


@pytest.mark.parametrize("activation", GATED)
def test_gated_activation_gradcheck(activation):
    _gradcheck(lambda t: torch.ops.ffn.gated_activation(t, activation), randn(4, 10, dtype=torch.float64))


def test_bias_gelu_gradcheck():
    _gradcheck(lambda x, b: torch.ops.ffn.bias_gelu(x, b, "tanh"), randn(4, 7, dtype=torch.float64),
               randn(7, dtype=torch.float64))


def _opcheck_cases():
    x, w, b = randn(4, 40), randn(40), randn(40)
    dy = randn(4, 40)
    ln = torch.ops.ffn._layer_norm_fwd(x, w, b, 1e-5)
    rms = torch.ops.ffn._rms_norm_fwd(x, w, b, 1e-6)
    fx, w1, b1, w2, b2 = ffn_inputs(torch.float32, 16, 24, gated=False, with_bias=True)
    gx, wgu, bgu, wd, bd = ffn_inputs(torch.float32, 16, 24, gated=True, with_bias=True)
    g_out, g_pre = torch.ops.ffn._gated_ffn_fwd(gx, wgu, bgu, wd, bd, "silu")
    f_out, f_pre = torch.ops.ffn._gelu_ffn_fwd(fx, w1, b1, w2, b2, "none")
    mask = [True] * 5
    return [
        (torch.ops.ffn._layer_norm_fwd.default, (x, w, b, 1e-5)),
        (torch.ops.ffn._layer_norm_bwd.default, (dy, x, ln[1], ln[2], w, b, True, True)),
        (torch.ops.ffn._rms_norm_fwd.default, (x, w, b, 1e-6)),
        (torch.ops.ffn._rms_norm_bwd.default, (dy, x, rms[1], w, b, True, True)),
        (torch.ops.ffn._gelu_ffn_fwd.default, (fx, w1, b1, w2, b2, "tanh")),
        (torch.ops.ffn._gelu_ffn_bwd.default, (randn(*f_out.shape), fx, f_pre, w1, w2, "none", mask)),
        (torch.ops.ffn._gated_ffn_fwd.default, (gx, wgu, bgu, wd, bd, "silu")),
        (torch.ops.ffn._gated_ffn_bwd.default, (randn(*g_out.shape), gx, g_pre, wgu, wd, "silu", mask)),
        (torch.ops.ffn.gated_activation.default, (randn(3, 2 * 24), "gelu")),
        (torch.ops.ffn._gated_activation_bwd.default, (randn(3, 24), randn(3, 48), "relu")),
        (torch.ops.ffn.bias_gelu.default, (randn(3, 24), randn(24), "none")),
        (torch.ops.ffn._bias_gelu_bwd.default, (randn(3, 24), randn(3, 24), randn(24), "tanh", True)),
    ]


def test_opcheck_on_cuda():
    for op, args in _opcheck_cases():
        torch.library.opcheck(op, args)


# ----------------------------------------------------------------------------- CUDA behaviour
def _block(x, norm_w, norm_b, w_gate_up, w_down):
    h = torch.ops.ffn.layer_norm(x, norm_w, norm_b, 1e-5)
    h = torch.ops.ffn.rms_norm(h, norm_w, None, 1e-6)
    return x + torch.ops.ffn.swiglu(h, w_gate_up, None, w_down, None)


def _block_inputs(dtype=torch.float32):
    d, d_ff = 256, 352
    return (
        randn(8, 16, d, dtype=dtype),
        randn(d, dtype=dtype, shift=1.0),
        randn(d, dtype=dtype),
        randn(2 * d_ff, d, dtype=dtype, scale=d**-0.5),
        randn(d, d_ff, dtype=dtype, scale=d_ff**-0.5),
    )


def test_cuda_graph_capture_and_replay():
    inputs = leaves(*_block_inputs())
    dy = randn(*inputs[0].shape)
    eager_out, eager_grads = run(_block, inputs, dy)

    static = leaves(*[torch.zeros_like(t) for t in inputs])
    static_dy = torch.zeros_like(dy)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph, as torch.cuda.graphs asks
        for _ in range(2):
            run(_block, static, static_dy)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _block(*static)
        grads = torch.autograd.grad(out, static, static_dy)
    with torch.no_grad():
        for s, t in zip(static, inputs):
            s.copy_(t)
        static_dy.copy_(dy)
    graph.replay()
    torch.cuda.synchronize()
    # cuBLAS may pick other algorithms under capture: equal up to float32 rounding.
    torch.testing.assert_close(out, eager_out)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


def test_torch_compile_on_cuda():
    from torch.utils._triton import has_triton

    if not has_triton():
        pytest.skip("torch.compile's inductor needs triton on CUDA")
    inputs = _block_inputs()
    compiled = torch.compile(_block, fullgraph=True)
    dy = randn(*inputs[0].shape)
    out, grads = run(compiled, leaves(*inputs), dy)
    eager_out, eager_grads = run(_block, leaves(*inputs), dy)
    torch.testing.assert_close(out, eager_out)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("kind", NORMS)
def test_runs_on_the_current_stream(kind):
    x, w, b = randn(1024, 4096), randn(4096), randn(4096)
    expected = norm_op(kind)(x, w, b, 1e-5)
    side = torch.cuda.Stream()
    staged = torch.zeros_like(x)  # zero-filled on the current stream, before the side stream waits
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        # The copy runs late on the side stream: a kernel launched on another
        # stream would read zeros.
        torch.cuda._sleep(50_000_000)
        staged.copy_(x)
        actual = norm_op(kind)(staged, w, b, 1e-5)
        h = torch.ops.ffn.gated_activation(torch.cat([staged, staged], dim=-1), "silu")
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    torch.testing.assert_close(h, reference.gated_activation(torch.cat([x, x], dim=-1), "silu"))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_runs_on_the_inputs_device():
    inputs = [t.to("cuda:1") for t in _block_inputs()]
    with torch.cuda.device(0):
        out = _block(*inputs)
    assert out.device == torch.device("cuda:1")
    torch.testing.assert_close(out.cpu(), _block(*[t.to("cuda:0") for t in inputs]).cpu())
