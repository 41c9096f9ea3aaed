"""The case-study report across experiments: one report.md, with its plots, from several run
directories (python -m ffn.harness.report --studies RUN_DIR [RUN_DIR ...] --out DIR).

Each answer is taken from the given run that trained the designs it needs (found by the
designs, not by the run's name), and cites that run: its name, designs, preset and budget,
seeds. Within a run, comparisons are paired by seed (same initialization seed and batches;
studies.py); across runs nothing is compared. A needed run that was not given is named by
the make target that produces it. Runs written before a measure existed (the relative gate
saturation of outliers.GATE_KEYS) say so instead of showing numbers.
"""

import statistics
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from .. import stats, studies
from ..designs import parse_design
from ..health import flag_text, marked, usable
from ..metrics import records_by_kind
from ..results import RunMeta, load_run
from ..tables import isnum, markdown_table
from .plots import plot_gate_saturation, plot_intervals, plot_quant

MAKE_TARGETS = {"2x2": "make study-2x2", "shift": "make study-shift", "layout": "make study-layout",
                "postnorm_lr": "make study-postnorm-lr", "lr256": "make study-lr256"}
# The gate measures of the saturation answer: (record kind, key, label, format); the relative
# ones from the "outliers" records (outliers.GATE_KEYS), the absolute ones from "telemetry".
GATE_MEASURES = (
    ("outliers", "gate_rel_large4_frac", "share |act| > 4 rms %", ".3f"),
    ("outliers", "gate_rel_large8_frac", "share |act| > 8 rms %", ".4f"),
    ("outliers", "gate_rel_near_zero_frac", "share |act| < 0.01 rms %", ".3f"),
    ("outliers", "gate_rel_p99", "p99 of |act| / rms", ".3f"),
    ("outliers", "gate_rel_max", "max of |act| / rms", ".2f"),
    ("outliers", "gate_preact_tail4_frac", "share |z − mean| > 4 std %", ".4f"),
    ("telemetry", "gate_large_frac", "share |act| > 6 (absolute) %", ".4f"),
    ("telemetry", "gate_near_zero_frac", "share |act| < 0.01 (absolute) %", ".3f"),
)
# The measures the answer states, and how it names them.
GATE_ANSWER_WORDS = {"gate_rel_large4_frac": "of gate activations beyond 4× their rms",
                     "gate_rel_near_zero_frac": "below 0.01× their rms"}
QUANT_METRICS = ("val loss", "int8 weights Δ loss", "int4 weights Δ loss", "W8A8 tensor Δ loss",
                 "W8A8 channel Δ loss", "W8A8 smooth Δ loss", "max|h|/rms", "kurtosis of neuron rms(h)",
                 "max/median |h|")
OUTLIER_METRICS = ("max|h|/rms", "kurtosis of neuron rms(h)", "max/median |h|")


@dataclass
class Experiment:
    """One finished run directory, read back."""

    run_dir: Path
    meta: RunMeta
    results: list  # [results.DesignResult]

    @classmethod
    def load(cls, run_dir):
        meta, results = load_run(run_dir)
        return cls(Path(run_dir), meta, results)

    @property
    def name(self):
        return self.meta.config.get("name") or self.run_dir.name

    @cached_property
    def groups(self):
        return studies.groups(self.results)

    @property
    def lr(self):
        """The learning rate of the run's first design: the one its answers read (a sweep's others
        appear in the health table)."""
        return studies.representatives(self.results)[0].lr

    def find(self, spec):
        return studies.find_design(self.groups, parse_design(spec), self.lr)

    @cached_property
    def metrics(self):
        return records_by_kind(self.run_dir / "metrics.jsonl")

    @property
    def seeds(self):
        return self.meta.seeds or sorted({r.seed for r in self.results if r.seed is not None})

    def citation(self):
        a = self.meta.train_config()
        preset = self.meta.config.get("preset", "?")
        return (f"run `{self.name}` (designs {', '.join(self.meta.designs)}; preset `{preset}`: "
                f"d_model {a.d_model}, {a.n_layers} layers, {a.steps} steps of {a.batch_size}×{a.seq_len} tokens, "
                f"lr {', '.join(f'{v:g}' for v in self.meta.lrs) if self.meta.lrs else f'{a.lr:g}'}; "
                f"{len(self.seeds)} seed(s): {', '.join(map(str, self.seeds))}; "
                f"wall {self.meta.wall_s / 60:.1f} min)")

    def scale(self):
        a = self.meta.train_config()
        return f"{a.d_model}-wide, {a.n_layers}-layer byte-level models, {a.steps} steps, {len(self.seeds)} seed(s)"


