"""The findings of report.md: sentences generated from the measured numbers, with the
thresholds they use stated next to them."""

import math
import statistics
from collections import defaultdict
from dataclasses import replace

from ..health import marked, usable
from ..tables import fmt, isnum
from .common import LOSS_RESOLUTION, REACH_OFFSET, layer_values, max_over_layers, mean_of, offsets, reaches

QUANT_PROBES = (("int8", "int8 weights"), ("int4", "int4 weights"), ("int8_h", "int8 down-proj input"))


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


def _name(r):
    """A design's name in the text, marked when its run diverged or did not learn."""
    return marked(r.spec, [r])


def _quality(results, unigram):
    """The validation-loss ranking, of the runs that trained to a result only."""
    ranked = sorted((r for r in results if usable([r])), key=lambda r: r.final_val_loss)
    unranked = [r for r in results if not usable([r])]
    text = f"**Quality.** After {results[0].steps} steps ({results[0].tokens_seen:,} tokens each), "
    if ranked:
        below = [r for r in ranked if r.final_val_loss < unigram]
        text += ("validation loss ranks " + ", ".join(f"{r.spec} {r.final_val_loss:.4f}" for r in ranked)
                 + f" nats/byte; {len(below)} of {len(ranked)} designs end below the unigram entropy of the "
                 f"validation text ({unigram:.4f}), "
                 + (f"the best by {unigram - ranked[0].final_val_loss:.3f} nats." if below else
                    f"the best is {ranked[0].final_val_loss - unigram:.3f} nats above it."))
    else:
        text += "no design trained to a result, so none is ranked."
    if unranked:
        text += (" Not ranked, their numbers are no result: " + ", ".join(
            f"{_name(r)} (val loss {fmt(r.final_val_loss)})" for r in unranked) + ".")
    return text


def findings(results, meta):
    out = [_quality(results, meta.unigram_entropy)]
    out += _baseline_findings(results)
    probed = [r for r in results if r.shift_probe]
    if probed:
        k = probed[0].shift_probe.shift_rms_units
        rms = [v for r in probed for v in r.shift_probe.norm_input_rms if isnum(v)]
        lines = []
        for r in probed:
            d_in, d_gate, d_down = offsets(r)
            val_delta = r.shift_probe.val_loss - r.final_val_loss
            text = (f"- {_name(r)} ({r.description}): offset of the FFN input {d_in:.3f}, of the gate "
                    f"pre-activations {fmt(d_gate, '.3f')}, of the down-projection input {d_down:.3f}; val loss "
                    f"{val_delta:+.4f}. Reaches the FFN input: {reaches(d_in)}, the gate: {reaches(d_gate)}, "
                    f"the down projection: {reaches(d_down)}.")
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
    overheads = [r.telemetry_overhead for r in results if isnum(r.telemetry_overhead)]
    if overheads:
        k = meta.train_config().telemetry_every
        med = statistics.median(overheads)
        out.append(
            f"**Telemetry cost.** A step with telemetry takes {100 * med:+.1f}% more "
            f"{results[0].telemetry_overhead_clock} than the plain steps beside it (median over "
            "designs; per design " + ", ".join(f"{_name(r)} {100 * r.telemetry_overhead:+.1f}%"
                                                for r in results if isnum(r.telemetry_overhead))
            + f"); logged every {k} steps that is {100 * med / k:+.2f}% of training time."
        )
    for r in (r for r in results if r.design.mean_shift):
        twin = next((o for o in results if not o.design.mean_shift
                     and replace(o.design, mean_shift=0.0) == replace(r.design, mean_shift=0.0)), None)
        if twin:
            out.append(f"**Training with a mean shift.** {_name(r)} (shift {r.design.mean_shift:g} while "
                       f"training) reaches val loss {r.final_val_loss:.4f} vs {twin.final_val_loss:.4f} for "
                       f"{_name(twin)} without it ({r.final_val_loss - twin.final_val_loss:+.4f})"
                       + ("." if usable([r, twin]) else ": no result, not compared."))
    return out


