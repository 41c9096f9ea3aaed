"""The A/B harness: model flags on both backends, telemetry integration, the int8 probe,
the design grammar, checkpoints/resume, DDP, and a tiny end-to-end run with its report."""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ffn
from ffn import ab, designs, probes, quant, telemetry
from ffn import data as textdata
from ffn.model import Design, ModelConfig, TransformerLM, ffn_param_count, gated_d_ff, shift_probe

TINY = dict(vocab_size=256, seq_len=16, d_model=16, n_layers=2, n_heads=2, d_ff=32)
SUMMARY_KEYS = {"input_mean", "input_mean_abs", "down_in_mean", "gate_preact_mean", "gate_preact_std",
                "gate_near_zero_frac", "gate_large_frac", "h_max_over_rms", "h_kurtosis", "h_outlier_frac"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads, and OpenMP threads spin-waiting on shared
    cores make each step many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(design, backend="ffn", seed=0, **sizes):
    torch.manual_seed(seed)
    return TransformerLM(ModelConfig(**{**TINY, **sizes}, design=design, backend=backend))


def tiny_batch(seed=1, batch=3, seq_len=TINY["seq_len"]):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (batch, seq_len), generator=g)
    return x, torch.roll(x, -1, dims=1)


def train_losses(model, steps=3, with_telemetry=False):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    x, y = tiny_batch()
    for _ in range(steps):
        stats = [] if with_telemetry else None
        _, loss = model(x, y, stats=stats)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


# ----------------------------------------------------------------------------- model
@pytest.mark.parametrize("d_model,d_ff,bias", [(16, 32, True), (128, 512, True), (128, 512, False),
                                                (512, 2048, True), (768, 3072, False), (100, 300, True)])
def test_gated_ffn_width_keeps_parameter_count_within_one_percent(d_model, d_ff, bias):
    width = gated_d_ff(d_model, d_ff, bias)
    assert abs(width - 2 * d_ff / 3) <= 1.5
    plain = ffn_param_count(d_model, d_ff, False, bias)
    assert abs(ffn_param_count(d_model, width, True, bias) - plain) / plain < 0.01


def test_gated_and_gelu_models_have_matching_parameter_counts():
    counts = {ffn_name: sum(p.numel() for p in tiny_model(Design(norm="rmsnorm", ffn=ffn_name),
                                                          d_model=64, d_ff=256).parameters())
              for ffn_name in ("gelu", "swiglu", "geglu", "reglu")}
    assert max(counts.values()) / min(counts.values()) < 1.01


COMBINATIONS = list(itertools.product(("layernorm", "rmsnorm"), (None, True, False),
                                      ("gelu", "swiglu", "geglu", "reglu"), ("pre", "post"),
                                      ("serial", "parallel")))


@pytest.mark.parametrize("norm,norm_bias,ffn_name,placement,layout", COMBINATIONS)
def test_every_flag_combination_trains_the_same_on_both_backends(norm, norm_bias, ffn_name, placement, layout):
    design = Design(norm=norm, ffn=ffn_name, norm_bias=norm_bias, placement=placement, layout=layout,
                    mean_shift=0.5)
    ours = train_losses(tiny_model(design, "ffn"), with_telemetry=True)
    plain = train_losses(tiny_model(design, "torch"))
    assert all(torch.isfinite(torch.tensor(ours)))
    assert ours[-1] < ours[0]
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(plain), rtol=1e-4, atol=1e-4)


def test_training_code_calls_the_ffn_ops():
    model = tiny_model(Design(norm="rmsnorm", ffn="swiglu"))
    x, y = tiny_batch()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        _, loss = model(x, y)
        loss.backward()
    names = {e.name for e in prof.events()}
    assert {"ffn::rms_norm", "ffn::swiglu", "ffn::_gated_ffn_bwd", "ffn::_rms_norm_bwd"} <= names


