"""Outlier statistics of the FFN, from the FFN modules' shared interface (in_proj,
out_proj, activation, gated; h and the output from probes.hidden / probes.down): cheap
enough to log at the telemetry cadence, and measured on validation windows after training.

Per layer:
    h_rms_kurtosis      kurtosis over neurons k of r_k = rms over tokens of h_k (h: the
                        down-projection input): sum_k (r_k - mean r)^4 / K / var(r)^2, the
                        Pearson form (3 for normal r_k, larger when a few neurons carry
                        outlier features; He et al., NeurIPS 2024)
    h_max_over_median   max |h| / median |h| over all entries (massive activations, Sun et al. 2024)
    resid_max_over_median  the same for the residual stream entering the block
    gate_up_cos         gated FFNs: mean over units of cos(gate row k, up row k) of W_in
                        (Fishman et al., ICLR 2025: gate/up alignment grows outliers); NaN otherwise
    gate_up_cos_max     the largest of those cosines
    gate_rel_*          gated FFNs (NaN otherwise): gate saturation relative to the gate's own
                        scale, which the absolute telemetry thresholds (|act| > 6) never reach at
                        small widths. With a = |act(gate pre-activation)| and s = rms(a) over the
                        layer's entries: gate_rel_near_zero_frac = share of a < 0.01 s,
                        gate_rel_large4_frac / gate_rel_large8_frac = share of a > 4 s / 8 s,
                        gate_rel_p99 / gate_rel_max = the 99th percentile (nearest rank) and max
                        of a / s; gate_preact_tail4_frac = share of gate pre-activations z with
                        |z - mean z| > 4 std z
    w8a8_<mode>_err     ||FFN_W8A8(x) - FFN(x)|| / ||FFN(x)|| on this batch with static activation
                        scales calibrated on the same batch (quant.W8A8_MODES)
"""

import contextlib
import math

import torch
import torch.nn.functional as F

from ..activations import activation as activation_spec
from .model import Block
from .probes import down, hidden
from .quant import W8A8_MODES, w8a8_output

GATE_KEYS = ("gate_rel_near_zero_frac", "gate_rel_large4_frac", "gate_rel_large8_frac", "gate_rel_p99",
             "gate_rel_max", "gate_preact_tail4_frac")
OUTLIER_KEYS = ("h_rms_kurtosis", "h_max_over_median", "resid_max_over_median", "gate_up_cos", "gate_up_cos_max",
                *GATE_KEYS, *(f"w8a8_{m}_err" for m in W8A8_MODES))
# The median of |values| is taken over at most this many entries (a fixed strided subsample).
MEDIAN_SAMPLE = 1 << 20


def kurtosis(values):
    """Pearson kurtosis (population moments) of a 1-D tensor: E[(v - mean)^4] / var^2."""
    v = values.double()
    d = v - v.mean()
    var = d.square().mean()
    return float(d.pow(4).mean() / var.square()) if var > 0 else float("nan")


