"""The A/B report: terminal table, report.md with tables and findings, PNG plots.

Everything here is computed from the run's files (run.json, <design>/result.json,
metrics.jsonl), so `python -m ffn.harness.report runs/<name>` rebuilds a report.
The findings are sentences generated from the measured numbers, with the
thresholds they use stated next to them.
"""

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

from ..modules import gated_d_ff
from . import stats as seedstats
from . import studies
from .health import THRESHOLDS
from .results import load_run

# A probe shift "reaches" a tensor when it leaves a systematic per-unit offset larger than
# this fraction of the tensor's own scale (probes.py).
REACH_OFFSET = 0.05
# Loss changes below this many nats are reported as not measurable.
LOSS_RESOLUTION = 5e-3
QUANT_PROBES = (("int8", "int8 weights"), ("int4", "int4 weights"), ("int8_h", "int8 down-proj input"))

TELEMETRY_PLOT_KEYS = ("input_mean", "input_mean_abs", "down_in_mean", "gate_preact_std",
                       "gate_near_zero_frac", "gate_large_frac", "h_max_over_rms", "h_kurtosis")


def _isnum(value):
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _fmt(value, spec=".4f"):
    return format(value, spec) if _isnum(value) else "–"


def _pct(value, spec=".2f"):
    return _fmt(100 * value if _isnum(value) else None, spec)


def _layer_values(layers, key):
    return [layer[key] for layer in layers or [] if _isnum(layer.get(key))]


def _max_over_layers(result, key):
    values = _layer_values(result.telemetry_val, key)
    return max(values) if values else None


def _mean(values):
    values = [v for v in values if _isnum(v)]
    return statistics.fmean(values) if values else float("nan")


def _table(header, rows):
    def cells(row):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |"

    return "\n".join([cells(header), "|" + "|".join("---" for _ in header) + "|"] + [cells(row) for row in rows])


SUMMARY_HEADER = ["design", "block", "params", "val loss", "Δ vs first", "tokens/s", "memory MiB",
                  "int8 w Δ loss", "int4 w Δ loss", "int8 h Δ loss", "max|h|/rms", "kurtosis(h)",
                  "telemetry step overhead %"]


def summary_rows(results):
    base = results[0].final_val_loss
    return [[r.spec, r.description, f"{r.params:,}", _fmt(r.final_val_loss),
             _fmt(r.final_val_loss - base, "+.4f"), _fmt(r.tokens_per_s, ",.0f"),
             _fmt(r.memory_bytes / 2**20, ".1f"), _fmt(r.int8_delta, "+.5f"), _fmt(r.int4_delta, "+.4f"),
             _fmt(r.int8_h_delta, "+.4f"),
             _fmt(_max_over_layers(r, "h_max_over_rms"), ".1f"), _fmt(_max_over_layers(r, "h_kurtosis"), ".1f"),
             _pct(r.telemetry_overhead, "+.1f")] for r in results]


def terminal_table(results, meta):
    every = results
    results = studies.representatives(results)
    rows = [SUMMARY_HEADER] + summary_rows(results)
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(SUMMARY_HEADER))]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"unigram entropy of val: {meta.unigram_entropy:.4f} nats/byte; "
                 f"max|h|/rms and kurtosis: the largest over layers, on validation")
    for r in results:
        probe = r.shift_probe
        if probe:
            off = probe.offsets
            lines.append(f"shift probe {probe.shift_rms_units:g} rms, {r.spec}: offsets per layer (FFN input / gate / "
                         f"down-proj input) " + "  ".join(
                             f"L{i} {_fmt(o['input_offset'], '.3f')}/{_fmt(o['gate_offset'], '.3f')}/"
                             f"{_fmt(o['down_in_offset'], '.3f')}" for i, o in enumerate(off))
                         + f"; val loss {probe.val_loss - r.final_val_loss:+.4f}")
    flagged = [f"{r.label}: {studies.flag_text(r.health)}" for r in every if studies.flag_text(r.health) not in ("ok", "–")]
    if flagged:
        lines.append("health: " + "; ".join(flagged))
    g = studies.groups(every)
    if max(len(rs) for rs in g.values()) > 1:
        lines.append("val loss over seeds, mean [95% t interval]: " + "; ".join(
            f"{name} {studies.interval(rs, 'val loss').fmt()}" for name, rs in g.items()))
    return "\n".join(lines)


