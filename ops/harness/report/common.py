"""What the tables, findings and plots of the report share: per-layer values of a result,
the probe's offsets, and the thresholds the findings state."""

import statistics

from ..tables import isnum

# A probe shift "reaches" a tensor when it leaves a systematic per-unit offset larger than
# this fraction of the tensor's own scale (probes.py).
REACH_OFFSET = 0.05
# Loss changes below this many nats are reported as not measurable.
LOSS_RESOLUTION = 5e-3


def layer_values(layers, key):
    return [layer[key] for layer in layers or [] if isnum(layer.get(key))]


def max_over_layers(result, key):
    values = layer_values(result.telemetry_val, key)
    return max(values) if values else None


def mean_of(values):
    values = [v for v in values if isnum(v)]
    return statistics.fmean(values) if values else float("nan")


def offsets(result):
    """Layer-averaged (input, gate, down-proj input) offsets of a probed result."""
    off = result.shift_probe.offsets
    return tuple(mean_of([o[key] for o in off]) for key in ("input_offset", "gate_offset", "down_in_offset"))


def reaches(value):
    return "–" if not isnum(value) else ("yes" if value > REACH_OFFSET else "no")

