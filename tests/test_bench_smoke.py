"""Keeps scripts/bench.py runnable: its CPU mode on tiny sizes (a few seconds). Not a timing test."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("ffn_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_swiglu_d_ff_rounds_up_to_64(bench):
    assert [bench.swiglu_d_ff(d) for d in (512, 1024, 4096)] == [1408, 2752, 10944]


def test_cpu_quick_run_writes_tables(bench, tmp_path):
    out = tmp_path / "cpu.json"
    results = bench.main(
        ["--device", "cpu", "--quick", "--rows", "16", "--dims", "7", "32", "--ffn-tokens", "16", "--ffn-dims", "32",
         "--reps", "2", "--warmup", "1", "--json", str(out)]
    )
    written = json.loads(out.read_text())
    assert written["results"] == json.loads(json.dumps(results["results"]))
    timed = [r for r in results["results"] if r["kind"] in ("norm", "ffn")]
    # 2 norms x 2 dims x 2 passes, 2 FFNs x 1 dim x 2 passes.
    assert len(timed) == 12
    assert all(r["ffn_s"] > 0 and r["speedup"] > 0 for r in timed)
    saved = {r["op"]: r for r in results["results"] if r["kind"] == "ffn_saved"}
    assert set(saved) == {"gelu_ffn", "swiglu"}
    for r in saved.values():
        # ffn keeps x and the pre-activation; eager also keeps the hidden activation.
        assert r["ffn_saved_bytes"] < r["eager_saved_bytes"]
    markdown = out.with_suffix(".md").read_text()
    assert "| rms_norm | fwd+bwd | 16x7 |" in markdown and "Targets:" in markdown