def test_norm_choices_build_the_right_modules():
    def norm_of(spec):
        return tiny_model(designs.parse_design(spec)).blocks[0].norm2

    assert isinstance(norm_of("A"), ffn.LayerNorm) and norm_of("A").bias is not None
    assert isinstance(norm_of("B"), ffn.RMSNorm) and norm_of("B").bias is None
    assert isinstance(norm_of("B+bias"), ffn.RMSNorm) and norm_of("B+bias").bias is not None
    assert isinstance(norm_of("B+recenter"), ffn.LayerNorm) and norm_of("B+recenter").bias is None
    assert isinstance(tiny_model(designs.parse_design("B")).blocks[0].ffn, ffn.SwiGLU)
    assert tiny_model(designs.parse_design("A+parallel")).blocks[0].norm2 is None


# ----------------------------------------------------------------------------- designs
def test_design_grammar():
    assert designs.parse_design("A") == Design(norm="layernorm", ffn="gelu")
    assert designs.parse_design("B") == Design(norm="rmsnorm", ffn="swiglu")
    assert designs.parse_design("B+recenter") == Design(norm="layernorm", ffn="swiglu", norm_bias=False)
    assert designs.parse_design("rms+gelu+bias+post+parallel+shift=1.5") == Design(
        norm="rmsnorm", ffn="gelu", norm_bias=True, placement="post", layout="parallel", mean_shift=1.5)
    base = Design(placement="post", mean_shift=2.0)
    assert designs.parse_design("ln+reglu", base) == Design(norm="layernorm", ffn="reglu", placement="post",
                                                            mean_shift=2.0)
    assert designs.describe(designs.parse_design("B+recenter")) == "ln+swiglu+nobias"
    assert designs.describe(designs.parse_design("B+bias+shift=1")) == "rms+swiglu+bias+shift=1"
    for bad in ("C", "rms", "gelu", "B+shift=x", ""):
        with pytest.raises(ValueError):
            designs.parse_design(bad)
    with pytest.raises(ValueError, match="twice"):
        designs.parse_designs("A,B,A")


# ----------------------------------------------------------------------------- telemetry
@pytest.mark.parametrize("spec", ["A", "B", "ln+geglu+post", "rms+reglu+parallel"])
def test_telemetry_has_every_key_for_every_layer_and_matches_the_torch_backend(spec):
    design = designs.parse_design(spec)
    x, y = tiny_batch()
    summaries = {}
    for backend in ("ffn", "torch"):
        stats = []
        tiny_model(design, backend)(x, y, stats=stats)
        assert len(stats) == TINY["n_layers"]
        summaries[backend] = [telemetry.summarize(s) for s in stats]
    for ours, plain in zip(summaries["ffn"], summaries["torch"]):
        assert set(ours) == SUMMARY_KEYS
        gated = design.ffn != "gelu"
        for key, value in ours.items():
            if key.startswith("gate_") and not gated:
                assert value != value, key  # NaN: not a gated FFN
            else:
                assert abs(value - plain[key]) <= 1e-4 * max(1.0, abs(plain[key])), key


def test_telemetry_does_not_change_the_loss():
    for spec in ("A", "B"):
        model = tiny_model(designs.parse_design(spec))
        x, y = tiny_batch()
        _, plain = model(x, y)
        _, observed = model(x, y, stats=[])
        assert torch.equal(plain, observed)


def test_telemetry_raw_sums_equal_the_reference_on_the_model_tensors():
    model = tiny_model(designs.parse_design("B"))
    block = model.blocks[0]
    h = torch.randn(2, TINY["seq_len"], TINY["d_model"])
    normed = block.norm2(h)
    stats = []
    block._ffn(normed, stats)
    _, preact = ffn.model.ffn_forward_with_preact(block.ffn, normed)
    expected = telemetry.reference_stats(normed, preact, "silu", True)
    torch.testing.assert_close(stats[0], expected, rtol=1e-6, atol=1e-6)


def test_mean_shift_moves_the_ffn_input_mean_under_rmsnorm_only():
    x, _ = tiny_batch()
    means = {}
    for spec in ("B", "B+recenter", "A"):
        for shift in (0.0, 3.0):
            stats = []
            tiny_model(designs.parse_design(f"{spec}+shift={shift}"))(x, stats=stats)
            means[spec, shift] = [telemetry.summarize(s) for s in stats]
    for layer in range(TINY["n_layers"]):
        # RMSNorm keeps a positive shift: the normalized input's mean moves up by a lot.
        assert means["B", 3.0][layer]["input_mean"] - means["B", 0.0][layer]["input_mean"] > 0.5
        # LayerNorm subtracts it: the input mean is unchanged up to rounding.
        for spec in ("B+recenter", "A"):
            assert abs(means[spec, 3.0][layer]["input_mean"] - means[spec, 0.0][layer]["input_mean"]) < 1e-5