def _best(experiments, score):
    """The experiment with the highest score(e) (None: not eligible); the first given on ties."""
    scored = [(s, -i, e) for i, e in enumerate(experiments) if (s := score(e)) is not None]
    return max(scored, key=lambda t: t[:2])[2] if scored else None


def _mean_shift_score(e):
    B = e.find("B")
    return sum(bool(e.find(s)) for s in ("A", "B+recenter", "B+bias")) if B and B[0].shift_probe else None


def _shift_score(e):
    return len(studies.trained_shift_twins(e.groups, e.lr)) or None


def _quant_score(e):
    return sum(bool(e.find(spec)) for _, spec in studies.QUANT_OPTIONS) or None


def _name(rs):
    return marked(rs[0].group, rs)


def _health(rs):
    """The health flags of a group's seeds in a few words."""
    texts = [f"seed {r.seed}: {flag_text(r.health)}" for r in rs if flag_text(r.health) not in ("ok", "–")]
    return "; ".join(texts) or ("ok" if all(r.health for r in rs) else "–")


def _sign(ci, rs, base):
    return studies.verdict(ci, groups=(rs, base))


def _signed(spec):
    """The format spec with a sign: differences print theirs."""
    return "+" + spec.lstrip("+")


def _interval_of(rs, get):
    """Mean and 95% t interval over a group's seeds of get(result)."""
    return stats.mean_interval([get(r) for r in rs])


# ----------------------------------------------------------------------------- 1. mean shift
def _trained_costs(shift):
    """{spec of the unshifted design: (shifted results, unshifted results)} of the shift run."""
    return {twin[0].spec: (rs, twin) for rs, twin in studies.trained_shift_twins(shift.groups, shift.lr)}


def mean_shift_section(probe_run, shift):
    lines = ["## 1. What RMSNorm + SwiGLU does with a mean shift", ""]
    if probe_run is None:
        lines.append("Post-training shift probe: not measured, no given run has B with the shift probe; "
                     f"`{MAKE_TARGETS['shift']}` produces one.")
    else:
        lines.append(f"Backed by {probe_run.citation()}. " + studies.mean_shift_answer(probe_run.groups, probe_run.lr))
    lines.append("")
    if shift is None:
        lines.append(f"Trained-in shift: not given; `{MAKE_TARGETS['shift']}` trains A, B, B+recenter and B+bias "
                     "with and without the per-sequence shift.")
    else:
        costs = _trained_costs(shift)
        parts = []
        for spec, (rs, twin) in costs.items():
            ci = studies.paired(rs, twin, "val loss")
            parts.append(f"{_name(twin)} {ci.fmt('+.4f')} ({_sign(ci, rs, twin)})")
        source = f"the same run `{shift.name}`" if shift is probe_run else shift.citation()
        text = (f"Trained-in shift, backed by {source}: training and evaluating under the per-sequence "
                "shift (vshift, designs.py) changes the validation loss, paired by seed against the same design "
                "trained without it, by: " + "; ".join(parts) + ".")
        for other, words in (("B+recenter", "putting mean subtraction back"), ("B+bias", "a learnable RMSNorm bias")):
            if "B" in costs and other in costs:
                (bv, b), (ov, o) = costs["B"], costs[other]
                ci = studies.contrast([(1, bv), (-1, b), (-1, ov), (1, o)], studies.METRICS["val loss"][0])
                text += (f" B's cost minus {other}'s ({words}), a paired difference of differences: "
                         f"{ci.fmt('+.4f')} ({studies.verdict(ci, 'smaller', 'larger', groups=(bv, b, ov, o))}).")
        lines.append(text)
    lines += ["", "What this scale cannot decide: both experiments inject the shift; whether models of production "
              "width and depth develop one on their own, and how large it is there, is not measured.", ""]
    return lines


