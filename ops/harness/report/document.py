"""report.md: the run's settings, the tables, findings, health, seeds, paired differences,
outlier probes, case-study answers and the plots, in one markdown file."""

from pathlib import Path

from .. import studies
from ..health import THRESHOLDS
from ..metrics import records_by_kind
from ..model import gated_d_ff
from ..tables import markdown_table
from .findings import findings
from .plots import plot_losses, plot_paired, plot_probe, plot_quant, plot_seeds, plot_telemetry
from .tables import PROBE_HEADER, SUMMARY_HEADER, TELEMETRY_HEADER, probe_rows, summary_rows, telemetry_rows


def write_report(run_dir, results, meta):
    run_dir = Path(run_dir)
    metrics = records_by_kind(run_dir / "metrics.jsonl")
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
        markdown_table(SUMMARY_HEADER, summary_rows(results)),
        "",
        f"memory: {results[0].memory_kind}. tokens/s: wall clock, telemetry steps included (with --compile, the seconds spent compiling are left out and shown beside it). Δ loss columns: "
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
        markdown_table(studies.OUTLIER_HEADER, studies.outlier_rows(every)),
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
        markdown_table(TELEMETRY_HEADER, telemetry_rows(results)),
        "",
        "FFN input: the normalized tensor entering the FFN; h: the hidden activation entering the down projection "
        "(act(x W1) or act(gate) * up); gate columns are empty for GELU FFNs.",
        "",
    ]
    if any(r.shift_probe for r in results):
        lines += [f"## Mean-shift probe: {run['probe_shift']:g}× the rms of each FFN norm's input", "",
                  markdown_table(PROBE_HEADER, probe_rows(results)), "",
                  "offset: per-unit change common to all tokens, in units of the unshifted tensor's rms (std for "
                  "the gate); the telemetry columns read before → after.", ""]
    lines += ["## Plots", ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots if p is not None]
    lines.append("")
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
