"""A decoder-only Transformer LM whose normalization + FFN sublayer is chosen by flags.

The block's design (`Design`): norm (layernorm | rmsnorm, with or without a
learnable bias), FFN (gelu | swiglu | geglu | reglu), placement (pre | post),
layout (serial | parallel, PaLM-style), and a constant `mean_shift` added to
the tensor entering each FFN norm (the "customer domain" shift of the case
studies). The backend ("ffn": torch.ops.ffn through the ffn modules, "torch":
plain PyTorch with the same parameters) is chosen per model.

    pre,  serial:   x = x + attn(n1(x));  x = x + ffn(n2(x + c))
    post, serial:   x = n1(x + attn(x));  x = n2(x + ffn(x) + c)
    pre,  parallel: n = n1(x + c);        x = x + attn(n) + ffn(n)
    post, parallel: x = n1(x + attn(x) + ffn(x) + c)

With telemetry requested for a forward pass, every block also computes the
per-layer FFN statistics (ffn.telemetry.ffn_stats) from tensors the forward
already has: the FFN input and the pre-activation the FFN module returns
(FFN.forward_with_preact).

On the ffn backend, pre-norm serial blocks fuse each residual add with the norm that
reads its sum (torch.ops.ffn.add_layer_norm / add_rms_norm: the same numbers as the
add and the norm apart): the attention output's add with n2, and, since a block hands
its FFN output on unadded (`pending`), that add with the next block's n1 or the final
norm. The add into n2 stays apart with a mean shift (the shift enters n2's input, not
the residual stream) and whenever forward hooks watch the norm (they see its input).
"""

import contextlib
import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as module_hooks

from .. import telemetry
from ..modules import AddLayerNorm, AddRMSNorm, LayerNorm, RMSNorm
from ..schema import op_default
from .designs import NORMS, Design

BACKENDS = ("ffn", "torch")
NORM_MODULES = {"layer_norm": LayerNorm, "rms_norm": RMSNorm}


class ResidualLayerNorm(AddLayerNorm):
    """ffn.AddLayerNorm that is also the plain norm: forward(x) is layer_norm(x), forward(x, residual)
    the fused (layer_norm(x + residual), x + residual). Parameters (and state_dict) as LayerNorm's."""

    def forward(self, x, residual=None):
        return LayerNorm.forward(self, x) if residual is None else super().forward(x, residual)


class ResidualRMSNorm(AddRMSNorm):
    """ffn.AddRMSNorm that is also the plain norm, as ResidualLayerNorm."""

    def forward(self, x, residual=None):
        return RMSNorm.forward(self, x) if residual is None else super().forward(x, residual)


RESIDUAL_NORM_MODULES = {"layer_norm": ResidualLayerNorm, "rms_norm": ResidualRMSNorm}


def ffn_param_count(d_model, d_ff, gated, bias):
    """Parameters of one FFN (d_out = d_model)."""
    if gated:
        return 3 * d_model * d_ff + (2 * d_ff + d_model if bias else 0)
    return 2 * d_model * d_ff + (d_ff + d_model if bias else 0)


def gated_d_ff(d_model, d_ff, bias=True):
    """The width of a gated FFN with the parameter count of a GELU FFN of width d_ff:
    2/3 of d_ff, rounded to the integer whose count is closest; it must be within 1%."""
    target = ffn_param_count(d_model, d_ff, False, bias)
    base = round(2 * d_ff / 3)
    width = min((base - 1, base, base + 1),
                key=lambda w: abs(ffn_param_count(d_model, w, True, bias) - target))
    mismatch = abs(ffn_param_count(d_model, width, True, bias) - target) / target
    if mismatch >= 0.01:
        raise ValueError(f"no gated FFN width matches the parameter count of a GELU FFN with d_model={d_model}, "
                         f"d_ff={d_ff} within 1% (best: {width}, off by {mismatch:.2%}); use a larger d_ff")
    return width


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 256
    seq_len: int = 128
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 512  # the GELU FFN's width; gated FFNs use gated_d_ff(d_model, d_ff)
    ffn_bias: bool = True
    design: Design = Design()
    backend: str = "ffn"

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")

    @property
    def ffn_width(self):
        """The FFN's d_ff: d_ff itself, or the gated width with the same parameter count."""
        return gated_d_ff(self.d_model, self.d_ff, self.ffn_bias) if self.design.gated else self.d_ff

    def with_design(self, design):
        return replace(self, design=design)

    def to_dict(self):
        return asdict(self)


