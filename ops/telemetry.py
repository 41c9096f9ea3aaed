"""Per-layer FFN telemetry, cheap enough to leave on in training.

What it shows, per FFN call: whether a mean shift in the normalized input
survives the norm (RMSNorm does not subtract the mean, LayerNorm does) and
reaches the tensor entering the down projection; for gated FFNs, how many gate
activations are near zero or very large; and the outliers after the
nonlinearity (max|h| / rms(h), kurtosis, share of |h| > 6 rms(h)) that hurt
8-bit weight-only quantization.

    stats = ffn_stats(normed, preact, "silu", gated=True)   # one fused op, float64 sums
    stats = combine([stats_microbatch_0, stats_microbatch_1])   # all_reduce_(stats) across ranks
    summarize(stats)  # {"input_mean": ..., "gate_near_zero_frac": ..., ...}

    with record(model) as rec:       # a model patched by ffn.patch: every MLP's stats
        model(input_ids)
    rec.table()                      # [{"layer": 0, "module": "model.layers.0.mlp", ...}, ...]

`preact` is the pre-activation FFN modules return from forward_with_preact
(the second output of torch.ops.ffn._gelu_ffn_fwd / _gated_ffn_fwd, bias included); h = act(preact) (plain) or act(gate) * up (gated) is
recomputed inside the kernel and never materialized. The op returns raw sums,
counts and one max (STAT_FIELDS), so micro-batches and DDP ranks combine before
anything is divided: add the vectors (all_reduce SUM), except MAX_FIELDS, which
take the max (all_reduce MAX).

The one entry that does not combine exactly is `h_outliers`: each call counts
|h| > outlier * rms(h) against the rms of its own h (a threshold needs the rms
first, and a global rms is not known until every call is done). Combined, it is
the sum of per-call counts.

ffn_input and preact may differ in dtype (a float32 norm output next to a
bfloat16 pre-activation under autocast). h is computed in float32 (float64 for
float64 input) and not rounded to the input dtype before it enters the
statistics. The defaults of the thresholds are the op schema's (ffn.schema).
"""

import contextlib
import math
import re
from collections.abc import Sequence

import torch
import torch.distributed as dist

from .activations import activation as _activation
from .schema import op_default

# Entries of the vector ffn_stats returns, in order (csrc/telemetry.h, StatField).
STAT_FIELDS = (
    "tokens",  # rows of ffn_input
    "input_row_mean_sum",  # sum over tokens of (mean over features of ffn_input)
    "input_row_mean_abs_sum",  # sum over tokens of |mean over features of ffn_input|
    "h_count",  # elements of h (tokens * d_ff)
    "h_sum",  # sum of h
    "h_sq_sum",  # sum of h^2
    "h_cube_sum",  # sum of h^3
    "h_quad_sum",  # sum of h^4
    "h_abs_max",  # max |h| (NaN if h has a NaN)
    "gate_count",  # gate elements (tokens * d_ff when gated, else 0)
    "gate_sum",  # sum of gate pre-activations
    "gate_sq_sum",  # sum of squared gate pre-activations
    "gate_near_zero",  # count of |act(gate)| < near_zero
    "gate_large",  # count of |act(gate)| > large
    "h_outliers",  # count of |h| > outlier * rms(h), rms of the same call's h
)
# Entries that combine by max instead of sum.
MAX_FIELDS = ("h_abs_max",)

_INDEX = {name: i for i, name in enumerate(STAT_FIELDS)}
_MAX_INDICES = [_INDEX[name] for name in MAX_FIELDS]


_NEAR_ZERO, _LARGE, _OUTLIER = (op_default("ffn_stats", arg) for arg in ("near_zero", "large", "outlier"))


def ffn_stats(ffn_input, preact, activation, gated, near_zero=_NEAR_ZERO, large=_LARGE, outlier=_OUTLIER):
    """Raw telemetry sums of one FFN call: a float64 [len(STAT_FIELDS)] tensor on the inputs' device.

    ffn_input: [..., d], the normalized FFN input; preact: [tokens, d_ff] or, gated,
    [tokens, 2*d_ff] (gate columns, then up); activation: one of
    ffn.activations.ACTIVATION_NAMES. Not differentiable (the result never requires grad).
    """
    return torch.ops.ffn.ffn_stats(ffn_input, preact, activation, gated, near_zero, large, outlier)