# ----------------------------------------------------------------------------- gate saturation
def _record_mean(exp, kind, label, key, layer=None):
    vals = [t[key] for t in exp.metrics[kind].get(label, [])
            if (layer is None or t["layer"] == layer) and isnum(t.get(key))]
    return statistics.fmean(vals) if vals else float("nan")


def _training_mean(exp, kind, key, layer=None, scale=1.0):
    """A DesignResult -> scale × the mean over its telemetry steps (and layers, unless one is given)."""
    return lambda r: scale * _record_mean(exp, kind, r.label, key, layer)


def gate_section(shift, out_dir):
    """The gate saturation answer, with its plot written into out_dir when measured."""
    lines = ["## Gate saturation under a mean shift (case study 1's observation)", ""]
    if shift is None:
        return lines + [f"Not measured: no given run trains gated designs with and without the shift; "
                        f"`{MAKE_TARGETS['shift']}` produces it.", ""]
    pairs = [(rs, twin) for rs, twin in studies.trained_shift_twins(shift.groups, shift.lr) if rs[0].design.gated]
    if not pairs:
        return lines + [f"Not measured: {shift.citation()} has no gated design trained with and without the shift; "
                        f"`{MAKE_TARGETS['shift']}` produces it.", ""]
    lines.append(f"Backed by {shift.citation()}. Per layer at every telemetry step of training, on that step's "
                 "batch, with a = |act(gate pre-activation)| and s = rms(a) of the layer: the share of a beyond 4 s "
                 "and 8 s, below 0.01 s, the 99th percentile and the max of a / s, and the share of pre-activations "
                 "z more than 4 std from their mean (outliers.py); beside them the absolute telemetry shares "
                 "(|act| > 6, |act| < 0.01). A design's value per seed: the mean over its telemetry steps and "
                 "layers; differences paired by seed against the same design trained without the shift.")
    lines.append("")
    measured = any(isnum(t.get("gate_rel_large4_frac")) for rs, twin in pairs for r in rs + twin
                   for t in shift.metrics["outliers"].get(r.label, []))
    rows, verdicts = [], []
    for rs, twin in pairs:
        cis = {}
        verdicts.append((rs, twin, cis))
        for kind, key, label, spec in GATE_MEASURES:
            if kind == "outliers" and not measured:
                continue
            get = _training_mean(shift, kind, key, scale=100 if label.endswith("%") else 1)
            ci = studies.paired_by(rs, twin, get)
            rows.append([_name(twin), label, _interval_of(twin, get).fmt(spec), _interval_of(rs, get).fmt(spec),
                         ci.fmt(_signed(spec)), ci.n, _sign(ci, rs, twin)])
            if key in GATE_ANSWER_WORDS:
                cis[key] = ci
    if not measured:
        why = ("has no gate_rel_* fields (written before they existed)" if (shift.run_dir / "metrics.jsonl").exists()
               else "is missing")
        lines.append(f"The relative measures were not measured in run `{shift.name}`: its metrics.jsonl {why}; a "
                     f"rerun of `{MAKE_TARGETS['shift']}` measures them. The absolute shares it has:")
        lines.append("")
    lines += [markdown_table(["design", "measure", "without shift", "trained with shift", "paired difference",
                              "seeds", "sign"], rows), ""]
    plot = None
    if measured:
        B = next(((rs, twin) for rs, twin in pairs if twin[0].spec == "B"), pairs[0])
        lines += _gate_layer_table(shift, *B) + [""]
        plot = plot_gate_saturation(out_dir, [(B[1][0].group, B[1]), (B[0][0].group, B[0])],
                                    shift.metrics["outliers"])
        answers = []
        for rs, twin, cis in verdicts:
            if not usable(rs + twin):
                answers.append(f"{_name(twin)}: no claim, a run diverged or did not learn")
                continue
            parts = []
            for key, ci in cis.items():
                what = GATE_ANSWER_WORDS[key]
                parts.append(f"{'raises' if ci.sign() > 0 else 'lowers'} the share {what}: {ci.fmt('+.3f')} "
                             "percentage points" if ci.sign() else
                             f"leaves the share {what} unresolved: not at this scale (interval {ci.fmt('+.3f')} "
                             "includes 0)")
            answers.append(f"under {twin[0].group} the trained-in shift " + ", and ".join(parts))
        lines.append("Answer: " + "; ".join(answers) + ".")
        lines.append("")
    lines += ["What this scale cannot decide: the absolute threshold of the telemetry op (|act| > 6) is the same "
              "number at every gate scale, so its share says little at this width; whether the relative shares "
              "grow with width, depth and training length is not measured here.", ""]
    if plot is not None:
        lines += [f"![{plot.stem}]({plot.name})", ""]
    return lines


