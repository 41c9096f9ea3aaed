"""Seeds, health, outlier probes and the case-study answers of a run, for report.py.

Every number here is a mean over the seeds of a group (a design, or a design at one
learning rate in a sweep) with its 95% t interval (stats.py), and every comparison a
paired difference over the same seeds. A claim is made only when the interval excludes
0; otherwise the text says the difference is not resolved at this number of seeds.
"""

from collections import OrderedDict
from dataclasses import replace

from . import stats
from .designs import parse_design
from .health import flag_text, marked, usable
from .quant import W8A8_MODES
from .tables import isnum, markdown_table


def _layer_max(layers, key):
    vals = [layer.get(key) for layer in layers or [] if isnum(layer.get(key))]
    return max(vals) if vals else float("nan")


def _layer_mean(layers, key):
    vals = [layer.get(key) for layer in layers or [] if isnum(layer.get(key))]
    return sum(vals) / len(vals) if vals else float("nan")


def _probe_delta(r):
    return r.shift_probe.val_loss - r.final_val_loss if r.shift_probe else float("nan")


def _vprobe_delta(r):
    return r.vshift_probe["val_loss"] - r.final_val_loss if r.vshift_probe else float("nan")


def _w8a8(mode):
    return lambda r: (r.w8a8_delta or {}).get(mode, float("nan"))


# name -> (how it is read from a DesignResult, format)
METRICS = OrderedDict([
    ("val loss", (lambda r: r.final_val_loss, ".4f")),
    ("int8 weights Δ loss", (lambda r: r.int8_delta, "+.5f")),
    ("int4 weights Δ loss", (lambda r: r.int4_delta, "+.4f")),
    ("int8 down-proj input Δ loss", (lambda r: r.int8_h_delta, "+.4f")),
    *((f"W8A8 {m} Δ loss", (_w8a8(m), "+.4f")) for m in W8A8_MODES),
    ("shift probe Δ loss", (_probe_delta, "+.4f")),
    ("per-sequence shift probe Δ loss", (_vprobe_delta, "+.4f")),
    ("max|h|/rms", (lambda r: _layer_max(r.telemetry_val, "h_max_over_rms"), ".2f")),
    ("kurtosis of neuron rms(h)", (lambda r: _layer_max(r.outliers_val, "h_rms_kurtosis"), ".2f")),
    ("max/median |h|", (lambda r: _layer_max(r.outliers_val, "h_max_over_median"), ".1f")),
    ("max/median |residual|", (lambda r: _layer_max(r.outliers_val, "resid_max_over_median"), ".1f")),
    ("gate/up cos", (lambda r: _layer_mean(r.outliers_val, "gate_up_cos"), "+.3f")),
    ("gate near 0 % (shift probe)", (lambda r: 100 * _layer_mean(r.shift_probe.telemetry, "gate_near_zero_frac")
                                     if r.shift_probe and r.shift_probe.telemetry else float("nan"), ".2f")),
])
PAIRED_METRICS = ("val loss", "int8 weights Δ loss", "W8A8 tensor Δ loss", "W8A8 smooth Δ loss",
                  "shift probe Δ loss", "per-sequence shift probe Δ loss", "kurtosis of neuron rms(h)",
                  "max/median |h|")


def groups(results):
    """group -> its results in seed order, groups in run order."""
    out = OrderedDict()
    for r in results:
        out.setdefault(r.group, []).append(r)
    for rs in out.values():
        rs.sort(key=lambda r: (r.seed is None, r.seed))
    return out


def representatives(results):
    """The first seed of every group: what the single-run sections of the report show."""
    return [rs[0] for rs in groups(results).values()]


def values(rs, metric):
    get = METRICS[metric][0]
    return [get(r) for r in rs]


def interval(rs, metric):
    return stats.mean_interval(values(rs, metric))


def paired(rs, base, metric):
    """Paired difference rs - base over the seeds both have."""
    return paired_by(rs, base, METRICS[metric][0])