def _group_mean(results, key, predicate):
    return mean_of([mean_of(layer_values(r.telemetry_val, key)) for r in results if predicate(r)])


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
            if not usable([a, b]):
                continue
            ma, mb = max_over_layers(a, "h_max_over_rms"), max_over_layers(b, "h_max_over_rms")
            if not (isnum(ma) and isnum(mb)) or ma <= 0:
                continue
            also = ", norm bias too" if factor == "FFN activation" and "norm bias" in diff else ""
            out.append((factor, mb / ma, f"{factor} ({a.spec} → {b.spec}{also}): {ma:.1f} → {mb:.1f} "
                        f"({max_over_layers(a, 'h_kurtosis'):.1f} → {max_over_layers(b, 'h_kurtosis'):.1f})"))
    return out


def _quantization_findings(results):
    parts = []
    with_outliers = [r for r in results if isnum(max_over_layers(r, "h_max_over_rms")) and usable([r])]
    for key, name in QUANT_PROBES:
        deltas = [getattr(r, f"{key}_delta") for r in results]
        text = f"{name}: " + ", ".join(f"{_name(r)} {getattr(r, f'{key}_delta'):+.4f}" for r in results)
        if max(abs(d) for d in deltas) < LOSS_RESOLUTION:
            text += f" (all below {LOSS_RESOLUTION:g} nats: no measurable regression)"
        elif len(with_outliers) >= 3:
            rho = _spearman([max_over_layers(r, "h_max_over_rms") for r in with_outliers],
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

    d_in, d_gate, d_down = offsets(b)
    text = (f"**Answer to the case studies.** Under RMSNorm+SwiGLU ({_name(b)}) a mean shift of {k:g}× the "
            f"residual rms reaches the gate "
            f"(offset {d_gate:.3f} of the gate pre-activations' std: {reaches(d_gate)}) and the down projection "
            f"(offset {d_down:.3f} of its input's rms: {reaches(d_down)}), and costs {loss(b):+.4f} nats.")
    if rms_gelu:
        g_in, _, g_down = offsets(rms_gelu)
        text += (f" With GELU instead of SwiGLU under the same RMSNorm ({_name(rms_gelu)}) the shift also arrives "
                 f"(offsets {g_in:.3f} and {g_down:.3f} at the FFN and down-projection inputs) and costs "
                 f"{loss(rms_gelu):+.4f} nats vs {loss(b):+.4f} with SwiGLU.")
    if recentered:
        r_in, r_gate, r_down = offsets(recentered)
        removed = max(r_in, r_gate, r_down) <= REACH_OFFSET
        kind = "without" if not recentered.design.has_norm_bias else "with"
        verdict = ("no conclusion from runs that are no result" if not usable([b, recentered]) else
                   f"mean subtraction {'removes the shift' if removed else 'does not remove the shift'}")
        text += (f" Re-centering ({_name(recentered)}: LayerNorm {kind} bias, SwiGLU kept) leaves offsets "
                 f"{r_in:.2e}, {r_gate:.2e} and {r_down:.2e} and {loss(recentered):+.2e} nats: {verdict}.")
    if b_bias:
        bb_in, bb_gate, bb_down = offsets(b_bias)
        text += (f" A learnable RMSNorm bias ({_name(b_bias)}) leaves offsets {bb_in:.3f}, {bb_gate:.3f} and "
                 f"{bb_down:.3f} and costs {loss(b_bias):+.4f} nats: a constant beta cannot cancel a shift that "
                 "RMSNorm rescales by each token's own rms." if max(bb_gate, bb_down) > REACH_OFFSET
                 and usable([b_bias]) else
                 f" A learnable RMSNorm bias ({_name(b_bias)}) leaves offsets {bb_in:.3f}, {bb_gate:.3f} and "
                 f"{bb_down:.3f} ({loss(b_bias):+.4f} nats).")
    return text
