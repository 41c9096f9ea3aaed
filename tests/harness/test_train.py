"""The training loop: checkpoints, resume, DDP with two processes."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from ffn.harness import cli, report
from ffn.harness.files import atomic_torch_save
from ffn.harness.results import load_run

from .tiny import SUMMARY_KEYS, read_metrics, run_args

def test_resume_gives_bit_identical_losses(tmp_path):
    common = ("--designs", "A,B", "--steps", "6", "--ckpt-every", "2", "--no-report")
    assert cli.main(run_args(tmp_path, "straight", *common)) == 0
    assert cli.main(run_args(tmp_path, "resumed", *common, "--stop-at", "3")) == 0  # dies after step 3
    assert not (tmp_path / "runs" / "resumed" / "A" / "result.json").exists()
    assert cli.main(run_args(tmp_path, "resumed", *common, "--resume")) == 0
    straight = read_metrics(tmp_path, "straight")
    resumed = read_metrics(tmp_path, "resumed")
    assert [(r["design"], r["step"]) for r in resumed] == [(r["design"], r["step"]) for r in straight]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    for label in ("A", "B"):
        a = json.loads((tmp_path / "runs" / "straight" / label / "result.json").read_text())
        b = json.loads((tmp_path / "runs" / "resumed" / label / "result.json").read_text())
        for key in ("final_val_loss", "int8_val_loss", "int4_val_loss", "int8_h_val_loss"):
            assert a[key] == b[key], key
        assert a["shift_probe"]["offsets"] == b["shift_probe"]["offsets"]


def test_fresh_run_over_a_finished_one_leaves_nothing_for_resume_to_take(tmp_path, capsys):
    """A run without --resume in the directory of a finished one removes that run's files: killed
    during its first design, neither a later --resume nor the report takes the earlier run's results
    or checkpoints of the other design for its own."""
    common = ("--designs", "A,B", "--steps", "4", "--ckpt-every", "2", "--no-report")
    assert cli.main(run_args(tmp_path, "again", *common)) == 0
    first = read_metrics(tmp_path, "again")
    run_dir = tmp_path / "runs" / "again"
    assert cli.main(run_args(tmp_path, "again", *common, "--stop-at", "3")) == 0  # dies in A
    assert "starting" in capsys.readouterr().out
    assert not (run_dir / "B").exists() and not (run_dir / "run.json").exists()
    with pytest.raises(SystemExit):
        report.main([str(run_dir)])
    assert "holds no finished run" in capsys.readouterr().err
    assert cli.main(run_args(tmp_path, "again", *common, "--resume")) == 0
    again = read_metrics(tmp_path, "again")
    assert [(r["design"], r["step"], r["loss"]) for r in again] == [(r["design"], r["step"], r["loss"]) for r in first]
    assert [r.spec for r in load_run(run_dir)[1]] == ["A", "B"]


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    atomic_torch_save({"step": 1}, path)

    def dies_midway(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"step": 2}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}


def test_resume_refuses_a_checkpoint_trained_with_other_settings(tmp_path):
    common = ("--designs", "B", "--ckpt-every", "2", "--no-report")
    assert cli.main(run_args(tmp_path, "changed", *common, "--steps", "6", "--stop-at", "2")) == 0
    with pytest.raises(SystemExit, match=r"steps: 6 -> 8"):
        cli.main(run_args(tmp_path, "changed", *common, "--steps", "8", "--resume"))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")  # Inductor's own, on torch 2.11
@pytest.mark.parametrize("backend", ["ffn", "torch"])
def test_compiled_training_matches_eager_within_float32_rounding(tmp_path, backend):
    common = ("--designs", "B", "--backend", backend, "--ckpt-every", "2", "--no-report")
    assert cli.main(run_args(tmp_path, "eager", *common)) == 0
    assert cli.main(run_args(tmp_path, "compiled", *common, "--compile")) == 0
    # Resuming may turn compilation on or off: it is not part of the run's identity.
    assert cli.main(run_args(tmp_path, "toggled", *common, "--stop-at", "2")) == 0
    assert cli.main(run_args(tmp_path, "toggled", *common, "--compile", "--resume")) == 0
    eager = read_metrics(tmp_path, "eager")
    for name in ("compiled", "toggled"):
        ours = read_metrics(tmp_path, name)
        assert [r["step"] for r in ours] == [r["step"] for r in eager]
        torch.testing.assert_close([r["loss"] for r in ours], [r["loss"] for r in eager], rtol=1e-5, atol=0)
        for tel, ref in zip(read_metrics(tmp_path, name, "telemetry"), read_metrics(tmp_path, "eager", "telemetry")):
            torch.testing.assert_close(tel["input_mean"], ref["input_mean"], rtol=1e-4, atol=1e-5)
    meta, (compiled,) = load_run(tmp_path / "runs" / "compiled")
    _, (plain,) = load_run(tmp_path / "runs" / "eager")
    assert meta.config["train"]["compile"] is True
    assert plain.compile_s is None and compiled.compile_s > 0
    assert compiled.tokens_per_s > 0 and math.isfinite(compiled.tokens_per_s)
    torch.testing.assert_close(compiled.final_val_loss, plain.final_val_loss, rtol=1e-5, atol=0)


def test_ddp_with_two_processes_matches_one_process(tmp_path):
    common = ("--designs", "B", "--steps", "4", "--no-report")
    assert cli.main(run_args(tmp_path, "single", *common, "--batch-size", "4")) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "ffn.harness", *run_args(tmp_path, "ddp", *common, "--batch-size", "2")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    single, ddp = read_metrics(tmp_path, "single"), read_metrics(tmp_path, "ddp")
    assert len(single) == len(ddp) == 4
    torch.testing.assert_close(torch.tensor([r["loss"] for r in ddp]), torch.tensor([r["loss"] for r in single]),
                               rtol=1e-5, atol=1e-5)
    result = json.loads((tmp_path / "runs" / "ddp" / "B" / "result.json").read_text())
    alone = json.loads((tmp_path / "runs" / "single" / "B" / "result.json").read_text())
    assert json.loads((tmp_path / "runs" / "ddp" / "run.json").read_text())["world_size"] == 2
    assert set(result["telemetry_val"][0]) == SUMMARY_KEYS
    # Evaluation, telemetry and probes are sharded over the ranks and reduced: same numbers.
    for key in ("final_val_loss", "int8_val_loss", "int8_h_val_loss"):
        assert result[key] == pytest.approx(alone[key], rel=1e-5), key
    for ours, theirs in zip(result["shift_probe"]["offsets"] + result["telemetry_val"],
                            alone["shift_probe"]["offsets"] + alone["telemetry_val"]):
        for key, value in ours.items():
            assert value == pytest.approx(theirs[key], rel=1e-4, abs=1e-6, nan_ok=True), key
