"""The A/B report: terminal table, report.md with tables and findings, PNG plots.

Everything here is computed from the run's files (run.json, <design>/result.json,
metrics.jsonl), so `python -m ffn.report runs/<name>` rebuilds a report.
The findings are sentences generated from the measured numbers, with the
thresholds they use stated next to them.
"""

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

# A probe shift "reaches" a tensor when it moves that tensor's mean by more than this
# (the FFN input is normalized, so its features are O(1)).
REACH_THRESHOLD = 0.01
# A gate share "moves" when it changes by more than this many percentage points.
SHARE_THRESHOLD_PP = 0.5

TELEMETRY_PLOT_KEYS = ("input_mean", "down_in_mean", "gate_preact_mean", "gate_preact_std",
                       "gate_near_zero_frac", "gate_large_frac", "h_max_over_rms", "h_kurtosis")


def _fmt(value, spec=".4f"):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, spec)


def _pct(value, spec=".2f"):
    return _fmt(None if value is None else 100 * value, spec)


def _max_over_layers(result, key):
    layers = result.get("telemetry_val") or []
    values = [layer[key] for layer in layers if layer.get(key) is not None and not math.isnan(layer[key])]
    return max(values) if values else None


def _table(header, rows):
    def cells(row):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |"

    lines = [cells(header), "|" + "|".join("---" for _ in header) + "|"] + [cells(row) for row in rows]
    return "\n".join(lines)


def summary_rows(results):
    base = results[0]["final_val_loss"]
    rows = []
    for r in results:
        rows.append([
            r["spec"], r["description"], f"{r['params']:,}", _fmt(r["final_val_loss"]),
            _fmt(r["final_val_loss"] - base, "+.4f"), _fmt(r["tokens_per_s"], ",.0f"),
            _fmt(r["memory_bytes"] / 2**20, ".1f"), _fmt(r["int8_delta"], "+.5f"),
            _fmt(_max_over_layers(r, "h_max_over_rms"), ".1f"), _fmt(_max_over_layers(r, "h_kurtosis"), ".1f"),
            _pct(r["telemetry_overhead"], "+.1f"),
        ])
    return rows


SUMMARY_HEADER = ["design", "block", "params", "val loss", "Δ vs first", "tokens/s", "memory MiB",
                  "int8 Δ loss", "max|h|/rms", "kurtosis(h)", "telemetry step overhead %"]


def terminal_table(results, meta):
    rows = [SUMMARY_HEADER] + summary_rows(results)
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(SUMMARY_HEADER))]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"unigram entropy of val: {meta['unigram_entropy']:.4f} nats/byte; "
                 f"max|h|/rms and kurtosis: the largest over layers, on validation")
    return "\n".join(lines)


def telemetry_rows(results):
    rows = []
    for r in results:
        for layer, t in enumerate(r.get("telemetry_val") or []):
            rows.append([r["spec"], layer, _fmt(t["input_mean"], "+.4f"), _fmt(t["input_mean_abs"]),
                         _fmt(t["down_in_mean"], "+.4f"), _fmt(t["gate_preact_mean"], "+.3f"),
                         _fmt(t["gate_preact_std"], ".3f"), _pct(t["gate_near_zero_frac"]),
                         _pct(t["gate_large_frac"], ".3f"), _fmt(t["h_max_over_rms"], ".1f"),
                         _fmt(t["h_kurtosis"], ".1f"), _pct(t["h_outlier_frac"], ".3f")])
    return rows


TELEMETRY_HEADER = ["design", "layer", "FFN input mean", "|mean| per token", "down-proj input mean",
                    "gate preact mean", "gate preact std", "gate near 0 %", "gate large %", "max|h|/rms",
                    "kurtosis(h)", "|h|>6rms %"]


def probe_deltas(result):
    """Per layer: (Δ input_mean, Δ down_in_mean, Δ near-zero share, Δ large share) under the probe."""
    probe = result.get("shift_probe")
    if not probe:
        return []
    out = []
    for base, shifted in zip(result["telemetry_val"], probe["telemetry"]):
        out.append({k: shifted[k] - base[k] for k in ("input_mean", "down_in_mean", "gate_near_zero_frac",
                                                       "gate_large_frac", "gate_preact_mean", "h_max_over_rms")})
    return out


