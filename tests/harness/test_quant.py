"""The quantization probes: weight-only int8/int4 and the int8 down-projection input."""

import pytest
import torch

from ffn.harness import designs, quant

from .tiny import TINY, tiny_batch, tiny_model

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
