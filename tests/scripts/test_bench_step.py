"""scripts/bench_step.py runs (smoke size): every implementation of every row timed in each round,
and the ratio it reports is the faster ffn's median per-round ratio over torch.compile."""

import json
import statistics

import pytest
from script_loader import load_script


@pytest.mark.slow
def test_quick_tables(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert load_script("bench_step").main(["--quick", "--designs", "B", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["workload"], r["design"]) for r in rows] == [("sublayer fwd+bwd", "B"), ("step fwd+bwd+AdamW", "B")]
    for row in rows:
        ms = row["ms"]
        assert set(ms) == {"torch", "torch+compile", "ffn", "ffn+compile"} and all(t > 0 for t in ms.values())
        seconds, best = row["seconds"], row["best_ffn"]
        assert best == min(("ffn", "ffn+compile"), key=lambda impl: statistics.median(seconds[impl]))
        assert row["ratios"] == [f / tc for f, tc in zip(seconds[best], seconds["torch+compile"])]
        assert len(row["ratios"]) == row["rounds"] == 3
        assert row["best_ffn_over_torch_compiled"] == statistics.median(row["ratios"])
    table = capsys.readouterr().out
    table_rows = [line for line in table.splitlines() if line.startswith("| ") and "| B |" in line]
    assert "best ffn / torch compiled" in table and len(table_rows) == 2


def test_combine_pools_the_rounds_of_runs(tmp_path, capsys):
    """--combine: per row, the rounds of every run one after another; the faster ffn is chosen over
    them all (here compiled ffn, though eager ffn is faster in the first run alone)."""
    runs = [{"ffn": [1.0, 1.0], "ffn+compile": [2.0, 2.0], "torch+compile": [1.0, 2.0], "torch": [3.0, 3.0]},
            {"ffn": [4.0, 4.0, 4.0], "ffn+compile": [1.5, 1.5, 1.5], "torch+compile": [1.0, 1.5, 3.0],
             "torch": [3.0, 3.0, 3.0]}]
    paths = []
    for i, seconds in enumerate(runs):
        paths.append(tmp_path / f"run{i}.json")
        row = {"workload": "sublayer fwd+bwd", "design": "B", "shape": "d 8", "seconds": seconds}
        paths[-1].write_text(json.dumps({"environment": {}, "rows": [row]}))
    out = tmp_path / "pooled.json"
    assert load_script("bench_step").main(["--combine", *map(str, paths), "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["best_ffn"] == "ffn+compile" and row["rounds"] == 5
    assert row["ratios"] == [2.0, 1.0, 1.5, 1.0, 0.5]
    assert row["best_ffn_over_torch_compiled"] == 1.0
    assert "1.000 [1.000, 1.500] (ffn+compile)" in capsys.readouterr().out
