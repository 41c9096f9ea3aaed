"""The outlier probes (kurtosis of per-neuron rms, max/median, gate/up alignment, gate
saturation relative to the gate's scale) and the W8A8 quantization probes, against
hand-computed values on tiny tensors."""

import math

import pytest
import torch
from scipy import stats as scistats

from ffn.harness import cli, designs, outliers, probes, quant

from .tiny import read_metrics, run_args, tiny_batch, tiny_model


class IdentityFFN:
    """The FFN interface with W_in = I and a ReLU, so h = x for the non-negative inputs used
    here, and a given down projection."""

    gated = False
    activation = "relu"

    def __init__(self, w_out):
        self.w_in = torch.eye(w_out.shape[1])
        self.w_out = w_out

    def in_proj(self):
        return self.w_in, None

    def out_proj(self):
        return self.w_out, None


def test_kurtosis_and_max_over_median_by_hand():
    # 1, 2, 3, 4: central moments m2 = 1.25, m4 = 2.5625 -> 2.5625 / 1.5625 = 1.64
    assert outliers.kurtosis(torch.tensor([1.0, 2.0, 3.0, 4.0])) == pytest.approx(1.64)
    v = torch.tensor([0.1, 0.2, 0.15, 5.0, 0.12])
    assert outliers.kurtosis(v) == pytest.approx(scistats.kurtosis(v.numpy(), fisher=False), rel=1e-6)
    # |.| = 1, 2, 3, 0.5: max 3, (lower) median 1
    assert outliers.max_over_median(torch.tensor([[1.0, -2.0], [3.0, 0.5]])) == pytest.approx(3.0)


def test_layer_outliers_of_a_known_input():
    x = torch.tensor([[3.0, 0.0, 1.0, 1.0], [4.0, 0.0, 1.0, 1.0]])
    # per-neuron rms over the 2 tokens: sqrt(12.5), 0, 1, 1
    r = torch.tensor([math.sqrt(12.5), 0.0, 1.0, 1.0])
    d = r - r.mean()
    expected = float(d.pow(4).mean() / d.square().mean() ** 2)
    got = outliers.layer_outliers(IdentityFFN(torch.eye(4)), x, x * 10, with_quant=False)
    assert got["h_rms_kurtosis"] == pytest.approx(expected, rel=1e-6)
    assert got["h_max_over_median"] == pytest.approx(4.0)  # sorted |x|: 0 0 1 1 1 1 3 4 -> lower median 1
    assert got["resid_max_over_median"] == pytest.approx(4.0)
    assert math.isnan(got["gate_up_cos"])


def test_gate_saturation_relative_to_the_gate_scale_by_hand():
    # relu: a = z. 97 ones, one 0, one 10, one 20: rms(a) = sqrt((97 + 100 + 400) / 100) = sqrt(5.97)
    z = torch.tensor([1.0] * 97 + [0.0, 10.0, 20.0])
    s = math.sqrt(5.97)  # 2.443: 10 / s = 4.09 (> 4), 20 / s = 8.19 (> 8)
    got = outliers.gate_saturation(z.reshape(10, 10), "relu")
    assert got["gate_rel_near_zero_frac"] == pytest.approx(0.01)
    assert got["gate_rel_large4_frac"] == pytest.approx(0.02)
    assert got["gate_rel_large8_frac"] == pytest.approx(0.01)
    assert got["gate_rel_p99"] == pytest.approx(10 / s, rel=1e-6)  # the 99th of 100 sorted values
    assert got["gate_rel_max"] == pytest.approx(20 / s, rel=1e-6)
    # z: mean 1.27, std 2.087 (population): 10 and 20 lie beyond 4 std (8.35) of the mean, 0 does not
    assert got["gate_preact_tail4_frac"] == pytest.approx(0.02)


def test_gate_saturation_counts_near_zero_activations_of_negative_preactivations():
    # silu(-30) = -2.8e-12: |act| near zero although |z| is the largest of all
    z = torch.tensor([-30.0, 1.0, 1.0, 1.0])
    got = outliers.gate_saturation(z, "silu")
    a = torch.nn.functional.silu(z).abs()
    assert got["gate_rel_near_zero_frac"] == pytest.approx(0.25)
    assert got["gate_rel_max"] == pytest.approx(float(a.max() / a.square().mean().sqrt()), rel=1e-6)
    assert got["gate_rel_large4_frac"] == 0.0 and got["gate_preact_tail4_frac"] == 0.0


def test_gate_saturation_is_nan_without_a_gate_or_a_scale():
    for gate in (None, torch.zeros(0, 4)):
        assert all(math.isnan(v) for v in outliers.gate_saturation(gate, "silu").values())
    flat = outliers.gate_saturation(torch.full((4, 4), -50.0), "relu")  # act 0 everywhere, z constant
    assert set(flat) == set(outliers.GATE_KEYS) and all(math.isnan(v) for v in flat.values())