def paired_by(rs, base, get):
    """Paired difference of get(result), rs - base, over the seeds both have."""
    by_seed = {r.seed: r for r in base}
    pairs = [(r, by_seed[r.seed]) for r in rs if r.seed in by_seed]
    return stats.paired_interval([get(a) for a, _ in pairs], [get(b) for _, b in pairs])


def contrast(terms, get):
    """Mean and 95% t interval over seeds of sum(coef * get(result of that seed)) for the
    (coef, group results) terms, over the seeds every group has: a paired difference of
    differences, or a main effect of a 2x2."""
    by_seed = [{r.seed: r for r in rs} for _, rs in terms]
    seeds = sorted(set.intersection(*(set(b) for b in by_seed)), key=lambda s: (s is None, s))

    def value(r):
        v = get(r)
        return v if isnum(v) else float("nan")

    return stats.mean_interval([sum(coef * value(b[s]) for (coef, _), b in zip(terms, by_seed)) for s in seeds])


def baseline_of(group_rs, all_groups):
    """The first design's group at the same learning rate."""
    lr = group_rs[0].lr
    return next(rs for rs in all_groups.values() if rs[0].lr == lr)


def verdict(ci, lower="lower", higher="higher", groups=()):
    """The sign of a paired difference in words; none is claimed when a run of `groups` (the
    two groups compared) diverged or did not learn: its numbers are no result."""
    if not all(usable(rs) for rs in groups):
        return "not claimed: a run diverged or did not learn"
    if not ci.known:
        return f"no interval (n={ci.n})"
    return {1: higher, -1: lower, 0: "not resolved (interval includes 0)"}[ci.sign()]


def seeds_table(results):
    g = groups(results)
    header = ["metric"] + [f"{marked(name, rs)} (n={len(rs)})" for name, rs in g.items()]
    rows = []
    for metric, (_, spec) in METRICS.items():
        cis = [interval(rs, metric) for rs in g.values()]
        if all(ci.n == 0 for ci in cis):
            continue
        rows.append([metric] + [ci.fmt(spec) for ci in cis])
    return markdown_table(header, rows)


def paired_table(results):
    g = groups(results)
    rows = []
    for name, rs in g.items():
        base = baseline_of(rs, g)
        if base is rs:
            continue
        for metric in PAIRED_METRICS:
            ci = paired(rs, base, metric)
            if ci.n == 0:
                continue
            rows.append([f"{marked(name, rs)} − {marked(base[0].group, base)}", metric, ci.fmt(METRICS[metric][1]),
                         ci.n, verdict(ci, groups=(rs, base))])
    return markdown_table(["difference", "metric", "mean [95% interval]", "seeds", "sign"], rows) if rows else ""


def health_table(results):
    rows = []
    for r in results:
        h = r.health or {}
        rows.append([r.label, r.seed, f"{r.lr:g}" if r.lr else "–", flag_text(h),
                     f"{h.get('start_loss', float('nan')):.3f}", f"{h.get('max_loss', float('nan')):.3f}",
                     h.get("n_spikes", "–"), f"{r.final_val_loss:.4f}", h.get("steps_run", "–")])
    return markdown_table(["run", "seed", "lr", "health", "first loss", "max loss", "spikes", "val loss", "steps run"],
                          rows)


def outlier_rows(results):
    rows = []
    for r in representatives(results):
        for layer, o in enumerate(r.outliers_val or []):
            rows.append([marked(r.group, [r]), layer, f"{o['h_rms_kurtosis']:.2f}", f"{o['h_max_over_median']:.1f}",
                         f"{o['resid_max_over_median']:.1f}",
                         "–" if not isnum(o["gate_up_cos"]) else f"{o['gate_up_cos']:+.3f} / {o['gate_up_cos_max']:+.3f}",
                         *(f"{100 * o[f'w8a8_{m}_err']:.2f}" for m in W8A8_MODES)])
    return rows


