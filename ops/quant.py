"""int8 weight-only quantization probe of the FFN weights.

Symmetric, per output channel (one scale per row of an [out_features, in_features]
weight): scale = max|w_row| / 127, q = round(w / scale) clamped to [-127, 127].
The probe evaluates with the dequantized weights q * scale, the numbers an int8
weight-only GEMM would use; biases and everything outside the FFNs stay as they are.
"""

import contextlib

import torch

from .modules import GeluFFN, _GatedFFN

QMAX = 127


def quantize_int8(weight):
    """(int8 values, float32 scales [out, 1]) of a 2-D weight, per output channel."""
    if weight.dim() != 2:
        raise ValueError(f"quantize_int8: weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    scale = w.abs().amax(dim=1, keepdim=True) / QMAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays zero
    q = torch.round(w / scale).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize_int8(q, scale):
    return q.float() * scale


def ffn_weights(model):
    """The FFN weight parameters of a model (biases excluded)."""
    weights = []
    for module in model.modules():
        if isinstance(module, GeluFFN):
            weights += [module.w1, module.w2]
        elif isinstance(module, _GatedFFN):
            weights += [module.w_gate_up, module.w_down]
    return weights


@contextlib.contextmanager
def int8_ffn_weights(model):
    """Within the block, every FFN weight holds its int8 round trip; restored on exit."""
    weights = ffn_weights(model)
    originals = [w.detach().clone() for w in weights]
    try:
        with torch.no_grad():
            for w in weights:
                w.copy_(dequantize_int8(*quantize_int8(w)).to(w.dtype))
        yield weights
    finally:
        with torch.no_grad():
            for w, original in zip(weights, originals):
                w.copy_(original)