def test_shift_probe_equals_training_with_the_shift_and_is_undone():
    x, y = tiny_batch()
    model = tiny_model(designs.parse_design("B"))
    _, before = model(x, y)
    with shift_probe(model, 2.0):
        _, probed = model(x, y)
    _, after = model(x, y)
    shifted_model = tiny_model(designs.parse_design("B+shift=2"))
    _, trained_shifted = shifted_model(x, y)
    assert torch.equal(before, after)
    assert torch.equal(probed, trained_shifted)
    assert not torch.equal(before, probed)


# ----------------------------------------------------------------------------- probes
def test_int8_quantization_of_a_known_matrix():
    w = torch.tensor([[1.0, -0.5, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0], [-254.0, 127.0, 1.0, 0.5]])
    q, scale = quant.quantize(w, bits=8)
    assert q.dtype == torch.int8
    torch.testing.assert_close(scale.squeeze(1), torch.tensor([1 / 127, 1.0, 2.0]))
    # 1.0*127 = 127, -0.5*127 = -63.5 -> -64 (half to even), 0.25*127 = 31.75 -> 32; row 3 in units of 2.
    assert q.tolist() == [[127, -64, 32, 0], [0, 0, 0, 0], [-127, 64, 0, 0]]
    torch.testing.assert_close(quant.dequantize(q, scale)[2], torch.tensor([-254.0, 128.0, 0.0, 0.0]))
    q4, scale4 = quant.quantize(w, bits=4)  # qmax 7
    assert q4[0, [0, 2, 3]].tolist() == [7, 2, 0] and scale4[2, 0] == pytest.approx(254 / 7)
    random_w = torch.randn(64, 48)
    q, scale = quant.quantize(random_w)
    err = (quant.dequantize(q, scale) - random_w).abs()
    assert (err <= scale / 2 + 1e-7).all() and q.abs().max() == 127


def test_quantization_probe_covers_every_ffn_weight_and_restores_them():
    model = tiny_model(designs.parse_design("B"))
    weights = quant.ffn_weights(model)
    assert len(weights) == 2 * TINY["n_layers"]
    before = [w.detach().clone() for w in weights]
    with quant.quantized_ffn_weights(model, bits=8):
        for w, orig in zip(weights, before):
            assert not torch.equal(w, orig)
            assert ((w - orig).abs() <= orig.abs().amax(1, keepdim=True) / 127 / 2 + 1e-7).all()
    assert all(torch.equal(w, orig) for w, orig in zip(weights, before))


def test_quantized_down_input_probe():
    model = tiny_model(designs.parse_design("B"))
    x, y = tiny_batch()
    _, base = model(x, y)
    with quant.quantized_down_input(model, bits=8):
        _, q8 = model(x, y)
    with quant.quantized_down_input(model, bits=2):
        _, q2 = model(x, y)
    _, after = model(x, y)
    assert torch.equal(base, after)
    assert 0 < abs(q8 - base) < abs(q2 - base)
    rows = torch.tensor([[0.6, -1.0, 0.25], [3.0, 0.0, -3.0]])
    torch.testing.assert_close(quant.fake_quantize_rows(rows, bits=2), torch.tensor([[1.0, -1.0, 0.0],
                                                                                    [3.0, 0.0, -3.0]]))


def test_paired_telemetry_overhead():
    times = [9.0, 1.0, 1.5, 1.0, 1.0, 2.0, 1.0, 1.0, 1.5, 1.0]
    flags = [True, False, True, False, False, True, False, False, True, False]
    # telemetry steps 2, 5, 8 against their neighbours: 1.5/1, 2/1, 1.5/1 -> median 1.5
    assert ab.paired_overhead(times, flags, skip=1) == pytest.approx(0.5)
    assert ab.paired_overhead(times, [False] * 10) is None


