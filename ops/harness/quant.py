"""Quantization probes of the FFN.

Weight-only: every FFN weight quantized symmetric, per output channel (one scale
per row of an [out_features, in_features] weight): with qmax = 2**(bits-1) - 1
(127 for int8), scale = max|w_row| / qmax and q = round(w / scale) clamped to
[-qmax, qmax]. The probe evaluates with the dequantized weights q * scale, the
numbers a weight-only integer GEMM would use; biases and everything outside the
FFNs stay as they are.

Down-projection input: h (the post-activation tensor the down projection reads)
quantized symmetric per token (one scale per row, max|h_row| / qmax), as an
int8 activation x int8 weight GEMM would see it. Its error grows with max|h|/rms,
the outlier statistic of the telemetry.
"""

import contextlib

import torch

from ..modules import FFN


def quantize(weight, bits=8):
    """(integer values as int8, float32 scales [out, 1]) of a 2-D weight, per output channel."""
    if weight.dim() != 2:
        raise ValueError(f"quantize: weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if not 2 <= bits <= 8:
        raise ValueError(f"quantize: bits must be in [2, 8], got {bits}")
    qmax = 2 ** (bits - 1) - 1
    w = weight.detach().float()
    scale = w.abs().amax(dim=1, keepdim=True) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays zero
    q = torch.round(w / scale).clamp_(-qmax, qmax).to(torch.int8)
    return q, scale


def dequantize(q, scale):
    return q.float() * scale


def fake_quantize_rows(x, bits=8):
    """x with each row (last dim) rounded to `bits`-bit symmetric integers and back."""
    rows = x.reshape(-1, x.shape[-1])
    return dequantize(*quantize(rows, bits)).reshape(x.shape)


def ffn_weights(model):
    """The FFN weight parameters of a model (biases excluded)."""
    return [proj()[0] for m in model.modules() if isinstance(m, FFN) for proj in (m.in_proj, m.out_proj)]


@contextlib.contextmanager
def quantized_ffn_weights(model, bits=8):
    """Within the block, every FFN weight holds its quantize/dequantize round trip; restored on exit."""
    weights = ffn_weights(model)
    originals = [w.detach().clone() for w in weights]
    try:
        with torch.no_grad():
            for w in weights:
                w.copy_(dequantize(*quantize(w, bits)).to(w.dtype))
        yield weights
    finally:
        with torch.no_grad():
            for w, original in zip(weights, originals):
                w.copy_(original)


@contextlib.contextmanager
def quantized_down_input(model, bits=8):
    """Within the block, every FFN computes its output from h quantized per token (plain PyTorch)."""

    def hook(module, args, out):
        _, h = module.hidden(args[0])
        return module.down(fake_quantize_rows(h, bits)).to(out.dtype)

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, FFN)]
    try:
        yield model
    finally:
        for h in hooks:
            h.remove()