def combine(stats: Sequence[torch.Tensor]) -> torch.Tensor:
    """The stats of several calls (micro-batches, steps) as one: sums add, MAX_FIELDS take the max.

    Each element is one call's vector [len(STAT_FIELDS)], or a stack of them with the
    same shape (e.g. [layers, len(STAT_FIELDS)]), combined entry by entry."""
    if len(stats) == 0:
        raise ValueError("combine: need at least one stats tensor")
    shapes = {tuple(t.shape) for t in stats}
    if len(shapes) != 1 or next(iter(shapes))[-1:] != (len(STAT_FIELDS),):
        raise ValueError(
            f"combine: each stats tensor must have shape [..., {len(STAT_FIELDS)}] (all the same), "
            f"got {sorted(shapes)}"
        )
    stacked = torch.stack(list(stats))
    out = stacked.sum(0)
    out[..., _MAX_INDICES] = stacked[..., _MAX_INDICES].amax(0)  # amax propagates NaN
    return out


def neutral(*leading, device=None) -> torch.Tensor:
    """Stats of no call, shape [*leading, len(STAT_FIELDS)]: zeros, and -inf for MAX_FIELDS,
    so combining with them changes nothing (e.g. for a DDP rank that saw no tokens)."""
    out = torch.zeros(*leading, len(STAT_FIELDS), dtype=torch.float64, device=device)
    out[..., _MAX_INDICES] = -math.inf
    return out


def all_reduce_(stats: torch.Tensor, group=None) -> torch.Tensor:
    """Combines stats over the ranks of a torch.distributed process group, in place:
    what combine() does across ranks."""
    maxed = stats.clone()
    dist.all_reduce(stats, group=group)
    dist.all_reduce(maxed, op=dist.ReduceOp.MAX, group=group)
    stats[..., _MAX_INDICES] = maxed[..., _MAX_INDICES]
    return stats


def _ratio(num, den):
    return num / den if den != 0 else math.nan


def summarize(stats: torch.Tensor) -> dict[str, float]:
    """The reported statistics of a stats vector (NaN where undefined: no tokens, not gated)."""
    s = dict(zip(STAT_FIELDS, stats.detach().to("cpu", torch.float64).tolist(), strict=True))
    n = s["h_count"]
    h_mean = _ratio(s["h_sum"], n)
    h_sq = _ratio(s["h_sq_sum"], n)
    h_cube = _ratio(s["h_cube_sum"], n)
    h_quad = _ratio(s["h_quad_sum"], n)
    h_var = h_sq - h_mean**2
    # Central 4th moment from raw moments (float64; fine unless |mean| >> std).
    h_central_quad = h_quad - 4 * h_mean * h_cube + 6 * h_mean**2 * h_sq - 3 * h_mean**4
    gate_mean = _ratio(s["gate_sum"], s["gate_count"])
    gate_var = _ratio(s["gate_sq_sum"], s["gate_count"]) - gate_mean**2
    return {
        "input_mean": _ratio(s["input_row_mean_sum"], s["tokens"]),
        "input_mean_abs": _ratio(s["input_row_mean_abs_sum"], s["tokens"]),
        "down_in_mean": h_mean,
        "gate_preact_mean": gate_mean,
        "gate_preact_std": math.sqrt(max(gate_var, 0.0)) if not math.isnan(gate_var) else math.nan,
        "gate_near_zero_frac": _ratio(s["gate_near_zero"], s["gate_count"]),
        "gate_large_frac": _ratio(s["gate_large"], s["gate_count"]),
        "h_max_over_rms": _ratio(s["h_abs_max"], math.sqrt(h_sq)) if not math.isnan(h_sq) else math.nan,
        "h_kurtosis": _ratio(h_central_quad, h_var**2) if h_var > 0 else math.nan,
        "h_outlier_frac": _ratio(s["h_outliers"], n),
    }


