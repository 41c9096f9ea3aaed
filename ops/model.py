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
already has: the FFN input and the pre-activation returned by the internal
_gelu_ffn_fwd/_gated_ffn_fwd ops.
"""

import contextlib
import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from . import reference
from .modules import GeGLU, GeluFFN, LayerNorm, ReGLU, RMSNorm, SwiGLU

NORMS = ("layernorm", "rmsnorm")
FFNS = ("gelu", "swiglu", "geglu", "reglu")
PLACEMENTS = ("pre", "post")
LAYOUTS = ("serial", "parallel")
BACKENDS = ("ffn", "torch")

GATED_FFNS = {"swiglu": (SwiGLU, "silu"), "geglu": (GeGLU, "gelu"), "reglu": (ReGLU, "relu")}


@dataclass(frozen=True)
class Design:
    """The block choices an A/B run compares. norm_bias=None means the norm's usual
    default: LayerNorm with a bias, RMSNorm without."""

    norm: str = "layernorm"
    ffn: str = "gelu"
    norm_bias: bool | None = None
    placement: str = "pre"
    layout: str = "serial"
    mean_shift: float = 0.0

    def __post_init__(self):
        for field, value, allowed in (("norm", self.norm, NORMS), ("ffn", self.ffn, FFNS),
                                      ("placement", self.placement, PLACEMENTS),
                                      ("layout", self.layout, LAYOUTS)):
            if value not in allowed:
                raise ValueError(f"design {field} must be one of {allowed}, got {value!r}")

    @property
    def has_norm_bias(self):
        return self.norm == "layernorm" if self.norm_bias is None else self.norm_bias

    @property
    def gated(self):
        return self.ffn in GATED_FFNS


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 256
    seq_len: int = 128
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 512  # the GELU FFN's width; gated FFNs use gated_d_ff(d_ff)
    ffn_bias: bool = True
    design: Design = Design()
    backend: str = "ffn"

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")

    def with_design(self, design):
        return replace(self, design=design)

    def to_dict(self):
        return asdict(self)


def ffn_param_count(d_model, d_ff, gated, bias):
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


def make_norm(design, d_model, backend):
    if design.norm == "layernorm":
        return LayerNorm(d_model, eps=1e-5, bias=design.has_norm_bias, backend=backend)
    return RMSNorm(d_model, eps=1e-6, bias=design.has_norm_bias, backend=backend)


def make_ffn(config):
    design = config.design
    if design.gated:
        cls, _ = GATED_FFNS[design.ffn]
        width = gated_d_ff(config.d_model, config.d_ff, config.ffn_bias)
        return cls(config.d_model, width, bias=config.ffn_bias, backend=config.backend)
    return GeluFFN(config.d_model, config.d_ff, bias=config.ffn_bias, backend=config.backend)


def ffn_activation(ffn):
    """(activation name as ffn_stats takes it, gated) of an FFN module."""
    if isinstance(ffn, GeluFFN):
        return ("gelu" if ffn.approximate == "none" else "gelu_tanh"), False
    for cls, activation in GATED_FFNS.values():
        if isinstance(ffn, cls):
            return activation, True
    raise TypeError(f"not an ffn FFN module: {type(ffn).__name__}")


def _autocast_to(tensors, device_type):
    """What the public FFN ops' autocast rule does to their inputs, for the internal ops
    called directly (which have no autocast kernel)."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return [t if t is None else t.to(dtype) for t in tensors]


def ffn_forward_with_preact(ffn, x):
    """The FFN output and its pre-activation ([rows, F], gated: gate | up), computed once.

    ffn backend: the internal forward op the public op calls (differentiable in out).
    torch backend: the same math in plain PyTorch.
    """
    activation, gated = ffn_activation(ffn)
    w_in, b_in, w_out, b_out = (
        (ffn.w_gate_up, ffn.b_gate_up, ffn.w_down, ffn.b_down) if gated else (ffn.w1, ffn.b1, ffn.w2, ffn.b2)
    )
    if ffn.backend == "ffn":
        x, w_in, b_in, w_out, b_out = _autocast_to([x, w_in, b_in, w_out, b_out], x.device.type)
        if gated:
            return torch.ops.ffn._gated_ffn_fwd(x, w_in, b_in, w_out, b_out, activation)
        return torch.ops.ffn._gelu_ffn_fwd(x, w_in, b_in, w_out, b_out, ffn.approximate)
    preact = F.linear(x, w_in, b_in)
    if gated:
        hidden = reference.gated_activation(preact, activation)
    else:
        hidden = F.gelu(preact, approximate=ffn.approximate)
    return F.linear(hidden, w_out, b_out), preact.reshape(-1, preact.shape[-1])


