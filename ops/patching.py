"""ffn.patching: the norms and MLPs of a Hugging Face transformers model on the ffn ops.

    import ffn
    model = LlamaForCausalLM.from_pretrained(...)
    replaced = ffn.patch(model)          # {"LlamaRMSNorm": 5, "LlamaMLP": 2}  (ffn.patching.patch)
    ffn.unpatch(model)                   # the original classes back

Each supported module is patched in place by swapping its class for a subclass
whose forward calls torch.ops.ffn (FfnLlamaRMSNorm for LlamaRMSNorm, ...). The
module keeps its parameters -- the same nn.Parameter objects, under the same
names -- so state_dict() keys and values are HF's, an HF checkpoint loads
unchanged, optimizers, PEFT target names, tied weights and
`isinstance(m, LlamaRMSNorm)` / `isinstance(m, nn.LayerNorm)` (HF Trainer's
weight-decay grouping) keep working, and `unpatch(model)` swaps the classes back.

Every parameter keeps its own storage, so checkpoint tools (safetensors, save_pretrained,
accelerate) save a patched model as they save the unpatched one: where the fused
gated ops take gate and up packed ([2*d_ff, d]) and HF holds two Linear layers,
forward concatenates their weights at each call. The patched forward reads only
the module's own parameters and keeps no state.

The fused op runs only while the MLP's projections are plain layers (nn.Linear, or
HF's Conv1D / FalconLinear: exact class, no hooks, plain or DTensor weights),
checked at each call: a projection wrapped by a LoRA adapter, a quantizer or a
hook, whether before or after patch(), is called as a module, with ffn's
elementwise activation in between, and a warning names it once.

The patched MLPs implement ffn.modules.FFN (in_proj/out_proj, forward_with_preact,
`activation`, `gated`), so ffn's telemetry and the harness's probes take them like
ffn's own modules; ffn.telemetry.record(model) records per-layer FFN telemetry of a
patched model while it runs. The forwards here are also ffn.hub's layers (the
`kernels` route to the same math).

transformers is imported only when patch() is called.
"""

import re
import types
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from . import telemetry as _telemetry
from .activations import GELU_APPROXIMATIONS, approximate_of, fused_op
from .modules import FFN, layer_wrapper, warn_unfused

__all__ = ["patch", "unpatch", "run_mlp", "PatchReport", "UnsupportedModuleError", "SUPPORTED_MODEL_TYPES"]

_ops = torch.ops.ffn
_HALF = (torch.float16, torch.bfloat16)

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


# ----------------------------------------------------------------------------- norms
class _Patched:
    """Marks a patched class; _ffn_original_class and _ffn_mixin are set on each generated subclass."""

    _ffn_original_class = None
    _ffn_mixin = None

    def __reduce_ex__(self, protocol):
        # The Ffn* classes are made at run time (_patched_class), so pickle cannot find them by name:
        # a patched module pickles as its original class and mixin, and the class is made again on load.
        cls = type(self)
        return _new_patched_module, (cls._ffn_original_class, cls._ffn_mixin), self.__getstate__()


