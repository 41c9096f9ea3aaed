"""nn.Modules over the ffn ops.

LayerNorm and RMSNorm are drop-in replacements for torch.nn.LayerNorm and
torch.nn.RMSNorm: same constructor, same parameter names, so their state_dicts
load unchanged and give the same outputs. `in_place_backward=True` lets backward
write grad_x into the output gradient's storage when nothing else holds it (one
activation-sized buffer less per norm). `weight_offset=1` makes their weight
zero-centered (scale 1 + weight, stored weight starting at 0; GemmaRMSNorm);
AddLayerNorm / AddRMSNorm take (x, residual) and return (norm(x + residual),
x + residual) in one fused pass. The FFN modules hold their two projections as
nn.Linear submodules (fc1/fc2; gate_up_proj/down_proj for the gated ones, whose
gate_up_proj packs gate and up so one GEMM computes both), so code that looks for
nn.Linear (init loops, LoRA, quantizers, FSDP wrap policies) sees them; state_dicts
saved with the earlier raw parameter names (w1, b1, w2, b2, w_gate_up, b_gate_up,
w_down, b_down) still load.

Every module takes `backend="ffn"` (torch.ops.ffn) or `backend="torch"` (the
plain PyTorch code in ffn.reference): same parameters, same math, for
side-by-side checks.

The FFN modules share one interface (FFN), so training code, telemetry and
quantization probes need not know which FFN they hold: `activation` and
`gated` name the nonlinearity as the kernels and ffn_stats take it,
`forward_with_preact` also returns the pre-activation, and `in_proj`/`out_proj`
are the (weight, bias) of the two projections.
"""

import math
import numbers
import sys
import warnings

import torch
from torch import nn
from torch.nn.modules import module as _module_globals

from . import reference
from .activations import GATED_OPS, gelu_activation
from .schema import op_default


def _check_backend(backend):
    reference.backend(backend)  # raises on an unknown name
    return backend


def _shape_tuple(normalized_shape):
    if isinstance(normalized_shape, numbers.Integral):
        return (int(normalized_shape),)
    return tuple(int(s) for s in normalized_shape)


class _Norm(nn.Module):
    """Normalizes over the trailing `normalized_shape` dims (flattened into one)."""

    _op_name = ""

    def __init__(self, normalized_shape, eps, elementwise_affine, bias, device, dtype, backend, weight_offset=0.0,
                 in_place_backward=False):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.normalized_shape = _shape_tuple(normalized_shape)
        self.eps = eps
        if weight_offset and not elementwise_affine:
            raise ValueError(f"weight_offset={weight_offset} needs a weight (elementwise_affine=True)")
        self.weight_offset = float(weight_offset)
        self.in_place_backward = bool(in_place_backward)
        self.elementwise_affine = elementwise_affine
        self.backend = _check_backend(backend)
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, **factory))
        else:
            self.register_parameter("weight", None)
        if elementwise_affine and bias:
            self.bias = nn.Parameter(torch.empty(self.normalized_shape, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self):
        if self.weight is not None:
            # A scale of 1 either way: weight 1, or weight 0 with weight_offset 1.
            nn.init.constant_(self.weight, 1.0 - self.weight_offset)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _eps_for(self, x):
        return self.eps

    def _check_shape(self, x, name="input"):
        n = len(self.normalized_shape)
        if tuple(x.shape[-n:]) != self.normalized_shape:
            raise ValueError(
                f"{type(self).__name__}: expected {name} with trailing shape {self.normalized_shape}, "
                f"got {tuple(x.shape)}"
            )

    def _call(self, op_name, *xs):
        """The op on the inputs xs (x, and the residual for the fused add), their trailing
        normalized_shape dims flattened into one; outputs reshaped back."""
        n = len(self.normalized_shape)
        flat = lambda t: t if t is None or n == 1 else t.reshape(-1)  # noqa: E731
        rows = [x if n == 1 else x.flatten(-n) for x in xs]
        out = getattr(reference.backend(self.backend), op_name)(
            *rows, flat(self.weight), flat(self.bias), self._eps_for(xs[0]), self.weight_offset,
            self.in_place_backward)
        unflat = lambda t: t if n == 1 else t.view(xs[0].shape)  # noqa: E731
        return tuple(unflat(t) for t in out) if isinstance(out, tuple) else unflat(out)

    def forward(self, x):
        self._check_shape(x)
        return self._call(self._op_name, x)

    def extra_repr(self):
        options = f", weight_offset={self.weight_offset}" if self.weight_offset else ""
        options += ", in_place_backward=True" if self.in_place_backward else ""
        return (
            f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
            f"bias={self.bias is not None}{options}, backend={self.backend!r}"
        )


class LayerNorm(_Norm):
    """torch.nn.LayerNorm on torch.ops.ffn.layer_norm."""

    _op_name = "layer_norm"

    def __init__(self, normalized_shape, eps=op_default("layer_norm", "eps"), elementwise_affine=True, bias=True,
                 device=None, dtype=None, backend="ffn", weight_offset=0.0, in_place_backward=False):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype, backend, weight_offset,
                         in_place_backward)