def fuses_residual_add(config):
    """Whether the model's norms take the residual add fused (module docstring)."""
    return config.backend == "ffn" and config.design.placement == "pre" and config.design.layout == "serial"


def make_norm(config):
    design, op = config.design, NORMS[config.design.norm].op
    modules = RESIDUAL_NORM_MODULES if fuses_residual_add(config) else NORM_MODULES
    return modules[op](config.d_model, eps=op_default(op, "eps"), bias=design.has_norm_bias, backend=config.backend)


def watched(module):
    """Whether forward hooks, the module's own or global ones, see its calls."""
    return bool(module._forward_pre_hooks or module._forward_hooks
                or module_hooks._global_forward_pre_hooks or module_hooks._global_forward_hooks)


def add_norm(norm, x, branch):
    """(norm(x + branch), x + branch), x alone when branch is None: one fused op when the norm
    takes the residual, no hook watches it (a hook must see the sum as the norm's input) and
    the dtypes match (under autocast a bf16 branch is promoted into the float32 stream)."""
    if branch is None:
        return norm(x), x
    if isinstance(norm, (ResidualLayerNorm, ResidualRMSNorm)) and not watched(norm) and x.dtype == branch.dtype:
        return norm(x, branch)
    s = x + branch
    return norm(s), s


def make_ffn(config):
    return config.design.ffn_module(config.d_model, config.ffn_width, bias=config.ffn_bias, backend=config.backend)


class CausalSelfAttention(nn.Module):
    """qkv packs the q, k and v rows ([3 * d_model, d_model]). The head count is read from the
    qkv output, so that under tensor parallelism (harness/parallel.py: qkv column-parallel with
    each rank holding its heads' q, k and v rows, proj row-parallel) the same code runs on a
    rank's heads."""

    def __init__(self, d_model, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, -1, self.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        design = config.design
        self.design = design
        self.mean_shift = design.mean_shift  # shift_probe() raises it temporarily
        self.var_shift = design.var_shift  # times the per-sequence multiplier; var_shift_probe() raises it
        self.capture = None  # a dict: forward stores its residual input and FFN input there (outliers.py)
        self.attn = CausalSelfAttention(config.d_model, config.n_heads)
        self.norm1 = make_norm(config)
        # The parallel layout shares one norm between attention and FFN (PaLM).
        self.norm2 = make_norm(config) if design.layout == "serial" else None
        self.ffn = make_ffn(config)

    @property
    def ffn_norm(self):
        """The norm whose input the mean shift enters (the parallel layout's shared norm)."""
        return self.norm2 if self.norm2 is not None else self.norm1

    def _ffn(self, x, stats):
        """FFN of x; appends this layer's raw telemetry sums to `stats` when it is a list."""
        if self.capture is not None:
            self.capture["ffn_in"] = x.detach()
        if stats is None:
            return self.ffn(x)
        out, preact = self.ffn.forward_with_preact(x)
        stats.append(telemetry.ffn_stats(x.detach(), preact.detach(), self.ffn.activation, self.ffn.gated))
        return out

    def shift(self, mult=None):
        """What enters the FFN norm besides the residual: the constant shift (a float), plus
        var_shift * mult ([batch, 1, 1], one multiplier per sequence) when var_shift is set."""
        c = self.mean_shift
        if self.var_shift and mult is not None:
            c = c + self.var_shift * mult
        return c

    def forward(self, x, stats=None, mult=None, pending=None):
        """(x, pending): the block's input is x + pending (pending: the previous block's FFN output
        not yet added, or None), its output likewise: pre-norm serial blocks hand their FFN
        output on unadded, so that the add fuses with the next norm (add_norm); others add it."""
        c = self.shift(mult)
        shifted = torch.is_tensor(c) or c
        if self.design.layout == "serial" and self.design.placement == "pre":
            n, x = add_norm(self.norm1, x, pending)
            if self.capture is not None:
                self.capture["resid"] = x.detach()
            a = self.attn(n)
            if shifted:
                x = x + a
                n = self.norm2(x + c)
            else:
                n, x = add_norm(self.norm2, x, a)
            return x, self._ffn(n, stats)
        if pending is not None:
            x = x + pending
        if self.capture is not None:
            self.capture["resid"] = x.detach()
        return self._post_or_parallel(x, stats, c if shifted else None), None

    def _post_or_parallel(self, x, stats, c):
        """The output of a post-norm or parallel block (c: the shift, or None)."""
        def add(t):
            return t if c is None else t + c

        if self.design.layout == "serial":
            x = self.norm1(x + self.attn(x))
            y = x + self._ffn(x, stats)
            return self.norm2(add(y))
        if self.design.placement == "pre":
            n = self.norm1(add(x))
            return x + self.attn(n) + self._ffn(n, stats)
        y = x + self.attn(x) + self._ffn(x, stats)
        return self.norm1(add(y))


class TransformerLM(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.seq_len, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        # Post-norm blocks end in a norm already.
        self.norm_f = make_norm(config) if config.design.placement == "pre" else None
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # tied
        self._init_weights()

    def _init_weights(self):
        # GPT-2 style: N(0, 0.02) embeddings and projections into the residual stream
        # scaled by 1/sqrt(2 * n_layers); the FFN and norm modules keep their own init.
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=0.02)
            nn.init.zeros_(block.attn.qkv.bias)
            nn.init.normal_(block.attn.proj.weight, std=0.02 / math.sqrt(2 * self.config.n_layers))
            nn.init.zeros_(block.attn.proj.bias)

    def forward(self, idx, targets=None, stats=None):
        """Logits (and the mean cross-entropy when targets are given). With `stats` a list,
        each block appends its raw telemetry sums, layer by layer."""
        t = idx.shape[1]
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(t, device=idx.device))
        mult = sequence_multipliers(idx).to(x.dtype) if any(b.var_shift for b in self.blocks) else None
        pending = None
        for block in self.blocks:
            x, pending = block(x, stats, mult, pending)
        if self.norm_f is not None:
            x, _ = add_norm(self.norm_f, x, pending)
        logits = self.head(x)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss

    def ffn_modules(self):
        return [block.ffn for block in self.blocks]


