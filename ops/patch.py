"""ffn.patch(model): the norms and MLPs of a Hugging Face transformers model on the ffn ops.

    import ffn
    model = LlamaForCausalLM.from_pretrained(...)
    replaced = ffn.patch(model)          # {"LlamaRMSNorm": 5, "LlamaMLP": 2}

Each supported module is patched in place by swapping its class for a subclass
whose forward calls torch.ops.ffn (FfnLlamaRMSNorm for LlamaRMSNorm, ...). The
module keeps its parameters -- the same nn.Parameter objects, under the same
names -- so state_dict() keys and values are HF's, an HF checkpoint loads
unchanged, optimizers, PEFT target names, tied weights and
`isinstance(m, LlamaRMSNorm)` / `isinstance(m, nn.LayerNorm)` (HF Trainer's
weight-decay grouping) keep working, and `unpatch(model)` swaps the classes back.

Gate and up projections stay two nn.Linear layers, but patch() moves their
weights (and biases) into one buffer, gate rows first: gate_proj.weight and
up_proj.weight are adjacent row blocks of it, so the packed [2*d_ff, d] weight
the gated ops take is a zero-copy view (torch.cat per forward is the fallback
when they are not adjacent: after FSDP flattening, say, and under torch.compile).
`.to()`/`.half()`/`.cuda()` re-pack.

The patched MLPs implement ffn.modules.FFN (in_proj/out_proj,
forward_with_preact, hidden/down, `activation`, `gated`), so ffn's telemetry and
probes take them like ffn's own modules; `telemetry(model)` (also
`ffn.patch.telemetry`) records per-layer FFN telemetry while the model runs.

transformers is imported only when patch() (or telemetry) is called.
"""

import contextlib
import re
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from . import telemetry as _telemetry
from .activations import GATED_OPS
from .modules import FFN

__all__ = ["patch", "unpatch", "telemetry", "collect_telemetry", "FFNTelemetry", "PatchReport",
           "UnsupportedModuleError", "SUPPORTED_MODEL_TYPES"]

_ops = torch.ops.ffn
_HALF = (torch.float16, torch.bfloat16)
# The activation of a gated op's gate -> the op ("silu" -> "swiglu", ...).
_GATED_OP_OF = {act: op for op, act in GATED_OPS.items()}

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gpt2", "gpt_neox", "olmo", "olmo2",
                         "gemma", "gemma2", "falcon", "t5")


class UnsupportedModuleError(TypeError):
    """patch() met a norm/MLP module (or a model) it does not know how to run on the ffn ops."""


class PatchReport(dict):
    """What patch() replaced: {original module class name: count}. `.skipped` maps the
    class names of known modules left as they are to the reason."""

    def __init__(self):
        super().__init__()
        self.skipped = {}


class _Skip(Exception):
    """A known module that is left unpatched by design (the reason is reported)."""


class _Unknown(Exception):
    """A known module class in a configuration patch() does not understand (an error)."""


# ----------------------------------------------------------------------------- helpers
def _mixed_ok(x, w):
    """The norm ops take a weight of x's dtype, or float32 with half x."""
    return w is None or w.dtype == x.dtype or (x.dtype in _HALF and w.dtype == torch.float32)


def _norm_call(op, x, weight, bias, eps, out_dtype, weight_offset=0.0):
    if not (_mixed_ok(x, weight) and _mixed_ok(x, bias) and (weight is None or bias is None
                                                               or weight.dtype == bias.dtype)):
        dt = x.dtype
        for t in (weight, bias):
            if t is not None:
                dt = torch.promote_types(dt, t.dtype)
        x = x.to(dt)
        weight = None if weight is None else weight.to(dt)
        bias = None if bias is None else bias.to(dt)
    return op(x, weight, bias, eps, weight_offset).to(out_dtype)


def _compiling():
    return torch.compiler.is_compiling()


def _adjacent(a, b):
    """a and b are consecutive row blocks of one contiguous buffer (a first)."""
    return (a.dtype == b.dtype and a.device == b.device and a.shape[1:] == b.shape[1:]
            and a.is_contiguous() and b.is_contiguous() and a.device.type != "meta"
            and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and b.storage_offset() == a.storage_offset() + a.numel())


