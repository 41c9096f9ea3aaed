"""layer_norm and rms_norm against F.layer_norm / F.rms_norm (and F.rms_norm + bias):
forward and backward over shapes, dtypes and optional weight/bias, gradcheck,
double backward, and deterministic weight gradients."""

import itertools

import pytest
import torch

from helpers import (
    HALF_DTYPES,
    NORM_DTYPE_IDS,
    NORM_DTYPES,
    SHORT,
    assert_accurate,
    assert_agrees_with_cpu,
    assert_same_across_threads,
    ffn_op,
    on_cpu,
    randn,
    reference_op,
    run_three_ways,
)

pytestmark = pytest.mark.filterwarnings(
    # F.rms_norm with float32 weights and half x leaves its fused kernel; we compare with it anyway.
    "ignore:Mismatch dtype between input and weight:UserWarning"
)

NORMS = ("layer_norm", "rms_norm")
# Row lengths: tails and odd sizes (the CUDA kernels' scalar path), one warp, several
# warps, and on CUDA the long-row kernels: forward past 16384 bf16/fp16, 8192 fp32 and
# 4096 fp64 elements, backward past 8192 (2048 fp64), and at 40000 the layer_norm
# parameter gradients no longer fit the shared accumulators.
DIMS = (1, 7, 64, 127, 4097, 8192, 16384, 40000)
AFFINE = ("none", "w", "b", "wb")
# (dtypes, affine): float32 parameters with half x only where there are parameters.
DTYPE_AFFINE = [(dt, a) for dt in NORM_DTYPES for a in AFFINE if a != "none" or dt[0] == dt[1]]
DTYPE_AFFINE_IDS = [f"{i}-{a}" for dt, i in zip(NORM_DTYPES, NORM_DTYPE_IDS) for a in AFFINE
                    if a != "none" or dt[0] == dt[1]]