def probe_rows(results):
    rows = []
    for r in results:
        probe = r.get("shift_probe")
        if not probe:
            continue
        for layer, (base, shifted) in enumerate(zip(r["telemetry_val"], probe["telemetry"])):
            rows.append([r["spec"], layer,
                         f"{_fmt(base['input_mean'], '+.4f')} → {_fmt(shifted['input_mean'], '+.4f')}",
                         f"{_fmt(base['down_in_mean'], '+.4f')} → {_fmt(shifted['down_in_mean'], '+.4f')}",
                         f"{_fmt(base['gate_preact_mean'], '+.3f')} → {_fmt(shifted['gate_preact_mean'], '+.3f')}",
                         f"{_pct(base['gate_near_zero_frac'])} → {_pct(shifted['gate_near_zero_frac'])}",
                         f"{_pct(base['gate_large_frac'], '.3f')} → {_pct(shifted['gate_large_frac'], '.3f')}",
                         f"{_fmt(base['h_max_over_rms'], '.1f')} → {_fmt(shifted['h_max_over_rms'], '.1f')}",
                         f"{_fmt(r['final_val_loss'])} → {_fmt(probe['val_loss'])}" if layer == 0 else ""])
    return rows


PROBE_HEADER = ["design", "layer", "FFN input mean", "down-proj input mean", "gate preact mean", "gate near 0 %",
                "gate large %", "max|h|/rms", "val loss"]


def _mean(values):
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.fmean(values) if values else float("nan")


def _rank(values):
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    for r, i in enumerate(order):
        ranks[i] = float(r)
    return ranks