class _AdjacentRows(torch.autograd.Function):
    """torch.cat([a, b]) of two adjacent row blocks without the copy: a view of their buffer."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.rows = a.shape[0]
        return a.as_strided((a.shape[0] + b.shape[0], *a.shape[1:]), a.stride(), a.storage_offset())

    @staticmethod
    def backward(ctx, grad):
        return grad[:ctx.rows], grad[ctx.rows:]


def _cat_rows(a, b):
    if not _compiling() and _adjacent(a, b):
        return _AdjacentRows.apply(a, b)
    return torch.cat([a, b])


def _pack_rows(a, b):
    """Moves parameters a and b into one buffer (a's rows, then b's), in place (.data)."""
    if a is None or b is None or _adjacent(a, b) or a.device.type == "meta":
        return
    if a.dtype != b.dtype or a.device != b.device or a.shape[1:] != b.shape[1:]:
        return
    with torch.no_grad():
        buf = torch.cat([a.detach(), b.detach()])
        a.data = buf[:a.shape[0]]
        b.data = buf[a.shape[0]:]


# ----------------------------------------------------------------------------- norms
class _Patched:
    """Marks a patched class; _ffn_original_class is set on each generated subclass."""

    _ffn_original_class = None


class _LlamaRMSNorm(_Patched):
    """weight * x_hat in the promoted dtype (Llama, Mistral, Qwen2, Qwen3, Phi3)."""

    def forward(self, x):
        return _norm_call(_ops.rms_norm, x, self.weight, None, self.variance_epsilon,
                          torch.promote_types(x.dtype, self.weight.dtype))


class _Olmo2RMSNorm(_Patched):
    """(weight * x_hat) in float32, returned in x's dtype."""

    def forward(self, x):
        return _norm_call(_ops.rms_norm, x, self.weight, None, self.variance_epsilon, x.dtype)


class _GemmaRMSNorm(_Patched):
    """x_hat * (1 + weight) in float32 (zero-centered gamma: weight_offset 1), returned in x's dtype."""

    def forward(self, x):
        xc = x if x.dtype in (torch.float32, *_HALF) else x.float()  # Gemma normalizes x.float()
        return _norm_call(_ops.rms_norm, xc, self.weight, None, self.eps, x.dtype, weight_offset=1.0)


class _T5LayerNorm(_Patched):
    """RMSNorm statistics in float32; output in the weight's dtype when it is half, else float32."""

    def forward(self, x):
        w = self.weight
        out = w.dtype if w.dtype in _HALF else torch.promote_types(torch.promote_types(x.dtype, torch.float32),
                                                                   w.dtype)
        return _norm_call(_ops.rms_norm, x, w, None, self.variance_epsilon, out)


class _OlmoLayerNorm(_Patched):
    """LayerNorm without weight or bias, eps 1e-5."""

    def forward(self, x):
        return _ops.layer_norm(x, None, None, 1e-5)


class _TorchLayerNorm(_Patched):
    def forward(self, x):
        return _norm_call(_ops.layer_norm, x, self.weight, self.bias, self.eps, x.dtype)


class _TorchRMSNorm(_Patched):
    def forward(self, x):
        eps = self.eps
        if eps is None:
            eps = torch.finfo(torch.float64 if x.dtype == torch.float64 else torch.float32).eps
        return _norm_call(_ops.rms_norm, x, self.weight, None, eps, x.dtype)


