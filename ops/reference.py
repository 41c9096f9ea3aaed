"""Plain PyTorch versions of every ffn op: the same math, written with torch ops.

They are what the tests compare against, what the benchmarks call "eager", and
the `torch` backend of the modules and of the A/B harness. Each takes the ffn
op's arguments in the same order, with the same defaults (ffn.schema).
"""

import sys

import torch
import torch.nn.functional as F

from .activations import GATED_OPS, gelu_activation
from .activations import activation as _activation
from .schema import op_default


def _offset_norm(norm, x, weight, bias, weight_offset):
    """norm(x) with the weight scaling as (weight + weight_offset), formed in float32
    (float64 for float64 x) as Gemma's RMSNorm does; output in x's dtype."""
    if weight_offset == 0:
        return norm(x, weight, bias)
    if weight is None:
        raise ValueError(f"weight_offset ({weight_offset}) scales a weight, but weight is None")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = norm(x.to(acc), weight.to(acc) + weight_offset, None if bias is None else bias.to(acc))
    return y.to(x.dtype)


# in_place_backward changes where the ops' backward writes grad_x, not what it is: ignored here.
def layer_norm(x, weight=None, bias=None, eps=op_default("layer_norm", "eps"),
               weight_offset=op_default("layer_norm", "weight_offset"), in_place_backward=False):
    return _offset_norm(lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, eps), x, weight, bias, weight_offset)


def rms_norm(x, weight=None, bias=None, eps=op_default("rms_norm", "eps"),
             weight_offset=op_default("rms_norm", "weight_offset"), in_place_backward=False):
    def norm(x, w, b):
        y = F.rms_norm(x, (x.shape[-1],), w, eps)
        # Output in y's dtype, like F.layer_norm's with float32 parameters and half x
        # (a plain `y + bias` would promote to float32).
        return y if b is None else (y + b).to(y.dtype)

    return _offset_norm(norm, x, weight, bias, weight_offset)


def add_layer_norm(x, residual, weight=None, bias=None, eps=op_default("add_layer_norm", "eps"),
                   weight_offset=op_default("add_layer_norm", "weight_offset"), in_place_backward=False):
    s = x + residual
    return layer_norm(s, weight, bias, eps, weight_offset), s


def add_rms_norm(x, residual, weight=None, bias=None, eps=op_default("add_rms_norm", "eps"),
                 weight_offset=op_default("add_rms_norm", "weight_offset"), in_place_backward=False):
    s = x + residual
    return rms_norm(s, weight, bias, eps, weight_offset), s


def gelu_ffn(x, w1, b1, w2, b2, approximate=op_default("gelu_ffn", "approximate")):
    return F.linear(F.gelu(F.linear(x, w1, b1), approximate=approximate), w2, b2)


def relu_ffn(x, w1, b1, w2, b2):
    return F.linear(F.relu(F.linear(x, w1, b1)), w2, b2)


def gated_activation(gate_up, activation=op_default("gated_activation", "activation")):
    gate, up = gate_up.chunk(2, dim=-1)
    return _activation(activation).fn(gate) * up


def gated_ffn(x, w_gate_up, b_gate_up, w_down, b_down, activation):
    return F.linear(gated_activation(F.linear(x, w_gate_up, b_gate_up), activation), w_down, b_down)


def _gated_op(name, gate_activation):
    def op(x, w_gate_up, b_gate_up, w_down, b_down, approximate="none"):
        act = gate_activation
        if gate_activation == "gelu":
            act = gelu_activation(approximate)
        elif approximate != "none":
            raise ValueError(f"{name}: approximate applies to GELU gates (geglu) only; got {approximate!r}")
        return gated_ffn(x, w_gate_up, b_gate_up, w_down, b_down, act)

    return op


# swiglu, geglu, reglu: one function per gated op of the activation table.
for _op_name, _gate_activation in GATED_OPS.items():
    globals()[_op_name] = _gated_op(_op_name, _gate_activation)
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
