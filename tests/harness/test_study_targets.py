"""The case-study experiments' make targets (Makefile: study-*) and the `short` preset they
train at are pinned: their sizes and budgets are what the committed reports
(bench/results/studies/) and the README's wall times were measured with."""

import re
import shlex
from pathlib import Path

import pytest

from ffn.harness import cli
from ffn.harness.config import PRESETS

MAKEFILE = Path(__file__).resolve().parents[2] / "Makefile"

# target -> (runs = designs x seeds x learning rates, d_model, steps, tokens per run)
TARGETS = {
    "study-2x2": (12, 96, 250, 250 * 32 * 128),
    "study-shift": (24, 96, 250, 250 * 32 * 128),
    "study-layout": (18, 96, 250, 250 * 32 * 128),
    "study-postnorm-lr": (12, 96, 250, 250 * 32 * 128),
    "study-lr256": (12, 256, 120, 120 * 16 * 128),
}


def target_args(target):
    """The arguments the target passes to scripts/ab.py (make's line continuations joined)."""
    text = MAKEFILE.read_text().replace("\\\n", " ")
    match = re.search(rf"^{re.escape(target)}:.*\n\t\$\(PY\) scripts/ab\.py (.*?) \$\(AB_ARGS\)$", text, re.M)
    assert match, f"Makefile has no {target} target running scripts/ab.py"
    return shlex.split(match.group(1))


def test_short_preset_is_the_study_model_at_half_its_budget():
    short, study = PRESETS["short"], PRESETS["study"]
    assert {k: v for k, v in short.items() if k not in ("steps", "warmup", "eval_every", "telemetry_every",
                                                       "ckpt_every")} == \
        {k: v for k, v in study.items() if k not in ("steps", "warmup", "eval_every", "telemetry_every",
                                                     "ckpt_every")}
    assert (short["steps"], short["warmup"], short["telemetry_every"]) == (250, 15, 25)
    assert study["steps"] == 2 * short["steps"]


@pytest.mark.parametrize("target", TARGETS)
def test_study_target_sizes_and_budget(target):
    runs, d_model, steps, tokens = TARGETS[target]
    run = cli.parse_config(target_args(target))
    t = run.train
    assert len(run.designs) * run.seeds * len(run.lrs or [t.lr]) == runs
    assert (t.d_model, t.steps, t.steps * t.batch_size * t.seq_len) == (d_model, steps, tokens)
    assert run.seeds == 3 and run.name == target


def test_the_shift_experiment_trains_each_design_with_and_without_the_shift():
    specs = [spec for spec, _ in cli.parse_config(target_args("study-shift")).designs]
    plain = [s for s in specs if "vshift" not in s]
    assert sorted(specs) == sorted(plain + [f"{s}+vshift=1" for s in plain])
    assert set(plain) == {"A", "B", "B+recenter", "B+bias"}