def test_training_logs_relative_gate_saturation_per_layer_at_every_telemetry_step(tmp_path):
    assert cli.main(run_args(tmp_path, "gates", "--designs", "A,B", "--no-report")) == 0
    records = read_metrics(tmp_path, "gates", "outliers")
    # tiny preset: 4 steps, telemetry every 2 and at the last step -> steps 0, 2, 3; 2 layers
    for design, gated in (("A", False), ("B", True)):
        mine = [r for r in records if r["design"] == design]
        assert sorted((r["step"], r["layer"]) for r in mine) == [(s, layer) for s in (0, 2, 3) for layer in (0, 1)]
        for r in mine:
            values = [r[key] for key in outliers.GATE_KEYS]
            if gated:
                assert 0 <= r["gate_rel_large4_frac"] <= 1 and 1 <= r["gate_rel_p99"] <= r["gate_rel_max"]
            else:
                assert all(math.isnan(v) for v in values)


def test_gate_up_alignment_of_known_rows():
    model = tiny_model(designs.parse_design("B"), n_layers=1)
    ffn = model.blocks[0].ffn
    w, _ = ffn.in_proj()
    with torch.no_grad():
        w.zero_()
        f = w.shape[0] // 2
        w[0, 0] = w[f, 0] = 1.0  # unit 0: gate (1, 0, ..), up (1, 0, ..): cos 1
        w[1:f, 0] = w[1:f, 1] = 1.0
        w[f + 1:, 1] = 1.0  # units 1..: gate (1, 1), up (0, 1): cos 1/sqrt(2)
    mean, top = outliers.gate_up_alignment(ffn)
    assert mean == pytest.approx((1 + (f - 1) / math.sqrt(2)) / f, rel=1e-6) and top == pytest.approx(1.0)


def test_static_activation_quantization_by_hand():
    x = torch.tensor([[0.5, -1.27], [2.54, 0.0]])
    # per tensor: scale 2.54 / 127 = 0.02; -1.27 / 0.02 = -63.5 -> -64 (half to even) -> -1.28
    torch.testing.assert_close(quant.fake_quantize_static(x, x.abs().max()), torch.tensor([[0.5, -1.28], [2.54, 0.0]]))
    # per channel: scales 0.02 and 0.01: exact
    torch.testing.assert_close(quant.fake_quantize_static(x, x.abs().amax(0)), x)
    # beyond the calibrated range: clamped to 127 * scale
    assert quant.fake_quantize_static(torch.tensor([5.0]), torch.tensor(2.54)).item() == pytest.approx(2.54)
    # SmoothQuant: s_j = max|X_j|^0.5 / max|W_:,j|^0.5 with max|X| = (4, 1), max|W| columns = (2, 4)
    s = quant.smooth_scales(torch.tensor([4.0, 1.0]), torch.tensor([[1.0, 4.0], [-2.0, 1.0]]))
    torch.testing.assert_close(s, torch.tensor([math.sqrt(2.0), 0.5]))


def test_smoothing_helps_when_one_input_channel_carries_an_outlier():
    torch.manual_seed(0)
    ffn = IdentityFFN(torch.randn(6, 8))
    x = torch.randn(64, 8).abs()
    x[:, 3] *= 100  # an outlier channel
    calib = quant.channel_absmax(ffn, x)
    ref = probes.down(ffn, x)
    err = {m: float((quant.w8a8_output(ffn, x, calib, m) - ref).norm() / ref.norm()) for m in quant.W8A8_MODES}
    assert err["smooth"] < err["tensor"] / 3 and err["channel"] < err["tensor"] / 3
    assert torch.equal(ffn.w_out, ffn.out_proj()[0])  # weights restored


def test_w8a8_probe_changes_the_loss_a_little_and_restores_the_model():
    model = tiny_model(designs.parse_design("B"))
    x, y = tiny_batch()
    before = [p.detach().clone() for p in model.parameters()]
    _, base = model(x, y)
    calib = quant.calibrate(model, [x])
    for mode in quant.W8A8_MODES:
        with quant.quantized_w8a8(model, calib, mode):
            _, q = model(x, y)
        assert 0 < abs(q - base) < 0.05, mode
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    tel = outliers.eval_outliers(model, [x])
    assert len(tel) == 2 and set(tel[0]) == set(outliers.OUTLIER_KEYS)
    assert 0 < tel[0]["w8a8_tensor_err"] < 0.1 and -1 <= tel[0]["gate_up_cos"] <= 1