def reference_stats(ffn_input, preact, activation, gated, near_zero=_NEAR_ZERO, large=_LARGE, outlier=_OUTLIER):
    """What ffn_stats returns, computed with plain PyTorch ops in float64."""
    x = ffn_input.detach().to(torch.float64)
    z = preact.detach().to(torch.float64)
    d_ff = z.shape[-1] // 2 if gated else z.shape[-1]
    gate = z[:, :d_ff]
    act = _activation(activation).fn(gate)
    h = act * z[:, d_ff:] if gated else act
    row_mean = x.reshape(-1, x.shape[-1]).mean(-1)
    h_sq_sum = h.square().sum()
    rms = torch.sqrt(h_sq_sum / h.numel())
    zero = z.new_zeros(())
    values = {
        "tokens": row_mean.numel(),
        "input_row_mean_sum": row_mean.sum(),
        "input_row_mean_abs_sum": row_mean.abs().sum(),
        "h_count": h.numel(),
        "h_sum": h.sum(),
        "h_sq_sum": h_sq_sum,
        "h_cube_sum": h.pow(3).sum(),
        "h_quad_sum": h.pow(4).sum(),
        "h_abs_max": h.abs().amax() if h.numel() else zero,
        "gate_count": gate.numel() if gated else 0,
        "gate_sum": gate.sum() if gated else zero,
        "gate_sq_sum": gate.square().sum() if gated else zero,
        "gate_near_zero": (act.abs() < near_zero).sum() if gated else zero,
        "gate_large": (act.abs() > large).sum() if gated else zero,
        "h_outliers": (h.abs() > outlier * rms).sum() if h.numel() else zero,
    }
    return torch.stack(
        [torch.as_tensor(values[name], dtype=torch.float64, device=z.device) for name in STAT_FIELDS]
    )


# ----------------------------------------------------------------------------- recording a patched model
def _layer_index(name):
    m = re.search(r"\.(\d+)(\.|$)", f".{name}")
    return int(m.group(1)) if m else None


class FFNTelemetry:
    """Per-layer FFN telemetry of a model patched by ffn.patch: ffn_stats of every patched
    MLP's input and pre-activation, summed over the calls while attached."""

    def __init__(self, model, near_zero=None, large=None, outlier=None):
        from .patching import _FFNPatched

        self.modules = [(name, m) for name, m in model.named_modules() if isinstance(m, _FFNPatched)]
        if not self.modules:
            raise ValueError("ffn.telemetry.record: the model has no patched MLP (call ffn.patch(model) first)")
        defaults = (_NEAR_ZERO, _LARGE, _OUTLIER)
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
        """{module name: combined raw stats vector} (STAT_FIELDS), for modules that ran."""
        return {name: combine(calls) for name, calls in self._calls.items() if calls}

    def table(self):
        """One dict per patched MLP that ran: layer, module, kind, activation, gated, calls,
        then summarize()'s entries."""
        rows = []
        for name, m in self.modules:
            calls = self._calls[name]
            if not calls:
                continue
            rows.append({"layer": _layer_index(name), "module": name, "kind": type(m)._ffn_original_class.__name__,
                         "activation": m.activation, "gated": m.gated, "calls": len(calls),
                         **summarize(combine(calls))})
        return rows


@contextlib.contextmanager
def record(model, *, near_zero=None, large=None, outlier=None):
    """Records FFN telemetry of a patched model while inside the block (eager mode):

        with ffn.telemetry.record(model) as t:
            model(input_ids)
        t.table()   # [{"layer": 0, "module": "model.layers.0.mlp", "input_mean": ..., ...}, ...]
    """
    rec = FFNTelemetry(model, near_zero, large, outlier).attach()
    try:
        yield rec
    finally:
        rec.detach()


def collect(model, batches, **thresholds):
    """Runs the patched model in eval mode without gradients over `batches` (each a tensor
    of input ids or a dict of model kwargs) and returns record()'s per-layer table."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), record(model, **thresholds) as rec:
            for batch in batches:
                model(**batch) if isinstance(batch, dict) else model(batch)
    finally:
        model.train(was_training)
    return rec.table()