TELEMETRY_HEADER = ["design", "layer", "FFN input mean", "|mean| per token", "down-proj input mean",
                    "gate preact mean", "gate preact std", "gate near 0 %", "gate large %", "max|h|/rms",
                    "kurtosis(h)", "|h|>6rms %"]


def telemetry_rows(results):
    rows = []
    for r in results:
        for layer, t in enumerate(r.telemetry_val or []):
            rows.append([r.spec, layer, _fmt(t["input_mean"], "+.4f"), _fmt(t["input_mean_abs"]),
                         _fmt(t["down_in_mean"], "+.4f"), _fmt(t["gate_preact_mean"], "+.3f"),
                         _fmt(t["gate_preact_std"], ".3f"), _pct(t["gate_near_zero_frac"]),
                         _pct(t["gate_large_frac"], ".3f"), _fmt(t["h_max_over_rms"], ".1f"),
                         _fmt(t["h_kurtosis"], ".1f"), _pct(t["h_outlier_frac"], ".3f")])
    return rows


PROBE_HEADER = ["design", "layer", "norm input rms", "shift", "offset: FFN input", "offset: gate preact",
                "offset: down-proj input", "FFN input mean", "down-proj input mean", "gate near 0 %", "gate large %",
                "max|h|/rms", "val loss"]


def probe_rows(results):
    rows = []
    for r in results:
        probe = r.shift_probe
        if not probe:
            continue
        base_tel = r.telemetry_val or [None] * len(probe.offsets)
        shifted_tel = probe.telemetry or [None] * len(probe.offsets)
        for layer, (off, base, shifted) in enumerate(zip(probe.offsets, base_tel, shifted_tel)):
            def change(key, spec, pct=False):
                if base is None or shifted is None:
                    return "–"
                f = _pct if pct else _fmt
                return f"{f(base[key], spec)} → {f(shifted[key], spec)}"

            rows.append([r.spec, layer, _fmt(probe.norm_input_rms[layer], ".3f"),
                         _fmt(probe.shifts[layer], "+.3f"), _fmt(off["input_offset"], ".3f"),
                         _fmt(off["gate_offset"], ".3f"), _fmt(off["down_in_offset"], ".3f"),
                         change("input_mean", "+.3f"), change("down_in_mean", "+.4f"),
                         change("gate_near_zero_frac", ".2f", pct=True), change("gate_large_frac", ".3f", pct=True),
                         change("h_max_over_rms", ".1f"),
                         f"{_fmt(r.final_val_loss)} → {_fmt(probe.val_loss)}" if layer == 0 else ""])
    return rows


def _rank(values):
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    for rank, i in enumerate(order):
        ranks[i] = float(rank)
    return ranks