OUTLIER_HEADER = ["design", "layer", "kurtosis of neuron rms(h)", "max/median |h|", "max/median |residual|",
                  "gate/up cos mean / max", *(f"W8A8 {m} rel. err %" for m in W8A8_MODES)]


def seed_findings(results):
    """Sentences that claim only what the paired intervals support."""
    g = groups(results)
    n = min(len(rs) for rs in g.values())
    out = []
    if n < 2:
        out.append(f"**Seeds.** One seed per design: the numbers above are single measurements without intervals; "
                   "differences between designs are not shown to exceed seed-to-seed noise (run with --seeds 3 or "
                   "--preset study).")
        return out
    parts = []
    for name, rs in g.items():
        base = baseline_of(rs, g)
        if base is rs:
            continue
        ci = paired(rs, base, "val loss")
        parts.append(f"{marked(name, rs)} − {marked(base[0].group, base)}: {ci.fmt('+.4f')} nats, "
                     f"{verdict(ci, groups=(rs, base))}")
    out.append(f"**Seeds.** {n}+ seeds per design, paired by seed (same initialization seed and batches). "
               "Validation loss differences vs the first design with 95% t intervals: " + "; ".join(parts) + ".")
    return out


# ----------------------------------------------------------------------------- case studies
def find_design(g, design, lr=None):
    """The results of the group that trained `design` (at learning rate lr), or None."""
    for rs in g.values():
        if rs[0].design == design and (lr is None or rs[0].lr == lr):
            return rs
    return None


def _find(g, spec, lr=None):
    return find_design(g, parse_design(spec), lr)


def interval_text(rs, metric):
    """The metric's mean over the seeds with its 95% interval, in the metric's format."""
    return interval(rs, metric).fmt(METRICS[metric][1])


def _offset(rs, key):
    """Interval over seeds of a shift-probe offset, averaged over layers."""
    return stats.mean_interval([sum(o[key] for o in r.shift_probe.offsets if isnum(o[key])) / len(r.shift_probe.offsets)
                                for r in rs])


def mean_shift_answer(g, lr):
    """Case study 1 from the post-training shift probe of B (and A, B+recenter, B+bias when run)."""
    A, B = _find(g, "A", lr), _find(g, "B", lr)
    B_rec, B_bias = _find(g, "B+recenter", lr), _find(g, "B+bias", lr)
    if not (B and B[0].shift_probe):
        return "Not measured: the run has no B design with the shift probe (--probe-shift > 0)."
    text = (f"Experiment: the post-training shift probe ({B[0].shift_probe.shift_rms_units:g}× the rms of each FFN "
            f"norm's input). Under {marked(B[0].group, B)} the shift reaches the gate pre-activations (offset "
            f"{_offset(B, 'gate_offset').fmt('.3f')} of their std) and the down-projection input (offset "
            f"{_offset(B, 'down_in_offset').fmt('.3f')} of its rms) and costs {interval_text(B, 'shift probe Δ loss')} nats.")
    if A:
        text += (f" Under {marked(A[0].group, A)} (LayerNorm: mean over features subtracted) the down-projection "
                 f"offset is {_offset(A, 'down_in_offset').fmt('.2e')} and the cost {interval_text(A, 'shift probe Δ loss')}.")
    if B_rec:
        ci = paired(B_rec, B, "shift probe Δ loss")
        text += (f" The minimal test of the causal chain, putting mean subtraction back with SwiGLU kept "
                 f"({marked(B_rec[0].group, B_rec)}), leaves a gate offset of "
                 f"{_offset(B_rec, 'gate_offset').fmt('.2e')}; its shift "
                 f"cost minus B's: {ci.fmt('+.4f')} ({verdict(ci, 'smaller', 'larger', groups=(B_rec, B))}).")
        if usable(B_rec + B):
            text += (" The mean shift is therefore the cause of the shifted gate inputs at this scale."
                     if ci.sign() == -1 else " Whether removing it changes the loss is not resolved by these seeds."
                     if ci.sign() == 0 else "")
    if B_bias:
        ci = paired(B_bias, B, "shift probe Δ loss")
        text += (f" A learnable RMSNorm bias ({marked(B_bias[0].group, B_bias)}): shift cost minus B's "
                 f"{ci.fmt('+.4f')} ({verdict(ci, groups=(B_bias, B))}).")
    return text