@contextlib.contextmanager
def _raised_shift(model, attr, extra):
    """Within the block, each Block's `attr` (its mean_shift or var_shift) is its design's value
    plus `extra` (a number) or extra[i] for layer i (a sequence); restored on exit."""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    extras = list(extra) if isinstance(extra, (list, tuple)) else [extra] * len(blocks)
    if len(extras) != len(blocks):
        raise ValueError(f"{len(extras)} shifts for {len(blocks)} layers")
    try:
        for block, e in zip(blocks, extras):
            setattr(block, attr, getattr(block.design, attr) + e)
        yield model
    finally:
        for block in blocks:
            setattr(block, attr, getattr(block.design, attr))


def shift_probe(model, extra_shift):
    """Within the block, every FFN norm's input gets more mean shift: `extra_shift` (a number)
    or extra_shift[i] for layer i (a sequence)."""
    return _raised_shift(model, "mean_shift", extra_shift)


def var_shift_probe(model, extra):
    """Within the block, every FFN norm's input gets an extra per-sequence shift extra[i] * m
    in layer i (m: sequence_multipliers; mean 1, so the mean shift equals extra[i])."""
    return _raised_shift(model, "var_shift", extra)


_MASK32 = 0xFFFFFFFF


def sequence_multipliers(idx):
    """One multiplier per sequence of idx [batch, t], m = exp(z - 1/2) with z ~ N(0, 1)
    (log-normal: mean 1, median exp(-1/2) = 0.61): z is a fixed function of the sequence's
    tokens (a 32-bit hash mapped through the normal quantile), so the same window gets the
    same shift in training, evaluation, after --resume and on every DDP rank, and no
    random-number stream is consumed. Returns float32 [batch, 1, 1]."""
    t = idx.shape[1]
    pos = torch.arange(t, device=idx.device, dtype=torch.int64)
    h = ((idx.long() + 1) * ((pos * 2 + 1) * 0x9E3779B1 & _MASK32)).sum(1) & _MASK32
    for _ in range(2):  # integer mixing (lowbias32-style)
        h = ((h ^ (h >> 16)) * 0x7FEB352D) & _MASK32
        h = ((h ^ (h >> 15)) * 0x846CA68B) & _MASK32
    h = h ^ (h >> 16)
    u = (h.double() + 0.5) / 2.0 ** 32
    return torch.exp(torch.special.ndtri(u) - 0.5).float().view(-1, 1, 1)


def param_count(model):
    return sum(p.numel() for p in model.parameters())