def _spearman(a, b):
    ra, rb = _rank(a), _rank(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    num = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    den = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return num / den if den else float("nan")


def _offsets(result):
    """Layer-averaged (input, gate, down-proj input) offsets of a probed result."""
    off = result.shift_probe.offsets
    return tuple(_mean([o[key] for o in off]) for key in ("input_offset", "gate_offset", "down_in_offset"))


def _reaches(value):
    return "–" if not _isnum(value) else ("yes" if value > REACH_OFFSET else "no")


def findings(results, meta):
    out = []
    unigram = meta.unigram_entropy
    by_loss = sorted(results, key=lambda r: r.final_val_loss)
    below = [r for r in results if r.final_val_loss < unigram]
    out.append(
        f"**Quality.** After {results[0].steps} steps ({results[0].tokens_seen:,} tokens each), validation "
        "loss ranks " + ", ".join(f"{r.spec} {r.final_val_loss:.4f}" for r in by_loss)
        + f" nats/byte; {len(below)} of {len(results)} designs end below the unigram entropy of the validation "
        f"text ({unigram:.4f}), " + (f"the best by {unigram - by_loss[0].final_val_loss:.3f} nats." if below else
                                     f"the best is {by_loss[0].final_val_loss - unigram:.3f} nats above it.")
    )
    out += _baseline_findings(results)
    probed = [r for r in results if r.shift_probe]
    if probed:
        k = probed[0].shift_probe.shift_rms_units
        rms = [v for r in probed for v in r.shift_probe.norm_input_rms if _isnum(v)]
        lines = []
        for r in probed:
            d_in, d_gate, d_down = _offsets(r)
            val_delta = r.shift_probe.val_loss - r.final_val_loss
            text = (f"- {r.spec} ({r.description}): offset of the FFN input {d_in:.3f}, of the gate "
                    f"pre-activations {_fmt(d_gate, '.3f')}, of the down-projection input {d_down:.3f}; val loss "
                    f"{val_delta:+.4f}. Reaches the FFN input: {_reaches(d_in)}, the gate: {_reaches(d_gate)}, "
                    f"the down projection: {_reaches(d_down)}.")
            lines.append(text)
        out.append(
            f"**Mean shift.** After training, a constant shift of {k:g}× the rms of each FFN norm's input is added "
            f"to it (the shifts range {k * min(rms):.3f}–{k * max(rms):.3f} across designs and layers) and the "
            "validation windows run again. "
            "Offset = the per-unit change common to all tokens, in units of the tensor's own scale, averaged over "
            f"layers; 'reaches' means offset > {REACH_OFFSET}.\n" + "\n".join(lines)
        )
        answer = _causal_answer(probed)
        if answer:
            out.append(answer)
    out += _quantization_findings(results)
    overheads = [r.telemetry_overhead for r in results if _isnum(r.telemetry_overhead)]
    if overheads:
        k = meta.train_config().telemetry_every
        med = statistics.median(overheads)
        out.append(
            f"**Telemetry cost.** A step with telemetry takes {100 * med:+.1f}% more "
            f"{results[0].telemetry_overhead_clock} than the plain steps beside it (median over "
            "designs; per design " + ", ".join(f"{r.spec} {100 * r.telemetry_overhead:+.1f}%"
                                                for r in results if _isnum(r.telemetry_overhead))
            + f"); logged every {k} steps that is {100 * med / k:+.2f}% of training time."
        )
    for r in (r for r in results if r.design.mean_shift):
        twin = next((o for o in results if not o.design.mean_shift
                     and replace(o.design, mean_shift=0.0) == replace(r.design, mean_shift=0.0)), None)
        if twin:
            out.append(f"**Training with a mean shift.** {r.spec} (shift {r.design.mean_shift:g} while "
                       f"training) reaches val loss {r.final_val_loss:.4f} vs {twin.final_val_loss:.4f} for "
                       f"{twin.spec} without it ({r.final_val_loss - twin.final_val_loss:+.4f}).")
    return out


def _group_mean(results, key, predicate):
    return _mean([_mean(_layer_values(r.telemetry_val, key)) for r in results if predicate(r)])


def _baseline_findings(results):
    """What the norms leave in the FFN input without any probe, and where outliers come from."""
    out = []
    centered = lambda r: r.design.norm == "layernorm"  # noqa: E731
    gated = lambda r: r.design.ffn != "gelu"  # noqa: E731
    if any(centered(r) for r in results) and any(not centered(r) for r in results) and \
            any(r.telemetry_val for r in results):
        ln = _group_mean(results, "input_mean_abs", centered)
        rms = _group_mean(results, "input_mean_abs", lambda r: not centered(r))
        out.append(f"**What the norm leaves in the FFN input.** Without any added shift, the per-token mean over "
                   f"features of the normalized FFN input has magnitude {rms:.4f} on average under RMSNorm designs "
                   f"vs {ln:.4f} under LayerNorm designs (layer average of |mean|; LayerNorm's is not exactly 0 "
                   "because of its gain and bias).")
    changes = _matched_outlier_changes(results)
    if changes:
        text = ("**Where the post-activation outliers come from.** Designs that differ in one factor only, largest "
                "max|h|/rms over layers (kurtosis): " + "; ".join(line for _, _, line in changes) + ".")
        by_factor = defaultdict(list)
        for factor, ratio, _ in changes:
            by_factor[factor].append(ratio)
        if len(by_factor) > 1:
            effects = {f: statistics.fmean(abs(math.log(x)) for x in v) for f, v in by_factor.items()}
            text += " Mean factor of change: " + ", ".join(f"{f} ×{math.exp(e):.2f}" for f, e in effects.items()) + \
                f"; the outliers follow the {max(effects, key=effects.get)}."
        out.append(text)
    return out


def _factors(design):
    return {"norm": design.norm, "norm bias": design.has_norm_bias, "FFN activation": design.ffn,
            "placement": design.placement, "layout": design.layout, "mean shift": design.mean_shift}


def _matched_outlier_changes(results):
    """(factor, ratio, text) for each pair of designs that differ only in the FFN activation
    (the norm's bias may differ too) or only in the norm (type and/or bias)."""
    out = []
    for i, a in enumerate(results):
        for b in results[i + 1:]:
            fa, fb = _factors(a.design), _factors(b.design)
            diff = {k for k in fa if fa[k] != fb[k]}
            if "FFN activation" in diff and diff <= {"FFN activation", "norm bias"}:
                factor = "FFN activation"
            elif diff and diff <= {"norm", "norm bias"}:
                factor = "norm"
            else:
                continue
            ma, mb = _max_over_layers(a, "h_max_over_rms"), _max_over_layers(b, "h_max_over_rms")
            if not (_isnum(ma) and _isnum(mb)) or ma <= 0:
                continue
            also = ", norm bias too" if factor == "FFN activation" and "norm bias" in diff else ""
            out.append((factor, mb / ma, f"{factor} ({a.spec} → {b.spec}{also}): {ma:.1f} → {mb:.1f} "
                        f"({_max_over_layers(a, 'h_kurtosis'):.1f} → {_max_over_layers(b, 'h_kurtosis'):.1f})"))
    return out


def _quantization_findings(results):
    parts = []
    with_outliers = [r for r in results if _isnum(_max_over_layers(r, "h_max_over_rms"))]
    for key, name in QUANT_PROBES:
        deltas = [getattr(r, f"{key}_delta") for r in results]
        text = f"{name}: " + ", ".join(f"{r.spec} {getattr(r, f'{key}_delta'):+.4f}" for r in results)
        if max(abs(d) for d in deltas) < LOSS_RESOLUTION:
            text += f" (all below {LOSS_RESOLUTION:g} nats: no measurable regression)"
        elif len(with_outliers) >= 3:
            rho = _spearman([_max_over_layers(r, "h_max_over_rms") for r in with_outliers],
                            [getattr(r, f"{key}_delta") for r in with_outliers])
            text += f" (rank correlation with max|h|/rms across designs {rho:+.2f})"
        parts.append(text)
    return ["**Quantization vs post-activation outliers.** Validation loss change with " + "; ".join(parts) + "."]


def _causal_answer(probed):
    """The case studies' question in one paragraph: does the shift reach the gate and the down
    projection under RMSNorm+SwiGLU, and does putting mean subtraction back remove it?"""
    def find(norm, bias, ffn="swiglu"):
        return next((r for r in probed if r.design.norm == norm and r.design.ffn == ffn
                     and r.design.has_norm_bias == bias and not r.design.mean_shift
                     and r.design.placement == "pre" and r.design.layout == "serial"), None)

    b, b_bias, rms_gelu = find("rmsnorm", False), find("rmsnorm", True), find("rmsnorm", False, "gelu")
    recentered = find("layernorm", False) or find("layernorm", True)
    if not b:
        return None
    k = b.shift_probe.shift_rms_units

    def loss(r):
        return r.shift_probe.val_loss - r.final_val_loss

    d_in, d_gate, d_down = _offsets(b)
    text = (f"**Answer to the case studies.** Under RMSNorm+SwiGLU ({b.spec}) a mean shift of {k:g}× the "
            f"residual rms reaches the gate "
            f"(offset {d_gate:.3f} of the gate pre-activations' std: {_reaches(d_gate)}) and the down projection "
            f"(offset {d_down:.3f} of its input's rms: {_reaches(d_down)}), and costs {loss(b):+.4f} nats.")
    if rms_gelu:
        g_in, _, g_down = _offsets(rms_gelu)
        text += (f" With GELU instead of SwiGLU under the same RMSNorm ({rms_gelu.spec}) the shift also arrives "
                 f"(offsets {g_in:.3f} and {g_down:.3f} at the FFN and down-projection inputs) and costs "
                 f"{loss(rms_gelu):+.4f} nats vs {loss(b):+.4f} with SwiGLU.")
    if recentered:
        r_in, r_gate, r_down = _offsets(recentered)
        removed = max(r_in, r_gate, r_down) <= REACH_OFFSET
        kind = "without" if not recentered.design.has_norm_bias else "with"
        text += (f" Re-centering ({recentered.spec}: LayerNorm {kind} bias, SwiGLU kept) leaves offsets "
                 f"{r_in:.2e}, {r_gate:.2e} and {r_down:.2e} and {loss(recentered):+.2e} nats: mean subtraction "
                 f"{'removes the shift' if removed else 'does not remove the shift'}.")
    if b_bias:
        bb_in, bb_gate, bb_down = _offsets(b_bias)
        text += (f" A learnable RMSNorm bias ({b_bias.spec}) leaves offsets {bb_in:.3f}, {bb_gate:.3f} and "
                 f"{bb_down:.3f} and costs {loss(b_bias):+.4f} nats: a constant beta cannot cancel a shift that "
                 "RMSNorm rescales by each token's own rms." if max(bb_gate, bb_down) > REACH_OFFSET else
                 f" A learnable RMSNorm bias ({b_bias.spec}) leaves offsets {bb_in:.3f}, {bb_gate:.3f} and "
                 f"{bb_down:.3f} ({loss(b_bias):+.4f} nats).")
    return text


# ----------------------------------------------------------------------------- plots
def load_metrics(run_dir):
    path = Path(run_dir) / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    by_kind = defaultdict(lambda: defaultdict(list))
    for r in records:
        by_kind[r["kind"]][r["design"]].append(r)
    return by_kind


def _ema(values, alpha=0.1):
    out, acc = [], None
    for v in values:
        acc = v if acc is None else (1 - alpha) * acc + alpha * v
        out.append(acc)
    return out


def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, run_dir, name, dpi):
    path = Path(run_dir) / name
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_losses(run_dir, results, metrics, unigram):
    plt = _pyplot()

    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, r in enumerate(results):
        color = f"C{i}"
        train = metrics["train"].get(r.label, [])
        ax_train.plot([t["step"] for t in train], _ema([t["loss"] for t in train]), color=color, label=r.spec)
        val = metrics["eval"].get(r.label, [])
        ax_val.plot([v["step"] + 1 for v in val], [v["val_loss"] for v in val], "o-", color=color, label=r.spec)
    for ax, title in ((ax_train, "train loss (EMA 0.1)"), (ax_val, "validation loss")):
        ax.axhline(unigram, color="gray", ls=":", label="unigram entropy")
        ax.set_xlabel("step")
        ax.set_ylabel("nats / byte")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(plt, fig, run_dir, "loss.png", dpi=110)


