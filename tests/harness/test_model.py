"""The Transformer built from a Design: every flag on both backends, the ffn ops in training, telemetry from the model's own tensors, the mean shift."""

import itertools

import pytest
import torch

import ffn
from ffn import telemetry
from ffn.harness import designs
from ffn.harness.designs import Design
from ffn.harness.model import ResidualRMSNorm, add_norm, ffn_param_count, gated_d_ff, shift_probe

from .tiny import SUMMARY_KEYS, TINY, read_metrics, run_args, tiny_batch, tiny_model, train_losses


@pytest.mark.parametrize("d_model,d_ff,bias", [(16, 32, True), (128, 512, True), (128, 512, False),
                                                (512, 2048, True), (768, 3072, False), (100, 300, True)])
def test_gated_ffn_width_keeps_parameter_count_within_one_percent(d_model, d_ff, bias):
    width = gated_d_ff(d_model, d_ff, bias)
    assert abs(width - 2 * d_ff / 3) <= 1.5
    plain = ffn_param_count(d_model, d_ff, False, bias)
    assert abs(ffn_param_count(d_model, width, True, bias) - plain) / plain < 0.01


@pytest.mark.parametrize("cls", list(ffn.modules.FFN_MODULES.values()), ids=lambda c: c.__name__)
@pytest.mark.parametrize("bias", (True, False))
def test_ffn_param_count_is_the_modules_count(cls, bias):
    module = cls(16, 24, bias=bias)
    assert sum(p.numel() for p in module.parameters()) == ffn_param_count(16, 24, module.gated, bias)


def test_gated_and_gelu_models_have_matching_parameter_counts():
    counts = {ffn_name: sum(p.numel() for p in tiny_model(Design(norm="rmsnorm", ffn=ffn_name),
                                                          d_model=64, d_ff=256).parameters())
              for ffn_name in designs.FFNS}
    assert max(counts.values()) / min(counts.values()) < 1.01


COMBINATIONS = list(itertools.product(("layernorm", "rmsnorm"), (None, True, False),
                                      designs.FFNS, ("pre", "post"),
                                      ("serial", "parallel"), (0.0, 0.5)))


@pytest.mark.parametrize("norm,norm_bias,ffn_name,placement,layout,mean_shift", COMBINATIONS)
def test_every_flag_combination_trains_the_same_on_both_backends(norm, norm_bias, ffn_name, placement, layout,
                                                                 mean_shift):
    design = Design(norm=norm, ffn=ffn_name, norm_bias=norm_bias, placement=placement, layout=layout,
                    mean_shift=mean_shift)
    ours = train_losses(tiny_model(design, "ffn"), with_telemetry=True)
    plain = train_losses(tiny_model(design, "torch"))
    assert all(torch.isfinite(torch.tensor(ours)))
    assert ours[-1] < ours[0]
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(plain), rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore:Warning. Profiler clears events")  # torch 2.11's profiler, on every use
def test_training_code_calls_the_ffn_ops():
    model = tiny_model(Design(norm="rmsnorm", ffn="swiglu"))
    x, y = tiny_batch()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        _, loss = model(x, y)
        loss.backward()
    names = {e.name for e in prof.events()}
    assert {"ffn::rms_norm", "ffn::swiglu", "ffn::_gated_ffn_bwd", "ffn::_rms_norm_bwd"} <= names