def _spearman(a, b):
    ra, rb = _rank(a), _rank(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    num = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    den = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return num / den if den else float("nan")


def findings(results, meta):
    out = []
    unigram = meta["unigram_entropy"]
    by_loss = sorted(results, key=lambda r: r["final_val_loss"])
    below = [r for r in results if r["final_val_loss"] < unigram]
    out.append(
        f"**Quality.** After {results[0]['steps']} steps ({results[0]['tokens_seen']:,} tokens each), validation "
        f"loss ranks " + ", ".join(f"{r['spec']} {r['final_val_loss']:.4f}" for r in by_loss)
        + f" nats/byte; {len(below)} of {len(results)} designs end below the unigram entropy of the validation "
        f"text ({unigram:.4f}), the best by {unigram - by_loss[0]['final_val_loss']:.3f} nats."
    )
    probed = [r for r in results if r.get("shift_probe")]
    if probed:
        c = probed[0]["shift_probe"]["shift"]
        lines = []
        for r in probed:
            d = probe_deltas(r)
            d_in, d_down = _mean([x["input_mean"] for x in d]), _mean([x["down_in_mean"] for x in d])
            d_zero = _mean([x["gate_near_zero_frac"] for x in d])
            d_large = _mean([x["gate_large_frac"] for x in d])
            d_gate = _mean([x["gate_preact_mean"] for x in d])
            reaches_in = abs(d_in) > REACH_THRESHOLD
            reaches_down = abs(d_down) > REACH_THRESHOLD
            gated = not math.isnan(d_zero)
            text = (f"- {r['spec']} ({r['description']}): FFN input mean {d_in:+.4f}, down-projection input mean "
                    f"{d_down:+.4f}")
            if gated:
                reaches_gate = abs(100 * d_zero) > SHARE_THRESHOLD_PP or abs(100 * d_large) > SHARE_THRESHOLD_PP \
                    or abs(d_gate) > REACH_THRESHOLD
                text += (f", gate pre-activation mean {d_gate:+.4f}, gate near-zero share {100 * d_zero:+.2f} pp, "
                         f"large share {100 * d_large:+.3f} pp")
            val_delta = r["shift_probe"]["val_loss"] - r["final_val_loss"]
            text += f"; val loss {val_delta:+.4f}. "
            verdict = [f"reaches the FFN input: {'yes' if reaches_in else 'no'}",
                       f"the down projection: {'yes' if reaches_down else 'no'}"]
            if gated:
                verdict.append(f"the gate: {'yes' if reaches_gate else 'no'}")
            lines.append(text + "Shift " + ", ".join(verdict) + ".")
        out.append(
            f"**Mean shift (probe: +{c:g} added to every FFN norm's input after training, averaged over layers; "
            f"'reaches' means |Δ mean| > {REACH_THRESHOLD} or a gate share moving by > {SHARE_THRESHOLD_PP} pp).**\n"
            + "\n".join(lines)
        )
        answer = _causal_answer(probed)
        if answer:
            out.append(answer)
    with_outliers = [r for r in results if _max_over_layers(r, "h_max_over_rms") is not None]
    if with_outliers:
        worst_out = max(with_outliers, key=lambda r: _max_over_layers(r, "h_max_over_rms"))
        worst_q = max(results, key=lambda r: r["int8_delta"])
        text = (f"**int8 weight-only probe vs outliers.** int8 FFN weights change validation loss by "
                + ", ".join(f"{r['spec']} {r['int8_delta']:+.5f}" for r in results)
                + f". The largest post-activation outliers (max|h|/rms {_max_over_layers(worst_out, 'h_max_over_rms'):.1f},"
                f" kurtosis {_max_over_layers(worst_out, 'h_kurtosis'):.1f}) are in {worst_out['spec']}; the largest "
                f"int8 loss is {worst_q['spec']}'s ({'the same design' if worst_q is worst_out else 'a different design'}).")
        if len(with_outliers) >= 3:
            rho = _spearman([_max_over_layers(r, "h_max_over_rms") for r in with_outliers],
                            [r["int8_delta"] for r in with_outliers])
            text += f" Rank correlation across designs of max|h|/rms with the int8 loss: {rho:+.2f}."
        out.append(text)
    overheads = [r["telemetry_overhead"] for r in results if r.get("telemetry_overhead") is not None]
    if overheads:
        k = meta["args"]["telemetry_every"]
        med = statistics.median(overheads)
        out.append(
            f"**Telemetry cost.** A step with telemetry takes {100 * med:+.1f}% time vs one without (median over "
            f"designs; per design " + ", ".join(f"{r['spec']} {100 * r['telemetry_overhead']:+.1f}%"
                                                for r in results if r.get("telemetry_overhead") is not None)
            + f"); logged every {k} steps that is {100 * med / k:+.2f}% of training time."
        )
    shifted = [r for r in results if r["design"]["mean_shift"]]
    for r in shifted:
        twin = next((o for o in results if o is not r and {**o["design"], "mean_shift": 0} ==
                     {**r["design"], "mean_shift": 0} and not o["design"]["mean_shift"]), None)
        if twin:
            out.append(f"**Training with a mean shift.** {r['spec']} (shift {r['design']['mean_shift']:g} while training) "
                       f"reaches val loss {r['final_val_loss']:.4f} vs {twin['final_val_loss']:.4f} for {twin['spec']} "
                       f"without it ({r['final_val_loss'] - twin['final_val_loss']:+.4f}).")
    return out


def _causal_answer(probed):
    """The case studies' question in one paragraph: does the shift reach the gate and the down
    projection under RMSNorm+SwiGLU, and does putting mean subtraction back remove it?"""
    def find(norm, ffn, bias):
        return next((r for r in probed if r["design"]["norm"] == norm and r["design"]["ffn"] == ffn
                     and _has_bias(r["design"]) == bias and not r["design"]["mean_shift"]), None)

    b, recentered, b_bias = find("rmsnorm", "swiglu", False), find("layernorm", "swiglu", False), \
        find("rmsnorm", "swiglu", True)
    if not b:
        return None

    def avg(r, key):
        return _mean([x[key] for x in probe_deltas(r)])

    text = (f"**Answer to the case studies.** Under RMSNorm+SwiGLU ({b['spec']}) the shift moves the normalized FFN "
            f"input mean by {avg(b, 'input_mean'):+.4f}, the gate pre-activation mean by {avg(b, 'gate_preact_mean'):+.4f}"
            f" and the down-projection input mean by {avg(b, 'down_in_mean'):+.4f}, and costs "
            f"{b['shift_probe']['val_loss'] - b['final_val_loss']:+.4f} nats of validation loss.")
    if recentered:
        text += (f" Re-centering ({recentered['spec']}: LayerNorm without bias, SwiGLU kept) moves them by "
                 f"{avg(recentered, 'input_mean'):+.6f}, {avg(recentered, 'gate_preact_mean'):+.6f} and "
                 f"{avg(recentered, 'down_in_mean'):+.6f} (val loss "
                 f"{recentered['shift_probe']['val_loss'] - recentered['final_val_loss']:+.6f}): mean subtraction "
                 f"{'removes' if abs(avg(recentered, 'input_mean')) <= REACH_THRESHOLD else 'does not remove'} it.")
    if b_bias:
        text += (f" A learnable RMSNorm bias ({b_bias['spec']}) moves them by {avg(b_bias, 'input_mean'):+.4f}, "
                 f"{avg(b_bias, 'gate_preact_mean'):+.4f} and {avg(b_bias, 'down_in_mean'):+.4f} (val loss "
                 f"{b_bias['shift_probe']['val_loss'] - b_bias['final_val_loss']:+.4f}).")
    return text


def _has_bias(design):
    return design["norm"] == "layernorm" if design["norm_bias"] is None else design["norm_bias"]


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


def plot_losses(run_dir, results, metrics, unigram):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, r in enumerate(results):
        color = f"C{i}"
        train = metrics["train"].get(r["label"], [])
        ax_train.plot([t["step"] for t in train], _ema([t["loss"] for t in train]), color=color, label=r["spec"])
        val = metrics["eval"].get(r["label"], [])
        ax_val.plot([v["step"] + 1 for v in val], [v["val_loss"] for v in val], "o-", color=color, label=r["spec"])
    for ax, title in ((ax_train, "train loss (EMA 0.1)"), (ax_val, "validation loss")):
        ax.axhline(unigram, color="gray", ls=":", label="unigram entropy")
        ax.set_xlabel("step")
        ax.set_ylabel("nats / byte")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(run_dir) / "loss.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_telemetry(run_dir, results, metrics):
    if not any(metrics["telemetry"].get(r["label"]) for r in results):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    styles = ["-", "--", ":", "-."]
    n_layers = 1
    fig, axes = plt.subplots(2, 4, figsize=(18, 8))
    for ax, key in zip(axes.flat, TELEMETRY_PLOT_KEYS):
        for i, r in enumerate(results):
            per_layer = defaultdict(list)
            for t in metrics["telemetry"].get(r["label"], []):
                value = t.get(key)
                if value is not None and not math.isnan(value):
                    per_layer[t["layer"]].append((t["step"], value))
            for layer, points in sorted(per_layer.items()):
                n_layers = max(n_layers, layer + 1)
                ax.plot(*zip(*points), styles[layer % len(styles)], color=f"C{i}", lw=1.2)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if key.endswith("_frac"):
            ax.set_yscale("symlog", linthresh=1e-4)
    handles = [Line2D([], [], color=f"C{i}", lw=2, label=r["spec"]) for i, r in enumerate(results)]
    handles += [Line2D([], [], color="black", ls=styles[layer % len(styles)], label=f"layer {layer}")
                for layer in range(n_layers)]
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8)
    fig.suptitle("per-layer FFN telemetry on training batches (color: design, line style: layer)", y=0.94,
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    path = Path(run_dir) / "telemetry.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_probe(run_dir, results):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probed = [r for r in results if r.get("shift_probe")]
    if not probed:
        return None
    keys = (("input_mean", "Δ FFN input mean"), ("gate_preact_mean", "Δ gate pre-activation mean"),
            ("down_in_mean", "Δ down-proj input mean"), ("gate_near_zero_frac", "Δ gate near-zero share (pp)"))
    fig, axes = plt.subplots(1, len(keys), figsize=(18, 4))
    n_layers = len(probed[0]["telemetry_val"])
    width = 0.8 / len(probed)
    for ax, (key, title) in zip(axes, keys):
        for i, r in enumerate(probed):
            deltas = [d[key] * (100 if key.endswith("_frac") else 1) for d in probe_deltas(r)]
            deltas = [0.0 if math.isnan(v) else v for v in deltas]
            ax.bar([layer + i * width for layer in range(n_layers)], deltas, width, color=f"C{i}", label=r["spec"])
        ax.set_xticks([layer + 0.4 - width / 2 for layer in range(n_layers)])
        ax.set_xticklabels([f"L{layer}" for layer in range(n_layers)])
        ax.axhline(0, color="black", lw=0.8)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"effect of a +{probed[0]['shift_probe']['shift']:g} mean shift into every FFN norm "
                 "(validation, after training)", fontsize=10)
    fig.tight_layout()
    path = Path(run_dir) / "shift_probe.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- report.md