def rows_for(d):
    """Few rows for large d: the suite stays fast while every kernel path runs."""
    return max(3, min(33, 65536 // d))


def make_params(affine, d, dtype, device, requires_grad=False):
    weight = randn(d, dtype=dtype, device=device, scale=0.5, shift=1.0) if "w" in affine else None
    bias = randn(d, dtype=dtype, device=device, scale=0.5) if "b" in affine else None
    for t in (weight, bias):
        if t is not None:
            t.requires_grad_(requires_grad)
    return weight, bias


def grad_x_scale(op, x, weight, grad_out, eps):
    """Largest term of grad_x = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w
    (RMSNorm: no mean(g)); grad_x cancels (exactly 0 for LayerNorm with d = 1), so its
    rounding errors scale with these terms, not with grad_x itself."""
    x, g = x.detach().double(), grad_out.double()
    if weight is not None:
        g = g * weight.detach().double()
    centered = x - x.mean(-1, keepdim=True) if op == "layer_norm" else x
    rstd = (centered.pow(2).mean(-1, keepdim=True) + eps).rsqrt()
    xhat = centered * rstd
    terms = g.abs() + (xhat * (g * xhat).mean(-1, keepdim=True)).abs()
    if op == "layer_norm":
        terms = terms + g.mean(-1, keepdim=True).abs()
    return (rstd * terms).max().item() if x.numel() else 0.0


# torch's native_layer_norm_backward fails ("expected scalar type Half but found Float")
# for half x with a float32 bias and no weight: there, ours is judged on float64 only.
def torch_backward_works(op, x, weight, bias):
    return not (op == "layer_norm" and weight is None and bias is not None and bias.dtype != x.dtype)


def check_layer_norm_d1(y, bias, grads):
    """LayerNorm over one feature: x - mean(x) is exactly 0, so y = bias, grad_x = 0 and
    grad_weight = 0 exactly. (torch's float64 result is no reference here: its mean's
    rounding error, times rstd = 1/sqrt(eps), leaves values around 1e-13.)"""
    expected = torch.zeros_like(y) if bias is None else bias.to(y.dtype).expand_as(y)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    if grads is None:
        return
    grad_x, grad_weight, grad_bias = grads
    for g in (grad_x, grad_weight):
        if g is not None:
            assert torch.count_nonzero(g[0]) == 0
    if grad_bias is not None:
        assert_accurate(grad_bias[0], grad_bias[2], grad_bias[1], terms=y.shape[0], name="grad_bias")


def check_norm(op, x, weight, bias, eps=None, grad_out=None):
    """Forward (and backward with grad_out) of ffn's op against torch's, both judged on float64;
    on CUDA also against ffn's CPU kernels on the same inputs."""
    kwargs = {} if eps is None else {"eps": eps}
    ours_fn = lambda x, w, b: ffn_op(op)(x, w, b, **kwargs)  # noqa: E731
    ref_fn = lambda x, w, b: reference_op(op)(x, w, b, **kwargs)  # noqa: E731
    inputs = (x, weight, bias)
    (ours, theirs, ref), grads = run_three_ways(
        ours_fn, ref_fn, inputs, grad_out, torch_grads=torch_backward_works(op, x, weight, bias)
    )
    d, rows = x.shape[-1], x[..., 0].numel()
    assert ours.dtype == x.dtype
    # (name, ours, torch's, float64 reference, longest sum, scale of the terms) per result.
    results = [("output", ours, theirs, ref, d, None)]
    if grads is not None:
        default_eps = {"layer_norm": 1e-5, "rms_norm": 1e-6}[op]
        scales = (grad_x_scale(op, x, weight, grad_out, kwargs.get("eps", default_eps)), None, None)
        for name, t, g, terms, scale in zip(("grad_x", "grad_weight", "grad_bias"), inputs, grads, (d, rows, rows),
                                            scales):
            if g is not None:
                assert g[0].dtype == t.dtype, f"{name}: dtype {g[0].dtype}, its input is {t.dtype}"
                results.append((name, g[0], g[1], g[2], terms, scale))
    if x.device.type != "cpu":
        cpu_out, cpu_grads = on_cpu(ours_fn, inputs, grad_out)
        cpu_results = [cpu_out] + [c for g, c in zip(grads or (), cpu_grads or ()) if g is not None]
        for (name, ours_r, _, ref_r, terms, scale), cpu_r in zip(results, cpu_results, strict=True):
            assert_agrees_with_cpu(ours_r, cpu_r, ref_r, terms=terms, name=name, scale=scale)
    if op == "layer_norm" and d == 1:
        check_layer_norm_d1(ours, bias, grads)
        return
    for name, ours_r, theirs_r, ref_r, terms, scale in results:
        assert_accurate(ours_r, ref_r, theirs_r, terms=terms, name=name, scale=scale)


@pytest.mark.parametrize("dtypes,affine", DTYPE_AFFINE, ids=DTYPE_AFFINE_IDS)
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("op", NORMS)
def test_forward_backward(op, d, dtypes, affine, device):
    x_dtype, p_dtype = dtypes
    x = randn(rows_for(d), d, dtype=x_dtype, device=device, scale=2.0, shift=1.0, requires_grad=True)
    weight, bias = make_params(affine, d, p_dtype, device, requires_grad=True)
    check_norm(op, x, weight, bias, grad_out=torch.randn_like(x))


def shaped_input(kind, d, dtype, device):
    """x of the given layout: batched, empty, or a non-contiguous view."""
    if kind == "1d":  # a single row
        return randn(d, dtype=dtype, device=device, scale=2.0, shift=1.0)
    if kind == "3d":
        return randn(2, 5, d, dtype=dtype, device=device, scale=2.0, shift=1.0)
    if kind == "4d":
        return randn(2, 3, 2, d, dtype=dtype, device=device, scale=2.0, shift=1.0)
    if kind == "0rows":
        return randn(0, d, dtype=dtype, device=device)
    if kind == "0rows-3d":
        return randn(3, 0, d, dtype=dtype, device=device)
    if kind == "transposed":  # features are the strided dim
        return randn(d, 6, dtype=dtype, device=device, scale=2.0, shift=1.0).t()
    if kind == "sliced":  # every other feature, every other row
        return randn(10, 2 * d, dtype=dtype, device=device, scale=2.0, shift=1.0)[::2, ::2]
    raise ValueError(kind)


SHAPES = ("1d", "3d", "4d", "0rows", "0rows-3d", "transposed", "sliced")


@pytest.mark.parametrize("kind", SHAPES)
@pytest.mark.parametrize("dtypes", NORM_DTYPES, ids=NORM_DTYPE_IDS)
@pytest.mark.parametrize("op", NORMS)
def test_shapes_forward_backward(op, dtypes, kind, device):
    x_dtype, p_dtype = dtypes
    d = 127
    x = shaped_input(kind, d, x_dtype, device).requires_grad_()
    assert x.is_contiguous() == (kind not in ("transposed", "sliced"))
    weight, bias = make_params("wb", d, p_dtype, device, requires_grad=True)
    check_norm(op, x, weight, bias, grad_out=torch.randn_like(x))


@pytest.mark.parametrize("op", NORMS)
def test_strided_parameters_and_expanded_grad(op, device):
    """Strided weight/bias views, and the zero-stride output gradient of y.sum()."""
    d = 65
    x = randn(4, d, device=device, requires_grad=True)
    weight = randn(2 * d, device=device, shift=1.0)[::2].requires_grad_()
    bias = randn(d, 2, device=device)[:, 1].requires_grad_()
    check_norm(op, x, weight, bias, grad_out=torch.ones((), device=device).expand_as(x))


@pytest.mark.parametrize("op", NORMS)
def test_empty_feature_dim(op, device):
    """d = 0 gives empty results, like F.layer_norm / F.rms_norm."""
    x = randn(3, 0, device=device, requires_grad=True)
    weight, bias = make_params("wb", 0, torch.float32, device, requires_grad=True)
    y = ffn_op(op)(x, weight, bias)
    assert y.shape == (3, 0) and y.shape == reference_op(op)(x, weight, bias).shape
    y.sum().backward()
    assert x.grad.shape == (3, 0) and weight.grad.shape == (0,) and bias.grad.shape == (0,)


@pytest.mark.parametrize("eps", (0.0, 1e-2, 0.5))
@pytest.mark.parametrize("op", NORMS)
def test_eps(op, eps, device):
    x = randn(8, 31, device=device, scale=0.3)
    check_norm(op, x, *make_params("wb", 31, torch.float32, device), eps=eps)


@pytest.mark.parametrize("op", NORMS)
def test_default_eps(op):
    """The schema default (1e-5 layer_norm, 1e-6 rms_norm) is what the op uses."""
    x = randn(4, 16, scale=1e-3)  # small enough for eps to matter
    default = {"layer_norm": 1e-5, "rms_norm": 1e-6}[op]
    torch.testing.assert_close(ffn_op(op)(x, None, None), ffn_op(op)(x, None, None, default), rtol=0, atol=0)
    assert not torch.equal(ffn_op(op)(x, None, None), ffn_op(op)(x, None, None, 10 * default))


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=SHORT.get)
def test_layer_norm_large_mean(dtype):
    """Rows with a mean far larger than their spread: the variance must not cancel to
    garbage (as a one-pass sum(x^2) / d - mean^2 would)."""
    x = randn(16, 1024, dtype=dtype, scale=1.0, shift=300.0)
    check_norm("layer_norm", x, *make_params("wb", 1024, dtype, "cpu"))


@pytest.mark.parametrize("op", NORMS)
def test_matches_torch(op, device):
    """float32 results within assert_close's default tolerance of F.layer_norm / F.rms_norm."""
    x, weight, bias = randn(5, 4096, device=device), randn(4096, device=device), randn(4096, device=device)
    if op == "layer_norm":
        expected = torch.nn.functional.layer_norm(x, (4096,), weight, bias, 1e-5)
        actual = ffn_op(op)(x, weight, bias, 1e-5)
    else:
        expected = torch.nn.functional.rms_norm(x, (4096,), weight, 1e-6)
        actual = ffn_op(op)(x, weight, None, 1e-6)
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=SHORT.get)
@pytest.mark.parametrize("d", (64, 127, 4096, 20000))
@pytest.mark.parametrize("op", NORMS)
def test_float32_params_with_half_input(op, d, dtype, device):
    """Half x with float32 weight and bias: x's dtype for y and grad_x, float32 parameter gradients."""
    x = randn(4, d, dtype=dtype, device=device, requires_grad=True)
    weight = randn(d, device=device, shift=1.0, requires_grad=True)
    bias = randn(d, device=device, requires_grad=True)
    check_norm(op, x, weight, bias, grad_out=torch.randn_like(x))