# ----------------------------------------------------------------------------- MLPs
class _FFNPatched(_Patched, FFN):
    """A patched HF MLP: the ffn.modules.FFN interface over HF's own Linear layers.

    forward runs the fused op (swiglu/geglu/reglu/gelu_ffn/relu_ffn) when no dropout
    is active between activation and down projection (T5 in training); else F.linear,
    the ffn elementwise op (gated_activation / bias_gelu; torch.relu for a plain ReLU
    FFN), dropout, F.linear.
    """

    backend = "ffn"
    _ffn_activation = None
    _ffn_fused_op = None  # the fused op for the activation, or None (set by patch())
    _ffn_telemetry = None  # a list while telemetry records (see FFNTelemetry)
    _ffn_telemetry_args = ()
    _dropout_name = None  # dropout between activation and down projection (T5)

    @property
    def activation(self):
        return self._ffn_activation

    @property
    def approximate(self):
        return "tanh" if self._ffn_activation == "gelu_tanh" else "none"

    def _fused_op(self):
        return self._ffn_fused_op

    def _mid_dropout(self):
        drop = getattr(self, self._dropout_name) if self._dropout_name else None
        return drop if drop is not None and drop.training and drop.p > 0 else None

    def _before_down(self, h, w_out):
        return h

    def _after(self, out):
        return out

    def _record(self, x, preact):
        if self._ffn_telemetry is not None:
            self._ffn_telemetry.append(_telemetry.ffn_stats(x, preact.reshape(-1, preact.shape[-1]),
                                                            self._ffn_activation, self.gated,
                                                            *self._ffn_telemetry_args))

    def _run(self, x, with_preact=False):
        (w_in, b_in), (w_out, b_out) = self.in_proj(), self.out_proj()
        op, drop = self._fused_op(), self._mid_dropout()
        # The fused ops take one dtype (autocast casts to it); T5 keeps `wo` in float32
        # next to half activations and casts h to it, which the unfused path does.
        same_dtype = x.dtype == w_in.dtype == w_out.dtype or torch.is_autocast_enabled(x.device.type)
        if op is not None and drop is None and same_dtype:
            if self._ffn_telemetry is None and not with_preact:
                extra = () if op == "relu_ffn" else (self.approximate,)
                return self._after(getattr(_ops, op)(x, w_in, b_in, w_out, b_out, *extra))
            # The internal forward ops follow the public ops' autocast rule (csrc/schemas.cpp).
            if self.gated:
                out, preact = _ops._gated_ffn_fwd(x, w_in, b_in, w_out, b_out, self._ffn_activation)
            elif op == "relu_ffn":
                out, preact = _ops._relu_ffn_fwd(x, w_in, b_in, w_out, b_out)
            else:
                out, preact = _ops._gelu_ffn_fwd(x, w_in, b_in, w_out, b_out, self.approximate)
        else:
            preact = F.linear(x, w_in, b_in)
            if self.gated:
                h = _ops.gated_activation(preact, self._ffn_activation)
            elif self._ffn_activation in ("gelu", "gelu_tanh"):
                h = _ops.bias_gelu(preact, None, self.approximate)
            elif self._ffn_activation == "relu":
                h = torch.relu(preact)
            else:  # no ffn op for this activation (not reached: such modules are not patched)
                raise RuntimeError(f"ffn.patch: no ffn op for activation {self._ffn_activation!r}")
            if drop is not None:
                h = drop(h)
            out = F.linear(self._before_down(h, w_out), w_out, b_out)
            preact = preact.reshape(-1, preact.shape[-1])
        self._record(x, preact)
        out = self._after(out)
        return (out, preact) if with_preact else out

    def forward(self, x):
        return self._run(x)

    def forward_with_preact(self, x):
        return self._run(x, with_preact=True)

    def _ffn_pack(self):
        pass

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._ffn_pack()
        return out


class _GatedSplit(_FFNPatched):
    """Gate and up as two Linear layers (Llama-style gate_proj/up_proj/down_proj, T5 wi_0/wi_1/wo)."""

    gated = True
    _gate_name, _up_name, _down_name = "gate_proj", "up_proj", "down_proj"

    def in_proj(self):
        g, u = getattr(self, self._gate_name), getattr(self, self._up_name)
        b = None if g.bias is None else _cat_rows(g.bias, u.bias)
        return _cat_rows(g.weight, u.weight), b

    def out_proj(self):
        d = getattr(self, self._down_name)
        return d.weight, d.bias

    def _ffn_pack(self):
        g, u = getattr(self, self._gate_name), getattr(self, self._up_name)
        _pack_rows(g.weight, u.weight)
        _pack_rows(g.bias, u.bias)


class _T5Gated(_GatedSplit):
    _gate_name, _up_name, _down_name, _dropout_name = "wi_0", "wi_1", "wo", "dropout"

    def _before_down(self, h, w_out):
        return h.to(w_out.dtype) if h.dtype != w_out.dtype and w_out.dtype != torch.int8 else h


