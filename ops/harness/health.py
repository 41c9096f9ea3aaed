"""Training health of one design: divergence, loss spikes, "did not learn", and the
per-layer optimizer telemetry (gradient norms, update-to-weight ratios).

Flags, with their thresholds stated here and in the report:
    diverged       a non-finite training loss, or any step's loss above DIVERGE_FACTOR x the
                   first step's loss, or the last 10 steps' mean above the first step's loss
    spikes         steps whose loss exceeds SPIKE_FACTOR x the median of the SPIKE_WINDOW
                   steps before it (at least SPIKE_MIN_HISTORY of them)
    did_not_learn  final validation loss above (unigram entropy of the validation bytes -
                   LEARN_MARGIN): no better than a model of byte frequencies by that margin
"""

import math
import statistics

import torch

from .model import Block

DIVERGE_FACTOR = 2.0
SPIKE_FACTOR = 1.5
SPIKE_WINDOW = 20
SPIKE_MIN_HISTORY = 5
LEARN_MARGIN = 0.1  # nats/byte
THRESHOLDS = {"diverge_factor": DIVERGE_FACTOR, "spike_factor": SPIKE_FACTOR, "spike_window": SPIKE_WINDOW,
              "learn_margin": LEARN_MARGIN}


def spike_steps(losses, factor=SPIKE_FACTOR, window=SPIKE_WINDOW, min_history=SPIKE_MIN_HISTORY):
    out = []
    for i in range(min_history, len(losses)):
        prior = [v for v in losses[max(0, i - window):i] if math.isfinite(v)]
        if len(prior) >= min_history and math.isfinite(losses[i]) and losses[i] > factor * statistics.median(prior):
            out.append(i)
    return out


def health_flags(losses, final_val_loss, unigram):
    """The health record of a design's training losses (one per step run) and final val loss."""
    finite = all(math.isfinite(v) for v in losses)
    start = losses[0] if losses else float("nan")
    tail = losses[-10:]
    final_train = statistics.fmean(tail) if tail and finite else float("nan")
    diverged = (not finite) or max(losses) > DIVERGE_FACTOR * start or final_train > start
    spikes = spike_steps(losses)
    did_not_learn = not (math.isfinite(final_val_loss) and final_val_loss <= unigram - LEARN_MARGIN)
    return {"diverged": bool(diverged), "non_finite": not finite,
            "first_non_finite_step": next((i for i, v in enumerate(losses) if not math.isfinite(v)), None),
            "n_spikes": len(spikes), "spike_steps": spikes[:20], "did_not_learn": bool(did_not_learn),
            "start_loss": start, "max_loss": max(losses) if finite else float("nan"),
            "unigram_entropy": unigram, "thresholds": THRESHOLDS}


def flag_text(health):
    if not health:
        return "–"
    flags = []
    if health["diverged"]:
        flags.append("DIVERGED" + (f" (non-finite at step {health['first_non_finite_step']})"
                                   if health["non_finite"] else ""))
    if health["n_spikes"]:
        flags.append(f"{health['n_spikes']} spike(s)")
    if health["did_not_learn"]:
        flags.append("did not learn")
    return ", ".join(flags) or "ok"


def layer_params(model):
    """Per layer, the block's matrices (dim >= 2)."""
    return [[p for p in b.parameters() if p.dim() >= 2] for b in model.modules() if isinstance(b, Block)]


def grad_norms(model):
    """Per layer, the l2 norm of the gradients of the block's parameters (before clipping)."""
    out = []
    for b in (m for m in model.modules() if isinstance(m, Block)):
        grads = [p.grad.detach().double().square().sum() for p in b.parameters() if p.grad is not None]
        out.append(float(torch.stack(grads).sum().sqrt()) if grads else float("nan"))
    return out


def update_ratios(before, model):
    """Per layer ||W_after - W_before|| / ||W_before|| over the block's matrices."""
    out = []
    for olds, news in zip(before, layer_params(model)):
        num = sum(float((n.detach().double() - o.double()).square().sum()) for o, n in zip(olds, news))
        den = sum(float(o.double().square().sum()) for o in olds)
        out.append(math.sqrt(num / den) if den > 0 else float("nan"))
    return out


def unusable(health):
    """The flags that make a run's numbers no result ("DIVERGED", "did not learn"), or "":
    such a run is shown marked wherever its numbers appear and is never ranked or compared."""
    if not health:
        return ""
    return ", ".join(text for text, on in (("DIVERGED", health["diverged"]), ("did not learn", health["did_not_learn"]))
                     if on)


def usable(results):
    """Whether every run of `results` (one run, or the seeds of a group) trained to a result."""
    return not any(unusable(r.health) for r in results)


def marked(name, results):
    """`name` (of a run, or of a group of seeds) with the flags of its runs that are no result."""
    bad = [(r, unusable(r.health)) for r in results if unusable(r.health)]
    if not bad:
        return name
    if len(results) == 1:
        return f"{name} [{bad[0][1]}]"
    return f"{name} [" + "; ".join(f"seed {r.seed}: {text}" for r, text in bad) + "]"
