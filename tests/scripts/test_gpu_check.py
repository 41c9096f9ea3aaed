"""scripts/gpu_check.py where there is no GPU (as in CI): it must say so, write its
summary and exit 0; and a stage that runs past its limit is reported, not lost.
The GPU path itself runs on the GPU machine (make gpu-check)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from script_loader import SCRIPTS, load_script


@pytest.fixture(scope="module")
def gpu_check():
    return load_script("gpu_check")


def test_without_a_gpu_it_says_so_and_exits_cleanly(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(SCRIPTS / "gpu_check.py"), str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no GPU here" in proc.stdout
    summary = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert summary["status"] == "no-gpu"
    assert summary["environment"]["torch"] == torch.__version__
    assert summary["environment"]["gpu"] is False
    assert summary["stages"] == {}


def test_a_stage_past_its_limit_is_reported(gpu_check, tmp_path):
    result = gpu_check.run_stage("slow", [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(30)"],
                                 str(tmp_path), limit=2)
    assert result["status"] == "timeout" and result["returncode"] is None
    assert result["seconds"] < 20
    assert "started" in (tmp_path / "slow.log").read_text()


def test_a_failing_stage_is_reported_with_its_output(gpu_check, tmp_path):
    result = gpu_check.run_stage("fails", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"],
                                 str(tmp_path), limit=30)
    assert result["status"] == "failed" and result["returncode"] == 3
    assert "boom" in result["tail"]


def test_the_stage_limits_fit_the_default_budget(gpu_check):
    assert sum(gpu_check.STAGE_LIMITS.values()) <= gpu_check.DEFAULT_BUDGET_S
    # The plan sweep (its own budget: the limit less the startup) runs before the benchmark, which
    # takes what is left.
    assert list(gpu_check.STAGE_LIMITS)[-2:] == ["norm-plans", "bench"]
    assert gpu_check.STAGE_LIMITS["norm-plans"] - gpu_check.SWEEP_STARTUP_S >= 20
