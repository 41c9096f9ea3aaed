"""Where a mean shift arrives: the shift offsets and the norm input rms."""

import pytest
import torch

import ffn
from ffn.harness import designs, probes

from .tiny import TINY, tiny_batch, tiny_model


# Every FFN module, each activation and bias setting once.
FFN_CASES = [
    (ffn.GeluFFN, {}),
    (ffn.GeluFFN, {"bias": False, "approximate": "tanh"}),
    (ffn.ReluFFN, {}),
    (ffn.SwiGLU, {"bias": True}),
    (ffn.GeGLU, {}),
    (ffn.GeGLU, {"approximate": "tanh"}),
    (ffn.ReGLU, {"bias": True}),
]


@pytest.mark.parametrize("backend", ("ffn", "torch"))
@pytest.mark.parametrize("cls,kwargs", FFN_CASES, ids=[f"{c.__name__}-{i}" for i, (c, _) in enumerate(FFN_CASES)])
def test_hidden_and_down_split_the_ffn_at_h(cls, kwargs, backend):
    """probes.hidden / probes.down, from the FFN interface alone, compose to the module's forward."""
    torch.manual_seed(0)
    module = cls(16, 24, backend=backend, **kwargs)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + 1.0)
    x = torch.randn(2, 5, 16)
    out, preact = module.forward_with_preact(x)
    gate, h = probes.hidden(module, x)
    assert h.dtype == torch.float32 and h.shape == (2, 5, 24)
    if module.gated:
        torch.testing.assert_close(gate, preact.reshape(2, 5, -1)[..., :24])
    else:
        assert gate is None
    torch.testing.assert_close(probes.down(module, h), out, rtol=1e-5, atol=1e-6)


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
