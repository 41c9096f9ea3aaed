"""The case-study report across experiments (python -m ffn.harness.report --studies): every
answer from the run that holds its designs, with its citation and intervals; the make target
of a run that was not given; runs written before the relative gate measures; the 2x2
contrasts by hand."""

import json
import math
import re
import shutil
from dataclasses import replace
from types import SimpleNamespace

import pytest

from ffn.harness import report, studies
from ffn.harness.outliers import GATE_KEYS
from ffn.harness.report import combined
from ffn.harness.results import load_run

from .tiny import run_args

RUNS = {"x2": "A,B,rms+gelu,ln+swiglu", "shift": "A,B,B+recenter,A+vshift=1,B+vshift=1,B+recenter+vshift=1",
        "layout": "A,A+post,A+parallel"}
PNG = b"\x89PNG\r\n\x1a\n"


def healthy(run_dir):
    """Marks every result of a run as trained to a result: a few tiny steps learn nothing, and
    the answers are written only from runs that did."""
    _, results = load_run(run_dir)
    for r in results:
        replace(r, health={**r.health, "diverged": False, "did_not_learn": False}).save(run_dir / r.label)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("studies")
    from ffn.harness import cli

    for name, designs in RUNS.items():
        assert cli.main(run_args(tmp, name, "--designs", designs, "--seeds", "2", "--no-report")) == 0
        healthy(tmp / "runs" / name)
    return tmp / "runs"


def section(text, title):
    """The text of the report section whose heading starts with `title`."""
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