def _new_patched_module(orig, mixin):
    """An instance of patch()'s class for `orig`, without __init__ (pickle sets its state)."""
    cls = _patched_class(orig, mixin)
    return cls.__new__(cls)


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
    """A patched HF MLP: the ffn.modules.FFN interface over HF's own projection layers.

    forward reads only the module's own parameters and keeps no state: it runs the
    fused op (swiglu/geglu/reglu/gelu_ffn/relu_ffn) on the layers' weights when every
    projection is a plain layer (ffn.modules.layer_wrapper, checked at each call, so a
    LoRA adapter or hook added after patch() counts) and no dropout is active between
    activation and down projection (T5 in training); otherwise it calls the projection
    layers themselves, with the ffn elementwise op (gated_activation / bias_gelu;
    torch.relu for a plain ReLU FFN) and dropout in between.

    Each subclass is a layout: its class attributes name the module's layers and its
    classmethods read them from a module given as argument, so run_mlp (and ffn.hub,
    on transformers' own unpatched classes) uses them on any module of that layout.
    """

    backend = "ffn"
    _ffn_activation = None
    _ffn_fused_op = None  # the fused op for the activation, or None (set by patch())
    _ffn_telemetry = None  # a list while telemetry records (see ffn.telemetry.FFNTelemetry)
    _ffn_telemetry_args = ()
    _dropout_name = None  # dropout between activation and down projection (T5)
    _in_names = ()  # the input projection layers; their outputs, concatenated, are the pre-activation
    # The layer classes whose forward is F.linear of their weight (Conv1D: of its transpose).
    _plain_layers = frozenset({"torch.nn.modules.linear.Linear"})

    @property
    def activation(self):
        return self._ffn_activation

    @property
    def approximate(self):
        return approximate_of(self._ffn_activation)

    def in_proj(self):
        return type(self)._in_weights(self)

    def out_proj(self):
        return type(self)._out_weights(self)

    def forward(self, x):
        return run_mlp(self, x, type(self), self._ffn_activation, self._ffn_fused_op)

    def forward_with_preact(self, x):
        return run_mlp(self, x, type(self), self._ffn_activation, self._ffn_fused_op, with_preact=True)

    @classmethod
    def _in_weights(cls, module):
        (name,) = cls._in_names
        return getattr(module, name).weight, getattr(module, name).bias

    @classmethod
    def _out_weights(cls, module):
        layer = getattr(module, cls._out_name)
        return layer.weight, layer.bias

    @classmethod
    def _wrapped(cls, module):
        """None when the fused op may run; else warns (once) naming what wraps a projection."""
        for name in (*cls._in_names, cls._out_name):
            why = layer_wrapper(getattr(module, name), cls._plain_layers)
            if why is not None:
                patched = isinstance(module, _Patched)
                orig = type(module)._ffn_original_class if patched else type(module)
                warn_unfused(f"ffn.{'patch' if patched else 'hub'}: {orig.__name__}.{name} {why}: running it as "
                             "a module, the fused FFN op is not used")
                return why
        return None

    @classmethod
    def _mid_dropout(cls, module):
        drop = getattr(module, cls._dropout_name) if cls._dropout_name else None
        return drop if drop is not None and drop.training and drop.p > 0 else None

    @classmethod
    def _before_down(cls, module, h):
        return h

    @classmethod
    def _after(cls, module, out):
        return out


def run_mlp(module, x, layout, activation, fused_op, with_preact=False):
    """The forward of an HF MLP `module` on the ffn ops: the one implementation behind
    ffn.patch's MLP classes and ffn.hub's MLP layers. `layout` is the _FFNPatched
    subclass that knows the module's layers (module need not be an instance of it),
    `activation` the ffn activation name, `fused_op` the fused op for it or None.
    Returns the output, or with_preact (output, pre-activation [rows, F or 2F])."""
    approximate = approximate_of(activation)
    drop = layout._mid_dropout(module)
    telemetry = getattr(module, "_ffn_telemetry", None)
    if fused_op is not None and drop is None and layout._wrapped(module) is None:
        (w_in, b_in), (w_out, b_out) = layout._in_weights(module), layout._out_weights(module)
        # The fused ops take one dtype (autocast casts to it); T5 keeps `wo` in float32
        # next to half activations and casts h to it, which the unfused path does.
        if x.dtype == w_in.dtype == w_out.dtype or torch.is_autocast_enabled(x.device.type):
            if telemetry is None and not with_preact:
                extra = () if fused_op == "relu_ffn" else (approximate,)
                return layout._after(module, getattr(_ops, fused_op)(x, w_in, b_in, w_out, b_out, *extra))
            # The internal forward ops follow the public ops' autocast rule (ops/_registrations.py).
            if layout.gated:
                out, preact = _ops._gated_ffn_fwd(x, w_in, b_in, w_out, b_out, activation)
            elif fused_op == "relu_ffn":
                out, preact = _ops._relu_ffn_fwd(x, w_in, b_in, w_out, b_out)
            else:
                out, preact = _ops._gelu_ffn_fwd(x, w_in, b_in, w_out, b_out, approximate)
            _record(module, telemetry, activation, layout.gated, x, preact)
            out = layout._after(module, out)
            return (out, preact) if with_preact else out
    layers = [getattr(module, name)(x) for name in layout._in_names]
    preact = layers[0] if len(layers) == 1 else torch.cat(layers, dim=-1)
    if layout.gated:
        h = _ops.gated_activation(preact, activation)
    elif activation == "relu":
        h = torch.relu(preact)
    else:
        h = _ops.bias_gelu(preact, None, approximate)
    if drop is not None:
        h = drop(h)
    out = getattr(module, layout._out_name)(layout._before_down(module, h))
    preact = preact.reshape(-1, preact.shape[-1])
    _record(module, telemetry, activation, layout.gated, x, preact)
    out = layout._after(module, out)
    return (out, preact) if with_preact else out