# Long rows whose cached row (forward) or x and dy rows (backward without parameter
# gradients) take just under 48 KiB of dynamic shared memory on CUDA: the kernels'
# static scratch then pushes the total over the limit a kernel has without opting in.
@pytest.mark.parametrize("dtype,d", [(torch.float32, 12288), (torch.bfloat16, 24576), (torch.float64, 6144),
                                     (torch.bfloat16, 12288), (torch.float64, 3072)],
                         ids=lambda v: SHORT.get(v, str(v)))
@pytest.mark.parametrize("op", NORMS)
def test_long_rows_near_the_default_shared_memory_limit(op, dtype, d, device):
    for frozen in (False, True):  # frozen weight and bias: backward computes grad_x only
        x = randn(3, d, dtype=dtype, device=device, shift=3.0, requires_grad=True)
        weight = randn(d, dtype=dtype, device=device, shift=1.0, requires_grad=not frozen)
        bias = randn(d, dtype=dtype, device=device, requires_grad=not frozen)
        check_norm(op, x, weight, bias, grad_out=torch.randn_like(x))


@pytest.mark.parametrize("op", NORMS)
def test_row_strided_and_misaligned(op, device):
    """A row-strided view with contiguous rows, and (bfloat16) x, weight and bias starting
    2 bytes past a 16-byte boundary, where the CUDA kernels cannot use 128-bit accesses."""
    d = 64
    x = randn(8, d + 1, device=device)[:, 1:].requires_grad_()
    assert x.stride() == (d + 1, 1)
    check_norm(op, x, *make_params("wb", d, torch.float32, device, requires_grad=True), grad_out=torch.randn_like(x))
    misaligned_x = randn(8 * d + 1, dtype=torch.bfloat16, device=device)[1:].view(8, d)
    params = randn(2 * d + 2, dtype=torch.bfloat16, device=device)
    weight, bias = params[1 : d + 1], params[d + 2 :]
    for t in (misaligned_x, weight, bias):
        assert t.data_ptr() % 16 != 0
    for x, b in ((misaligned_x, bias), (randn(8, d, dtype=torch.bfloat16, device=device), None)):
        leaves = [None if t is None else t.detach().requires_grad_() for t in (x, weight, b)]
        check_norm(op, *leaves, grad_out=torch.randn_like(x))


