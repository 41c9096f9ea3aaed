"""The design grammar of `--designs`.

A design is a '+'-joined list of tokens, applied left to right to the base
design given by the block flags (--norm-bias, --placement, --layout, --mean-shift):

    A                         LayerNorm + GELU            (= ln+gelu)
    B                         RMSNorm + SwiGLU            (= rms+swiglu)
    ln | layernorm            LayerNorm
    rms | rmsnorm             RMSNorm
    gelu | swiglu | geglu | reglu   the FFN (FFNS)
    bias | nobias             the norm with / without a learnable bias (beta)
    recenter                  LayerNorm without bias in place of the norm: puts mean
                              subtraction back and nothing else (B+recenter)
    pre | post                norm placement
    serial | parallel         block layout
    shift=C                   constant mean shift C added to every FFN norm's input
    vshift=C                  a positive mean shift whose size varies per sequence: C * m, with
                              m = exp(z - 1/2), z ~ N(0, 1) drawn per sequence (mean 1, median
                              0.61, 5-95% range 0.12-3.2; model.sequence_multipliers), in training
                              and evaluation alike

Examples: A,B  |  A,B,rms+gelu,ln+swiglu (the 2x2)  |  B+bias,B+recenter  |  B+shift=1.
"""

from dataclasses import dataclass, replace

from ..activations import GATED_OPS
from ..modules import FFN_MODULES


@dataclass(frozen=True)
class NormChoice:
    name: str  # as --norm and Design.norm spell it
    short: str  # the design token
    op: str  # torch.ops.ffn.<op>
    has_bias: bool  # whether the norm has a learnable bias unless told otherwise


# The design vocabulary, declared once: the CLI's choices, the grammar and the report read it.
NORMS = {n.name: n for n in (NormChoice("layernorm", "ln", "layer_norm", True),
                             NormChoice("rmsnorm", "rms", "rms_norm", False))}
FFNS = {"gelu": "gelu_ffn", **{op: op for op in GATED_OPS}}  # design name -> the FFN op
PLACEMENTS = ("pre", "post")
LAYOUTS = ("serial", "parallel")
ALIASES = {"A": ("layernorm", "gelu"), "B": ("rmsnorm", "swiglu")}
NORM_TOKENS = {**{n.short: n.name for n in NORMS.values()}, **{n.name: n.name for n in NORMS.values()}}


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
    var_shift: float = 0.0  # vshift=C: per-sequence shift C * m (model.sequence_multipliers)

    def __post_init__(self):
        for field, value, allowed in (("norm", self.norm, tuple(NORMS)), ("ffn", self.ffn, tuple(FFNS)),
                                      ("placement", self.placement, PLACEMENTS),
                                      ("layout", self.layout, LAYOUTS)):
            if value not in allowed:
                raise ValueError(f"design {field} must be one of {allowed}, got {value!r}")

    @property
    def has_norm_bias(self):
        return NORMS[self.norm].has_bias if self.norm_bias is None else self.norm_bias

    @property
    def ffn_module(self):
        """The ffn.modules class of this design's FFN."""
        return FFN_MODULES[FFNS[self.ffn]]

    @property
    def gated(self):
        return self.ffn_module.gated


def parse_design(spec, base=Design()):
    """The Design a spec names, starting from `base` (whose norm and ffn the spec must set)."""
    if not spec:
        raise ValueError("empty design spec")
    design = base
    seen_norm = seen_ffn = False
    for token in spec.split("+"):
        if token in ALIASES:
            norm, ffn = ALIASES[token]
            design = replace(design, norm=norm, ffn=ffn)
            seen_norm = seen_ffn = True
        elif token in NORM_TOKENS:
            design, seen_norm = replace(design, norm=NORM_TOKENS[token]), True
        elif token in FFNS:
            design, seen_ffn = replace(design, ffn=token), True
        elif token in ("bias", "nobias"):
            design = replace(design, norm_bias=token == "bias")
        elif token == "recenter":
            design, seen_norm = replace(design, norm="layernorm", norm_bias=False), True
        elif token in PLACEMENTS:
            design = replace(design, placement=token)
        elif token in LAYOUTS:
            design = replace(design, layout=token)
        elif token.startswith("vshift="):
            try:
                design = replace(design, var_shift=float(token[len("vshift="):]))
            except ValueError:
                raise ValueError(f"design {spec!r}: {token!r} needs a number, e.g. vshift=1") from None
        elif token.startswith("shift="):
            try:
                design = replace(design, mean_shift=float(token[len("shift="):]))
            except ValueError:
                raise ValueError(f"design {spec!r}: {token!r} needs a number, e.g. shift=1.5") from None
        else:
            raise ValueError(f"design {spec!r}: unknown token {token!r} (see --help for the grammar)")
    if not (seen_norm and seen_ffn):
        raise ValueError(f"design {spec!r} must name a norm and an FFN (or A / B)")
    return design


def describe(design):
    """Canonical spelled-out form, e.g. 'rms+swiglu+bias' or 'ln+swiglu+nobias'."""
    parts = [NORMS[design.norm].short, design.ffn]
    if design.has_norm_bias != NORMS[design.norm].has_bias:
        parts.append("bias" if design.has_norm_bias else "nobias")
    if design.placement != "pre":
        parts.append(design.placement)
    if design.layout != "serial":
        parts.append(design.layout)
    if design.mean_shift:
        parts.append(f"shift={design.mean_shift:g}")
    if design.var_shift:
        parts.append(f"vshift={design.var_shift:g}")
    return "+".join(parts)


def run_label(spec):
    """A file-system-safe name for a design spec."""
    return "".join(c if c.isalnum() or c in "+-._" else "_" for c in spec)


def parse_designs(specs, base=Design()):
    """[(spec, Design)] for a comma-separated list; specs must be distinct."""
    names = [s.strip() for s in specs.split(",") if s.strip()]
    if not names:
        raise ValueError("--designs names no design")
    if len(set(map(run_label, names))) != len(names):
        raise ValueError(f"--designs {specs!r} lists a design twice")
    return [(name, parse_design(name, base)) for name in names]