def norm_op_calls(model, x, y):
    """How often each ffn norm op (plain or fused with the residual add) runs in forward."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(x, y)
    names = [e.name for e in prof.events()]
    counts = {op: names.count(f"ffn::{op}") for op in ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm")}
    return {op: n for op, n in counts.items() if n}


# spec -> (plain norm calls, fused add + norm calls) of the 2-layer model: a pre-norm serial
# model fuses every norm after the first, except the FFN norms a mean shift enters.
FUSED_CALLS = {"A": (1, 4), "B": (1, 4), "B+bias": (1, 4), "B+recenter": (1, 4), "B+shift=1": (3, 2),
               "B+vshift=1": (3, 2), "A+post": (4, 0), "B+parallel": (3, 0), "A+post+parallel": (2, 0)}


@pytest.mark.parametrize("spec", list(FUSED_CALLS))
def test_pre_norm_serial_blocks_fuse_the_residual_add_with_the_same_numbers(spec):
    design = designs.parse_design(spec)
    x, y = tiny_batch()
    model = tiny_model(design)
    op = designs.NORMS[design.norm].op
    plain, fused = FUSED_CALLS[spec]
    assert norm_op_calls(model, x, y) == {op: plain, **({f"add_{op}": fused} if fused else {})}
    steps = {}
    for watched in (False, True):  # a hook on a norm makes the block add apart (it must see the norm's input)
        model = tiny_model(design)
        hooks = [m.register_forward_pre_hook(lambda mod, args: None) for m in model.modules()
                 if isinstance(m, (ffn.LayerNorm, ffn.RMSNorm))] if watched else []
        if watched:
            assert norm_op_calls(model, x, y) == {op: plain + fused}
        _, loss = model(x, y, stats=[])
        loss.backward()
        steps[watched] = [loss, *(p.grad for p in model.parameters())]
        for hook in hooks:
            hook.remove()
    assert all(torch.equal(a, b) for a, b in zip(steps[False], steps[True]))


def test_a_branch_of_another_dtype_is_added_apart_with_type_promotion():
    """Under autocast a bf16 attention output meets the float32 residual stream: the fused op
    takes one dtype, so the add is made apart and promotes, as the unfused model's does."""
    norm = ResidualRMSNorm(8, eps=1e-6)
    x, branch = torch.randn(4, 8), torch.randn(4, 8).bfloat16()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y, s = add_norm(norm, x, branch)
    assert "ffn::add_rms_norm" not in {e.name for e in prof.events()}
    assert s.dtype == torch.float32 and torch.equal(s, x + branch) and torch.equal(y, norm(x + branch))
    fused_y, fused_s = add_norm(norm, x, branch.float())
    assert torch.equal(fused_s, s) and torch.equal(fused_y, y)


def test_fused_norms_keep_the_state_dict_of_the_plain_ones():
    for spec in ("A", "B+bias"):
        design = designs.parse_design(spec)
        ours, plain = tiny_model(design, "ffn"), tiny_model(design, "torch")
        assert isinstance(ours.blocks[0].norm2, ffn.AddLayerNorm if spec == "A" else ffn.AddRMSNorm)
        assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
        plain.load_state_dict(ours.state_dict())


def test_norm_choices_build_the_right_modules():
    def norm_of(spec):
        return tiny_model(designs.parse_design(spec)).blocks[0].norm2

    assert isinstance(norm_of("A"), ffn.LayerNorm) and norm_of("A").bias is not None
    assert isinstance(norm_of("B"), ffn.RMSNorm) and norm_of("B").bias is None
    assert isinstance(norm_of("B+bias"), ffn.RMSNorm) and norm_of("B+bias").bias is not None
    assert isinstance(norm_of("B+recenter"), ffn.LayerNorm) and norm_of("B+recenter").bias is None
    assert isinstance(tiny_model(designs.parse_design("B")).blocks[0].ffn, ffn.SwiGLU)
    assert tiny_model(designs.parse_design("A+parallel")).blocks[0].norm2 is None


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
    _, preact = block.ffn.forward_with_preact(normed)
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


def test_per_sequence_shift_is_deterministic_log_normal_and_applied_per_sequence():
    import torch

    from ffn.harness import designs
    from ffn.harness.model import sequence_multipliers, var_shift_probe

    from .tiny import tiny_batch, tiny_model

    assert designs.parse_design("B+vshift=2").var_shift == 2.0
    assert designs.describe(designs.parse_design("B+vshift=2")) == "rms+swiglu+vshift=2"
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 256, (6000, 16), generator=g)
    m = sequence_multipliers(idx).flatten()
    assert torch.equal(m, sequence_multipliers(idx).flatten())
    assert abs(m.mean().item() - 1) < 0.1 and abs(m.median().item() - 0.6065) < 0.05
    assert abs(m.log().std().item() - 1) < 0.05
    model = tiny_model(designs.parse_design("B"))
    x, y = tiny_batch(batch=4)
    _, base = model(x, y)
    seen = []
    model.blocks[0].ffn_norm.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    with var_shift_probe(model, 1.0):
        logits_shifted = model(x)
    model(x)
    mult = sequence_multipliers(x).flatten()
    torch.testing.assert_close((seen[0] - seen[1]).mean((1, 2)), mult)  # sequence b got 1.0 * m_b
    assert model.blocks[0].var_shift == 0.0 and torch.equal(model(x, y)[1], base)
    assert not torch.equal(logits_shifted, model(x))
