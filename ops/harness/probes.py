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
never arrives (e.g. LayerNorm removes it exactly). `norm_input_rms` measures
the scale of the residual stream entering each FFN norm, so a shift can be
given in units of it. It is an evaluation-time
analysis on plain PyTorch copies of the FFN math, not training telemetry.
"""

import torch

from .model import Block, shift_probe

OFFSET_KEYS = ("input_offset", "gate_offset", "down_in_offset")


def run_with_hooks(model, batches, handles):
    """Runs the model on every batch of input tokens with the hooks behind `handles`
    installed, and removes them afterwards (also on an error)."""
    try:
        for x in batches:
            model(x)
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def norm_input_rms(model, batches, all_reduce=None):
    """Per layer, the rms of the tensor entering the FFN norm (where the mean shift enters)."""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    sums = [torch.zeros(2, dtype=torch.float64, device=next(model.parameters()).device) for _ in blocks]

    def hook(layer):
        def pre_hook(module, args):
            sums[layer] += torch.stack([args[0].double().square().sum(),
                                        torch.tensor(args[0].numel(), dtype=torch.float64, device=args[0].device)])
        return pre_hook

    run_with_hooks(model, batches, [b.ffn_norm.register_forward_pre_hook(hook(i)) for i, b in enumerate(blocks)])
    if all_reduce is not None:
        for s in sums:
            all_reduce(s)
    return [float((s[0] / s[1]).sqrt()) for s in sums]


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
    `shift` (a number, or one per layer) into every FFN norm, over `batches` (an iterable
    of input token tensors).
    `all_reduce(tensor)` sums the accumulators over DDP ranks when given."""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    captured = []
    hooks = [b.ffn.register_forward_hook(lambda mod, args, out: captured.append(args[0].reshape(-1, args[0].shape[-1])))
             for b in blocks]
    acc = [{key: _Accumulator() for key in OFFSET_KEYS} for _ in blocks]
    try:
        for x in batches:
            captured.clear()
            model(x)
            base = list(captured)
            captured.clear()
            with shift_probe(model, shift):
                model(x)
            for layer, (block, xb, xs) in enumerate(zip(blocks, base, captured)):
                (gb, hb), (gs, hs) = block.ffn.hidden(xb), block.ffn.hidden(xs)
                acc[layer]["input_offset"].add(xb.float(), xs.float())
                acc[layer]["down_in_offset"].add(hb, hs)
                if gb is not None:
                    acc[layer]["gate_offset"].add(gb, gs)
    finally:
        for hook in hooks:
            hook.remove()
    out = []
    for layer_acc in acc:
        layer = {}
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