def _record(module, telemetry, activation, gated, x, preact):
    """Appends the call's ffn_stats to the list an ffn.telemetry.FFNTelemetry attached."""
    if telemetry is not None:
        telemetry.append(_telemetry.ffn_stats(x, preact.reshape(-1, preact.shape[-1]), activation, gated,
                                              *module._ffn_telemetry_args))


class _GatedSplit(_FFNPatched):
    """Gate and up as two Linear layers (Llama-style gate_proj/up_proj/down_proj, T5 wi_0/wi_1/wo).

    The fused op takes them packed: torch.cat of the two weights at each call, a copy that
    keeps every HF parameter in its own storage (checkpoint tools read shared storage as
    tied weights) and the forward free of state of its own."""

    gated = True
    _in_names, _out_name = ("gate_proj", "up_proj"), "down_proj"

    @classmethod
    def _in_weights(cls, module):
        g, u = (getattr(module, name) for name in cls._in_names)
        b = None if g.bias is None else torch.cat([g.bias, u.bias])
        return torch.cat([g.weight, u.weight]), b


class _T5Gated(_GatedSplit):
    _in_names, _out_name, _dropout_name = ("wi_0", "wi_1"), "wo", "dropout"

    @classmethod
    def _before_down(cls, module, h):
        w = getattr(module.wo, "weight", None)  # as T5DenseGatedActDense: h in wo's dtype unless it is int8
        return h.to(w.dtype) if isinstance(w, torch.Tensor) and h.dtype != w.dtype and w.dtype != torch.int8 else h


class _Phi3MLP(_FFNPatched):
    """gate_up_proj is already packed, gate rows first."""

    gated = True
    _in_names, _out_name = ("gate_up_proj",), "down_proj"


class _PlainMLP(_FFNPatched):
    """act(x W1^T + b1) W2^T + b2 with nn.Linear layers (GPT-NeoX, Falcon)."""

    gated = False
    _in_names, _out_name = ("dense_h_to_4h",), "dense_4h_to_h"
    _plain_layers = _FFNPatched._plain_layers | {"transformers.models.falcon.modeling_falcon.FalconLinear"}


class _T5Plain(_PlainMLP):
    _in_names, _out_name, _dropout_name = ("wi",), "wo", "dropout"
    _before_down = _T5Gated._before_down


class _GPT2MLP(_PlainMLP):
    """Conv1D layers hold [in, out] weights: the ops get transposed views (no copy)."""

    _in_names, _out_name = ("c_fc",), "c_proj"
    _plain_layers = frozenset({"transformers.pytorch_utils.Conv1D"})

    @classmethod
    def _in_weights(cls, module):
        return module.c_fc.weight.t(), module.c_fc.bias

    @classmethod
    def _out_weights(cls, module):
        return module.c_proj.weight.t(), module.c_proj.bias

    @classmethod
    def _after(cls, module, out):
        return module.dropout(out)


# ----------------------------------------------------------------------------- the registry
# transformers' activation modules by qualified class name: read without importing transformers,
# which also keeps the lookup traceable by torch.compile (Dynamo refuses some imports).
_HF_ACTIVATIONS = {f"transformers.activations.{cls}": name for cls, name in (
    ("SiLUActivation", "silu"), ("GELUActivation", "gelu"), ("GELUTanh", "gelu_tanh"),
    ("NewGELUActivation", "gelu_tanh"), ("FastGELUActivation", "gelu_tanh"))}


def _activation_of(act):
    """The ffn activation name of an HF / torch activation module (its exact class), or None."""
    t = type(act)
    if t is nn.SiLU or act is F.silu:
        return "silu"
    if t is nn.ReLU:
        return "relu"
    if t is nn.GELU:
        return GELU_APPROXIMATIONS.get(act.approximate)
    return _HF_ACTIVATIONS.get(f"{t.__module__}.{t.__qualname__}")


