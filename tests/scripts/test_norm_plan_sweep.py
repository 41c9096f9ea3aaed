"""scripts/norm_plan_sweep.py without a GPU: --list lists every shape's plans, each checked as
csrc/cuda/norm.cu's forced_plan checks it, and the checks refuse what the kernels cannot run.
The sweep itself runs on the GPU machine (make gpu-check, stage norm-plans); the same plans run
emulated in tests/cuda_emu/norm_test.cpp (ForcedPlanTest)."""

import json
import os
import re
import subprocess
import sys

import pytest

from script_loader import SCRIPTS, load_script

sys.path.insert(0, str(SCRIPTS))

from benchmarking import CpuTimer, Report  # noqa: E402


@pytest.fixture(scope="module")
def sweep():
    return load_script("norm_plan_sweep")


def test_list_needs_no_gpu_and_lists_every_shape(sweep):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(SCRIPTS / "norm_plan_sweep.py"), "--list"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    # bfloat16 and float32, d 1024 4096 8192 16384, forward and backward: 16 shapes, then the total.
    assert len(lines) == 17
    assert "forward  bfloat16 16384x1024: auto 64x2; 32 plans: 16x8@1-8, 32x4@1-8, 64x2@1-8, 128x1@1-8" in lines
    assert "backward bfloat16 16384x16384: long rows (no register plan covers d); auto only" in lines
    assert "forward  float32  16384x16384: long rows (no register plan covers d); auto only" in lines
    total = sum(len(sweep.plans(p, sweep.DTYPES[t], d)) for p, t, _rows, d in sweep.groups(sweep.cuda_report.BENCH_SHAPES))
    # The 30 (threads, words) pairs tests/cuda_emu/norm_test.cpp runs at every blocks per SM.
    assert total == 30 * 8
    assert lines[-1].startswith(f"{total} plans")


def test_plans_are_valid_and_include_row_plans_choice(sweep):
    for pass_ in ("forward", "backward"):
        for elt in (2, 4):
            for d in (1, 7, 64, 100, 513, 1024, 3000, 4096, 6144, 8192, 16384, 20000):
                plans = sweep.plans(pass_, elt, d)
                for plan in plans:
                    sweep.check_plan(pass_, elt, d, *plan)
                auto = sweep.auto_plan(pass_, elt, d)
                pairs = {p[:2] for p in plans}
                assert (auto in pairs) if auto else not plans, (pass_, elt, d)
                words = sweep.row_words(d, elt)
                for threads, per_thread in pairs:
                    # The fewest words per thread, and no thread without a word of its own.
                    assert threads * per_thread // 2 < words and threads // 2 < words, (threads, per_thread, d)


@pytest.mark.parametrize("pass_, elt, d, plan, why", [
    ("forward", 4, 1024, (48, 8), "power of two from 1 to 256, got 48"),
    ("forward", 4, 1024, (512, 1), "got 512"),
    ("forward", 4, 1024, (0, 8), "got 0"),
    ("forward", 4, 1024, (64, 3), "up to 8), got 3"),
    ("forward", 2, 1024, (16, 16), "got 16"),
    ("backward", 2, 2048, (32, 8), "backward instantiations for 2-byte rows (up to 4), got 8"),
    ("forward", 4, 1000, (32, 4), "32 threads x 4 words cover 128 128-bit words, but a row of d = 1000 takes 250"),
    ("forward", 4, 8193, (256, 8), "takes 2049"),
    ("forward", 4, 1024, (64, 4, 0), "blocks per SM must be from 1 to 8, got 0"),
    ("forward", 4, 1024, (64, 4, 9), "got 9"),
])
def test_check_plan_refuses_what_the_kernels_cannot_run(sweep, pass_, elt, d, plan, why):
    with pytest.raises(ValueError, match=re.escape(why)):
        sweep.check_plan(pass_, elt, d, *plan)


def test_check_plan_accepts_the_largest_instantiations(sweep):
    sweep.check_plan("forward", 2, 16384, 256, 8, 1)
    sweep.check_plan("backward", 4, 8192, 256, 8, 8)
    sweep.check_plan("backward", 2, 8192, 256, 4)


def test_without_a_gpu_the_sweep_says_so(sweep, monkeypatch, tmp_path):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device"):
        sweep.main(["--json", str(tmp_path / "p.json")])
    assert not (tmp_path / "p.json").exists()


def test_a_group_is_timed_checked_and_tabled(sweep, tmp_path):
    """The sweep's measuring and reporting on the CPU kernels, which ignore the plans: every plan
    runs, matches auto and is timed; the tables and result files are written."""
    records = sweep.sweep_group("layer_norm", "backward", "float32", 16, 8192, budget=0.2, timer=CpuTimer(),
                                device="cpu")
    assert [r["plan"] for r in records] == ["auto"] + [f"256x8@{b}" for b in range(1, 9)]
    assert all(r["status"] == "measured" and r["ms"] > 0 and r["gbps"] > 0 for r in records)
    assert records[0]["speedup_vs_auto"] == 1.0
    assert set(records[1]["max_abs_diff"]) == {"dx", "dw", "db"} and records[1]["max_abs_diff"]["dx"] == 0
    report = Report("Norm row plan sweep", {}, {"torch": "t", "cuda": None, "git_commit": "c", "timestamp": "now"},
                    json_path=str(tmp_path / "plans.json"))
    key = ("layer_norm", "backward", "float32", 16, 8192)
    report.records += records
    sweep.write_tables(report, {key: records})
    report.save()
    assert json.loads((tmp_path / "plans.json").read_text())["results"] == records
    markdown = (tmp_path / "plans.md").read_text()
    summary = report.sections[0]["rows"]
    # auto: row_plan's 256x8 at the most blocks per SM that ran; 8 plans run, none refused.
    assert summary == [[*key[:3], "16x8192", "256x8@8", *summary[0][5:9], 8, 0]]
    assert "## layer_norm backward float32 16x8192" in markdown