def _gate_layer_table(shift, rs, twin):
    rows = []
    layers = sorted({t["layer"] for r in rs + twin for t in shift.metrics["outliers"].get(r.label, [])})
    for layer in layers:
        get = _training_mean(shift, "outliers", "gate_rel_large4_frac", layer, scale=100)
        ci = studies.paired_by(rs, twin, get)
        rows.append([layer, _interval_of(twin, get).fmt(".3f"), _interval_of(rs, get).fmt(".3f"),
                     ci.fmt("+.3f"), _sign(ci, rs, twin)])
    return [f"Per layer, the share |act| > 4 rms (%) over training: {_name(twin)} against {_name(rs)}.", "",
            markdown_table(["layer", _name(twin), _name(rs), "paired difference", "sign"], rows)]


# ----------------------------------------------------------------------------- 2. platform question
def platform_section(shift, probe_run, out_dir):
    lines = ["## 2. A persistent positive mean shift whose size varies across requests: Design A or B?", ""]
    plot = None
    if shift is None:
        lines.append(f"Trained-in shift: not given; `{MAKE_TARGETS['shift']}` trains A, B, B+recenter and B+bias "
                     "with and without it.")
    else:
        costs = _trained_costs(shift)
        sizes = ", ".join(sorted({f"{rs[0].design.var_shift:g}" for rs, _ in costs.values()}))
        lines.append(f"Backed by {shift.citation()}: each design trained and evaluated with the per-sequence shift "
                     f"vshift=C, C = {sizes} (C·m added to every FFN norm's input, m = exp(z − 1/2), z ~ N(0, 1) per "
                     "sequence) against the same design trained without it, paired by seed.")
        lines.append("")
        rows, cis = [], []
        for spec, (rs, twin) in costs.items():
            ci = studies.paired(rs, twin, "val loss")
            cis.append((f"{rs[0].group} − {twin[0].group}", ci))
            rows.append([twin[0].group, studies.interval_text(twin, "val loss"), rs[0].group, studies.interval_text(rs, "val loss"), ci.fmt("+.4f"),
                         _sign(ci, rs, twin), f"{_health(twin)} / {_health(rs)}"])
        lines += [markdown_table(["design", "val loss", "trained with the shift", "val loss", "cost (paired)", "sign",
                                  "health (without / with)"], rows), ""]
        lines.append(_best_under_shift(costs))
        if "A" in costs and "B" in costs:
            lines += ["", _a_or_b(*costs["A"], *costs["B"])]
        else:
            lines += ["", f"A or B: run `{shift.name}` lacks A or B with its shifted twin; `{MAKE_TARGETS['shift']}` "
                      "trains both."]
        probe = [(rs, twin) for rs, twin in costs.values() if rs[0].vshift_probe and twin[0].vshift_probe]
        if probe:
            parts = []
            for rs, twin in probe:
                ci = studies.paired(rs, twin, "per-sequence shift probe Δ loss")
                parts.append(f"{_name(rs)} {studies.interval_text(rs, 'per-sequence shift probe Δ loss')} vs {_name(twin)} "
                             f"{studies.interval_text(twin, 'per-sequence shift probe Δ loss')}: {ci.fmt('+.4f')} "
                             f"({_sign(ci, rs, twin)})")
            lines += ["", "A further per-sequence shift after training (the probe, 1× each FFN norm input's rms × m) "
                      "on the shift-trained models against the unshifted ones: " + "; ".join(parts) + "."]
        plot = plot_intervals(out_dir, "shift_costs.png", "the per-sequence shift trained in",
                              [("Δ val loss: with the shift − without", cis)])
    source = probe_run if probe_run and studies.shift_probe_choice(probe_run.groups, probe_run.lr) else None
    if source is not None:
        measured, choice = studies.shift_probe_choice(source.groups, source.lr)
        cited = f"the same run `{source.name}`" if source is shift else source.citation()
        lines += ["", f"Post-training probe on the unshifted models, backed by {cited}: {measured} {choice}"]
    lines += ["", "What this scale cannot decide: one shift distribution per size C was trained; a "
              "shift that appears later in training or grows with the model, and models wider and trained longer "
              "than these, may absorb it differently. Differences smaller than the intervals above are not resolved.",
              ""]
    if plot is not None:
        lines += [f"![{plot.stem}]({plot.name})", ""]
    return lines


