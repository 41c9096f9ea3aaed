"""The design grammar of `--designs`.

A design is a '+'-joined list of tokens, applied left to right to the base
design given by the block flags (--norm-bias, --placement, --layout, --mean-shift):

    A                         LayerNorm + GELU            (= ln+gelu)
    B                         RMSNorm + SwiGLU            (= rms+swiglu)
    ln | layernorm            LayerNorm
    rms | rmsnorm             RMSNorm
    gelu | swiglu | geglu | reglu   the FFN
    bias | nobias             the norm with / without a learnable bias (beta)
    recenter                  LayerNorm without bias in place of the norm: puts mean
                              subtraction back and nothing else (B+recenter)
    pre | post                norm placement
    serial | parallel         block layout
    shift=C                   constant mean shift C added to every FFN norm's input

Examples: A,B  |  A,B,rms+gelu,ln+swiglu (the 2x2)  |  B+bias,B+recenter  |  B+shift=1.
"""

from dataclasses import replace

from .model import Design

ALIASES = {"A": ("layernorm", "gelu"), "B": ("rmsnorm", "swiglu")}
NORM_TOKENS = {"ln": "layernorm", "layernorm": "layernorm", "rms": "rmsnorm", "rmsnorm": "rmsnorm"}
FFN_TOKENS = ("gelu", "swiglu", "geglu", "reglu")
SHORT_NORM = {"layernorm": "ln", "rmsnorm": "rms"}


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
        elif token in FFN_TOKENS:
            design, seen_ffn = replace(design, ffn=token), True
        elif token in ("bias", "nobias"):
            design = replace(design, norm_bias=token == "bias")
        elif token == "recenter":
            design, seen_norm = replace(design, norm="layernorm", norm_bias=False), True
        elif token in ("pre", "post"):
            design = replace(design, placement=token)
        elif token in ("serial", "parallel"):
            design = replace(design, layout=token)
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
    parts = [SHORT_NORM[design.norm], design.ffn]
    natural_bias = design.norm == "layernorm"
    if design.has_norm_bias != natural_bias:
        parts.append("bias" if design.has_norm_bias else "nobias")
    if design.placement != "pre":
        parts.append(design.placement)
    if design.layout != "serial":
        parts.append(design.layout)
    if design.mean_shift:
        parts.append(f"shift={design.mean_shift:g}")
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
