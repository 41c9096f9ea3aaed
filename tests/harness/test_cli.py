"""The command line: a tiny end-to-end run with its report, and the design flags."""

import json
import subprocess
import sys
from dataclasses import replace
from types import SimpleNamespace

import pytest

from ffn.harness import cli, designs, report
from ffn.harness.train import run_identity
from ffn.harness.config import DEFAULT_PROBE_SHIFT, TrainConfig
from ffn.harness.designs import Design
from ffn.harness.results import load_run

from .tiny import SUMMARY_KEYS, read_metrics, run_args

def test_end_to_end_tiny_run_writes_metrics_tensorboard_and_report(tmp_path, capsys):
    assert cli.main(run_args(tmp_path, "e2e", "--designs", "A,B,B+recenter", "--steps", "6")) == 0
    run_dir = tmp_path / "runs" / "e2e"
    out = capsys.readouterr().out
    assert "unigram entropy of val" in out and "int8" in out and "shift probe" in out
    for label in ("A", "B", "B+recenter"):
        result = json.loads((run_dir / label / "result.json").read_text())
        assert len(result["telemetry_val"]) == 2 and set(result["telemetry_val"][0]) == SUMMARY_KEYS
        probe = result["shift_probe"]
        assert probe["shift_rms_units"] == DEFAULT_PROBE_SHIFT
        assert len(probe["offsets"]) == len(probe["shifts"]) == 2
        assert probe["shifts"] == [DEFAULT_PROBE_SHIFT * r for r in probe["norm_input_rms"]]
        assert result["int8_delta"] == result["int8_val_loss"] - result["final_val_loss"]
        assert result["int4_delta"] == result["int4_val_loss"] - result["final_val_loss"]
        assert result["int8_h_delta"] == result["int8_h_val_loss"] - result["final_val_loss"]
        assert list((run_dir / "tb" / label).glob("events.out.tfevents.*"))
    tel = read_metrics(tmp_path, "e2e", "telemetry")
    assert {(r["design"], r["layer"]) for r in tel} == {(d, layer) for d in ("A", "B", "B+recenter")
                                                        for layer in range(2)}
    text = (run_dir / "report.md").read_text()
    for needle in ("## Results", "## Findings", "## Telemetry per layer", "## Mean-shift probe", "Re-centering",
                   "loss.png", "telemetry.png", "shift_probe.png"):
        assert needle in text
    for png in ("loss.png", "telemetry.png", "shift_probe.png"):
        assert (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The run's files load back into result objects, and the report rebuilds from them alone.
    meta, results = load_run(run_dir)
    assert [r.spec for r in results] == ["A", "B", "B+recenter"] and meta.world_size == 1
    assert results[2].design == designs.parse_design("B+recenter") and results[2].shift_probe.offsets
    (run_dir / "report.md").unlink()
    assert report.main([str(run_dir)]) == 0
    assert (run_dir / "report.md").read_text() == text


def test_cli_rejects_conflicting_design_flags(tmp_path):
    with pytest.raises(SystemExit):
        cli.parse_config(["--designs", "A", "--norm", "rmsnorm", "--ffn", "swiglu"])
    run = cli.parse_config(["--norm", "rmsnorm", "--ffn", "gelu", "--norm-bias", "--placement", "post"])
    assert run.designs == (("rmsnorm+gelu", Design(norm="rmsnorm", ffn="gelu", norm_bias=True, placement="post")),)


def test_recenter_flag_puts_mean_subtraction_back_in_every_design():
    run = cli.parse_config(["--designs", "A,B", "--recenter", "--norm-bias"])
    assert run.designs == (("A+recenter", Design(norm="layernorm", ffn="gelu", norm_bias=False)),
                           ("B+recenter", Design(norm="layernorm", ffn="swiglu", norm_bias=False)))
    run = cli.parse_config(["--norm", "rmsnorm", "--ffn", "swiglu", "--recenter"])
    assert run.designs == (("rmsnorm+swiglu+recenter", designs.parse_design("B+recenter")),)


def test_flags_become_typed_settings():
    run = cli.parse_config(["--preset", "tiny", "--steps", "9", "--lr", "0.01", "--no-ffn-bias", "--eval-every", "0"])
    assert isinstance(run.train, TrainConfig)
    assert (run.train.steps, run.train.lr, run.train.ffn_bias, run.train.d_model) == (9, 0.01, False, 32)
    assert run.train.eval_every == 9  # 0: evaluate at the end only
    with pytest.raises(TypeError, match="no settings"):
        TrainConfig.from_preset("tiny", depth=3)


def test_compile_flag_is_a_training_setting_outside_the_run_identity():
    assert cli.parse_config(["--preset", "tiny"]).train.compile is False
    assert cli.parse_config(["--preset", "tiny", "--compile", "--no-compile"]).train.compile is False
    run = cli.parse_config(["--preset", "tiny", "--compile"])
    assert run.train.compile is True and run.to_dict()["train"]["compile"] is True  # run.json records it
    # Compiled and eager losses differ by float rounding only: a run may resume with either.
    identity = [run_identity(run, run.designs[0][1], SimpleNamespace(dp_world=1), train, "sha")
                for train in (run.train, replace(run.train, compile=False))]
    assert identity[0] == identity[1] and "compile" not in identity[0]


def test_compile_on_cpu_needs_a_cpp_compiler(tmp_path):
    from torch._inductor import config as inductor_config

    # config.patch, not monkeypatch: deleting an Inductor config entry (monkeypatch's undo of an
    # attribute it found missing on the proxy) hides it for the rest of the process.
    with inductor_config.patch({"cpp.cxx": (str(tmp_path / "no-such-c++"),)}), \
            pytest.raises(SystemExit, match=r"--compile on CPU needs a C\+\+ compiler"):
        cli.main(run_args(tmp_path, "no_cxx", "--designs", "B", "--device", "cpu", "--compile"))
    assert not (tmp_path / "runs" / "no_cxx" / "B").exists()


def test_study_preset_trains_three_seeds_of_the_default_designs():
    run = cli.parse_config(["--preset", "study"])
    members = cli.members(run)
    assert run.seeds == 3 and len(members) == 12
    assert [m[3] for m in members[:4]] == ["A@s1234", "B@s1234", "B+bias@s1234", "B+recenter@s1234"]
    assert {m[2].seed for m in members} == {1234, 1235, 1236}
    assert run.train == TrainConfig.from_preset("study")
    # The budget the README's study excerpt was measured with (changing it changes the results).
    assert (run.train.d_model, run.train.batch_size, run.train.seq_len, run.train.steps, run.train.lr) == \
        (96, 32, 128, 500, 8e-3)


def test_default_run_keeps_the_cpu_preset():
    """`make ab`'s numbers (README) come from these settings and one seed."""
    run = cli.parse_config(["--device", "cpu"])
    assert run.preset == "cpu" and run.seeds == 1 and len(cli.members(run)) == 4
    assert (run.train.d_model, run.train.n_layers, run.train.d_ff, run.train.seq_len, run.train.batch_size,
            run.train.steps, run.train.lr, run.train.warmup, run.train.telemetry_every) == \
        (96, 4, 384, 128, 16, 120, 3e-3, 12, 10)


@pytest.mark.parametrize("module", ["ffn.harness", "ffn.ab"])
def test_module_entry_points(module):
    done = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--designs" in done.stdout and "recenter" in done.stdout