def write_report(run_dir, results, meta):
    run_dir = Path(run_dir)
    metrics = load_metrics(run_dir)
    plots = [plot_losses(run_dir, results, metrics, meta["unigram_entropy"]), plot_telemetry(run_dir, results, metrics),
             plot_probe(run_dir, results)]
    a = meta["args"]
    lines = [
        f"# A/B report: {', '.join(meta['designs'])}",
        "",
        f"- data: `{meta['data']}`, {meta['train_bytes']:,} train / {meta['val_bytes']:,} validation bytes, byte-level "
        f"tokens; unigram entropy of the validation bytes **{meta['unigram_entropy']:.4f} nats/byte**",
        f"- model: preset `{a['preset']}`, d_model {a['d_model']}, {a['n_layers']} layers, {a['n_heads']} heads, GELU "
        f"d_ff {a['d_ff']} (gated FFNs: {results[0]['d_ff'] if results[0]['design']['ffn'] != 'gelu' else _gated_width(results)}), "
        f"seq {a['seq_len']}, FFN biases {'off' if a['no_ffn_bias'] else 'on'}, backend `{a['backend']}`",
        f"- training: {a['steps']} steps of {a['batch_size']}x{meta['world_size']} sequences, AdamW lr {a['lr']:g} "
        f"(warmup {a['warmup']}, cosine), seed {a['seed']}, same batches for every design; device {meta['device']}, "
        f"{meta['world_size']} rank(s), {meta['threads']} threads, torch {meta['torch']}",
        f"- telemetry every {a['telemetry_every']} steps; post-training probes: mean shift +{a['probe_shift']:g} into every "
        f"FFN norm, int8 weight-only FFN weights (symmetric, per output channel)",
        f"- wall time {meta['wall_s']:.0f} s",
        "",
        "## Results",
        "",
        _table(SUMMARY_HEADER, summary_rows(results)),
        "",
        f"memory: {results[0]['memory_kind']}. tokens/s includes the telemetry steps. max|h|/rms and kurtosis(h): the "
        "largest over layers, on the validation windows.",
        "",
        "## Findings",
        "",
        *[p + "\n" for p in findings(results, meta)],
        "## Telemetry per layer (validation windows, end of training)",
        "",
        _table(TELEMETRY_HEADER, telemetry_rows(results)),
        "",
        "FFN input: the normalized tensor entering the FFN; h: the hidden activation entering the down projection "
        "(act(x W1) or act(gate) * up); gate columns are empty for GELU FFNs.",
        "",
    ]
    if any(r.get("shift_probe") for r in results):
        lines += [f"## Mean-shift probe: +{a['probe_shift']:g} into every FFN norm (before → after)", "",
                  _table(PROBE_HEADER, probe_rows(results)), ""]
    lines += ["## Plots", ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots if p is not None]
    lines.append("")
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def _gated_width(results):
    gated = [r for r in results if r["design"]["ffn"] != "gelu"]
    return gated[0]["d_ff"] if gated else "–"


def main(argv=None):
    parser = argparse.ArgumentParser(description="Rebuild report.md and the plots of an A/B run.")
    parser.add_argument("run_dir")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    meta = json.loads((run_dir / "run.json").read_text())
    results = [json.loads((run_dir / label / "result.json").read_text())
               for label in (d for d in _labels(meta))]
    print(terminal_table(results, meta))
    print(f"report: {write_report(run_dir, results, meta)}")
    return 0


def _labels(meta):
    from .designs import run_label

    return [run_label(spec) for spec in meta["designs"]]


if __name__ == "__main__":
    sys.exit(main())
