"""The activations of the FFN ops, declared once for Python.

Each entry names an activation as the kernels take it (the `activation`
argument of gated_activation and ffn_stats), its plain PyTorch formula, and the
public gated FFN op that uses it as the gate. The FFN modules (ffn.modules),
the reference ops (ffn.reference), the telemetry reference and the A/B
harness's design vocabulary read this table; the C++ twin is
csrc/activation_table.h.
"""

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch.nn.functional as F


@dataclass(frozen=True)
class ActivationSpec:
    name: str  # as the kernels take it
    fn: Callable  # the plain PyTorch formula
    gated_op: str | None  # torch.ops.ffn.<gated_op> gates with it; None: only inside gelu_ffn / bias_gelu
    plain_op: str | None  # the non-gated FFN op with this activation (gelu_ffn picks its GELU by `approximate`)


ACTIVATIONS = {
    spec.name: spec
    for spec in (
        ActivationSpec("silu", F.silu, "swiglu", None),
        ActivationSpec("gelu", F.gelu, "geglu", "gelu_ffn"),
        ActivationSpec("gelu_tanh", partial(F.gelu, approximate="tanh"), None, "gelu_ffn"),
        ActivationSpec("relu", F.relu, "reglu", "relu_ffn"),
    )
}

# Every activation name, in the table's order (the order the ops' error messages list them).
ACTIVATION_NAMES = tuple(ACTIVATIONS)

# The gated FFN ops and the activation of their gate.
GATED_OPS = {spec.gated_op: spec.name for spec in ACTIVATIONS.values() if spec.gated_op is not None}

# F.gelu's `approximate`, as gelu_ffn and bias_gelu take it, and the activation it selects.
GELU_APPROXIMATIONS = {"none": "gelu", "tanh": "gelu_tanh"}
_APPROXIMATE_OF = {act: approx for approx, act in GELU_APPROXIMATIONS.items()}


def approximate_of(name: str) -> str:
    """The `approximate` argument the FFN ops take for an activation: "tanh" for gelu_tanh, else "none"."""
    return _APPROXIMATE_OF.get(name, "none")


def fused_op(name: str, gated: bool) -> str | None:
    """The public FFN op that runs an activation, called with approximate=approximate_of(name):
    gated, the gated op of its formula (geglu for gelu_tanh); plain, gelu_ffn or relu_ffn.
    None where no op has it (a plain silu FFN)."""
    spec = activation(name)
    if not gated:
        return spec.plain_op
    if name in _APPROXIMATE_OF:  # both GELUs gate through geglu, which takes `approximate`
        return activation(GELU_APPROXIMATIONS["none"]).gated_op
    return spec.gated_op


def activation(name: str) -> ActivationSpec:
    """The entry of an activation name; a ValueError listing the names for an unknown one."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}") from None


def gelu_activation(approximate: str) -> str:
    """The activation name of F.gelu with this `approximate` ("none" -> "gelu", "tanh" -> "gelu_tanh")."""
    try:
        return GELU_APPROXIMATIONS[approximate]
    except KeyError:
        raise ValueError(f"approximate must be 'none' or 'tanh' (as in F.gelu), got {approximate!r}") from None
