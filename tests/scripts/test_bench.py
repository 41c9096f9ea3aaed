"""scripts/benchmarking.py (the shared timer and tables) and smoke runs of both benchmark scripts
on CPU at tiny sizes (a few seconds). Not timing tests: they check the scripts run and write what
they should."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import benchmarking  # noqa: E402
from script_loader import load_script  # noqa: E402
from ffn.harness.tables import markdown_table  # noqa: E402
from ffn.harness.model import gated_d_ff  # noqa: E402


@pytest.fixture(scope="module")
def bench():
    return load_script("bench")


# ----------------------------------------------------------------------------- shared helper
def test_markdown_table_on_known_input():
    table = benchmarking.markdown_table(["op", "ms", "note"], [["rms_norm", 1.5, None], ["swiglu", "n/a", "x"]])
    assert table == "| op | ms | note |\n|---|---|---|\n| rms_norm | 1.5 | None |\n| swiglu | n/a | x |"
    assert benchmarking.markdown_row(["a", 2]) == "| a | 2 |"
    assert benchmarking.markdown_table is markdown_table  # the project's one table helper


def test_report_writes_json_and_markdown(tmp_path):
    env = {"timestamp": "t", "git_commit": "abc", "git_dirty": False, "torch": "2", "cuda": None, "device_name": "cpu x"}
    report = benchmarking.Report("title", {"quick": True}, env, str(tmp_path / "r.json"))
    sec = report.section("Sec", ["a", "b"], "notes here")
    report.add_row(sec, [1, "PASS"], {"kind": "k", "a": 1}, echo=False)
    report.target("a >= 1", True, "1")
    report.target("b", False, "no")
    report.save()
    written = json.loads((tmp_path / "r.json").read_text())
    assert written == {"environment": env, "config": {"quick": True}, "results": [{"kind": "k", "a": 1}],
                       "targets": [{"target": "a >= 1", "pass": True, "detail": "1"}, {"target": "b", "pass": False, "detail": "no"}]}
    md = (tmp_path / "r.md").read_text()
    assert md.startswith("# title\n\ntorch 2, CUDA None, commit abc, t\n")
    assert "## Sec\n\nnotes here\n\n| a | b |\n|---|---|\n| 1 | PASS |\n" in md
    assert "## Targets: 1/2 pass\n\n- PASS a >= 1: 1\n- MISS b: no\n" in md


def test_cpu_timer_gives_positive_medians_in_order():
    timer = benchmarking.make_timer("cpu")
    assert isinstance(timer, benchmarking.CpuTimer) and timer.num_threads == torch.get_num_threads()
    x = torch.randn(64)
    (fast, slow), reps = benchmarking.measure(timer, [lambda: x.add(1), lambda: time.sleep(0.002)],
                                              warmup=1, budget=0.05, min_reps=2, max_reps=3)
    assert 2 <= reps <= 3
    assert 0 < fast < 1e-3
    assert 0.0019 < slow < 0.02
    assert all(n >= reps for n in timer.samples())  # at least one timed block per round


def test_measure_interleaves_in_rotating_order():
    calls = []

    class Recorder:
        def sync(self):
            pass

        def start(self, fns, budget, max_reps):
            self.fns = fns

        def time(self, i):
            calls.append(i)
            self.fns[i]()

        def medians(self):
            return [1.0] * len(self.fns)

    _, reps = benchmarking.measure(Recorder(), [lambda: None] * 3, warmup=0, reps=3)
    assert reps == 3 and calls == [0, 1, 2, 1, 2, 0, 2, 0, 1]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_timer_gives_positive_median():
    x = torch.randn(1 << 20, device="cuda")
    (t,), reps = benchmarking.measure(benchmarking.make_timer("cuda"), [lambda: x.mul(2)], warmup=1, reps=5)
    assert reps == 5 and 0 < t < 0.1


# ----------------------------------------------------------------------------- bench.py
def test_gated_width_rules(bench):
    # LLaMA-style: 8d/3 rounded up to 64 (the benchmark's documented exception).
    assert [bench.llama_d_ff(d) for d in (512, 1024, 4096)] == [1408, 2752, 10944]
    assert bench.bench_d_ff("swiglu", 1024) == (2752, "8d/3 up to 64")
    # matched: the harness's rule, the parameters of a bias-free 4d GELU FFN.
    assert bench.bench_d_ff("swiglu", 1024, "matched") == (gated_d_ff(1024, 4096, bias=False), "gated_d_ff(d, 4d)")
    assert bench.bench_d_ff("gelu_ffn", 1024, "matched") == (4096, "4d")
    # No case builder shares a name with the harness model's functions.
    assert not hasattr(bench, "make_norm") and not hasattr(bench, "make_ffn")


def test_cpu_quick_run_writes_tables(bench, tmp_path):
    out = tmp_path / "cpu.json"
    results = bench.main(
        ["--device", "cpu", "--quick", "--rows", "16", "--dims", "7", "32", "--ffn-tokens", "16", "--ffn-dims", "32",
         "--reps", "2", "--warmup", "1", "--budget", "0.02", "--json", str(out), "--no-compile"]
    )
    written = json.loads(out.read_text())
    assert written["results"] == json.loads(json.dumps(results["results"]))
    timed = [r for r in results["results"] if r["kind"] in ("norm", "ffn")]
    # 3 norms (rms_norm, layer_norm, add_rms_norm) x 2 dims x 2 passes, 2 FFNs x 1 dim x 2 passes.
    assert len(timed) == 16
    assert all(r["ffn_s"] > 0 and r["speedup"] > 0 and r["reps"] == 2 for r in timed)
    assert all(r["compile_s"] is None and r["speedup_vs_compile"] is None for r in timed)  # --no-compile
    ffn_rules = {(r["op"], r["d_ff"], r["d_ff_rule"]) for r in timed if r["kind"] == "ffn"}
    assert ffn_rules == {("gelu_ffn", 128, "4d"), ("swiglu", 128, "8d/3 up to 64")}
    saved = {r["op"]: r for r in results["results"] if r["kind"] == "ffn_saved"}
    assert set(saved) == {"gelu_ffn", "swiglu"}
    for r in saved.values():
        # ffn keeps x and the pre-activation; eager also keeps the hidden activation.
        assert r["ffn_saved_bytes"] < r["eager_saved_bytes"]
    markdown = out.with_suffix(".md").read_text()
    assert ("| op | pass | rows x d | ffn ms | torch ms | speedup | torch compiled ms | ffn compiled ms | speedup vs compiled"
            " | ffn GB/s | torch GB/s | reps | target |") in markdown
    assert ("| op | pass | tokens x d x d_ff | d_ff rule | ffn ms | eager ms | speedup | torch compiled ms | ffn compiled ms"
            " | speedup vs compiled | ffn GB/s | ffn GFLOP/s | eager GFLOP/s | reps | target |") in markdown
    assert "| op | tokens x d x d_ff | d_ff rule | ffn MiB | eager MiB | ffn/eager | params MiB (excluded) | target |" in markdown
    assert "| rms_norm | fwd+bwd | 16x7 |" in markdown and "| swiglu | fwd | 16x32x128 | 8d/3 up to 64 |" in markdown
    assert "Compiled columns n/a (this run: --no-compile)." in markdown and "as fast as torch.compile" not in markdown
    assert "Targets:" in markdown and markdown.count("| layer_norm |") == 4
    assert markdown.count("| add_rms_norm |") == 4


def test_cpu_quick_run_matched_width(bench, tmp_path):
    results = bench.main(["--device", "cpu", "--quick", "--ops", "swiglu", "--ffn-tokens", "8", "--ffn-dims", "96",
                          "--reps", "1", "--warmup", "0", "--budget", "0.01", "--gated-width", "matched", "--markdown", str(tmp_path / "m.md"),
                          "--no-compile"])
    rows = [r for r in results["results"] if r["kind"] == "ffn"]
    assert [r["d_ff"] for r in rows] == [gated_d_ff(96, 384, bias=False)] * 2
    assert all(r["d_ff_rule"] == "gated_d_ff(d, 4d)" for r in rows)
    assert "gated_d_ff(d, 4d)" in (tmp_path / "m.md").read_text() and not (tmp_path / "m.json").exists()


@pytest.mark.slow
def test_cpu_quick_run_times_torch_compile_in_the_same_rounds(bench, tmp_path):
    results = bench.main(["--device", "cpu", "--quick", "--ops", "add_rms_norm", "swiglu", "--rows", "16", "--dims", "32",
                          "--ffn-tokens", "16", "--ffn-dims", "32", "--reps", "2", "--warmup", "1", "--budget", "0.02",
                          "--markdown", str(tmp_path / "c.md")])
    timed = [r for r in results["results"] if r["kind"] in ("norm", "ffn")]
    assert [(r["op"], r["pass"]) for r in timed] == [(op, p) for op in ("add_rms_norm", "swiglu") for p in ("fwd", "fwd+bwd")]
    for r in timed:
        assert r["compile_s"] > 0 and r["ffn_compile_s"] > 0 and r["reps"] == 2
        assert r["speedup_vs_compile"] == pytest.approx(r["compile_s"] / min(r["ffn_s"], r["ffn_compile_s"]))
    assert results["environment"]["failures"] == {}
    names = [t["target"] for t in results["targets"]]
    assert "add_rms_norm fwd+bwd 16x32 as fast as torch.compile" in names
    assert "swiglu fwd 16x32x128 as fast as torch.compile" in names
    assert "torch compiled = torch.compile" in (tmp_path / "c.md").read_text()


def test_cpu_compile_failure_is_reported_not_fatal(bench, monkeypatch):
    def no_compiler(fn, dynamic):
        def fails(*args):
            raise RuntimeError("no C++ compiler")
        return fails

    monkeypatch.setattr(bench.torch, "compile", no_compiler)
    results = bench.main(["--device", "cpu", "--quick", "--ops", "rms_norm", "--rows", "8", "--dims", "16", "--reps", "1",
                          "--warmup", "0", "--budget", "0.01", "--no-save"])
    rows = [r for r in results["results"] if r["kind"] == "norm"]
    assert len(rows) == 2 and all(r["ffn_s"] > 0 and r["torch_s"] > 0 for r in rows)
    assert all(r["compile_s"] is None and r["ffn_compile_s"] is None and r["speedup_vs_compile"] is None for r in rows)
    assert set(results["environment"]["failures"]) == {"torch_compiled", "ffn_compiled"}


# ----------------------------------------------------------------------------- bench_telemetry.py
def test_telemetry_quick_run_writes_tables(tmp_path):
    out = tmp_path / "telemetry.json"
    proc = subprocess.run([sys.executable, str(SCRIPTS / "bench_telemetry.py"), "--quick", "--tokens", "32", "--repeats", "2", "--budget", "0.02",
                           "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    written = json.loads(out.read_text())
    whats = [r["what"] for r in written["results"]]
    assert whats == ["_gated_ffn_fwd (2 GEMMs + act)", "of which the activation pass", "ffn_stats (fused telemetry)",
                     "reference_stats (plain PyTorch)"]
    assert all(r["seconds"] > 0 and r["reps"] == 2 for r in written["results"])
    assert written["results"][0]["over_forward"] == 1.0
    assert written["config"]["d_ff"] == gated_d_ff(64, 256)
    md = out.with_suffix(".md").read_text()
    assert "| what | median ms | x forward | reps |" in md and "| ffn_stats (fused telemetry) |" in md
    assert "| what | median ms | x forward | reps |" in proc.stdout and "summary:" in proc.stdout