class RMSNorm(_Norm):
    """torch.nn.RMSNorm on torch.ops.ffn.rms_norm, plus an optional learnable bias (beta).

    eps=None means what it means in torch.nn.RMSNorm, whose drop-in replacement this is:
    the machine epsilon of the computation type (float32's for half and float32 inputs,
    float64's for float64). The op's own default, op_default("rms_norm", "eps"), is what
    LLaMA-style models pass explicitly.
    """

    _op_name = "rms_norm"

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, bias=False, device=None,
                 dtype=None, backend="ffn", weight_offset=0.0, in_place_backward=False):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype, backend, weight_offset,
                         in_place_backward)

    def _eps_for(self, x):
        if self.eps is not None:
            return self.eps
        return torch.finfo(torch.float64 if x.dtype == torch.float64 else torch.float32).eps


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: zero-centered gamma, y = x_hat * (1 + weight) with 1 + weight
    formed in float32 (weight_offset=1, the stored weight starts at 0), eps 1e-6."""

    def __init__(self, normalized_shape, eps=1e-6, elementwise_affine=True, bias=False, device=None,
                 dtype=None, backend="ffn", in_place_backward=False):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype, backend, weight_offset=1.0,
                         in_place_backward=in_place_backward)


class _AddNorm:
    """forward(x, residual) -> (y, s): s = x + residual (in x's dtype, the new residual
    stream) and y = the norm of s, in one fused pass with the same numbers as the
    unfused pair. Parameters as the norm's, so a state_dict of the plain norm loads."""

    def forward(self, x, residual):
        self._check_shape(x)
        if residual.shape != x.shape:
            raise ValueError(f"{type(self).__name__}: residual must have the input's shape {tuple(x.shape)}, "
                             f"got {tuple(residual.shape)}")
        return self._call("add_" + self._op_name, x, residual)


class AddLayerNorm(_AddNorm, LayerNorm):
    """Residual add + LayerNorm on torch.ops.ffn.add_layer_norm: (y, s) = (layer_norm(x + residual), x + residual)."""


class AddRMSNorm(_AddNorm, RMSNorm):
    """Residual add + RMSNorm on torch.ops.ffn.add_rms_norm: (y, s) = (rms_norm(x + residual), x + residual)."""


