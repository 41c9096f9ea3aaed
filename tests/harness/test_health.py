"""Training health: divergence, spikes, "did not learn", and the per-seed pairing of runs."""

import json

import pytest

from ffn.harness import cli, health, report
from ffn.harness import data as textdata
from ffn.harness.metrics import MetricsLog
from ffn.harness.results import load_run

from .tiny import read_metrics, run_args


def test_spike_and_divergence_flags_of_known_curves():
    flat = [3.0] * 10 + [4.6] + [3.0] * 5  # 4.6 > 1.5 x median 3.0 at step 10
    assert health.spike_steps(flat) == [10]
    assert health.spike_steps([3.0] * 10 + [4.4]) == []  # 4.4 < 4.5
    ok = health.health_flags([5.5, 4.0, 3.0, 2.5], final_val_loss=2.0, unigram=3.0)
    assert not ok["diverged"] and not ok["did_not_learn"] and health.flag_text(ok) == "ok"
    assert health.health_flags([5.5, 12.0, 3.0], 2.0, 3.0)["diverged"]  # 12 > 2 x 5.5
    assert health.health_flags([5.5, float("nan")], float("nan"), 3.0)["non_finite"]
    assert health.health_flags([5.5, 4.0], final_val_loss=2.95, unigram=3.0)["did_not_learn"]  # margin 0.1


def test_a_huge_learning_rate_is_flagged_as_diverged(tmp_path):
    assert cli.main(run_args(tmp_path, "boom", "--designs", "B", "--steps", "8", "--lr", "300",
                             "--warmup", "1", "--grad-clip", "1e9")) == 0
    result = json.loads((tmp_path / "runs" / "boom" / "B" / "result.json").read_text())
    assert result["health"]["diverged"] and result["health"]["did_not_learn"]
    text = (tmp_path / "runs" / "boom" / "report.md").read_text()
    assert "DIVERGED" in text
    assert "\n| B [DIVERGED, did not learn] | rms+swiglu |" in text  # marked in the results table too
    optim = read_metrics(tmp_path, "boom", "optim")
    assert {r["layer"] for r in optim} == {0, 1} and all(r["grad_norm"] > 0 for r in optim if r["step"] == 0)


def test_seeds_are_paired_across_designs_and_differ_across_seeds(tmp_path, monkeypatch):
    calls, current = {}, {}
    real_offsets, real_open = textdata.batch_offsets, MetricsLog.open_design

    def spy_offsets(n, seq_len, batch, seed, step):
        out = real_offsets(n, seq_len, batch, seed, step)
        if seed != 999_983:  # not the W8A8 calibration stream
            calls.setdefault(current["label"], {})[step] = (seed, out.tolist())
        return out

    def spy_open(self, label, start_step):
        current["label"] = label
        return real_open(self, label, start_step)

    monkeypatch.setattr(textdata, "batch_offsets", spy_offsets)
    monkeypatch.setattr(MetricsLog, "open_design", spy_open)
    assert cli.main(run_args(tmp_path, "seeds", "--designs", "A,B", "--seeds", "2", "--steps", "3")) == 0
    assert set(calls) == {"A@s1234", "B@s1234", "A@s1235", "B@s1235"}
    for seed in (1234, 1235):
        assert calls[f"A@s{seed}"] == calls[f"B@s{seed}"]  # same batches for both designs
        assert all(s == seed for s, _ in calls[f"A@s{seed}"].values())
    assert [o for _, o in calls["A@s1234"].values()] != [o for _, o in calls["A@s1235"].values()]
    meta, results = load_run(tmp_path / "runs" / "seeds")
    assert meta.seeds == [1234, 1235] and [r.group for r in results] == ["A", "B", "A", "B"]
    # Seed 1234 of a multi-seed run is the single-seed run: the default numbers do not move.
    monkeypatch.undo()
    assert cli.main(run_args(tmp_path, "one", "--designs", "A", "--steps", "3", "--no-report")) == 0
    one = [r["loss"] for r in read_metrics(tmp_path, "one")]
    multi = read_metrics(tmp_path, "seeds")
    assert [r["loss"] for r in multi if r["design"] == "A@s1234"] == one
    assert [r["loss"] for r in multi if r["design"] == "A@s1235"] != one
    text = (tmp_path / "runs" / "seeds" / "report.md").read_text()
    assert "## Seeds: mean and 95% interval" in text and "## Paired differences" in text


def test_learning_rate_sweep_flags():
    run = cli.parse_config(["--preset", "tiny", "--designs", "A,B", "--lrs", "1e-3,3e-3", "--seeds", "2"])
    members = cli.members(run)
    assert len(members) == 8 and members[0][3] == "A@lr=0.001@s1234"
    assert {m[2].lr for m in members} == {1e-3, 3e-3} and {m[4] for m in members} == {
        "A@lr=0.001", "B@lr=0.001", "A@lr=0.003", "B@lr=0.003"}
    with pytest.raises(SystemExit):
        cli.parse_config(["--lrs", "1e-3,x"])
    assert cli.parse_config(["--preset", "study"]).seeds >= 3
    assert report is not None
