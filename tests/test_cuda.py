"""What exists only on CUDA: tensors of more than 2^31 elements, CUDA graph capture
and replay, the current stream, and the inputs' device among several GPUs.

The CUDA cases of everything else (values against float64 references, torch and
the CPU kernels, shapes, dtypes, long rows, alignment, gradcheck, opcheck,
torch.compile, determinism) are the `device`-parametrized tests of test_norm.py,
test_ffn.py and test_compile.py. Everything here skips without a CUDA device.
"""

import pytest
import torch

import ffn  # noqa: F401  (registers torch.ops.ffn.*)
from ffn import reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

NORMS = ["layer_norm", "rms_norm"]
DEVICE = "cuda"
# bfloat16 against a float64 reference rounded to bfloat16: one rounding of the
# result plus float32 accumulation error.
BF16_TOL = dict(rtol=1.6e-2, atol=1.6e-2)


def randn(*shape, dtype=torch.float32, device=DEVICE, scale=1.0, shift=0.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale + shift).to(device=device, dtype=dtype)


def leaves(*tensors):
    """Leaf tensors requiring grad that alias the inputs."""
    return [None if t is None else t.detach().requires_grad_(True) for t in tensors]


def run(fn, inputs, grad_out):
    """fn(*inputs) and the gradients of <out, grad_out> w.r.t. every input that requires grad."""
    out = fn(*inputs)
    wrt = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(out, wrt, grad_out) if wrt else ()
    return out.detach(), list(grads)


def norm_op(kind):
    return getattr(torch.ops.ffn, kind)


# ----------------------------------------------------------------------------- > 2^31 elements
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
    torch.testing.assert_close(y[tail].detach(), yt.to(y.dtype).detach(), **BF16_TOL)
    torch.testing.assert_close(gx[tail], gt.to(gx.dtype), **BF16_TOL)


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
    torch.testing.assert_close(h[tail], expected, **BF16_TOL)


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
