"""Plain PyTorch versions of every ffn op: the same math, written with torch ops.

They are what the tests compare against, what the benchmarks call "eager", and
the `torch` backend of the modules and of the A/B harness. Each takes the ffn
op's arguments in the same order.
"""

import torch
import torch.nn.functional as F

GATED_ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def layer_norm(x, weight=None, bias=None, eps=1e-5):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def rms_norm(x, weight=None, bias=None, eps=1e-6):
    y = F.rms_norm(x, (x.shape[-1],), weight, eps)
    # Output in y's dtype, like F.layer_norm's with float32 parameters and half x
    # (a plain `y + bias` would promote to float32).
    return y if bias is None else (y + bias).to(y.dtype)


def gelu_ffn(x, w1, b1, w2, b2, approximate="none"):
    return F.linear(F.gelu(F.linear(x, w1, b1), approximate=approximate), w2, b2)


def gated_activation(gate_up, activation="silu"):
    gate, up = gate_up.chunk(2, dim=-1)
    return GATED_ACTIVATIONS[activation](gate) * up


def gated_ffn(x, w_gate_up, b_gate_up, w_down, b_down, activation="silu"):
    return F.linear(gated_activation(F.linear(x, w_gate_up, b_gate_up), activation), w_down, b_down)


def swiglu(x, w_gate_up, b_gate_up, w_down, b_down):
    return gated_ffn(x, w_gate_up, b_gate_up, w_down, b_down, "silu")


def geglu(x, w_gate_up, b_gate_up, w_down, b_down):
    return gated_ffn(x, w_gate_up, b_gate_up, w_down, b_down, "gelu")


def reglu(x, w_gate_up, b_gate_up, w_down, b_down):
    return gated_ffn(x, w_gate_up, b_gate_up, w_down, b_down, "relu")


def bias_gelu(x, bias=None, approximate="none"):
    return F.gelu(x if bias is None else x + bias, approximate=approximate)


def backend(name):
    """The op namespace of a backend: "ffn" (torch.ops.ffn) or "torch" (this module)."""
    if name == "ffn":
        return torch.ops.ffn
    if name == "torch":
        import sys

        return sys.modules[__name__]
    raise ValueError(f"backend must be 'ffn' or 'torch', got {name!r}")