def _a_or_b(av, a, bv, b):
    """The trained-in answer: B and A under the shift (quality), and B's cost of the shift minus A's."""
    ci_q = studies.paired(bv, av, "val loss")
    ci_c = studies.contrast([(1, bv), (-1, b), (-1, av), (1, a)], studies.METRICS["val loss"][0])
    text = (f"Under the shift, {_name(bv)} − {_name(av)}: {ci_q.fmt('+.4f')} ({_sign(ci_q, bv, av)}); B's cost of "
            f"the shift minus A's: {ci_c.fmt('+.4f')} "
            f"({studies.verdict(ci_c, 'smaller', 'larger', groups=(bv, b, av, a))}). ")
    if not usable(av + a + bv + b):
        return text + "Answer: none from the trained-in experiment, a run diverged or did not learn."
    quality = {1: "Design A reaches the lower loss under the shift", -1: "Design B reaches the lower loss under the "
               "shift", 0: "neither design reaches a lower loss under the shift at this number of seeds"}[ci_q.sign()]
    robust = {1: "A loses less to it", -1: "B loses less to it",
              0: "their costs of the shift are not separated"}[ci_c.sign()]
    return text + f"Answer from the trained-in experiment: {quality}, and {robust}."


def _best_under_shift(costs):
    shifted = [rs for rs, _ in costs.values() if usable(rs)]
    if not shifted:
        return "Best under the shift: none, every shifted design diverged or did not learn."
    best = min(shifted, key=lambda rs: studies.interval(rs, "val loss").mean)
    others = []
    for rs in shifted:
        if rs is not best:
            ci = studies.paired(rs, best, "val loss")
            others.append((rs, ci))
    text = f"Best under the shift (lowest mean val loss): {_name(best)} {studies.interval_text(best, 'val loss')}"
    if not others:
        return text + "."
    text += "; the others minus it: " + "; ".join(f"{_name(rs)} {ci.fmt('+.4f')} ({_sign(ci, rs, best)})"
                                                  for rs, ci in others)
    tied = [rs for rs, ci in others if ci.sign() != 1]
    return text + (". Every other design is worse with intervals excluding 0." if not tied else
                   f". Not separated from {', '.join(_name(rs) for rs in tied)} at this number of seeds.")


# ----------------------------------------------------------------------------- 3. quantization
def _factor_terms(opts):
    """2x2 contrasts over (A, B, rms+gelu, ln+swiglu): (name, terms) of the main effects and the
    interaction, each per seed."""
    A, B, rg, ls = opts["A"], opts["B"], opts["rms+gelu"], opts["ln+swiglu"]
    return (("norm: RMSNorm − LayerNorm", [(0.5, B), (-0.5, ls), (0.5, rg), (-0.5, A)]),
            ("FFN: SwiGLU − GELU", [(0.5, B), (-0.5, rg), (0.5, ls), (-0.5, A)]),
            ("interaction", [(1, B), (-1, rg), (-1, ls), (1, A)]))