def test_shift_offsets_find_the_shift_under_rmsnorm_and_none_under_layernorm():
    batches = [tiny_batch(seed=s)[0] for s in range(2)]
    offsets = {spec: probes.shift_offsets(tiny_model(designs.parse_design(spec)), batches, 2.0)
               for spec in ("B", "B+recenter", "rms+gelu", "A")}
    for layer in range(TINY["n_layers"]):
        b = offsets["B"][layer]
        assert b["input_offset"] > 0.5 and b["gate_offset"] > 0.05 and b["down_in_offset"] > 0.05
        assert offsets["rms+gelu"][layer]["down_in_offset"] > 0.05
        assert offsets["rms+gelu"][layer]["gate_offset"] != offsets["rms+gelu"][layer]["gate_offset"]  # NaN
        for spec in ("B+recenter", "A"):
            for key in ("input_offset", "down_in_offset"):
                assert offsets[spec][layer][key] < 1e-5, (spec, key)
        assert offsets["B+recenter"][layer]["gate_offset"] < 1e-5


def test_shift_offsets_of_a_known_shift():
    """One RMSNorm + GELU layer without gain: the FFN input's per-feature offset is known exactly."""
    model = tiny_model(designs.parse_design("rms+gelu"), n_layers=1)
    block = model.blocks[0]
    captured = []
    block.ffn_norm.register_forward_pre_hook(lambda mod, args: captured.append(args[0].detach().clone()))
    x = tiny_batch()[0]
    model(x)
    residual = captured[0].reshape(-1, TINY["d_model"])
    c = 1.5
    shifted = ffn.reference.rms_norm(residual + c, block.ffn_norm.weight, None, 1e-6)
    base = ffn.reference.rms_norm(residual, block.ffn_norm.weight, None, 1e-6)
    expected = (shifted - base).mean(0).abs().mean() / base.square().mean().sqrt()
    got = probes.shift_offsets(model, [x], [c])[0]
    assert got["input_offset"] == pytest.approx(expected.item(), rel=1e-4)
    rms = probes.norm_input_rms(model, [x])
    assert rms == [pytest.approx(residual.square().mean().sqrt().item(), rel=1e-5)]


# ----------------------------------------------------------------------------- data
def test_data_split_batches_and_unigram_entropy(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"ab" * 500)
    data = textdata.TextData(path)
    assert len(data.train) == 900 and len(data.val) == 100
    assert textdata.unigram_entropy(data.val) == pytest.approx(torch.log(torch.tensor(2.0)).item())
    first = textdata.batch_offsets(900, 16, 4, seed=3, step=7)
    assert torch.equal(first, textdata.batch_offsets(900, 16, 4, seed=3, step=7))
    assert not torch.equal(first, textdata.batch_offsets(900, 16, 4, seed=3, step=8))
    x, y = textdata.get_batch(data.train, first, 16, "cpu")
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert textdata.decode(textdata.encode("héllo")) == "héllo"
    with pytest.raises(ValueError, match="seq_len"):
        data.check_seq_len(200)


# ----------------------------------------------------------------------------- runs
def write_corpus(path):
    words = ("the king and queen of england speak to their lords in the castle while a storm "
             "rises over the sea and the fool sings of love and death").split()
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, len(words), (6000,), generator=g).tolist()
    path.write_text(" ".join(words[i] for i in idx))
    return path


def run_args(tmp_path, name, *extra):
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        write_corpus(corpus)
    return ["--preset", "tiny", "--data", str(corpus), "--out", str(tmp_path / "runs"), "--name", name,
            "--no-progress", *extra]


