"""Where a mean shift arrives: the shift offsets and the norm input rms."""

import pytest

import ffn
from ffn.harness import designs, probes

from .tiny import TINY, tiny_batch, tiny_model

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