# ----------------------------------------------------------------------------- backward
def grad_subsets(affine):
    """Every non-empty subset of the present inputs (x, weight, bias) that could require grad."""
    present = ["x"] + [name for name in ("w", "b") if name in affine]
    for k in range(1, len(present) + 1):
        yield from itertools.combinations(present, k)


SUBSET_CASES = [(affine, subset) for affine in AFFINE for subset in grad_subsets(affine)]


@pytest.mark.parametrize(
    "affine,subset", SUBSET_CASES, ids=[f"{a}-{'+'.join(s)}" for a, s in SUBSET_CASES]
)
@pytest.mark.parametrize("op", NORMS)
def test_backward_grad_subsets(op, affine, subset, device):
    """Frozen weights, frozen input, ...: only the requested gradients, all correct."""
    d = 33
    x = randn(2, 9, d, device=device, scale=2.0, shift=1.0, requires_grad="x" in subset)
    weight, bias = make_params(affine, d, torch.float32, device)
    if weight is not None:
        weight.requires_grad_("w" in subset)
    if bias is not None:
        bias.requires_grad_("b" in subset)
    check_norm(op, x, weight, bias, grad_out=torch.randn_like(x))


@pytest.mark.parametrize("op", NORMS)
def test_backward_op_returns_empty_for_unrequested(op, device):
    x = randn(3, 8, device=device)
    weight, bias = make_params("wb", 8, torch.float32, device)
    fwd = ffn_op(f"_{op}_fwd")(x, weight, bias, 1e-5)
    stats = fwd[1:] if op == "layer_norm" else fwd[1:2]
    bwd = ffn_op(f"_{op}_bwd")
    for weight_grad, bias_grad in itertools.product((False, True), repeat=2):
        gx, gw, gb = bwd(torch.ones_like(x), x, *stats, weight, bias, weight_grad, bias_grad)
        assert gx.shape == x.shape
        assert gw.shape == ((8,) if weight_grad else (0,))
        assert gb.shape == ((8,) if bias_grad else (0,))