def read_metrics(tmp_path, name, kind="train"):
    lines = (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_end_to_end_tiny_run_writes_metrics_tensorboard_and_report(tmp_path, capsys):
    assert ab.main(run_args(tmp_path, "e2e", "--designs", "A,B,B+recenter", "--steps", "6")) == 0
    run_dir = tmp_path / "runs" / "e2e"
    out = capsys.readouterr().out
    assert "unigram entropy of val" in out and "int8" in out and "shift probe" in out
    for label in ("A", "B", "B+recenter"):
        result = json.loads((run_dir / label / "result.json").read_text())
        assert len(result["telemetry_val"]) == 2 and set(result["telemetry_val"][0]) == SUMMARY_KEYS
        probe = result["shift_probe"]
        assert probe["shift_rms_units"] == ab.DEFAULT_PROBE_SHIFT
        assert len(probe["offsets"]) == len(probe["shifts"]) == 2
        assert probe["shifts"] == [ab.DEFAULT_PROBE_SHIFT * r for r in probe["norm_input_rms"]]
        assert result["int8_delta"] == result["int8_val_loss"] - result["final_val_loss"]
        assert result["int4_delta"] == result["int4_val_loss"] - result["final_val_loss"]
        assert result["int8_h_delta"] == result["int8_h_val_loss"] - result["final_val_loss"]
        assert list((run_dir / "tb" / label).glob("events.out.tfevents.*"))
    tel = read_metrics(tmp_path, "e2e", "telemetry")
    assert {(r["design"], r["layer"]) for r in tel} == {(d, layer) for d in ("A", "B", "B+recenter")
                                                        for layer in range(2)}
    report = (run_dir / "report.md").read_text()
    for needle in ("## Results", "## Findings", "## Telemetry per layer", "## Mean-shift probe", "Re-centering",
                   "loss.png", "telemetry.png", "shift_probe.png"):
        assert needle in report
    for png in ("loss.png", "telemetry.png", "shift_probe.png"):
        assert (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_gives_bit_identical_losses(tmp_path):
    common = ("--designs", "A,B", "--steps", "6", "--ckpt-every", "2", "--no-report")
    assert ab.main(run_args(tmp_path, "straight", *common)) == 0
    assert ab.main(run_args(tmp_path, "resumed", *common, "--stop-at", "3")) == 0  # dies after step 3
    assert not (tmp_path / "runs" / "resumed" / "A" / "result.json").exists()
    assert ab.main(run_args(tmp_path, "resumed", *common, "--resume")) == 0
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


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    ab.atomic_torch_save({"step": 1}, path)

    def dies_midway(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        ab.atomic_torch_save({"step": 2}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}


def test_resume_refuses_a_checkpoint_trained_with_other_settings(tmp_path):
    common = ("--designs", "B", "--ckpt-every", "2", "--no-report")
    assert ab.main(run_args(tmp_path, "changed", *common, "--steps", "6", "--stop-at", "2")) == 0
    with pytest.raises(SystemExit, match=r"steps: 6 -> 8"):
        ab.main(run_args(tmp_path, "changed", *common, "--steps", "8", "--resume"))


def test_ddp_with_two_processes_matches_one_process(tmp_path):
    common = ("--designs", "B", "--steps", "4", "--no-report")
    assert ab.main(run_args(tmp_path, "single", *common, "--batch-size", "4")) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "ffn.ab", *run_args(tmp_path, "ddp", *common, "--batch-size", "2")]
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


def test_cli_rejects_conflicting_design_flags(tmp_path):
    with pytest.raises(SystemExit):
        ab.resolve_args(["--designs", "A", "--norm", "rmsnorm", "--ffn", "swiglu"])
    args = ab.resolve_args(["--norm", "rmsnorm", "--ffn", "gelu", "--norm-bias", "--placement", "post"])
    assert args.design_list == [("rmsnorm+gelu", Design(norm="rmsnorm", ffn="gelu", norm_bias=True,
                                                       placement="post"))]


def test_recenter_flag_puts_mean_subtraction_back_in_every_design():
    args = ab.resolve_args(["--designs", "A,B", "--recenter", "--norm-bias"])
    assert args.design_list == [("A+recenter", Design(norm="layernorm", ffn="gelu", norm_bias=False)),
                                ("B+recenter", Design(norm="layernorm", ffn="swiglu", norm_bias=False))]
    args = ab.resolve_args(["--norm", "rmsnorm", "--ffn", "swiglu", "--recenter"])
    assert args.design_list == [("rmsnorm+swiglu+recenter", designs.parse_design("B+recenter"))]
