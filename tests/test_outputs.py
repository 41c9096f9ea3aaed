"""Every op's outputs are tensors of their own, never views of an internal buffer:
training code may add into them in place under autograd (Falcon's block does
`mlp_output += attention_output`), eagerly and under torch.compile, where the
fake kernels must agree with the real ones about it."""

import pytest
import torch

import ffn  # noqa: F401
from helpers import randn

D, D_FF = 12, 10


def public_calls(device):
    """(name, op call, the same math in plain PyTorch, leaves) for every public op."""
    kw = {"device": device}
    x = randn(2, 3, D, **kw)
    w, b = randn(D, **kw), randn(D, **kw)
    w1, b1, w2, b2 = randn(D_FF, D, **kw), randn(D_FF, **kw), randn(D, D_FF, **kw), randn(D, **kw)
    wgu, bgu = randn(2 * D_FF, D, **kw), randn(2 * D_FF, **kw)
    gate_up, z = randn(2, 3, 2 * D_FF, **kw), randn(2, 3, D, **kw)
    ref = ffn.reference
    calls = [
        ("layer_norm", "layer_norm", (x, w, b, 1e-5)),
        ("rms_norm", "rms_norm", (x, w, b, 1e-6)),
        ("gemma_rms_norm", "rms_norm", (x, w, b, 1e-6, 1.0)),
        ("add_layer_norm", "add_layer_norm", (x, z, w, b, 1e-5)),
        ("add_rms_norm", "add_rms_norm", (x, z, w, b, 1e-6, 1.0)),
        ("gelu_ffn", "gelu_ffn", (x, w1, b1, w2, b2, "tanh")),
        ("relu_ffn", "relu_ffn", (x, w1, b1, w2, b2)),
        ("geglu_tanh", "geglu", (x, wgu, bgu, w2, b2, "tanh")),
        ("gated_activation", "gated_activation", (gate_up, "silu")),
        ("bias_gelu", "bias_gelu", (z, b, "none")),
    ] + [(op, op, (x, wgu, bgu, w2, b2)) for op in ffn.activations.GATED_OPS]
    for name, op, args in calls:
        args = tuple(a.clone().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
        yield name, getattr(torch.ops.ffn, op), getattr(ref, op), args


def add_in_place_and_backward(fn, args):
    y = fn(*args)
    s = None
    if isinstance(y, tuple):  # the fused add + norms: (y, s); s is saved for backward, y is free
        y, s = y
    y += 1  # raises "... is a view and is being modified inplace" for a view output
    y.mul_(2)
    loss = y.square().sum() + (0 if s is None else s.square().sum())
    loss.backward()
    grads = [a.grad for a in args if isinstance(a, torch.Tensor)]
    for a in args:
        if isinstance(a, torch.Tensor):
            a.grad = None
    return y.detach(), grads


@pytest.mark.parametrize("name", ["layer_norm", "rms_norm", "gemma_rms_norm", "add_layer_norm", "add_rms_norm",
                                  "gelu_ffn", "relu_ffn", "geglu_tanh", "gated_activation", "bias_gelu",
                                  *ffn.activations.GATED_OPS])
def test_outputs_can_be_modified_in_place_under_autograd(name, device):
    _, op, ref, args = next(c for c in public_calls(device) if c[0] == name)
    y, grads = add_in_place_and_backward(op, args)
    y_ref, grads_ref = add_in_place_and_backward(ref, args)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("op_name", ["_layer_norm_fwd", "_rms_norm_fwd", "_add_layer_norm_fwd", "_add_rms_norm_fwd",
                                     "_gelu_ffn_fwd", "_relu_ffn_fwd", "_gated_ffn_fwd"])
def test_internal_outputs_own_their_storage(op_name, device):
    x = randn(2, 3, D, device=device)
    if op_name in ("_layer_norm_fwd", "_rms_norm_fwd"):
        args = (x, randn(D, device=device), None, 1e-5)
    elif op_name in ("_add_layer_norm_fwd", "_add_rms_norm_fwd"):
        args = (x, randn(2, 3, D, device=device), randn(D, device=device), None, 1e-5, 1.0)
    elif op_name == "_relu_ffn_fwd":
        args = (x, randn(D_FF, D, device=device), None, randn(D, D_FF, device=device), None)
    elif op_name == "_gelu_ffn_fwd":
        args = (x, randn(D_FF, D, device=device), None, randn(D, D_FF, device=device), None, "none")
    else:
        args = (x, randn(2 * D_FF, D, device=device), None, randn(D, D_FF, device=device), None, "silu")
    outputs = getattr(torch.ops.ffn, op_name)(*args)
    for out in outputs:
        if out is not None and out.numel():
            assert out._base is None
            assert out.untyped_storage().nbytes() == out.numel() * out.element_size()


@pytest.mark.slow
def test_in_place_add_into_outputs_under_compile(device):
    """A Falcon-style block, compiled with fullgraph: the fake kernels' outputs are fresh too."""
    x = randn(4, D, device=device, requires_grad=True)
    norm_w = randn(D, device=device)
    wgu, wd = randn(2 * D_FF, D, device=device), randn(D, D_FF, device=device)
    w1, w2 = randn(D_FF, D, device=device), randn(D, D_FF, device=device)

    def block(x):
        h = torch.ops.ffn.rms_norm(x, norm_w, None, 1e-6)
        mlp = torch.ops.ffn.swiglu(h, wgu, None, wd, None)
        mlp += torch.ops.ffn.gelu_ffn(h, w1, None, w2, None)
        mlp += x
        return mlp

    eager = block(x)
    (g_eager,) = torch.autograd.grad(eager.sum(), x)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")(x)
    (g_compiled,) = torch.autograd.grad(compiled.sum(), x)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(g_compiled, g_eager)
