"""Where a mean shift goes: the systematic offset it leaves in each FFN tensor.

The telemetry means (FFN input mean, down-projection input mean, gate
pre-activation mean) average over features or units. A shift entering the FFN
input moves each gate unit's pre-activation by (row of W_gate) . shift, whose
sign differs from unit to unit, so those averages can stay put while every unit
moves. This probe runs the same validation windows with and without an extra
shift and measures, per layer, the part of the change that is the same for
every token (a per-unit offset, i.e. a mean shift), in units of the tensor's
own scale:

    offset(T) = mean over units k of |mean over tokens of (T_shifted - T_base)_k| / scale(T_base)

for T = the FFN input (scale: rms), the gate pre-activation (scale: std) and
h, the tensor entering the down projection (scale: rms). 0 means the shift
never arrives (e.g. LayerNorm removes it exactly). It also reports the rms of
the unshifted tensor entering each FFN norm, the scale to read the shift against. It is an evaluation-time
analysis on plain PyTorch copies of the FFN math, not training telemetry.
"""

import torch
import torch.nn.functional as F

from . import reference
from .model import Block, ffn_activation, shift_probe

OFFSET_KEYS = ("input_offset", "gate_offset", "down_in_offset")



def _ffn_tensors(ffn, x):
    """(gate pre-activation or None, h) of an FFN module for input rows x, in float32."""
    activation, gated = ffn_activation(ffn)
    x = x.float()
    if gated:
        preact = F.linear(x, ffn.w_gate_up.float(), None if ffn.b_gate_up is None else ffn.b_gate_up.float())
        gate, up = preact.chunk(2, dim=-1)
        return gate, reference.GATED_ACTIVATIONS[activation](gate) * up
    preact = F.linear(x, ffn.w1.float(), None if ffn.b1 is None else ffn.b1.float())
    return None, F.gelu(preact, approximate=ffn.approximate)


class _Accumulator:
    """Per-unit sums of (shifted - base) and the base tensor's moments, for one tensor of one layer."""

    def __init__(self):
        self.diff = self.total = self.total_sq = None
        self.count = 0

    def add(self, base, shifted):
        diff = (shifted - base).double().sum(0)
        total = base.double().sum()
        total_sq = base.double().square().sum()
        if self.diff is None:
            self.diff, self.total, self.total_sq = diff, total, total_sq
        else:
            self.diff += diff
            self.total += total
            self.total_sq += total_sq
        self.count += base.shape[0]

    def packed(self):
        return torch.cat([self.diff, self.total.view(1), self.total_sq.view(1),
                          self.diff.new_tensor([self.count])])

    @staticmethod
    def offset(packed, centered):
        diff, total, total_sq, rows = packed[:-3], packed[-3], packed[-2], packed[-1]
        n = rows * diff.numel()
        mean_sq = total_sq / n
        scale = torch.sqrt(mean_sq - (total / n) ** 2 if centered else mean_sq)
        return float((diff / rows).abs().mean() / scale) if scale > 0 else float("nan")


@torch.no_grad()
def shift_offsets(model, batches, shift, all_reduce=None):
    """Per layer {input_offset, gate_offset (NaN for GELU FFNs), down_in_offset} of an extra
    `shift` into every FFN norm, over `batches` (an iterable of input token tensors).
    `all_reduce(tensor)` sums the accumulators over DDP ranks when given."""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    captured = []
    hooks = [b.ffn.register_forward_hook(lambda mod, args, out: captured.append(args[0].reshape(-1, args[0].shape[-1])))
             for b in blocks]
    # Sum of squares and count of each FFN norm's input, on the unshifted pass.
    norm_in = [torch.zeros(2, dtype=torch.float64) for _ in blocks]
    shifting = [False]

    def norm_hook(layer):
        def hook(mod, args):
            if not shifting[0]:
                norm_in[layer] += torch.tensor([args[0].double().square().sum().item(), args[0].numel()],
                                               dtype=torch.float64)
        return hook

    hooks += [b.ffn_norm.register_forward_pre_hook(norm_hook(i)) for i, b in enumerate(blocks)]
    acc = [{key: _Accumulator() for key in OFFSET_KEYS} for _ in blocks]
    try:
        for x in batches:
            captured.clear()
            model(x)
            base = list(captured)
            captured.clear()
            shifting[0] = True
            with shift_probe(model, shift):
                model(x)
            shifting[0] = False
            for layer, (block, xb, xs) in enumerate(zip(blocks, base, captured)):
                (gb, hb), (gs, hs) = _ffn_tensors(block.ffn, xb), _ffn_tensors(block.ffn, xs)
                acc[layer]["input_offset"].add(xb.float(), xs.float())
                acc[layer]["down_in_offset"].add(hb, hs)
                if gb is not None:
                    acc[layer]["gate_offset"].add(gb, gs)
    finally:
        for hook in hooks:
            hook.remove()
    out = []
    for layer_acc, sq in zip(acc, norm_in):
        if all_reduce is not None:
            sq = all_reduce(sq.to(next(model.parameters()).device)).cpu()
        layer = {"norm_input_rms": float((sq[0] / sq[1]).sqrt()) if sq[1] > 0 else float("nan")}
        for key, a in layer_acc.items():
            if a.diff is None:
                layer[key] = float("nan")
                continue
            packed = a.packed()
            if all_reduce is not None:
                all_reduce(packed)
            layer[key] = _Accumulator.offset(packed, centered=key == "gate_offset")
        out.append(layer)
    return out