def max_over_median(t):
    a = t.detach().float().abs().flatten()
    sample = a[:: max(1, a.numel() // MEDIAN_SAMPLE)]
    med = sample.median()
    return float(a.max() / med) if med > 0 else float("nan")


def gate_up_alignment(ffn):
    """(mean, max) over units of cos(gate row, up row) of a gated FFN's W_in; NaNs otherwise."""
    if not ffn.gated:
        return float("nan"), float("nan")
    gate, up = ffn.in_proj()[0].detach().float().chunk(2, dim=0)
    cos = F.cosine_similarity(gate, up, dim=1)
    return float(cos.mean()), float(cos.max())


def gate_saturation(gate_preact, activation):
    """The GATE_KEYS of one layer's gate pre-activations (any shape; None: not gated, all NaN),
    in float32 over all entries."""
    if gate_preact is None or gate_preact.numel() == 0:
        return dict.fromkeys(GATE_KEYS, float("nan"))
    z = gate_preact.detach().float().flatten()
    a = activation_spec(activation).fn(z).abs()
    scale = a.square().mean().sqrt()
    z_dev = (z - z.mean()).abs()
    z_std = z_dev.square().mean().sqrt()
    if scale == 0:
        rel = dict.fromkeys(GATE_KEYS[:5], float("nan"))
    else:
        ratio = a / scale
        rel = {"gate_rel_near_zero_frac": float((ratio < 0.01).float().mean()),
               "gate_rel_large4_frac": float((ratio > 4).float().mean()),
               "gate_rel_large8_frac": float((ratio > 8).float().mean()),
               "gate_rel_p99": float(ratio.kthvalue(math.ceil(0.99 * ratio.numel())).values),
               "gate_rel_max": float(ratio.max())}
    tail = float((z_dev > 4 * z_std).float().mean()) if z_std > 0 else float("nan")
    return {**rel, "gate_preact_tail4_frac": tail}


@contextlib.contextmanager
def captured(model):
    """Within the block, each Block's forward stores its residual input ('resid') and FFN input
    ('ffn_in') in a dict; yields the list of dicts, one per layer."""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    caps = [{} for _ in blocks]
    try:
        for b, c in zip(blocks, caps):
            b.capture = c
        yield caps
    finally:
        for b in blocks:
            b.capture = None


@torch.no_grad()
def layer_outliers(ffn, ffn_in, resid, with_quant=True):
    """The OUTLIER_KEYS of one layer from its FFN input and residual input tensors."""
    x = ffn_in.reshape(-1, ffn_in.shape[-1]).float()
    gate, h = hidden(ffn, x)
    cos_mean, cos_max = gate_up_alignment(ffn)
    out = {"h_rms_kurtosis": kurtosis(h.square().mean(0).sqrt()), "h_max_over_median": max_over_median(h),
           "resid_max_over_median": max_over_median(resid), "gate_up_cos": cos_mean, "gate_up_cos_max": cos_max,
           **gate_saturation(gate, ffn.activation)}
    if with_quant:
        ref = down(ffn, h)
        calib = {"x": x.abs().amax(0), "h": h.abs().amax(0)}  # channel_absmax(ffn, x), h already computed
        norm = ref.norm()
        for mode in W8A8_MODES:
            err = (w8a8_output(ffn, x, calib, mode) - ref).norm()
            out[f"w8a8_{mode}_err"] = float(err / norm) if norm > 0 else float("nan")
    return out


def model_outliers(model, caps, with_quant=True):
    """Per layer OUTLIER_KEYS from the tensors captured() stored during a forward."""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    return [layer_outliers(b.ffn, c["ffn_in"], c["resid"], with_quant) for b, c in zip(blocks, caps)]


@torch.no_grad()
def eval_outliers(model, batches):
    """Per layer OUTLIER_KEYS on validation batches: statistics of the batches concatenated
    (per-neuron rms over all their tokens, max and median over all entries)."""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    ffn_in, resid = [[] for _ in blocks], [[] for _ in blocks]
    with captured(model) as caps:
        for x in batches:
            model(x)
            for i, c in enumerate(caps):
                ffn_in[i].append(c["ffn_in"].reshape(-1, c["ffn_in"].shape[-1]))
                resid[i].append(c["resid"].reshape(-1, c["resid"].shape[-1]))
    return captured_outliers(model, ffn_in, resid)


@torch.no_grad()
def captured_outliers(model, ffn_in, resid):
    """eval_outliers of tensors captured elsewhere: per layer, the lists of FFN input and residual
    input tensors ([rows, d_model]) of the batches (None when there were none)."""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    if not ffn_in or not ffn_in[0]:
        return None
    return [layer_outliers(b.ffn, torch.cat(f), torch.cat(r)) for b, f, r in zip(blocks, ffn_in, resid)]


def finite_or_none(value):
    return value if isinstance(value, float) and math.isfinite(value) else None