def ffn_hidden(ffn, x):
    """(gate pre-activation, or None for a GELU FFN; h, the tensor entering the down projection)
    of an FFN module for input x, in plain PyTorch and float32: for probes, not training."""
    activation, gated = ffn_activation(ffn)
    x = x.float()
    if gated:
        preact = F.linear(x, ffn.w_gate_up.float(), None if ffn.b_gate_up is None else ffn.b_gate_up.float())
        gate, up = preact.chunk(2, dim=-1)
        return gate, reference.GATED_ACTIVATIONS[activation](gate) * up
    preact = F.linear(x, ffn.w1.float(), None if ffn.b1 is None else ffn.b1.float())
    return None, F.gelu(preact, approximate=ffn.approximate)


def ffn_down(ffn, h):
    """The down projection of an FFN module applied to h (float32)."""
    w, b = (ffn.w_down, ffn.b_down) if ffn_activation(ffn)[1] else (ffn.w2, ffn.b2)
    return F.linear(h, w.float(), None if b is None else b.float())


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        design = config.design
        self.design = design
        self.mean_shift = design.mean_shift  # shift_probe() raises it temporarily
        self.attn = CausalSelfAttention(config.d_model, config.n_heads)
        self.norm1 = make_norm(design, config.d_model, config.backend)
        # The parallel layout shares one norm between attention and FFN (PaLM).
        self.norm2 = make_norm(design, config.d_model, config.backend) if design.layout == "serial" else None
        self.ffn = make_ffn(config)
        self.activation, self.gated = ffn_activation(self.ffn)

    @property
    def ffn_norm(self):
        """The norm whose input the mean shift enters (the parallel layout's shared norm)."""
        return self.norm2 if self.norm2 is not None else self.norm1

    def _ffn(self, x, stats):
        """FFN of x; appends this layer's raw telemetry sums to `stats` when it is a list."""
        if stats is None:
            return self.ffn(x)
        from . import telemetry

        out, preact = ffn_forward_with_preact(self.ffn, x)
        stats.append(telemetry.ffn_stats(x.detach(), preact.detach(), self.activation, self.gated))
        return out

    def forward(self, x, stats=None):
        c = self.mean_shift
        if self.design.layout == "serial":
            if self.design.placement == "pre":
                x = x + self.attn(self.norm1(x))
                return x + self._ffn(self.norm2(x + c if c else x), stats)
            x = self.norm1(x + self.attn(x))
            y = x + self._ffn(x, stats)
            return self.norm2(y + c if c else y)
        if self.design.placement == "pre":
            n = self.norm1(x + c if c else x)
            return x + self.attn(n) + self._ffn(n, stats)
        y = x + self.attn(x) + self._ffn(x, stats)
        return self.norm1(y + c if c else y)


class TransformerLM(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.seq_len, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        # Post-norm blocks end in a norm already.
        self.norm_f = make_norm(config.design, config.d_model, config.backend) \
            if config.design.placement == "pre" else None
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
        for block in self.blocks:
            x = block(x, stats)
        if self.norm_f is not None:
            x = self.norm_f(x)
        logits = self.head(x)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss

    def ffn_modules(self):
        return [block.ffn for block in self.blocks]


@contextlib.contextmanager
def shift_probe(model, extra_shift):
    """Within the block, every FFN norm's input gets more mean shift: `extra_shift` (a number)
    or extra_shift[i] for layer i (a sequence)."""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    shifts = list(extra_shift) if isinstance(extra_shift, (list, tuple)) else [extra_shift] * len(blocks)
    if len(shifts) != len(blocks):
        raise ValueError(f"shift_probe: {len(shifts)} shifts for {len(blocks)} layers")
    try:
        for block, shift in zip(blocks, shifts):
            block.mean_shift = block.design.mean_shift + shift
        yield model
    finally:
        for block in blocks:
            block.mean_shift = block.design.mean_shift


def param_count(model):
    return sum(p.numel() for p in model.parameters())
