"""scripts/bench_patch.py on tiny models: it runs, and its accuracy columns are float32 rounding."""

import json

import pytest

from script_loader import load_script

pytest.importorskip("transformers")


def test_quick_run_prints_and_writes_rows(tmp_path, capsys, monkeypatch):
    bench = load_script("bench_patch")
    out = tmp_path / "rows.json"
    monkeypatch.setattr("sys.argv", ["bench_patch.py", "--arch", "llama,gemma,t5_v1_0", "--hidden", "64",
                                     "--seq", "8", "--batch", "2", "--repeats", "2", "--warmup", "0",
                                     "--json", str(out)])
    bench.main()
    printed = capsys.readouterr().out
    assert "| gemma | GemmaMLP 2, GemmaRMSNorm 5 |" in printed
    rows = json.loads(out.read_text())["rows"]
    assert [r["arch"] for r in rows] == ["llama", "gemma", "t5_v1_0"]
    for row in rows:
        assert row["logits_rel_diff"] < 1e-5 and row["grad_rel_diff"] < 1e-5, row
        assert row["patched_min_ms"] > 0 and row["unpatched_min_ms"] > 0
    assert rows[2]["replaced"] == {"T5LayerNorm": 12, "T5DenseActDense": 4}


def test_kernelize_column(tmp_path, capsys, monkeypatch):
    pytest.importorskip("kernels")
    bench = load_script("bench_patch")
    out = tmp_path / "rows.json"
    monkeypatch.setattr("sys.argv", ["bench_patch.py", "--arch", "llama,phi3", "--hidden", "64", "--seq", "8",
                                     "--batch", "2", "--repeats", "2", "--warmup", "0", "--kernelize",
                                     "--json", str(out)])
    from transformers.models.llama.modeling_llama import LlamaMLP

    marked_before = hasattr(LlamaMLP, "kernel_layer_name")
    try:
        bench.main()
    finally:  # mark_mlps marks transformers' class (as kernels does): undone here
        if not marked_before:
            del LlamaMLP.kernel_layer_name, LlamaMLP.kernel_condition
    assert "| kernelized (layers) |" in capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["kernelized"] == {"RMSNorm": 5, "SwiGLUMLP": 2}
    assert rows[1]["kernelized"] == {"RMSNorm": 5}  # Phi3's packed MLP: only ffn.patch
    for row in rows:
        assert row["kernelized_logits_rel_diff"] < 1e-5 and row["kernelized_min_ms"] > 0