class _Phi3MLP(_FFNPatched):
    """gate_up_proj is already packed, gate rows first."""

    gated = True

    def in_proj(self):
        return self.gate_up_proj.weight, self.gate_up_proj.bias

    def out_proj(self):
        return self.down_proj.weight, self.down_proj.bias


class _PlainMLP(_FFNPatched):
    """act(x W1^T + b1) W2^T + b2 with nn.Linear layers (GPT-NeoX, Falcon)."""

    gated = False
    _in_name, _out_name = "dense_h_to_4h", "dense_4h_to_h"

    def in_proj(self):
        lin = getattr(self, self._in_name)
        return lin.weight, lin.bias

    def out_proj(self):
        lin = getattr(self, self._out_name)
        return lin.weight, lin.bias


class _T5Plain(_PlainMLP):
    _in_name, _out_name, _dropout_name = "wi", "wo", "dropout"
    _before_down = _T5Gated._before_down


class _GPT2MLP(_PlainMLP):
    """Conv1D layers hold [in, out] weights: the ops get transposed views (no copy)."""

    def in_proj(self):
        return self.c_fc.weight.t(), self.c_fc.bias

    def out_proj(self):
        return self.c_proj.weight.t(), self.c_proj.bias

    def _after(self, out):
        return self.dropout(out)


# ----------------------------------------------------------------------------- the registry
def _activation_of(act):
    """The ffn activation name of an HF / torch activation module, or None."""
    from transformers import activations as A

    t = type(act)
    if t in (A.SiLUActivation, nn.SiLU):
        return "silu"
    if t is nn.ReLU:
        return "relu"
    if t is A.GELUActivation:
        return "gelu"
    if t in (A.GELUTanh, A.NewGELUActivation, A.FastGELUActivation):
        return "gelu_tanh"
    if t is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act.approximate)
    if act is F.silu:
        return "silu"
    return None


def _mlp_handler(mixin, act_attr, *, linears=()):
    def handle(module):
        act = _activation_of(getattr(module, act_attr))
        if act is None:
            raise _Unknown(f"activation {type(getattr(module, act_attr)).__name__}")
        for name in linears:
            lin = getattr(module, name)
            if type(lin).__name__ not in ("Linear", "FalconLinear", "Conv1D"):
                raise _Unknown(f"{name} is a {type(lin).__name__}, not a Linear layer")
        if not mixin.gated and act not in ("gelu", "gelu_tanh", "relu"):
            raise _Skip(f"no ffn op for a non-gated {act} FFN")
        if mixin.gated:
            fused = _GATED_OP_OF.get("gelu" if act == "gelu_tanh" else act)  # geglu, approximate="tanh"
        else:
            fused = "relu_ffn" if act == "relu" else "gelu_ffn"
        return mixin, {"_ffn_activation": act, "_ffn_fused_op": fused if fused and hasattr(_ops, fused) else None}

    return handle


def _norm_handler(mixin):
    return lambda module: (mixin, {})


def _torch_norm_handler(mixin):
    def handle(module):
        if len(module.normalized_shape) != 1:
            raise _Unknown(f"normalized_shape {tuple(module.normalized_shape)} (ffn norms take one dim)")
        return mixin, {}

    return handle


_GATED_SPLIT = _mlp_handler(_GatedSplit, "act_fn", linears=("gate_proj", "up_proj", "down_proj"))
_HANDLERS = {
    # HF class name -> handler(module) -> (mixin, attributes)
    **{f"{p}RMSNorm": _norm_handler(_LlamaRMSNorm) for p in ("Llama", "Mistral", "Qwen2", "Qwen3", "Phi3")},
    "Olmo2RMSNorm": _norm_handler(_Olmo2RMSNorm),
    "GemmaRMSNorm": _norm_handler(_GemmaRMSNorm),
    "Gemma2RMSNorm": _norm_handler(_GemmaRMSNorm),
    "T5LayerNorm": _norm_handler(_T5LayerNorm),
    "OlmoLayerNorm": _norm_handler(_OlmoLayerNorm),
    **{f"{p}MLP": _GATED_SPLIT for p in ("Llama", "Mistral", "Qwen2", "Qwen3", "Olmo", "Olmo2", "Gemma", "Gemma2")},
    "Phi3MLP": _mlp_handler(_Phi3MLP, "activation_fn", linears=("gate_up_proj", "down_proj")),
    "GPT2MLP": _mlp_handler(_GPT2MLP, "act", linears=("c_fc", "c_proj")),
    "GPTNeoXMLP": _mlp_handler(_PlainMLP, "act", linears=("dense_h_to_4h", "dense_4h_to_h")),
    "FalconMLP": _mlp_handler(_PlainMLP, "act", linears=("dense_h_to_4h", "dense_4h_to_h")),
    "T5DenseGatedActDense": _mlp_handler(_T5Gated, "act", linears=("wi_0", "wi_1", "wo")),
    "T5DenseActDense": _mlp_handler(_T5Plain, "act", linears=("wi", "wo")),
}
_TORCH_HANDLERS = {nn.LayerNorm: _torch_norm_handler(_TorchLayerNorm),
                   nn.RMSNorm: _torch_norm_handler(_TorchRMSNorm)}

