"""nn.Modules over the ffn ops.

LayerNorm and RMSNorm are drop-in replacements for torch.nn.LayerNorm and
torch.nn.RMSNorm: same constructor, same parameter names, so their state_dicts
load unchanged and give the same outputs. The FFN modules hold the weights in
the ops' layout (nn.Linear's [out_features, in_features]; the gated ones pack
gate and up into one `w_gate_up` so one GEMM computes both).

Every module takes `backend="ffn"` (torch.ops.ffn) or `backend="torch"` (the
plain PyTorch code in ffn.reference): same parameters, same math, for
side-by-side checks.
"""

import math
import numbers

import torch
from torch import nn

from . import reference


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

    def __init__(self, normalized_shape, eps, elementwise_affine, bias, device, dtype, backend):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.normalized_shape = _shape_tuple(normalized_shape)
        self.eps = eps
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
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _eps_for(self, x):
        return self.eps

    def forward(self, x):
        n = len(self.normalized_shape)
        if tuple(x.shape[-n:]) != self.normalized_shape:
            raise ValueError(
                f"{type(self).__name__}: expected input with trailing shape {self.normalized_shape}, "
                f"got {tuple(x.shape)}"
            )
        flat = lambda t: t if t is None or n == 1 else t.reshape(-1)  # noqa: E731
        x_rows = x if n == 1 else x.flatten(-n)
        y = getattr(reference.backend(self.backend), self._op_name)(x_rows, flat(self.weight), flat(self.bias), self._eps_for(x))
        return y if n == 1 else y.view(x.shape)

    def extra_repr(self):
        return (
            f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
            f"bias={self.bias is not None}, backend={self.backend!r}"
        )


class LayerNorm(_Norm):
    """torch.nn.LayerNorm on torch.ops.ffn.layer_norm."""

    _op_name = "layer_norm"

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, device=None,
                 dtype=None, backend="ffn"):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype, backend)


class RMSNorm(_Norm):
    """torch.nn.RMSNorm on torch.ops.ffn.rms_norm, plus an optional learnable bias (beta).

    eps=None means what it means in torch.nn.RMSNorm: the machine epsilon of the
    computation type (float32's for half and float32 inputs, float64's for float64).
    """

    _op_name = "rms_norm"

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, bias=False, device=None,
                 dtype=None, backend="ffn"):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype, backend)

    def _eps_for(self, x):
        if self.eps is not None:
            return self.eps
        return torch.finfo(torch.float64 if x.dtype == torch.float64 else torch.float32).eps