def quantization_section(exp, out_dir):
    lines = ["## 3. Quantization regression: which single change first (options 1–4)", ""]
    if exp is None:
        return lines + [f"Not measured: no given run has any of A, B, rms+gelu, ln+swiglu; `{MAKE_TARGETS['2x2']}` "
                        "trains all four.", ""]
    opts = {spec: exp.find(spec) for _, spec in studies.QUANT_OPTIONS}
    lines.append(f"Backed by {exp.citation()}: the post-training probes (int8 / int4 weight-only per output channel; "
                 "W8A8 with static per-tensor or per-channel activation scales, or SmoothQuant) and the outlier "
                 "statistics on validation windows, paired by seed against option 4.")
    lines.append("")
    rows = [[label, opts[spec][0].group, *(studies.interval_text(opts[spec], m) for m in QUANT_METRICS), _health(opts[spec])]
            for label, spec in studies.QUANT_OPTIONS if opts[spec]]
    lines += [markdown_table(["option", "design", *QUANT_METRICS, "health"], rows), ""]
    base = opts["A"]
    plots = []
    if base:
        rows = []
        for label, spec in studies.QUANT_OPTIONS[:3]:
            rs = opts[spec]
            if rs:
                for metric in QUANT_METRICS:
                    ci = studies.paired(rs, base, metric)
                    rows.append([f"option {label.split()[0]} ({_name(rs)}) − option 4", metric,
                                 ci.fmt(_signed(studies.METRICS[metric][1])), ci.n, _sign(ci, rs, base)])
        if rows:
            lines += [markdown_table(["difference", "metric", "mean [95% interval]", "seeds", "sign"], rows), ""]
    missing = [spec for spec, rs in opts.items() if not rs]
    if missing:
        lines.append(f"Not in run `{exp.name}`: {', '.join(missing)}. The factor analysis needs all four options; "
                     f"`{MAKE_TARGETS['2x2']}` trains them.")
    else:
        lines += _factor_analysis(opts) + [_quant_choice(opts)]
        plots.append(plot_intervals(out_dir, "quant_factors.png", "2x2 effects", [
            (metric, [(name, studies.contrast(terms, studies.METRICS[metric][0]))
                      for name, terms in _factor_terms(opts)])
            for metric in (*OUTLIER_METRICS, "W8A8 tensor Δ loss")]))
    present = [r for rs in opts.values() if rs for r in rs]
    plots.append(plot_quant(out_dir, present))
    lines += ["", "What this scale cannot decide: int8 weight-only costs sit near the resolution of the validation "
              "loss at this size, and outlier features are reported to grow with width and training length "
              "(Sun et al. 2024), so the ordering of the options at production scale is not measured here.", ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots if p is not None] + [""]
    return lines


def _factor_analysis(opts):
    groups = list(opts.values())
    rows, drivers = [], {"norm": [], "FFN": []}
    for metric in (*OUTLIER_METRICS, "W8A8 tensor Δ loss", "val loss"):
        spec = studies.METRICS[metric][1]
        cells = []
        for name, terms in _factor_terms(opts):
            ci = studies.contrast(terms, studies.METRICS[metric][0])
            cells.append(f"{ci.fmt(_signed(spec))} ({studies.verdict(ci, groups=groups)})")
            factor = name.split(":")[0]
            if metric in OUTLIER_METRICS and factor in drivers and ci.sign() and usable(sum(groups, [])):
                drivers[factor].append(f"{metric} {ci.fmt(_signed(spec))}")
        rows.append([metric, *cells])
    lines = ["Which factor drives the outliers: the 2x2's main effects (each the mean of the two paired differences "
             "that change one factor with the other fixed) and their interaction, per seed.", "",
             markdown_table(["metric", *(name for name, _ in _factor_terms(opts))], rows), ""]
    named = {"norm": "the norm (RMSNorm)", "FFN": "the FFN activation (SwiGLU)"}
    resolved = [f for f, found in drivers.items() if found]
    if not resolved:
        lines.append("Driver of the outliers: neither factor's effect on the outlier statistics is resolved at this "
                     "number of seeds (every interval includes 0).")
    else:
        lines.append("Driver of the outliers, where an effect's interval excludes 0: "
                     + "; ".join(f"{named[f]}, {', '.join(drivers[f])}" for f in resolved) + ".")
    return lines + [""]