def plot_telemetry(run_dir, results, metrics):
    if not any(metrics["telemetry"].get(r.label) for r in results):
        return None
    plt = _pyplot()
    from matplotlib.lines import Line2D

    styles = ["-", "--", ":", "-."]
    n_layers = 1
    fig, axes = plt.subplots(2, 4, figsize=(18, 8))
    for ax, key in zip(axes.flat, TELEMETRY_PLOT_KEYS):
        for i, r in enumerate(results):
            per_layer = defaultdict(list)
            for t in metrics["telemetry"].get(r.label, []):
                value = t.get(key)
                if _isnum(value):
                    per_layer[t["layer"]].append((t["step"], 100 * value if key.endswith("_frac") else value))
            for layer, points in sorted(per_layer.items()):
                n_layers = max(n_layers, layer + 1)
                ax.plot(*zip(*points), styles[layer % len(styles)], color=f"C{i}", lw=1.2)
        ax.set_title(key.replace("_frac", " (%)"), fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=f"C{i}", lw=2, label=r.spec) for i, r in enumerate(results)]
    handles += [Line2D([], [], color="black", ls=styles[layer % len(styles)], label=f"layer {layer}")
                for layer in range(n_layers)]
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8)
    fig.suptitle("per-layer FFN telemetry on training batches (color: design, line style: layer)", y=0.94,
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    return _save(plt, fig, run_dir, "telemetry.png", dpi=100)


def plot_probe(run_dir, results):
    probed = [r for r in results if r.shift_probe]
    if not probed:
        return None
    plt = _pyplot()

    keys = (("input_offset", "FFN input (÷ rms)"), ("gate_offset", "gate pre-activation (÷ std)"),
            ("down_in_offset", "down-projection input (÷ rms)"))
    fig, axes = plt.subplots(1, len(keys), figsize=(16, 4))
    n_layers = len(probed[0].shift_probe.offsets)
    width = 0.8 / len(probed)
    for ax, (key, title) in zip(axes, keys):
        for i, r in enumerate(probed):
            values = [o[key] if _isnum(o[key]) else 0.0 for o in r.shift_probe.offsets]
            xs = [layer + i * width for layer in range(n_layers)]
            ax.bar(xs, values, width, color=f"C{i}", label=r.spec)
            for x, v, o in zip(xs, values, r.shift_probe.offsets):
                if v < REACH_OFFSET / 10:  # make "nothing arrives" visible
                    ax.text(x, 0, "0" if _isnum(o[key]) else "–", ha="center", va="bottom", fontsize=7, color=f"C{i}")
        ax.set_xticks([layer + 0.4 - width / 2 for layer in range(n_layers)])
        ax.set_xticklabels([f"layer {layer}" for layer in range(n_layers)])
        ax.axhline(REACH_OFFSET, color="gray", ls=":", lw=1)
        ax.set_title(f"offset of the {title}", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"where a mean shift of {probed[0].shift_probe.shift_rms_units:g}× the rms into every FFN norm "
                 "arrives: per-unit "
                 f"offset common to all tokens (validation, after training; dotted: {REACH_OFFSET})", fontsize=10)
    fig.tight_layout()
    return _save(plt, fig, run_dir, "shift_probe.png", dpi=100)


def plot_seeds(run_dir, results, metrics, unigram):
    """Per-seed training curves (thin), their mean (thick) and 95% t band, per group."""
    import numpy as np
    from scipy import stats as scistats

    g = studies.groups(results)
    if max(len(rs) for rs in g.values()) < 2:
        return None
    plt = _pyplot()
    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (name, rs) in enumerate(g.items()):
        color = f"C{i % 10}"
        for ax, kind, key, smooth in ((ax_train, "train", "loss", _ema), (ax_val, "eval", "val_loss", list)):
            curves = []
            for r in rs:
                recs = metrics[kind].get(r.label, [])
                steps = [t["step"] + (kind == "eval") for t in recs]
                ys = smooth([t[key] for t in recs])
                ax.plot(steps, ys, color=color, lw=0.6, alpha=0.5)
                curves.append((steps, ys))
            n = min(len(c[1]) for c in curves)
            if n == 0:
                continue
            arr = np.array([c[1][:n] for c in curves], dtype=float)
            mean = arr.mean(0)
            steps = curves[0][0][:n]
            ax.plot(steps, mean, color=color, lw=2, label=f"{name} (n={len(rs)})")
            if len(rs) > 1:
                half = scistats.t.ppf(0.975, len(rs) - 1) * arr.std(0, ddof=1) / np.sqrt(len(rs))
                ax.fill_between(steps, mean - half, mean + half, color=color, alpha=0.2)
    for ax, title in ((ax_train, "train loss (EMA 0.1): seeds, mean, 95% band"), (ax_val, "validation loss")):
        ax.axhline(unigram, color="gray", ls=":", label="unigram entropy")
        ax.set_xlabel("step")
        ax.set_ylabel("nats / byte")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(plt, fig, run_dir, "seeds.png", dpi=110)


def plot_paired(run_dir, results):
    """The paired differences vs the first design with their 95% intervals."""
    g = studies.groups(results)
    if max(len(rs) for rs in g.values()) < 2 or len(g) < 2:
        return None
    plt = _pyplot()
    metrics = ("val loss", "W8A8 tensor Δ loss", "shift probe Δ loss", "per-sequence shift probe Δ loss")
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 0.5 * len(g) + 2.5))
    for ax, metric in zip(axes, metrics):
        names, cis = [], []
        for name, rs in g.items():
            base = studies.baseline_of(rs, g)
            if base is rs:
                continue
            names.append(f"{name} − {base[0].group}")
            cis.append(studies.paired(rs, base, metric))
        ys = list(range(len(names)))
        for y, ci in zip(ys, cis):
            if not _isnum(ci.mean):
                continue
            err = [[ci.mean - ci.lo], [ci.hi - ci.mean]] if ci.known else None
            ax.errorbar([ci.mean], [y], xerr=err, fmt="o", color="C3" if ci.excludes_zero() else "C0", capsize=4)
        ax.axvline(0, color="gray", ls=":")
        ax.set_yticks(ys)
        ax.set_yticklabels(names, fontsize=8)
        ax.set_title(f"paired Δ {metric}", fontsize=9)
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle("paired differences vs the first design, mean and 95% t interval over seeds "
                 "(red: the interval excludes 0)", fontsize=10)
    fig.tight_layout()
    return _save(plt, fig, run_dir, "paired_diff.png", dpi=100)


