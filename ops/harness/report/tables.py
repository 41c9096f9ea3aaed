"""The report's tables of single runs: the summary (terminal and report.md), telemetry per
layer, and the mean-shift probe."""

from .. import studies
from ..health import marked, usable
from ..tables import fmt, pct
from .common import max_over_layers

SUMMARY_HEADER = ["design", "block", "params", "val loss", "Δ vs first", "tokens/s", "memory MiB",
                  "int8 w Δ loss", "int4 w Δ loss", "int8 h Δ loss", "max|h|/rms", "kurtosis(h)",
                  "telemetry step overhead %"]


def summary_rows(results):
    """One row per result; a run that diverged or did not learn is marked, and no Δ is taken
    to or from it."""
    base = results[0]
    return [[marked(r.spec, [r]), r.description, f"{r.params:,}", fmt(r.final_val_loss),
             fmt(r.final_val_loss - base.final_val_loss if usable([r, base]) else None, "+.4f"),
             fmt(r.tokens_per_s, ",.0f") + (f" (+{r.compile_s:.0f} s compile)" if r.compile_s is not None else ""),
             fmt(r.memory_bytes / 2**20, ".1f"), fmt(r.int8_delta, "+.5f"), fmt(r.int4_delta, "+.4f"),
             fmt(r.int8_h_delta, "+.4f"),
             fmt(max_over_layers(r, "h_max_over_rms"), ".1f"), fmt(max_over_layers(r, "h_kurtosis"), ".1f"),
             pct(r.telemetry_overhead, "+.1f")] for r in results]


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
            lines.append(f"shift probe {probe.shift_rms_units:g} rms, {marked(r.spec, [r])}: offsets per layer "
                         f"(FFN input / gate / down-proj input) " + "  ".join(
                             f"L{i} {fmt(o['input_offset'], '.3f')}/{fmt(o['gate_offset'], '.3f')}/"
                             f"{fmt(o['down_in_offset'], '.3f')}" for i, o in enumerate(off))
                         + f"; val loss {probe.val_loss - r.final_val_loss:+.4f}")
    flagged = [f"{r.label}: {studies.flag_text(r.health)}" for r in every if studies.flag_text(r.health) not in ("ok", "–")]
    if flagged:
        lines.append("health: " + "; ".join(flagged))
    g = studies.groups(every)
    if max(len(rs) for rs in g.values()) > 1:
        lines.append("val loss over seeds, mean [95% t interval]: " + "; ".join(
            f"{marked(name, rs)} {studies.interval(rs, 'val loss').fmt()}" for name, rs in g.items()))
    return "\n".join(lines)


TELEMETRY_HEADER = ["design", "layer", "FFN input mean", "|mean| per token", "down-proj input mean",
                    "gate preact mean", "gate preact std", "gate near 0 %", "gate large %", "max|h|/rms",
                    "kurtosis(h)", "|h|>6rms %"]


def telemetry_rows(results):
    rows = []
    for r in results:
        for layer, t in enumerate(r.telemetry_val or []):
            rows.append([marked(r.spec, [r]), layer, fmt(t["input_mean"], "+.4f"), fmt(t["input_mean_abs"]),
                         fmt(t["down_in_mean"], "+.4f"), fmt(t["gate_preact_mean"], "+.3f"),
                         fmt(t["gate_preact_std"], ".3f"), pct(t["gate_near_zero_frac"]),
                         pct(t["gate_large_frac"], ".3f"), fmt(t["h_max_over_rms"], ".1f"),
                         fmt(t["h_kurtosis"], ".1f"), pct(t["h_outlier_frac"], ".3f")])
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
            def change(key, spec, percent=False):
                if base is None or shifted is None:
                    return "–"
                f = pct if percent else fmt
                return f"{f(base[key], spec)} → {f(shifted[key], spec)}"

            rows.append([marked(r.spec, [r]), layer, fmt(probe.norm_input_rms[layer], ".3f"),
                         fmt(probe.shifts[layer], "+.3f"), fmt(off["input_offset"], ".3f"),
                         fmt(off["gate_offset"], ".3f"), fmt(off["down_in_offset"], ".3f"),
                         change("input_mean", "+.3f"), change("down_in_mean", "+.4f"),
                         change("gate_near_zero_frac", ".2f", percent=True), change("gate_large_frac", ".3f", percent=True),
                         change("h_max_over_rms", ".1f"),
                         f"{fmt(r.final_val_loss)} → {fmt(probe.val_loss)}" if layer == 0 else ""])
    return rows