def test_every_answer_comes_from_the_run_that_holds_its_designs(runs, tmp_path):
    out = tmp_path / "studies"
    assert report.main(["--studies", *(str(runs / n) for n in RUNS), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "Not run" not in text and "Not measured" not in text and "not measured in run" not in text
    # No answer points to a missing run; only the learning-rate note names the sweep these runs lack.
    assert re.findall(r"make study-[\w-]+", text) == ["make study-lr256"]
    assert "did not learn;" not in text and "[seed " not in text
    for title, run in (("1. ", "shift"), ("Gate saturation", "shift"), ("2. ", "shift"), ("3. ", "x2"),
                       ("4. ", "layout")):
        body = section(text, title)
        assert f"Backed by run `{run}` (designs {RUNS[run].replace(',', ', ')}; preset `tiny`" in body, title
        assert "2 seed(s): 1234, 1235" in body or f"the same run `{run}`" in body, title
    assert "Under the shift, B+vshift=1 − A+vshift=1:" in section(text, "2. ")
    assert "Answer from the trained-in experiment:" in section(text, "2. ")
    assert "Best under the shift (lowest mean val loss):" in section(text, "2. ")
    quant = section(text, "3. ")
    assert "| norm: RMSNorm − LayerNorm | FFN: SwiGLU − GELU | interaction |" in quant
    assert "Driver of the outliers" in quant and "option 3 (B) − option 4" in quant
    gate = section(text, "Gate saturation")
    assert "| B | share \\|act\\| > 4 rms % |" in gate and "Answer: under B the trained-in shift" in gate
    assert "| A+post | A |" in section(text, "4. ") and "| A+parallel | A |" in section(text, "4. ")
    assert "Learning-rate sensitivity: no given run sweeps the learning rate" in text
    for png in ("gate_saturation.png", "shift_costs.png", "quant.png", "quant_factors.png", "layout.png"):
        assert (out / png).read_bytes()[:8] == PNG and f"]({png})" in text, png


def test_a_run_not_given_is_named_by_its_make_target(runs, tmp_path):
    text = combined.write_studies_report([runs / "layout"], tmp_path).read_text()
    assert "`make study-shift`" in section(text, "2. ") and "`make study-shift`" in section(text, "Gate saturation")
    assert "`make study-2x2`" in section(text, "3. ")
    assert "make study-" not in section(text, "4. ") and "Backed by run `layout`" in section(text, "4. ")
    # The layout run has A and its probe but no B: the mean-shift probe answer names its run too.
    assert "`make study-shift`" in section(text, "1. ")


def test_a_run_without_the_relative_gate_measures_says_so(runs, tmp_path):
    old = tmp_path / "old-shift"
    shutil.copytree(runs / "shift", old)
    lines = (old / "metrics.jsonl").read_text().splitlines()
    stripped = [{k: v for k, v in json.loads(line).items() if k not in GATE_KEYS} for line in lines]
    (old / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stripped))
    gate = section(combined.write_studies_report([old], tmp_path / "out").read_text(), "Gate saturation")
    assert "The relative measures were not measured in run `shift`: its metrics.jsonl has no gate_rel_* fields" in gate
    assert "share |act| > 6 (absolute) %" in gate.replace("\\|", "|") and "rms %" not in gate
    assert not (tmp_path / "out" / "gate_saturation.png").exists()


def test_a_trained_in_rise_of_the_large_gate_share_is_reported(runs, tmp_path):
    """B+vshift=1's share |act| > 4 rms raised by 0.1 + 0.01 * step in every record: a resolved
    rise; B's near-zero share left alone, which (equal up to seed noise) is not resolved or is
    reported with its own sign."""
    raised = tmp_path / "raised"
    shutil.copytree(runs / "shift", raised)
    records = [json.loads(line) for line in (raised / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        if r["kind"] == "outliers" and r["design"].startswith("B+vshift_1@"):
            r["gate_rel_large4_frac"] += 0.1 + 0.01 * r["step"] + 0.001 * int(r["design"][-1])
    (raised / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    gate = section(combined.write_studies_report([raised], tmp_path / "out").read_text(), "Gate saturation")
    assert "under B the trained-in shift raises the share of gate activations beyond 4× their rms: +" in gate


def test_studies_needs_out_and_excludes_a_run_dir(runs, capsys):
    with pytest.raises(SystemExit):
        report.main(["--studies", str(runs / "x2")])
    assert "--studies needs --out DIR" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        report.main([str(runs / "x2"), "--studies", str(runs / "shift"), "--out", "x"])
    assert "give either RUN_DIR or --studies" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        report.main([])
    assert "expected RUN_DIR" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        report.main(["--studies", str(runs / "x2"), str(runs / "x2" / "A@s1234"), "--out", "x"])
    assert f"--studies: {runs / 'x2' / 'A@s1234'} holds no finished run (no run.json)" in \
        capsys.readouterr().err


def test_2x2_contrasts_by_hand():
    def group(values):
        return [SimpleNamespace(seed=s, final_val_loss=v) for s, v in enumerate(values)]

    A, B, rg, ls = group([1.0, 2.0, 3.0]), group([5.0, 8.0, 7.0]), group([2.0, 3.0, 4.0]), group([3.0, 6.0, 5.0])
    opts = {"A": A, "B": B, "rms+gelu": rg, "ln+swiglu": ls}
    get = studies.METRICS["val loss"][0]
    effects = {name: studies.contrast(terms, get) for name, terms in combined._factor_terms(opts)}
    # norm: ((B - ls) + (rg - A)) / 2 per seed = (2 + 1) / 2 = 1.5 at every seed: zero spread
    assert (effects["norm: RMSNorm − LayerNorm"].mean, effects["norm: RMSNorm − LayerNorm"].lo) == (1.5, 1.5)
    # FFN: ((B - rg) + (ls - A)) / 2 = (3 + 2) / 2, (5 + 4) / 2, (3 + 2) / 2 = 2.5, 4.5, 2.5
    ffn = effects["FFN: SwiGLU − GELU"]
    half = 4.302653 * math.sqrt(4 / 3) / math.sqrt(3)  # t(0.975, 2) * sd / sqrt(n), sd^2 = (4/9 * 2 + 16/9) / 2
    assert ffn.mean == pytest.approx(19 / 6) and ffn.hi - ffn.mean == pytest.approx(half, rel=1e-5)
    # interaction: (B - rg) - (ls - A) = 1 at every seed; a seed missing from one group drops out
    assert effects["interaction"].mean == 1.0 and effects["interaction"].n == 3
    assert studies.contrast([(1, B), (-1, A[:2])], get).n == 2


def test_a_learning_rate_sweep_reports_the_health_of_A_and_B_per_rate(tmp_path):
    from ffn.harness import cli

    assert cli.main(run_args(tmp_path, "sweep", "--designs", "A,B", "--lrs", "3e-3,1e-2", "--no-report")) == 0
    _, results = load_run(tmp_path / "runs" / "sweep")
    diverged = next(r for r in results if r.spec == "B" and r.lr == 1e-2)
    replace(diverged, health={**diverged.health, "diverged": True}).save(tmp_path / "runs" / "sweep" / diverged.label)
    text = combined.write_studies_report([tmp_path / "runs" / "sweep"], tmp_path / "out").read_text()
    health = section(text, "Training health")
    at_low = re.search(r"`sweep` \(d_model 32\) at lr 0\.003: A \S+.*? \(seed 1234: did not learn\), "
                       r"B \S+.*? \(seed 1234: did not learn\); B − A .*?\(not claimed", health)
    at_high = re.search(r"`sweep` \(d_model 32\) at lr 0\.01: A .*?, B \S+.*? \(seed 1234: DIVERGED, did not "
                        r"learn\); B − A .*?\(not claimed: a run diverged", health)
    assert at_low and at_high, health
    assert "| `sweep` | B@lr=0.01 | 1 | seed 1234: DIVERGED, did not learn |" in health