def plot_quant(run_dir, results):
    """The quantization probes per design: Δ validation loss, mean over seeds with 95% intervals."""
    g = studies.groups(results)
    metrics = [m for m in studies.METRICS if m.endswith("Δ loss") and ("int" in m or "W8A8" in m)]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(metrics) * len(g) / 3), 4.5))
    width = 0.8 / len(g)
    for i, (name, rs) in enumerate(g.items()):
        cis = [studies.interval(rs, m) for m in metrics]
        xs = [j + i * width for j in range(len(metrics))]
        means = [ci.mean if _isnum(ci.mean) else 0.0 for ci in cis]
        err = [[ci.mean - ci.lo if ci.known else 0 for ci in cis], [ci.hi - ci.mean if ci.known else 0 for ci in cis]]
        ax.bar(xs, means, width, yerr=err, capsize=3, color=f"C{i % 10}", label=f"{name} (n={len(rs)})")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(metrics))])
    ax.set_xticklabels([m.replace(" Δ loss", "") for m in metrics], fontsize=8, rotation=15)
    ax.set_ylabel("Δ validation loss (nats/byte)")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.axhline(0, color="gray", lw=0.8)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    ax.set_title("quantization probes per design (mean over seeds, 95% t interval)", fontsize=10)
    fig.tight_layout()
    return _save(plt, fig, run_dir, "quant.png", dpi=100)