def _linear_init(weight, bias):
    """nn.Linear's default initialization."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        bound = 1 / math.sqrt(weight.shape[1]) if weight.shape[1] > 0 else 0
        nn.init.uniform_(bias, -bound, bound)


def _uninitialized_linear(in_features, out_features, bias, device, dtype):
    """An nn.Linear whose parameters the caller initializes: built on the meta device, so it
    draws no random numbers (the modules draw exactly what they drew with raw parameters)."""
    device = torch.empty(0, device=device).device  # None: the default device, as nn.Linear takes it
    return nn.Linear(in_features, out_features, bias=bias, device="meta", dtype=dtype).to_empty(device=device)


_LINEAR = frozenset({"torch.nn.modules.linear.Linear"})
_MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _plain_tensor(t):
    if t is None or type(t) in (torch.Tensor, nn.Parameter):
        return True
    dtensor = sys.modules.get("torch.distributed.tensor")  # a DTensor exists only once that is imported
    return dtensor is not None and type(t) is dtensor.DTensor


def layer_wrapper(layer, plain=_LINEAR):
    """None when a fused op may read `layer`'s weight and bias instead of calling it: its class
    is exactly one of `plain` (qualified names), its class's forward is what runs (no forward set on
    the instance), no hook (its own or global) would run when it is called, and its weight and bias
    are plain tensors (or DTensors, which the ops shard).
    Otherwise what wraps it, as a phrase ("is a peft.tuners.lora.layer.Linear")."""
    cls = type(layer)
    name = f"{cls.__module__}.{cls.__qualname__}"
    if name not in plain:
        return f"is a {name}"
    if "forward" in vars(layer):  # accelerate's hooks (device_map, offloading) or a wrapper set on the instance
        return f"({name}) has a forward of its own (accelerate's hooks, or a wrapper)"
    if any(getattr(layer, h) for h in _MODULE_HOOKS) or any(
            getattr(_module_globals, f"_global{h}") for h in _MODULE_HOOKS):
        return f"({name}) has hooks"
    for attr in ("weight", "bias"):
        t = getattr(layer, attr, None)
        if not _plain_tensor(t):
            return f"({name}) holds a {type(t).__module__}.{type(t).__qualname__} {attr}"
    return None


_warned = set()


def warn_unfused(message):
    """Warns `message` once per process (eager mode; Dynamo would break the graph on warnings)."""
    if message not in _warned and not torch.compiler.is_compiling():
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


class FFN(nn.Module):
    """Base of the FFN modules: out = down(h), h = act(x W_in^T + b_in) (plain) or
    act(gate) * up (gated, W_in packs gate rows then up rows).

    Subclasses set `gated` and the `activation` property (the name the kernels and
    ffn_stats take), hold the two projections as nn.Linear submodules named by
    `_in_name` / `_out_name`, and implement `_ops_forward` (the public op) and
    `_ops_forward_with_preact` (the op's internal forward, which also returns the
    pre-activation the op saves for backward). The fused op reads the projections'
    weights only while they are plain nn.Linear layers (layer_wrapper); a wrapped one
    (LoRA, a quantized Linear, a hook) is called as a module, with the op's elementwise
    activation in between.
    """

    gated = False
    _in_name = _out_name = ""
    # Parameter names before the projections became nn.Linear submodules: old state_dicts load.
    _legacy_keys = {}

    def in_proj(self):
        """(weight [F or 2F, d_model], bias or None) of the input projection."""
        lin = getattr(self, self._in_name)
        return lin.weight, lin.bias

    def out_proj(self):
        """(weight [d_out, F], bias or None) of the down projection."""
        lin = getattr(self, self._out_name)
        return lin.weight, lin.bias

    def _wrapper(self):
        """None when the fused op may run; else warns (once) naming what wraps a projection."""
        for name in (self._in_name, self._out_name):
            why = layer_wrapper(getattr(self, name))
            if why is not None:
                if self.backend == "ffn":
                    warn_unfused(f"ffn.{type(self).__name__}.{name} {why}: running it as a module, "
                                 "the fused FFN op is not used")
                return why
        return None

    def forward(self, x):
        if self._wrapper() is not None:
            return self._modules_forward(x)[0]
        return self._ops_forward(reference.backend(self.backend), x)

    def forward_with_preact(self, x):
        """(output, pre-activation [rows, F] or, gated, [rows, 2F] gate | up), computed once:
        what telemetry (ffn.telemetry.ffn_stats) reads. Differentiable in the output;
        autocast applies as for forward()."""
        if self.backend == "ffn" and self._wrapper() is None:
            return self._ops_forward_with_preact(x)
        return self._modules_forward(x)

    def _modules_forward(self, x):
        """(output, pre-activation) with the projections called as modules."""
        preact = getattr(self, self._in_name)(x)
        out = getattr(self, self._out_name)(self._elementwise(reference.backend(self.backend), preact))
        return out, preact.reshape(-1, preact.shape[-1])

    def _elementwise(self, ops, preact):
        """The activation on the input projection's output, as the backend's elementwise op."""
        if self.gated:
            return ops.gated_activation(preact, self.activation)
        if self.activation == "relu":
            return torch.relu(preact)
        return ops.bias_gelu(preact, None, self.approximate)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for old, new in self._legacy_keys.items():
            if prefix + old in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _check_plain_linears(**layers):
    """from_linear copies weights: a wrapped layer (LoRA, quantized, hooked) would lose its wrapper."""
    for name, layer in layers.items():
        why = layer_wrapper(layer)
        if why is not None:
            raise TypeError(f"from_linear copies the weights of plain nn.Linear layers, but {name} {why}: "
                            "merge or remove what wraps it first")


class _PlainFFN(FFN):
    """out = act(fc1(x)) through fc2: fc1 = nn.Linear(d_model, d_ff), fc2 = nn.Linear(d_ff, d_out)
    with d_out = d_model unless given (OPT's and timm's names for these two layers)."""

    _in_name, _out_name = "fc1", "fc2"
    _legacy_keys = {"w1": "fc1.weight", "b1": "fc1.bias", "w2": "fc2.weight", "b2": "fc2.bias"}

    def __init__(self, d_model, d_ff, bias=True, d_out=None, device=None, dtype=None, backend="ffn"):
        super().__init__()
        d_out = d_model if d_out is None else d_out
        self.d_model, self.d_ff, self.d_out = d_model, d_ff, d_out
        self.backend = _check_backend(backend)
        self.fc1 = _uninitialized_linear(d_model, d_ff, bias, device, dtype)
        self.fc2 = _uninitialized_linear(d_ff, d_out, bias, device, dtype)
        self.reset_parameters()

    def reset_parameters(self):
        _linear_init(self.fc1.weight, self.fc1.bias)
        _linear_init(self.fc2.weight, self.fc2.bias)

    @classmethod
    def from_linear(cls, fc1, fc2, backend="ffn", **kwargs):
        """The FFN of two nn.Linear layers (fc1: d_model -> d_ff, fc2: d_ff -> d_out), weights
        copied (the layers given stay as they are, unshared); kwargs go to the constructor
        (GeluFFN: approximate)."""
        _check_plain_linears(fc1=fc1, fc2=fc2)
        if fc1.weight.shape[0] != fc2.weight.shape[1]:
            raise ValueError(f"fc1's out_features ({fc1.weight.shape[0]}) must be fc2's in_features "
                             f"({fc2.weight.shape[1]})")
        if (fc1.bias is None) != (fc2.bias is None):
            raise ValueError("fc1 and fc2 must both have biases or both have none")
        d_ff, d_model = fc1.weight.shape
        module = cls(d_model, d_ff, bias=fc1.bias is not None, d_out=fc2.weight.shape[0],
                     device=fc1.weight.device, dtype=fc1.weight.dtype, backend=backend, **kwargs)
        with torch.no_grad():
            module.fc1.weight.copy_(fc1.weight)
            module.fc2.weight.copy_(fc2.weight)
            if fc1.bias is not None:
                module.fc1.bias.copy_(fc1.bias)
                module.fc2.bias.copy_(fc2.bias)
        return module

    def extra_repr(self):
        return (
            f"d_model={self.d_model}, d_ff={self.d_ff}, d_out={self.d_out}, bias={self.fc1.bias is not None}, "
            f"backend={self.backend!r}"
        )
class _GeluApproximation:
    """The GELU FFNs' `approximate`, as in F.gelu ("none" or "tanh"), and the activation name it selects."""

    def _set_approximate(self, approximate):
        gelu_activation(approximate)  # raises on an unknown value
        self.approximate = approximate

    @property
    def activation(self):
        return gelu_activation(self.approximate)

    def extra_repr(self):
        return f"{super().extra_repr()}, approximate={self.approximate!r}"