def _quant_choice(opts):
    base = opts["A"]
    fewer = []
    for label, spec in studies.QUANT_OPTIONS[:3]:
        rs = opts[spec]
        lower = [m for m in OUTLIER_METRICS if studies.paired(rs, base, m).sign() == -1]
        loss = studies.paired(rs, base, "val loss")
        if lower and loss.sign() != 1 and usable(rs + base):
            fewer.append(f"option {label.split()[0]} ({_name(rs)}: lower {', '.join(lower)}; val loss "
                         f"{loss.fmt('+.4f')})")
    if fewer:
        return "Options that lower post-activation outliers against option 4 without a resolved loss cost: " + \
            "; ".join(fewer) + "."
    return ("None of options 1–3 lowers a post-activation outlier statistic below option 4's with an interval "
            "excluding 0 while keeping the loss: these numbers support keeping LayerNorm + GELU (option 4) when "
            "outliers are what must not grow.")


# ----------------------------------------------------------------------------- 4. layout
def _run_lrs(e):
    """The learning rates a run trained at: its sweep's, or its one."""
    return list(e.meta.lrs) if e.meta.lrs else [e.lr]


def layout_section(experiments, out_dir):
    """Every given run (and every learning rate of a sweep) with post-norm or parallel designs
    and their pre-norm serial twins, one table each."""
    lines = ["## 4. Pre- vs post-norm, serial vs parallel", ""]
    runs = [(e, lr) for e in experiments for lr in _run_lrs(e) if studies.layout_twins(e.groups, lr)]
    if not runs:
        return lines + [f"Not measured: no given run has post-norm or parallel designs with their pre-norm serial "
                        f"twins; `{MAKE_TARGETS['layout']}` produces it.", ""]
    panels, unstable, layers = [], [], set()
    for e, lr in runs:
        lines.append(f"Backed by {e.citation()}, at lr {lr:g}: each post-norm or parallel design against its pre-norm "
                     "serial twin, paired by seed.")
        lines.append("")
        rows, cis = [], []
        for rs, twin in studies.layout_twins(e.groups, lr):
            ci = studies.paired(rs, twin, "val loss")
            ci_s = studies.paired(rs, twin, "shift probe Δ loss")
            cis.append((f"{rs[0].group} − {twin[0].group}", ci))
            spikes = sum((r.health or {}).get("n_spikes", 0) for r in rs)
            rows.append([rs[0].group, twin[0].group, studies.interval_text(rs, "val loss"), ci.fmt("+.4f"), _sign(ci, rs, twin),
                         studies.interval_text(rs, "shift probe Δ loss"), ci_s.fmt("+.4f"), _sign(ci_s, rs, twin), _health(rs), spikes])
            if not usable(rs):
                unstable.append(f"{_name(rs)} at lr {lr:g}")
        lines += [markdown_table(["design", "twin", "val loss", "Δ val loss (paired)", "sign", "shift probe Δ loss",
                                  "Δ shift cost (paired)", "sign", "health", "loss spikes (all seeds)"], rows), ""]
        panels.append((f"Δ val loss vs the pre-norm serial twin, `{e.name}` lr {lr:g}", cis))
        layers.add(e.meta.train_config().n_layers)
    lines.append("Stability: " + (f"runs that are no result: {', '.join(unstable)}." if unstable else
                                  "every post-norm and parallel run trained to a result (none diverged, none failed "
                                  "to learn)."))
    plot = plot_intervals(out_dir, "layout.png", "placement and layout", panels)
    lrs = sorted({lr for _, lr in runs})
    lines += ["", f"What this scale cannot decide: post-norm's instability is reported to grow with depth and "
              f"learning rate (Xiong et al. 2020); with {', '.join(map(str, sorted(layers)))} layers and "
              f"learning rate{'s' if len(lrs) > 1 else ''} {', '.join(f'{v:g}' for v in lrs)} these runs do not "
              "test deeper models, and the learning rate at which each layout trains best is not searched.", ""]
    if plot is not None:
        lines += [f"![{plot.stem}]({plot.name})", ""]
    return lines


