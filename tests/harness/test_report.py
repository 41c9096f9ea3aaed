"""The report: a run that diverged or did not learn is marked wherever its numbers appear
and never ranked or compared; the one table helper and the one number check."""

import math
import re
from dataclasses import replace

import pytest

from ffn.harness import cli, report, studies
from ffn.harness.report.tables import summary_rows
from ffn.harness.results import load_run
from ffn.harness.tables import fmt, isnum, markdown_table

from .tiny import run_args


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    assert cli.main(run_args(tmp, "ab", "--designs", "A,B,B+recenter", "--steps", "6", "--no-report")) == 0
    return load_run(tmp / "runs" / "ab")


def flagged(result, diverged=False, did_not_learn=False):
    return replace(result, health={**result.health, "diverged": diverged, "did_not_learn": did_not_learn})


def test_a_diverged_run_is_marked_everywhere_and_never_ranked(run):
    meta, (a, b, rec) = run
    results = [flagged(a), flagged(b, diverged=True), flagged(rec)]
    rows = summary_rows(results)
    assert [row[0] for row in rows] == ["A", "B [DIVERGED]", "B+recenter"]
    assert rows[0][4] == "+0.0000" and rows[1][4] == "–" and rows[2][4] != "–"  # no Δ to or from B
    assert "B [DIVERGED]" in report.terminal_table(results, meta)
    text = "\n".join(report.findings(results, meta))
    quality = next(p for p in report.findings(results, meta) if p.startswith("**Quality.**"))
    assert re.search(r"ranks (A|B\+recenter) \d\.\d{4}, (A|B\+recenter) \d\.\d{4} nats/byte; \d of 2 designs", quality)
    assert f"Not ranked, their numbers are no result: B [DIVERGED] (val loss {b.final_val_loss:.4f})" in quality
    assert "Under RMSNorm+SwiGLU (B [DIVERGED])" in text and "no conclusion from runs that are no result" in text
    answers = "\n".join(studies.case_studies(results, meta))
    assert "Under B [DIVERGED] the shift reaches" in answers
    assert "not claimed: a run diverged or did not learn" in answers and "No choice: a run of A or B" in answers
    assert "Choice from these numbers" not in answers
    assert "| B [DIVERGED] | 0 |" in markdown_table(studies.OUTLIER_HEADER, studies.outlier_rows(results))


def test_a_run_that_did_not_learn_is_marked_and_healthy_runs_are_not(run):
    meta, (a, b, rec) = run
    healthy = [flagged(a), flagged(b), flagged(rec)]
    assert [row[0] for row in summary_rows(healthy)] == ["A", "B", "B+recenter"]
    quality = report.findings(healthy, meta)[0]
    assert "Not ranked" not in quality and quality.count(" nats/byte;") == 1
    assert "[" not in "\n".join(studies.case_studies(healthy, meta)).split("\n\n| option")[0]
    lazy = [flagged(a), flagged(b), flagged(rec, did_not_learn=True)]
    assert summary_rows(lazy)[2][0] == "B+recenter [did not learn]"
    assert "B+recenter [did not learn]" in studies.seeds_table(lazy)


def test_isnum_is_a_finite_real_number():
    assert isnum(1) and isnum(-2.5) and isnum(0.0)
    for value in (None, math.nan, math.inf, -math.inf, True, "1.0"):
        assert not isnum(value), value
    assert fmt(math.inf) == fmt(None) == fmt(math.nan) == "–" and fmt(2.0, ".1f") == "2.0"


def test_markdown_table_escapes_a_pipe_in_a_cell():
    assert markdown_table(["metric", "v"], [["max|h|/rms", 2], ["x", None]]) == \
        "| metric | v |\n|---|---|\n| max\\|h\\|/rms | 2 |\n| x | None |"