class GeluFFN(_GeluApproximation, _PlainFFN):
    """out = fc2(gelu(fc1(x))) on torch.ops.ffn.gelu_ffn."""

    def __init__(self, d_model, d_ff, bias=True, approximate=op_default("gelu_ffn", "approximate"), d_out=None,
                 device=None, dtype=None, backend="ffn"):
        super().__init__(d_model, d_ff, bias, d_out, device, dtype, backend)
        self._set_approximate(approximate)

    def _ops_forward(self, ops, x):
        return ops.gelu_ffn(x, *self.in_proj(), *self.out_proj(), self.approximate)

    def _ops_forward_with_preact(self, x):
        return torch.ops.ffn._gelu_ffn_fwd(x, *self.in_proj(), *self.out_proj(), self.approximate)


class ReluFFN(_PlainFFN):
    """out = fc2(relu(fc1(x))) on torch.ops.ffn.relu_ffn (T5 v1.0, OPT)."""

    activation = "relu"

    def _ops_forward(self, ops, x):
        return ops.relu_ffn(x, *self.in_proj(), *self.out_proj())

    def _ops_forward_with_preact(self, x):
        return torch.ops.ffn._relu_ffn_fwd(x, *self.in_proj(), *self.out_proj())


class GatedFFN(FFN):
    """out = down_proj(act(gate) * up) with [gate | up] = gate_up_proj(x).

    gate_up_proj: nn.Linear(d_model, 2*d_ff), its weight [2*d_ff, d_model] packing gate
    rows then up rows, so one GEMM computes both (Phi-3's layout and names);
    down_proj: nn.Linear(d_ff, d_out). d_ff is used as given (about 2/3 of a GELU FFN's width
    has its parameter count). Subclasses set `op` (a gated op of ffn.activations.GATED_OPS).
    """

    gated = True
    op = ""
    approximate = "none"  # GeGLU: F.gelu's approximate for the gate
    _in_name, _out_name = "gate_up_proj", "down_proj"
    _legacy_keys = {"w_gate_up": "gate_up_proj.weight", "b_gate_up": "gate_up_proj.bias",
                    "w_down": "down_proj.weight", "b_down": "down_proj.bias"}

    def __init__(self, d_model, d_ff, bias=False, d_out=None, device=None, dtype=None, backend="ffn"):
        super().__init__()
        d_out = d_model if d_out is None else d_out
        self.d_model, self.d_ff, self.d_out = d_model, d_ff, d_out
        self.backend = _check_backend(backend)
        self.gate_up_proj = _uninitialized_linear(d_model, 2 * d_ff, bias, device, dtype)
        self.down_proj = _uninitialized_linear(d_ff, d_out, bias, device, dtype)
        self.reset_parameters()

    @property
    def activation(self):
        return GATED_OPS[self.op]

    def reset_parameters(self):
        # Gate and up initialized as two separate nn.Linear(d_model, d_ff) would be.
        w_gate_up, b_gate_up = self.in_proj()
        for half in (slice(0, self.d_ff), slice(self.d_ff, 2 * self.d_ff)):
            with torch.no_grad():
                w = torch.empty_like(w_gate_up[half])
                b = torch.empty_like(b_gate_up[half]) if b_gate_up is not None else None
                _linear_init(w, b)
                w_gate_up[half].copy_(w)
                if b is not None:
                    b_gate_up[half].copy_(b)
        _linear_init(*self.out_proj())

    @classmethod
    def from_linear(cls, gate, up, down, backend="ffn", **kwargs):
        """Packs three nn.Linear layers (gate, up: d_model -> d_ff; down: d_ff -> d_out) into
        gate_up_proj and down_proj: the weights are copied (the layers given stay as they are,
        unshared); kwargs go to the constructor (GeGLU: approximate)."""
        _check_plain_linears(gate=gate, up=up, down=down)
        if gate.weight.shape != up.weight.shape or (gate.bias is None) != (up.bias is None):
            raise ValueError("gate and up must be nn.Linear layers of the same shape and bias setting")
        if (gate.bias is None) != (down.bias is None):
            raise ValueError("gate/up and down must all have biases or all have none")
        d_ff, d_model = gate.weight.shape
        module = cls(d_model, d_ff, bias=gate.bias is not None, d_out=down.weight.shape[0],
                     device=gate.weight.device, dtype=gate.weight.dtype, backend=backend, **kwargs)
        with torch.no_grad():
            module.gate_up_proj.weight.copy_(torch.cat([gate.weight, up.weight]))
            module.down_proj.weight.copy_(down.weight)
            if gate.bias is not None:
                module.gate_up_proj.bias.copy_(torch.cat([gate.bias, up.bias]))
                module.down_proj.bias.copy_(down.bias)
        return module

    def _ops_forward(self, ops, x):
        return getattr(ops, self.op)(x, *self.in_proj(), *self.out_proj(), self.approximate)

    def _ops_forward_with_preact(self, x):
        return torch.ops.ffn._gated_ffn_fwd(x, *self.in_proj(), *self.out_proj(), self.activation)

    def extra_repr(self):
        return (
            f"d_model={self.d_model}, d_ff={self.d_ff}, d_out={self.d_out}, "
            f"bias={self.gate_up_proj.bias is not None}, backend={self.backend!r}"
        )