def _linear_init(weight, bias):
    """nn.Linear's default initialization."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        bound = 1 / math.sqrt(weight.shape[1]) if weight.shape[1] > 0 else 0
        nn.init.uniform_(bias, -bound, bound)


class GeluFFN(nn.Module):
    """out = gelu(x w1^T + b1) w2^T + b2 on torch.ops.ffn.gelu_ffn.

    w1: [d_ff, d_model], w2: [d_out, d_ff] with d_out = d_model unless given.
    """

    def __init__(self, d_model, d_ff, bias=True, approximate="none", d_out=None, device=None,
                 dtype=None, backend="ffn"):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        d_out = d_model if d_out is None else d_out
        self.d_model, self.d_ff, self.d_out = d_model, d_ff, d_out
        self.approximate = approximate
        self.backend = _check_backend(backend)
        self.w1 = nn.Parameter(torch.empty(d_ff, d_model, **factory))
        self.b1 = nn.Parameter(torch.empty(d_ff, **factory)) if bias else None
        self.w2 = nn.Parameter(torch.empty(d_out, d_ff, **factory))
        self.b2 = nn.Parameter(torch.empty(d_out, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        _linear_init(self.w1, self.b1)
        _linear_init(self.w2, self.b2)

    def forward(self, x):
        return reference.backend(self.backend).gelu_ffn(x, self.w1, self.b1, self.w2, self.b2, self.approximate)

    def extra_repr(self):
        return (
            f"d_model={self.d_model}, d_ff={self.d_ff}, d_out={self.d_out}, bias={self.b1 is not None}, "
            f"approximate={self.approximate!r}, backend={self.backend!r}"
        )


class _GatedFFN(nn.Module):
    """out = (act(x Wg^T + bg) * (x Wu^T + bu)) Wd^T + bd with Wg, Wu packed in w_gate_up.

    w_gate_up: [2*d_ff, d_model] (gate rows first), w_down: [d_out, d_ff]. d_ff is
    used as given (a model that wants parameter parity with a GELU FFN picks a
    smaller d_ff itself).
    """

    _op_name = ""

    def __init__(self, d_model, d_ff, bias=False, d_out=None, device=None, dtype=None, backend="ffn"):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        d_out = d_model if d_out is None else d_out
        self.d_model, self.d_ff, self.d_out = d_model, d_ff, d_out
        self.backend = _check_backend(backend)
        self.w_gate_up = nn.Parameter(torch.empty(2 * d_ff, d_model, **factory))
        self.b_gate_up = nn.Parameter(torch.empty(2 * d_ff, **factory)) if bias else None
        self.w_down = nn.Parameter(torch.empty(d_out, d_ff, **factory))
        self.b_down = nn.Parameter(torch.empty(d_out, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        # Gate and up initialized as two separate nn.Linear(d_model, d_ff) would be.
        for half in (slice(0, self.d_ff), slice(self.d_ff, 2 * self.d_ff)):
            with torch.no_grad():
                w = torch.empty_like(self.w_gate_up[half])
                b = torch.empty_like(self.b_gate_up[half]) if self.b_gate_up is not None else None
                _linear_init(w, b)
                self.w_gate_up[half].copy_(w)
                if b is not None:
                    self.b_gate_up[half].copy_(b)
        _linear_init(self.w_down, self.b_down)

    @classmethod
    def from_linear(cls, gate, up, down, backend="ffn"):
        """Packs three nn.Linear layers (gate, up: d_model -> d_ff; down: d_ff -> d_out)."""
        if gate.weight.shape != up.weight.shape or (gate.bias is None) != (up.bias is None):
            raise ValueError("gate and up must be nn.Linear layers of the same shape and bias setting")
        if (gate.bias is None) != (down.bias is None):
            raise ValueError("gate/up and down must all have biases or all have none")
        d_ff, d_model = gate.weight.shape
        module = cls(d_model, d_ff, bias=gate.bias is not None, d_out=down.weight.shape[0],
                     device=gate.weight.device, dtype=gate.weight.dtype, backend=backend)
        with torch.no_grad():
            module.w_gate_up.copy_(torch.cat([gate.weight, up.weight]))
            module.w_down.copy_(down.weight)
            if gate.bias is not None:
                module.b_gate_up.copy_(torch.cat([gate.bias, up.bias]))
                module.b_down.copy_(down.bias)
        return module

    def forward(self, x):
        return getattr(reference.backend(self.backend), self._op_name)(x, self.w_gate_up, self.b_gate_up, self.w_down, self.b_down)

    def extra_repr(self):
        return (
            f"d_model={self.d_model}, d_ff={self.d_ff}, d_out={self.d_out}, "
            f"bias={self.b_gate_up is not None}, backend={self.backend!r}"
        )


class SwiGLU(_GatedFFN):
    """Gated FFN with a SiLU (Swish) gate, on torch.ops.ffn.swiglu."""

    _op_name = "swiglu"


class GeGLU(_GatedFFN):
    """Gated FFN with a GELU (erf) gate, on torch.ops.ffn.geglu."""

    _op_name = "geglu"


class ReGLU(_GatedFFN):
    """Gated FFN with a ReLU gate, on torch.ops.ffn.reglu."""

    _op_name = "reglu"
