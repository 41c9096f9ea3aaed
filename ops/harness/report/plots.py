"""The report's PNG plots (matplotlib, Agg backend): losses, telemetry, the shift probe,
seeds, paired differences, quantization."""

from collections import defaultdict
from pathlib import Path

from .. import studies
from ..tables import isnum
from .common import REACH_OFFSET

TELEMETRY_PLOT_KEYS = ("input_mean", "input_mean_abs", "down_in_mean", "gate_preact_std",
                       "gate_near_zero_frac", "gate_large_frac", "h_max_over_rms", "h_kurtosis")


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
                if isnum(value):
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
            values = [o[key] if isnum(o[key]) else 0.0 for o in r.shift_probe.offsets]
            xs = [layer + i * width for layer in range(n_layers)]
            ax.bar(xs, values, width, color=f"C{i}", label=r.spec)
            for x, v, o in zip(xs, values, r.shift_probe.offsets):
                if v < REACH_OFFSET / 10:  # make "nothing arrives" visible
                    ax.text(x, 0, "0" if isnum(o[key]) else "–", ha="center", va="bottom", fontsize=7, color=f"C{i}")
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
            if not isnum(ci.mean):
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
        means = [ci.mean if isnum(ci.mean) else 0.0 for ci in cis]
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


def plot_intervals(out_dir, name, title, panels):
    """Forest plots, one panel per (panel title, [(label, stats.Interval)]) of `panels` (each on
    its own scale): mean and 95% interval, red where the interval excludes 0. None when no
    row has a value."""
    panels = [(t, [(label, ci) for label, ci in rows if isnum(ci.mean)]) for t, rows in panels]
    panels = [(t, rows) for t, rows in panels if rows]
    if not panels:
        return None
    plt = _pyplot()
    height = max(len(rows) for _, rows in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels) + 2, 0.45 * height + 1.8), squeeze=False)
    for ax, (panel, rows) in zip(axes[0], panels):
        for y, (_, ci) in enumerate(rows):
            err = [[ci.mean - ci.lo], [ci.hi - ci.mean]] if ci.known else None
            ax.errorbar([ci.mean], [y], xerr=err, fmt="o", color="C3" if ci.excludes_zero() else "C0", capsize=4)
        ax.axvline(0, color="gray", ls=":")
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([label for label, _ in rows], fontsize=8)
        ax.set_ylim(len(rows) - 0.5, -0.5)
        ax.grid(alpha=0.3, axis="x")
        ax.set_title(panel, fontsize=9)
    fig.suptitle(f"{title}: mean and 95% t interval over seeds (red: the interval excludes 0)", fontsize=10)
    fig.tight_layout()
    return _save(plt, fig, out_dir, name, dpi=100)


GATE_PLOT_KEYS = (("gate_rel_large4_frac", "|act(gate)| > 4 rms (%)"),
                  ("gate_rel_near_zero_frac", "|act(gate)| < 0.01 rms (%)"))


def plot_gate_saturation(out_dir, designs, records):
    """Per layer (columns), the relative gate saturation shares (rows: GATE_PLOT_KEYS) over
    training: one thin line per seed, the mean over seeds thick, one color per design.
    `designs`: [(name, results of its seeds)]; `records`: label -> its "outliers" records."""
    import numpy as np

    n_layers = 1 + max((t["layer"] for _, rs in designs for r in rs for t in records.get(r.label, [])), default=-1)
    if n_layers == 0:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(GATE_PLOT_KEYS), n_layers, figsize=(4 * n_layers, 3.2 * len(GATE_PLOT_KEYS)),
                             squeeze=False)
    for row, (key, title) in enumerate(GATE_PLOT_KEYS):
        for layer in range(n_layers):
            ax = axes[row][layer]
            for i, (name, rs) in enumerate(designs):
                curves = {}
                for r in rs:
                    points = [(t["step"], 100 * t[key]) for t in records.get(r.label, [])
                              if t["layer"] == layer and isnum(t.get(key))]
                    if points:
                        ax.plot(*zip(*points), color=f"C{i}", lw=0.6, alpha=0.5)
                        curves[r.seed] = dict(points)
                common = sorted(set.intersection(*(set(c) for c in curves.values()))) if curves else []
                if common:
                    mean = np.mean([[c[s] for s in common] for c in curves.values()], axis=0)
                    ax.plot(common, mean, color=f"C{i}", lw=2, label=f"{name} (n={len(curves)})")
            ax.set_title(f"layer {layer}: {title}", fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("gate saturation relative to the gate's own rms, per layer over training\n"
                 "(training batches at the telemetry steps; thin: seeds, thick: their mean)", fontsize=10)
    fig.tight_layout()
    return _save(plt, fig, out_dir, "gate_saturation.png", dpi=100)
