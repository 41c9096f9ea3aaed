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
from .probes import down, hidden, run_with_hooks


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

    def make(i, module):
        def forward(x):
            _, h = hidden(module, x)
            return down(module, fake_quantize_rows(h, bits)).to(_out_dtype(module, x))
        return forward

    with _replaced_forwards(model, make):
        yield model


def _out_dtype(module, x):
    """The dtype the FFN module's own forward returns for x: the autocast dtype under autocast,
    else that of x and the weights."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return torch.promote_types(x.dtype, module.out_proj()[0].dtype)


@contextlib.contextmanager
def _replaced_forwards(model, make):
    """Within the block, every FFN module's forward is make(index, module) (the probes compute
    the FFN themselves: a forward hook would run the op first only to discard its output)."""
    ffns = [m for m in model.modules() if isinstance(m, FFN)]
    try:
        for i, m in enumerate(ffns):
            m.forward = make(i, m)
        yield model
    finally:
        for m in ffns:
            m.__dict__.pop("forward", None)


# ----------------------------------------------------------------------------- W8A8
# Weights int8 per output channel (as above) and activations int8 with static scales
# from a calibration pass, for both FFN matmuls: the FFN input x (into W_in) and the
# down-projection input h (into W_out). Modes:
#   tensor   one scale per tensor: max|X| / 127 over the calibration data
#   channel  one scale per input channel j: max|X_j| / 127 (a diagnostic: an integer GEMM
#            cannot apply per-input-channel activation scales, but it shows how much of the
#            error is the spread across channels)
#   smooth   SmoothQuant (Xiao et al. 2023): X' = X / s, W' = W * s per input channel with
#            s_j = max|X_j|^a / max|W_:,j|^(1-a), a = SMOOTH_ALPHA, then per-tensor W8A8
W8A8_MODES = ("tensor", "channel", "smooth")
SMOOTH_ALPHA = 0.5


def smooth_scales(x_absmax, weight, alpha=SMOOTH_ALPHA):
    """SmoothQuant's per-input-channel s_j = max|X_j|^a / max_i |W_ij|^(1-a) (weight [out, in])."""
    w_absmax = weight.detach().float().abs().amax(dim=0)
    s = x_absmax.float().clamp_min(1e-5).pow(alpha) / w_absmax.clamp_min(1e-5).pow(1 - alpha)
    return s.clamp_min(1e-5)


def fake_quantize_static(x, absmax, bits=8):
    """x rounded to `bits`-bit symmetric integers with the static scale absmax / qmax (absmax a
    number or one per last-dim channel); values beyond the calibrated range clamp."""
    qmax = 2 ** (bits - 1) - 1
    scale = torch.as_tensor(absmax, dtype=torch.float32, device=x.device) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(x.float() / scale).clamp_(-qmax, qmax) * scale


def _quantized_weight(absmax, weight, mode, bits):
    """What one matmul x W^T of `mode` needs besides x: (SmoothQuant's s or None, the activation's
    static absmax, the dequantized int8 weight). A function of the calibration and the weight only,
    so a probe computes it once per FFN, not once per batch."""
    if mode == "smooth":
        s = smooth_scales(absmax, weight)
        return s, (absmax / s).max(), dequantize(*quantize(weight * s, bits))
    if mode not in W8A8_MODES:
        raise ValueError(f"W8A8 mode must be one of {W8A8_MODES}, got {mode!r}")
    w = dequantize(*quantize(weight, bits))
    return None, absmax if mode == "channel" else absmax.max(), w


def _quantized_act(x, s, absmax, bits):
    x = x.float()
    return fake_quantize_static(x if s is None else x / s, absmax, bits)


def _quantized_pair(x, absmax, weight, mode, bits):
    """(activation after its fake quantization, dequantized int8 weight) of one matmul x W^T."""
    s, act_absmax, w = _quantized_weight(absmax, weight, mode, bits)
    return _quantized_act(x, s, act_absmax, bits), w


@contextlib.contextmanager
def _weights(ffn, w_in, w_out):
    """Within the block, the FFN's in/out projection weights hold w_in / w_out (restored on exit)."""
    params = (ffn.in_proj()[0], ffn.out_proj()[0])
    originals = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, w in zip(params, (w_in, w_out)):
                p.copy_(w.to(p.dtype))
        yield
    finally:
        with torch.no_grad():
            for p, o in zip(params, originals):
                p.copy_(o)


@torch.no_grad()
def channel_absmax(ffn, x):
    """Calibration statistics of one FFN on input x: {"x": max|x_j|, "h": max|h_k|} per channel."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    _, h = hidden(ffn, x2)
    return {"x": x2.abs().amax(0), "h": h.abs().amax(0)}


@torch.no_grad()
def w8a8_plan(ffn, calib, mode, bits=8):
    """The per-FFN part of w8a8_output (weights quantized, static scales) for its current weights."""
    (w_in, _), (w_out, _) = ffn.in_proj(), ffn.out_proj()
    return {"x": _quantized_weight(calib["x"], w_in, mode, bits), "h": _quantized_weight(calib["h"], w_out, mode, bits)}


@torch.no_grad()
def w8a8_output(ffn, x, calib, mode, bits=8, plan=None):
    """The FFN output for x with both matmuls in W8A8 (`mode`, static activation scales from
    `calib` = channel_absmax of the calibration data), in plain PyTorch, float32. `plan`:
    w8a8_plan(ffn, calib, mode, bits), computed here when not given."""
    plan = plan or w8a8_plan(ffn, calib, mode, bits)
    (w_in, _), (w_out, _) = ffn.in_proj(), ffn.out_proj()
    s, absmax, w_in_q = plan["x"]
    xq = _quantized_act(x, s, absmax, bits)
    with _weights(ffn, w_in_q, w_out):
        _, h = hidden(ffn, xq)
    s, absmax, w_out_q = plan["h"]
    hq = _quantized_act(h, s, absmax, bits)
    with _weights(ffn, w_in, w_out_q):
        return down(ffn, hq)


@torch.no_grad()
def calibrate(model, batches):
    """channel_absmax of every FFN over `batches` (input token tensors), max-combined."""
    ffns = [m for m in model.modules() if isinstance(m, FFN)]
    calib = [None] * len(ffns)

    def hook(i):
        def fn(module, args, out):
            c = channel_absmax(module, args[0])
            calib[i] = c if calib[i] is None else {k: torch.maximum(calib[i][k], c[k]) for k in c}
        return fn

    run_with_hooks(model, batches, [m.register_forward_hook(hook(i)) for i, m in enumerate(ffns)])
    return calib


@contextlib.contextmanager
def quantized_w8a8(model, calib, mode, bits=8):
    """Within the block, every FFN computes its output in W8A8 (w8a8_output) with the static
    activation scales of `calib` (calibrate())."""
    def make(i, module):
        plan = w8a8_plan(module, calib[i], mode, bits)  # the weights stay fixed within the block
        return lambda x: w8a8_output(module, x, calib[i], mode, bits, plan).to(_out_dtype(module, x))

    with _replaced_forwards(model, make):
        yield model