def shift_probe_choice(g, lr):
    """Case study 2 from the per-sequence shift probe of A and B after training: (what was
    measured, the choice it supports), or None when the run lacks them."""
    A, B = _find(g, "A", lr), _find(g, "B", lr)
    if not (A and B and A[0].vshift_probe and B[0].vshift_probe):
        return None
    ci_c = paired(B, A, "shift probe Δ loss")
    ci_v = paired(B, A, "per-sequence shift probe Δ loss")
    measured = (f"Experiment: the per-sequence shift probe (the mean shift of probe 1, its size multiplied per "
                f"sequence by m = exp(z − 1/2), z ~ N(0, 1)). Loss cost: A "
                f"{interval_text(A, 'per-sequence shift probe Δ loss')}, B {interval_text(B, 'per-sequence shift probe Δ loss')}; paired "
                f"B − A {ci_v.fmt('+.4f')} ({verdict(ci_v, groups=(B, A))}); with a constant shift B − A "
                f"{ci_c.fmt('+.4f')} ({verdict(ci_c, groups=(B, A))}).")
    if not usable(A + B):
        return measured, "No choice: a run of A or B diverged or did not learn, so its numbers are no result."
    return measured, {1: "Choice from these numbers: Design A (its loss moves less under the varying shift).",
                      -1: "Choice from these numbers: Design B (its loss moves less under the varying shift).",
                      0: "The evidence at this scale does not separate A from B on robustness to the varying "
                         "shift."}[ci_v.sign()]


def trained_shift_twins(g, lr):
    """[(results trained with vshift=C, results of the same design without it)] of the run."""
    out = []
    for rs in g.values():
        if rs[0].design.var_shift and rs[0].lr == lr:
            twin = find_design(g, replace(rs[0].design, var_shift=0.0), lr)
            if twin:
                out.append((rs, twin))
    return out


QUANT_OPTIONS = (("1 (LayerNorm, SwiGLU)", "ln+swiglu"), ("2 (RMSNorm, GELU)", "rms+gelu"),
                 ("3 (RMSNorm, SwiGLU)", "B"), ("4 (LayerNorm, GELU: no change)", "A"))


def quantization_answer(g, lr):
    """Case study 3 from the quantization probes and outlier statistics of the option designs."""
    found = [(label, _find(g, spec, lr)) for label, spec in QUANT_OPTIONS]
    rows = [[label, marked(rs[0].group, rs), interval_text(rs, "val loss"), interval_text(rs, "int8 weights Δ loss"),
             interval_text(rs, "W8A8 tensor Δ loss"),
             interval_text(rs, "max|h|/rms"), interval_text(rs, "kurtosis of neuron rms(h)")] for label, rs in found if rs]
    if not rows:
        return "Not measured: none of the four option designs is in the run."
    text = ("Experiment: the post-training quantization probes (int8 weights per channel; W8A8 with static "
            "per-tensor activation scales) and the outlier statistics on validation windows.\n\n"
            + markdown_table(["option", "design", "val loss", "int8 w Δ loss", "W8A8 tensor Δ loss", "max|h|/rms",
                              "kurtosis neuron rms(h)"], rows) + "\n\n")
    base = dict(found)[QUANT_OPTIONS[3][0]]
    verdicts = []
    for label, rs in found:
        if rs and base and rs is not base:
            ci_q = paired(rs, base, "W8A8 tensor Δ loss")
            ci_l = paired(rs, base, "val loss")
            verdicts.append(f"option {label.split()[0]} − option 4: W8A8 cost {ci_q.fmt('+.4f')} "
                            f"({verdict(ci_q, groups=(rs, base))}), val loss {ci_l.fmt('+.4f')} "
                            f"({verdict(ci_l, groups=(rs, base))})")
    text += ("; ".join(verdicts) + ". ") if verdicts else ""
    better = [v for v in verdicts if "lower), val loss" in v]
    text += ("An option that lowers the W8A8 cost with the interval excluding 0: " + "; ".join(better) + "."
             if better else "No option lowers the quantization cost with an interval excluding 0 at this scale; "
             "int8 weight-only costs are near the resolution of the validation loss.")
    missing = [spec for label, spec in QUANT_OPTIONS if not dict(found)[label]]
    if missing:
        text += f" Not run: {', '.join(missing)} (--designs A,ln+swiglu,rms+gelu,B answers all four)."
    return text