# ----------------------------------------------------------------------------- report.md
def write_report(run_dir, results, meta):
    run_dir = Path(run_dir)
    metrics = load_metrics(run_dir)
    every = results
    results = studies.representatives(every)
    plots = [plot_losses(run_dir, results, metrics, meta.unigram_entropy), plot_telemetry(run_dir, results, metrics),
             plot_probe(run_dir, results), plot_seeds(run_dir, every, metrics, meta.unigram_entropy),
             plot_paired(run_dir, every), plot_quant(run_dir, every)]
    n_seeds = len(meta.seeds or [1])
    a, run = meta.train_config(), meta.config
    lines = [
        f"# A/B report: {', '.join(meta.designs)}",
        "",
        f"- data: `{meta.data}`, {meta.train_bytes:,} train / {meta.val_bytes:,} validation bytes, byte-level "
        f"tokens; unigram entropy of the validation bytes **{meta.unigram_entropy:.4f} nats/byte**",
        f"- model: preset `{run['preset']}`, d_model {a.d_model}, {a.n_layers} layers, {a.n_heads} heads, GELU "
        f"d_ff {a.d_ff}, gated d_ff {gated_d_ff(a.d_model, a.d_ff, a.ffn_bias)} (same FFN "
        f"parameter count within 1%), seq {a.seq_len}, FFN biases {'on' if a.ffn_bias else 'off'}, "
        f"backend `{a.backend}`",
        f"- training: {a.steps} steps of {a.batch_size}x{meta.world_size} sequences, AdamW lr {a.lr:g} "
        f"(warmup {a.warmup}, cosine), seed {a.seed}" + (f" ({n_seeds} seeds: {', '.join(map(str, meta.seeds))})"
                                                        if n_seeds > 1 else "")
        + (f", learning rates {', '.join(f'{v:g}' for v in meta.lrs)}" if meta.lrs else "")
        + f", same batches for every design (per seed); device {meta.device}, "
        f"{meta.world_size} rank(s), {meta.threads} threads, torch {meta.torch}",
        f"- telemetry every {a.telemetry_every} steps; post-training probes: a mean shift of {run['probe_shift']:g}× "
        "the rms of each FFN norm's input; weight-only int8 and int4 FFN weights (symmetric, per output channel); "
        "int8 down-projection input (symmetric, per token); W8A8 (int8 weights per channel, int8 activations "
        "with static per-tensor / per-channel scales, and SmoothQuant smoothing a = 0.5, both FFN matmuls); a "
        "per-sequence mean shift (the probe's shift × m, m = exp(z − 1/2), z ~ N(0, 1) per sequence)",
        f"- wall time {meta.wall_s:.0f} s",
        "",
        "## Results",
        "",
        _table(SUMMARY_HEADER, summary_rows(results)),
        "",
        f"memory: {results[0].memory_kind}. tokens/s: wall clock, telemetry steps included. Δ loss columns: "
        "validation loss change with int8 / int4 FFN weights (per output channel) and with the down-projection "
        "input quantized to int8 (per token). max|h|/rms and kurtosis(h): the largest over layers, on the "
        "validation windows. Telemetry step overhead: "
        f"{results[0].telemetry_overhead_clock} of a step with telemetry vs the plain steps beside it.",
        "",
        ("Sections up to the telemetry tables show the first seed of each design; the seed sections below "
         "give every seed." if n_seeds > 1 else ""),
        "",
        "## Findings",
        "",
        *[p + "\n" for p in findings(results, meta) + studies.seed_findings(every)],
        "## Training health",
        "",
        studies.health_table(every),
        "",
        f"diverged: a non-finite loss, a step above {THRESHOLDS['diverge_factor']:g}× the first step's loss, or the "
        f"last 10 steps' mean above the first step's loss; spike: a step above {THRESHOLDS['spike_factor']:g}× the "
        f"median of the {THRESHOLDS['spike_window']} steps before it; did not learn: final validation loss above "
        f"the unigram entropy − {THRESHOLDS['learn_margin']:g} nats. Per-layer gradient norms and update-to-weight "
        "ratios: metrics.jsonl (kind \"optim\") and TensorBoard, every telemetry step.",
        "",
        f"## Seeds: mean and 95% interval (t, {n_seeds} seed(s))",
        "",
        studies.seeds_table(every),
        "",
        "With one seed a cell reads 'value (n=1)': no interval exists.",
        "",
        "## Paired differences vs the first design",
        "",
        studies.paired_table(every) or "Only one design (per learning rate): nothing to pair.",
        "",
        "Per seed, the design's metric minus the first design's (same seed, same batches); mean and 95% interval "
        "of scipy.stats.ttest_rel. 'not resolved': the interval contains 0, so no difference is claimed.",
        "",
        "## Outlier probes (validation windows, end of training)",
        "",
        _table(studies.OUTLIER_HEADER, studies.outlier_rows(every)),
        "",
        "kurtosis of neuron rms(h): Pearson kurtosis over down-projection input units of each unit's rms over "
        "tokens (3 for a normal spread; He et al. 2024). max/median: of |h| and of the residual stream entering the "
        "block (Sun et al. 2024). gate/up cos: cosine of each unit's gate and up rows of W_in (Fishman et al. "
        "2025). W8A8 rel. err: ||FFN_W8A8(x) − FFN(x)|| / ||FFN(x)|| on these windows, static activation scales "
        "calibrated on 4 training batches: per tensor, per input channel, and SmoothQuant (a = 0.5) + per tensor. "
        "The same statistics over training: metrics.jsonl kind \"outliers\" (scales from the batch itself).",
        "",
        "## Case-study answers",
        "",
        *studies.case_studies(every, meta),
        "## Telemetry per layer (validation windows, end of training)",
        "",
        _table(TELEMETRY_HEADER, telemetry_rows(results)),
        "",
        "FFN input: the normalized tensor entering the FFN; h: the hidden activation entering the down projection "
        "(act(x W1) or act(gate) * up); gate columns are empty for GELU FFNs.",
        "",
    ]
    if any(r.shift_probe for r in results):
        lines += [f"## Mean-shift probe: {run['probe_shift']:g}× the rms of each FFN norm's input", "",
                  _table(PROBE_HEADER, probe_rows(results)), "",
                  "offset: per-unit change common to all tokens, in units of the unshifted tensor's rms (std for "
                  "the gate); the telemetry columns read before → after.", ""]
    lines += ["## Plots", ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots if p is not None]
    lines.append("")
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description="Rebuild report.md and the plots of an A/B run.")
    parser.add_argument("run_dir")
    args = parser.parse_args(argv)
    meta, results = load_run(args.run_dir)
    print(terminal_table(results, meta))
    print(f"report: {write_report(args.run_dir, results, meta)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