class SwiGLU(GatedFFN):
    """Gated FFN with a SiLU (Swish) gate, on torch.ops.ffn.swiglu."""

    op = "swiglu"


class GeGLU(_GeluApproximation, GatedFFN):
    """Gated FFN with a GELU gate, on torch.ops.ffn.geglu: erf, or with approximate="tanh"
    the tanh GELU (Gemma, Gemma2, T5 v1.1)."""

    op = "geglu"

    def __init__(self, d_model, d_ff, bias=False, d_out=None, device=None, dtype=None, backend="ffn",
                 approximate=op_default("geglu", "approximate")):
        super().__init__(d_model, d_ff, bias, d_out, device, dtype, backend)
        self._set_approximate(approximate)


class ReGLU(GatedFFN):
    """Gated FFN with a ReLU gate, on torch.ops.ffn.reglu."""

    op = "reglu"


# The FFN module of each FFN op: gelu_ffn and every gated op of the activation table.
FFN_MODULES = {"gelu_ffn": GeluFFN, "relu_ffn": ReluFFN, **{cls.op: cls for cls in (SwiGLU, GeGLU, ReGLU)}}
assert set(FFN_MODULES) == {"gelu_ffn", "relu_ffn", *GATED_OPS}, "a gated op of ffn.activations has no module"