def _mlp_handler(mixin, act_attr):
    # The projection layers are not checked here: forward checks them at each call and runs
    # any layer that is not a plain one (LoRA, quantized, hooked) as a module.
    def handle(module):
        act = _activation_of(getattr(module, act_attr))
        if act is None:
            raise _Unknown(f"activation {type(getattr(module, act_attr)).__name__}")
        fused = fused_op_of(act, mixin.gated)
        if not mixin.gated and fused is None:
            raise _Skip(f"no ffn op for a non-gated {act} FFN")
        return mixin, {"_ffn_activation": act, "_ffn_fused_op": fused}

    return handle


def fused_op_of(activation, gated):
    """ffn.activations.fused_op, where this build of the library has the op; else None."""
    fused = fused_op(activation, gated)
    return fused if fused and hasattr(_ops, fused) else None


def _norm_handler(mixin):
    return lambda module: (mixin, {})


def _torch_norm_handler(mixin):
    def handle(module):
        if len(module.normalized_shape) != 1:
            raise _Unknown(f"normalized_shape {tuple(module.normalized_shape)} (ffn norms take one dim)")
        return mixin, {}

    return handle


_GATED_SPLIT = _mlp_handler(_GatedSplit, "act_fn")
_HANDLERS = {
    # HF class name -> handler(module) -> (mixin, attributes)
    **{f"{p}RMSNorm": _norm_handler(_LlamaRMSNorm) for p in ("Llama", "Mistral", "Qwen2", "Qwen3", "Phi3")},
    "Olmo2RMSNorm": _norm_handler(_Olmo2RMSNorm),
    "GemmaRMSNorm": _norm_handler(_GemmaRMSNorm),
    "Gemma2RMSNorm": _norm_handler(_GemmaRMSNorm),
    "T5LayerNorm": _norm_handler(_T5LayerNorm),
    "OlmoLayerNorm": _norm_handler(_OlmoLayerNorm),
    **{f"{p}MLP": _GATED_SPLIT for p in ("Llama", "Mistral", "Qwen2", "Qwen3", "Olmo", "Olmo2", "Gemma", "Gemma2")},
    "Phi3MLP": _mlp_handler(_Phi3MLP, "activation_fn"),
    "GPT2MLP": _mlp_handler(_GPT2MLP, "act"),
    "GPTNeoXMLP": _mlp_handler(_PlainMLP, "act"),
    "FalconMLP": _mlp_handler(_PlainMLP, "act"),
    "T5DenseGatedActDense": _mlp_handler(_T5Gated, "act"),
    "T5DenseActDense": _mlp_handler(_T5Plain, "act"),
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
                   {"__module__": __name__, "_ffn_original_class": orig, "_ffn_mixin": mixin,
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
    for a norm/MLP module (or a model type, or an activation) it does not understand;
    with skip_unknown=True those are left alone. Known modules it cannot run (a
    non-gated SiLU FFN, which has no ffn op; a module whose forward is set on the
    instance by a wrapper other than accelerate's hooks) are left alone and listed
    in `.skipped`, with a warning.
    """
    try:
        import transformers  # noqa: F401  (lazily: `import ffn` must not import transformers)
    except ImportError as e:
        raise ImportError(f"ffn.patch runs Hugging Face transformers models and needs the transformers package "
                          f"(pip install transformers): {e}") from e

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
        if "forward" in vars(module) and not _accelerate_hooked(module):
            report.skipped[type(module).__name__] = ("its forward is set on the instance (a wrapper), so a new "
                                                     "class would not change what runs")
            continue
        plan.append((module, mixin, attrs))
    for module, mixin, attrs in plan:
        orig = type(module)
        module.__class__ = _patched_class(orig, mixin)
        if _accelerate_hooked(module):
            module._old_forward = types.MethodType(type(module).forward, module)
        for k, v in attrs.items():
            setattr(module, k, v)
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
            if _accelerate_hooked(module):
                module._old_forward = types.MethodType(orig.forward, module)
            counts[orig.__name__] = counts.get(orig.__name__, 0) + 1
    return counts


def _accelerate_hooked(module):
    """Whether accelerate's hooks wrap the module (add_hook_to_module: device_map, offloading): its
    instance forward runs the hook, then `_old_forward`, the class's forward bound when hooked, which
    patch() and unpatch() point at the class they set."""
    return hasattr(module, "_hf_hook") and "_old_forward" in vars(module)