@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("op", NORMS)
def test_gradcheck(op, affine, device):
    x = randn(2, 3, 7, dtype=torch.float64, device=device, shift=0.5, requires_grad=True)
    weight, bias = make_params(affine, 7, torch.float64, device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: ffn_op(op)(x, w, b), (x, weight, bias))


@pytest.mark.parametrize("op", NORMS)
def test_double_backward_raises(op, device):
    x = randn(3, 8, dtype=torch.float64, device=device, requires_grad=True)
    weight, bias = make_params("wb", 8, torch.float64, device, requires_grad=True)
    (gx,) = torch.autograd.grad(ffn_op(op)(x, weight, bias).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=f"double backward through {op} is not supported"):
        gx.sum().backward()


# ----------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("dtypes", [NORM_DTYPES[1], NORM_DTYPES[4]], ids=["f32", "bf16-wf32"])
@pytest.mark.parametrize("op", NORMS)
def test_weight_grad_deterministic_across_threads(op, dtypes):
    """Weight/bias gradients are bit-identical run to run and for 1 vs 2 threads."""
    x_dtype, p_dtype = dtypes
    x = randn(1000, 96, dtype=x_dtype, scale=2.0, shift=1.0)
    grad_out = torch.randn_like(x)
    weight, bias = make_params("wb", 96, p_dtype, "cpu", requires_grad=True)

    def param_grads():
        weight.grad = bias.grad = None
        ffn_op(op)(x, weight, bias).backward(grad_out)
        return weight.grad.clone(), bias.grad.clone()

    assert_same_across_threads(param_grads)


@pytest.mark.parametrize("d", (64, 4096, 16384, 40000))
@pytest.mark.parametrize("op", NORMS)
def test_weight_grad_deterministic_run_to_run(op, d, device):
    """bfloat16 x, float32 parameters: bit-identical gradients run to run, for many short rows
    and (on CUDA) the register, long-row and column kernels of the parameter gradients."""
    rows = 20000 if d == 64 else 300
    x = randn(rows, d, dtype=torch.bfloat16, device=device, requires_grad=True)
    grad_out = randn(rows, d, dtype=torch.bfloat16, device=device)
    weight, bias = randn(d, device=device, requires_grad=True), randn(d, device=device, requires_grad=True)

    def all_grads():
        return torch.autograd.grad(ffn_op(op)(x, weight, bias), (x, weight, bias), grad_out)

    for first, second in zip(all_grads(), all_grads(), strict=True):
        assert torch.equal(first, second)
