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

Those copies are hidden() and down() below (the quantization and outlier probes use
them too): the FFN split at h, in float32, built on the FFN interface of ffn.modules.FFN
(in_proj, out_proj, activation, gated), so they take every module that implements it.
"""

import contextlib

import torch
import torch.nn.functional as F

from .. import reference
from ..activations import activation as activation_spec
from .model import Block, shift_probe

OFFSET_KEYS = ("input_offset", "gate_offset", "down_in_offset")


def _float(t):
    return None if t is None else t.float()


def hidden(ffn, x):
    """(gate pre-activation, or None when not gated; h, the tensor entering the down
    projection) of the FFN module `ffn` for input x, in plain PyTorch and float32: for
    probes, not training."""
    w_in, b_in = ffn.in_proj()
    preact = F.linear(x.float(), w_in.float(), _float(b_in))
    if ffn.gated:
        return preact.chunk(2, dim=-1)[0], reference.gated_activation(preact, ffn.activation)
    return None, activation_spec(ffn.activation).fn(preact)


def down(ffn, h):
    """The down projection of the FFN module `ffn` applied to h, in float32."""
    w_out, b_out = ffn.out_proj()
    return F.linear(h, w_out.float(), _float(b_out))


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
    """Per-unit sums of the shifted and the base tensor and the base tensor's moments, for one
    tensor of one layer. The two passes need not be paired batch by batch: the per-unit mean
    of (shifted - base) over the same windows is the difference of the per-unit means, so one
    pass can record the base and a later one the shifted tensors."""

    def __init__(self):
        self.base = self.shifted = self.total = self.total_sq = None
        self.count = 0

    def add_base(self, base):
        base = base.double()
        s, total, total_sq = base.sum(0), base.sum(), base.square().sum()
        if self.base is None:
            self.base, self.total, self.total_sq = s, total, total_sq
        else:
            self.base += s
            self.total += total
            self.total_sq += total_sq
        self.count += base.shape[0]

    def add_shifted(self, shifted):
        s = shifted.double().sum(0)
        self.shifted = s if self.shifted is None else self.shifted + s

    def packed(self):
        return torch.cat([self.shifted - self.base, self.total.view(1), self.total_sq.view(1),
                          self.base.new_tensor([self.count])])

    @staticmethod
    def offset(packed, centered):
        diff, total, total_sq, rows = packed[:-3], packed[-3], packed[-2], packed[-1]
        n = rows * diff.numel()
        mean_sq = total_sq / n
        scale = torch.sqrt(mean_sq - (total / n) ** 2 if centered else mean_sq)
        return float((diff / rows).abs().mean() / scale) if scale > 0 else float("nan")


class ShiftRecorder:
    """Records what the shift probe needs from forward passes the evaluation runs anyway: in a
    "base" pass the rms entering each FFN norm (norm_input_rms) and the per-unit sums of the
    FFN input, gate pre-activation and h; in a "shifted" pass (the same windows, more shift)
    their shifted sums. Use `with recorder.recording(phase):` around the forwards and call
    recorder.batch() after each one; then rms() and offsets()."""

    def __init__(self, model):
        self.blocks = [m for m in model.modules() if isinstance(m, Block)]
        device = next(model.parameters()).device
        self.sums = [torch.zeros(2, dtype=torch.float64, device=device) for _ in self.blocks]
        self.acc = [{key: _Accumulator() for key in OFFSET_KEYS} for _ in self.blocks]
        self.phase = None
        self.caps = None

    @contextlib.contextmanager
    def recording(self, phase):
        if phase not in ("base", "shifted"):
            raise ValueError(f"phase must be 'base' or 'shifted', got {phase!r}")
        handles = []
        if phase == "base":
            def hook(layer):
                def pre_hook(module, args):
                    self.sums[layer] += torch.stack([
                        args[0].double().square().sum(),
                        torch.tensor(args[0].numel(), dtype=torch.float64, device=args[0].device)])
                return pre_hook

            handles = [b.ffn_norm.register_forward_pre_hook(hook(i)) for i, b in enumerate(self.blocks)]
        self.phase, self.caps = phase, [{} for _ in self.blocks]
        try:
            for b, c in zip(self.blocks, self.caps):
                b.capture = c
            yield self
        finally:
            for b in self.blocks:
                b.capture = None
            for handle in handles:
                handle.remove()
            self.phase, self.caps = None, None

    @torch.no_grad()
    def batch(self):
        """Records the FFN inputs of the forward just run."""
        for block, cap, acc in zip(self.blocks, self.caps, self.acc):
            x = cap.pop("ffn_in")
            x = x.reshape(-1, x.shape[-1])
            gate, h = hidden(block.ffn, x)
            add = "add_base" if self.phase == "base" else "add_shifted"
            getattr(acc["input_offset"], add)(x.float())
            getattr(acc["down_in_offset"], add)(h)
            if gate is not None:
                getattr(acc["gate_offset"], add)(gate)
            cap.clear()

    def rms(self, all_reduce=None):
        if all_reduce is not None:
            for s in self.sums:
                all_reduce(s)
        return [float((s[0] / s[1]).sqrt()) for s in self.sums]

    def offsets(self, all_reduce=None):
        out = []
        for layer_acc in self.acc:
            layer = {}
            for key, a in layer_acc.items():
                if a.base is None or a.shifted is None:
                    layer[key] = float("nan")
                    continue
                packed = a.packed()
                if all_reduce is not None:
                    all_reduce(packed)
                layer[key] = _Accumulator.offset(packed, centered=key == "gate_offset")
            out.append(layer)
        return out


@torch.no_grad()
def shift_offsets(model, batches, shift, all_reduce=None):
    """Per layer {input_offset, gate_offset (NaN for GELU FFNs), down_in_offset} of an extra
    `shift` (a number, or one per layer) into every FFN norm, over `batches` (an iterable
    of input token tensors).
    `all_reduce(tensor)` sums the accumulators over DDP ranks when given."""
    recorder = ShiftRecorder(model)
    for x in batches:
        with recorder.recording("base"):
            model(x)
            recorder.batch()
        with shift_probe(model, shift), recorder.recording("shifted"):
            model(x)
            recorder.batch()
    return recorder.offsets(all_reduce)