# ----------------------------------------------------------------------------- health
def health_section(experiments):
    rows = []
    for e in experiments:
        for name, rs in e.groups.items():
            rows.append([f"`{e.name}`", name, len(rs), _health(rs),
                         sum((r.health or {}).get("n_spikes", 0) for r in rs), studies.interval_text(rs, "val loss")])
    lines = ["## Training health of the experiments", "",
             markdown_table(["run", "design", "seeds", "health", "loss spikes", "val loss"], rows), ""]
    swept = [e for e in experiments if e.meta.lrs]
    if swept:
        parts = []
        for e in swept:
            for lr in e.meta.lrs:
                A, B = (studies.find_design(e.groups, parse_design(spec), lr) for spec in ("A", "B"))
                found = [(spec, rs) for spec, rs in (("A", A), ("B", B)) if rs]
                text = f"`{e.name}` (d_model {e.meta.train_config().d_model}) at lr {lr:g}: " + ", ".join(
                    f"{spec} {studies.interval_text(rs, 'val loss')} ({_health(rs)})" for spec, rs in found)
                if A and B:
                    ci = studies.paired(B, A, "val loss")
                    text += f"; B − A {ci.fmt('+.4f')} ({_sign(ci, B, A)})"
                parts.append(text)
        lines.append("Learning-rate sensitivity (the sweeps' groups are named @lr=... above; the earlier observation: "
                     "at d_model 256 and lr 3e-3, B ended at 3.29 / 3.14 over two seeds while A trained): "
                     + "; ".join(parts) + ".")
    else:
        widths = sorted({e.meta.train_config().d_model for e in experiments})
        lrs = sorted({e.meta.train_config().lr for e in experiments})
        lines.append("Learning-rate sensitivity: no given run sweeps the learning rate (each trains at "
                     f"{', '.join(f'{v:g}' for v in lrs)}, d_model {', '.join(map(str, widths))}). The sensitivity "
                     "of B seen at d_model 256 (lr 3e-3 left B at 3.29 / 3.14 over two seeds while A trained) is "
                     f"not tested by these runs; `{MAKE_TARGETS['lr256']}` tests it.")
    return lines + [""]


# ----------------------------------------------------------------------------- the document
def write_studies_report(run_dirs, out_dir):
    """Writes out_dir/report.md and its plots from the given run directories; returns its path."""
    if not run_dirs:
        raise ValueError("write_studies_report: run_dirs must name at least one run directory")
    experiments = [Experiment.load(d) for d in run_dirs]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    probe_run = _best(experiments, _mean_shift_score)
    shift = _best(experiments, _shift_score)
    quant = _best(experiments, _quant_score)
    lines = [
        "# Case studies: the answers across experiments",
        "",
        "Experiments read:",
        "",
        *[f"- {e.citation()}" + (f"; rerun: `make {e.name}`" if f"make {e.name}" in MAKE_TARGETS.values() else "")
          for e in experiments],
        "",
        "Every number is a mean over seeds with its 95% t interval; a comparison is a paired difference over the "
        "seeds of one run (same initialization seed and batches per seed), claimed only when its interval excludes "
        "0 ('not resolved' otherwise). A design whose run diverged or did not learn is marked [DIVERGED] / "
        "[did not learn] and never compared. Scale: " + "; ".join(f"`{e.name}`: {e.scale()}" for e in experiments)
        + ".",
        "",
        *mean_shift_section(probe_run, shift),
        *gate_section(shift, out_dir),
        *platform_section(shift, probe_run, out_dir),
        *quantization_section(quant, out_dir),
        *layout_section(experiments, out_dir),
        *health_section(experiments),
    ]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