def layout_twins(g, lr):
    """[(results of a post-norm or parallel design, results of its pre-norm serial twin)] of the run."""
    out = []
    for rs in g.values():
        d = rs[0].design
        if rs[0].lr != lr or (d.placement == "pre" and d.layout == "serial"):
            continue
        twin = find_design(g, replace(d, placement="pre", layout="serial"), lr)
        if twin:
            out.append((rs, twin))
    return out


def layout_answer(g, lr):
    """Case study 4 from the post-norm and parallel designs against their pre-norm serial twins."""
    parts = []
    for rs, twin in layout_twins(g, lr):
        ci = paired(rs, twin, "val loss")
        ci_s = paired(rs, twin, "shift probe Δ loss")
        parts.append(f"{marked(rs[0].group, rs)} − {marked(twin[0].group, twin)}: val loss {ci.fmt('+.4f')} "
                     f"({verdict(ci, groups=(rs, twin))}), "
                     f"shift cost {ci_s.fmt('+.4f')} ({verdict(ci_s, groups=(rs, twin))})")
    if not parts:
        return ("Not run at this scale: --designs A,B,A+post,B+post,A+parallel,B+parallel --seeds 3 measures it. "
                "No claim is made.")
    return "Experiment: the designs with another placement or layout vs their pre-norm serial twins. " + \
        "; ".join(parts) + "."


def case_studies(results, meta):
    """One short answer per case study, from measured values with their intervals."""
    g = groups(results)
    lr = representatives(results)[0].lr
    n = min(len(rs) for rs in g.values())
    scale = (f"Scale: {meta.train_config().d_model}-wide, {meta.train_config().n_layers}-layer byte-level models, "
             f"{representatives(results)[0].steps} steps, {n} seed(s) per design.")
    out = [scale, ""]
    out.append("### 1. What RMSNorm + SwiGLU does with a mean shift (the distribution-shift analysis)\n\n"
               + mean_shift_answer(g, lr) + "\n")

    text = "### 2. Design A or B under a positive mean shift whose magnitude varies across requests\n\n"
    probe = shift_probe_choice(g, lr)
    if probe is None:
        text += "Not measured: the run needs designs A and B with the shift probe."
    else:
        measured, choice = probe
        trained = trained_shift_twins(g, lr)
        text += measured
        for rs, twin in trained:
            ci = paired(rs, twin, "val loss")
            text += (f" Trained with it ({marked(rs[0].group, rs)}, shift {rs[0].design.var_shift:g}·m while "
                     f"training and evaluating): val loss {interval_text(rs, 'val loss')}, minus {marked(twin[0].group, twin)} "
                     f"without it: {ci.fmt('+.4f')} ({verdict(ci, groups=(rs, twin))}).")
        text += " " + choice
        if not trained:
            text += " Not run: training with the shift (--designs A,B,A+vshift=1,B+vshift=1)."
    out.append(text + "\n")
    out.append("### 3. Quantization regression: which single change first (options 1–4)\n\n"
               + quantization_answer(g, lr) + "\n")
    out.append("### 4. Pre- vs post-norm, serial vs parallel\n\n" + layout_answer(g, lr) + "\n")
    return out
