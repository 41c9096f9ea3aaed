"""Plain PyTorch versions of every ffn op: the same math, written with torch ops.

They are what the tests compare against, what the benchmarks call "eager", and
the `torch` backend of the modules and of the A/B harness. Each takes the ffn
op's arguments in the same order, with the same defaults (ffn.schema).
"""

import sys

import torch
import torch.nn.functional as F

from .activations import GATED_OPS
from .activations import activation as _activation
from .schema import op_default


def layer_norm(x, weight=None, bias=None, eps=op_default("layer_norm", "eps")):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def rms_norm(x, weight=None, bias=None, eps=op_default("rms_norm", "eps")):
    y = F.rms_norm(x, (x.shape[-1],), weight, eps)
    # Output in y's dtype, like F.layer_norm's with float32 parameters and half x
    # (a plain `y + bias` would promote to float32).
    return y if bias is None else (y + bias).to(y.dtype)


def gelu_ffn(x, w1, b1, w2, b2, approximate=op_default("gelu_ffn", "approximate")):
    return F.linear(F.gelu(F.linear(x, w1, b1), approximate=approximate), w2, b2)


def gated_activation(gate_up, activation=op_default("gated_activation", "activation")):
    gate, up = gate_up.chunk(2, dim=-1)
    return _activation(activation).fn(gate) * up


def gated_ffn(x, w_gate_up, b_gate_up, w_down, b_down, activation):
    return F.linear(gated_activation(F.linear(x, w_gate_up, b_gate_up), activation), w_down, b_down)


def _gated_op(gate_activation):
    def op(x, w_gate_up, b_gate_up, w_down, b_down):
        return gated_ffn(x, w_gate_up, b_gate_up, w_down, b_down, gate_activation)

    return op


# swiglu, geglu, reglu: one function per gated op of the activation table.
for _op_name, _gate_activation in GATED_OPS.items():
    globals()[_op_name] = _gated_op(_gate_activation)
    globals()[_op_name].__name__ = _op_name


def bias_gelu(x, bias=None, approximate=op_default("bias_gelu", "approximate")):
    return F.gelu(x if bias is None else x + bias, approximate=approximate)


def backend(name):
    """The op namespace of a backend: "ffn" (torch.ops.ffn) or "torch" (this module)."""
    if name == "ffn":
        return torch.ops.ffn
    if name == "torch":
        return sys.modules[__name__]
    raise ValueError(f"backend must be 'ffn' or 'torch', got {name!r}")