# Class names of modules patch() must understand or refuse: norms and feed-forward blocks.
_CANDIDATE = re.compile(r"(Norm|MLP|Mlp|FeedForward|FFN|DenseActDense|DenseGatedActDense)$")
_NORM_BASES = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)

_PATCHED_CLASSES = {}


def _handler(module):
    t = type(module)
    if t in _TORCH_HANDLERS:
        return _TORCH_HANDLERS[t]
    if t.__module__.startswith("transformers.") and t.__name__ in _HANDLERS:
        return _HANDLERS[t.__name__]
    return None


def _patched_class(orig, mixin):
    cls = _PATCHED_CLASSES.get((orig, mixin))
    if cls is None:
        cls = type(f"Ffn{orig.__name__}", (mixin, orig),
                   {"__module__": __name__, "_ffn_original_class": orig,
                    "__doc__": f"{orig.__name__} on the ffn ops (ffn.patch). {mixin.__doc__ or ''}".strip()})
        _PATCHED_CLASSES[(orig, mixin)] = cls
    return cls


def _check_model_types(model, skip_unknown):
    for name, m in model.named_modules():
        config = getattr(m, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type is None or not hasattr(m, "base_model_prefix"):
            continue
        if model_type not in SUPPORTED_MODEL_TYPES and not skip_unknown:
            raise UnsupportedModuleError(
                f"ffn.patch: {type(m).__name__}{f' ({name})' if name else ''} is a {model_type!r} model, "
                f"which ffn.patch does not support (supported: {', '.join(SUPPORTED_MODEL_TYPES)}); "
                "pass skip_unknown=True to patch only the modules it knows")


def patch(model, *, skip_unknown=False):
    """Runs the norms and MLPs of a transformers model on the ffn ops, in place.

    Returns a PatchReport: {original class name: count} of what it replaced (a
    second call replaces nothing). Raises UnsupportedModuleError naming the class
    for a norm/MLP module (or a model type) it does not understand; with
    skip_unknown=True those are left alone. Known modules that have no ffn op (a
    non-gated FFN with an activation other than GELU or ReLU) are left alone and
    listed in `.skipped`, with a warning.
    """
    import transformers  # noqa: F401  (lazily: `import ffn` must not import transformers)

    _check_model_types(model, skip_unknown)
    report = PatchReport()
    plan = []
    for name, module in model.named_modules():
        if isinstance(module, _Patched):
            continue
        handler = _handler(module)
        where = f"{name or '<root>'} ({type(module).__name__})"
        if handler is None:
            if (_CANDIDATE.search(type(module).__name__) or isinstance(module, _NORM_BASES)) and not skip_unknown:
                raise UnsupportedModuleError(
                    f"ffn.patch: does not know how to run {type(module).__module__}.{type(module).__qualname__} "
                    f"(at {where}) on the ffn ops; pass skip_unknown=True to leave such modules alone")
            continue
        try:
            mixin, attrs = handler(module)
        except _Skip as e:
            report.skipped[type(module).__name__] = str(e)
            continue
        except _Unknown as e:
            if skip_unknown:
                continue
            raise UnsupportedModuleError(f"ffn.patch: does not know how to run {type(module).__name__} at "
                                         f"{where} on the ffn ops: unsupported {e}; pass skip_unknown=True "
                                         "to leave such modules alone") from None
        plan.append((module, mixin, attrs))
    for module, mixin, attrs in plan:
        orig = type(module)
        module.__class__ = _patched_class(orig, mixin)
        for k, v in attrs.items():
            setattr(module, k, v)
        if isinstance(module, _FFNPatched):
            module._ffn_pack()
        report[orig.__name__] = report.get(orig.__name__, 0) + 1
    if report.skipped:
        warnings.warn("ffn.patch left these modules unpatched: "
                      + "; ".join(f"{k}: {v}" for k, v in report.skipped.items()), stacklevel=2)
    return report


def unpatch(model):
    """Swaps the classes patch() set back to the originals (parameters stay where they are).
    Returns {original class name: count}."""
    counts = {}
    for module in model.modules():
        if isinstance(module, _Patched):
            orig = type(module)._ffn_original_class
            for k in ("_ffn_activation", "_ffn_fused_op", "_ffn_telemetry", "_ffn_telemetry_args"):
                module.__dict__.pop(k, None)
            module.__class__ = orig
            counts[orig.__name__] = counts.get(orig.__name__, 0) + 1
    return counts


# ----------------------------------------------------------------------------- telemetry
def _layer_index(name):
    m = re.search(r"\.(\d+)(\.|$)", f".{name}")
    return int(m.group(1)) if m else None


class FFNTelemetry:
    """Per-layer FFN telemetry of a patched model: ffn_stats of every patched MLP's
    input and pre-activation, summed over the calls while attached."""

    def __init__(self, model, near_zero=None, large=None, outlier=None):
        self.modules = [(name, m) for name, m in model.named_modules() if isinstance(m, _FFNPatched)]
        if not self.modules:
            raise ValueError("ffn.patch.telemetry: the model has no patched MLP (call ffn.patch(model) first)")
        defaults = (_telemetry._NEAR_ZERO, _telemetry._LARGE, _telemetry._OUTLIER)
        self._args = tuple(d if v is None else v for v, d in zip((near_zero, large, outlier), defaults))
        self._calls = {name: [] for name, _ in self.modules}

    def attach(self):
        for name, m in self.modules:
            m._ffn_telemetry = self._calls[name]
            m._ffn_telemetry_args = self._args
        return self

    def detach(self):
        for _, m in self.modules:
            m.__dict__.pop("_ffn_telemetry", None)
            m.__dict__.pop("_ffn_telemetry_args", None)

    def reset(self):
        for calls in self._calls.values():
            calls.clear()

    def stats(self):
        """{module name: combined raw stats vector} (ffn.telemetry.STAT_FIELDS), for modules that ran."""
        return {name: _telemetry.combine(calls) for name, calls in self._calls.items() if calls}

    def table(self):
        """One dict per patched MLP that ran: layer, module, kind, activation, gated, calls,
        then ffn.telemetry.summarize's entries."""
        rows = []
        for name, m in self.modules:
            calls = self._calls[name]
            if not calls:
                continue
            rows.append({"layer": _layer_index(name), "module": name, "kind": type(m)._ffn_original_class.__name__,
                         "activation": m.activation, "gated": m.gated, "calls": len(calls),
                         **_telemetry.summarize(_telemetry.combine(calls))})
        return rows


@contextlib.contextmanager
def telemetry(model, *, near_zero=None, large=None, outlier=None):
    """Records FFN telemetry of a patched model while inside the block (eager mode):

        with ffn.patch.telemetry(model) as t:
            model(input_ids)
        t.table()   # [{"layer": 0, "module": "model.layers.0.mlp", "input_mean": ..., ...}, ...]
    """
    rec = FFNTelemetry(model, near_zero, large, outlier).attach()
    try:
        yield rec
    finally:
        rec.detach()


def collect_telemetry(model, batches, **thresholds):
    """Runs the patched model in eval mode without gradients over `batches` (each a tensor
    of input ids or a dict of model kwargs) and returns the per-layer table."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), telemetry(model, **thresholds) as rec:
            for batch in batches:
                model(**batch) if isinstance(batch, dict) else model(batch)
    finally:
        model.train(was_training)
    return rec.table()


patch.telemetry = telemetry
patch.collect_telemetry = collect_telemetry
patch.unpatch = unpatch
