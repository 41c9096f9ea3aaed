"""ffn_stats (per-layer FFN telemetry): known answers, the float64 reference, combine, opcheck."""

import math

import pytest
import torch

import ffn
from ffn import telemetry
from ffn.telemetry import STAT_FIELDS, combine, reference_stats, summarize

ACTIVATIONS = list(ffn.activations.ACTIVATIONS)
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
FIELD = {name: i for i, name in enumerate(STAT_FIELDS)}
COUNT_FIELDS = ["tokens", "h_count", "gate_count", "gate_near_zero", "gate_large", "h_outliers"]


def _stats(x, preact, activation, gated, **kw):
    return ffn.ops.ffn_stats(x, preact, activation, gated, **kw)


def _scales(ref):
    """Per-field magnitude that bounds the rounding error of a sum (odd powers may cancel)."""
    r = {name: abs(ref[i].item()) for i, name in enumerate(STAT_FIELDS)}
    scale = dict(r)
    scale["input_row_mean_sum"] = r["input_row_mean_abs_sum"]
    scale["h_sum"] = math.sqrt(r["h_count"] * r["h_sq_sum"])  # >= sum |h|
    scale["h_cube_sum"] = math.sqrt(r["h_sq_sum"] * r["h_quad_sum"])  # >= sum |h|^3
    scale["gate_sum"] = math.sqrt(r["gate_count"] * r["gate_sq_sum"])
    return scale


def assert_stats_close(actual, expected, rtol):
    actual, expected = actual.cpu(), expected.cpu()
    assert actual.dtype == torch.float64 and actual.shape == (len(STAT_FIELDS),)
    scale = _scales(expected)
    for i, name in enumerate(STAT_FIELDS):
        a, e = actual[i].item(), expected[i].item()
        if name in COUNT_FIELDS:
            assert a == e, f"{name}: {a} != {e}"
        else:
            assert abs(a - e) <= rtol * scale[name] + 1e-300, f"{name}: {a} vs {e} (scale {scale[name]})"


def _rtol(dtype):
    # Inputs are exact in float32; the kernel computes in float32 (float64 for float64).
    # Worst seen: 4e-16 (float64), 1.3e-7 (others); a few ulp per element of h^4 bound it.
    return 1e-13 if dtype == torch.float64 else 1e-6


def _random_inputs(rows, d, d_ff, gated, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d, generator=g) + 0.3
    preact = torch.randn(rows, (2 if gated else 1) * d_ff, generator=g) * 1.5
    # Heavy tail: a few large entries, so there are outliers and saturated gates to count.
    spikes = torch.rand(preact.shape, generator=g) < 0.01
    preact = torch.where(spikes, preact * 8, preact)
    return x.to(device, dtype), preact.to(device, dtype)


# ----------------------------------------------------------------------------- known answers
def test_mean_shift_gives_known_input_mean(device):
    g = torch.Generator().manual_seed(1)
    rows, d, c = 64, 96, 0.75
    noise = torch.randn(rows, d, generator=g, dtype=torch.float64)
    x = noise - noise.mean(-1, keepdim=True) + c  # every token's feature mean is exactly c
    preact = torch.randn(rows, 32, generator=g, dtype=torch.float64)
    s = summarize(_stats(x.to(device), preact.to(device), "gelu", False))
    assert s["input_mean"] == pytest.approx(c, abs=1e-12)
    assert s["input_mean_abs"] == pytest.approx(c, abs=1e-12)
    # Half the tokens shifted by -c: the means cancel, the absolute means do not.
    x[::2] -= 2 * c
    s = summarize(_stats(x.to(device), preact.to(device), "gelu", False))
    assert s["input_mean"] == pytest.approx(0.0, abs=1e-12)
    assert s["input_mean_abs"] == pytest.approx(c, abs=1e-12)


def test_gate_saturation_shares(device):
    rows, d_ff = 40, 50
    n = rows * d_ff
    k_near, k_large = 300, 170
    gate = torch.full((n,), 2.0)  # silu(2) = 1.76: neither near zero nor large
    gate[:k_near] = 0.001  # silu(0.001) = 0.0005 < 0.01
    gate[k_near : k_near + k_large] = 10.0  # silu(10) = 9.9995 > 6
    gate = gate[torch.randperm(n, generator=torch.Generator().manual_seed(2))].view(rows, d_ff)
    preact = torch.cat([gate, torch.ones(rows, d_ff)], dim=1).to(device)
    x = torch.randn(rows, 16).to(device)
    s = summarize(_stats(x, preact, "silu", True))
    assert s["gate_near_zero_frac"] == k_near / n
    assert s["gate_large_frac"] == k_large / n
    values = [0.001] * k_near + [10.0] * k_large + [2.0] * (n - k_near - k_large)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / n)
    assert s["gate_preact_mean"] == pytest.approx(mean, rel=1e-6)
    assert s["gate_preact_std"] == pytest.approx(std, rel=1e-5)


def test_single_planted_outlier(device):
    rows, d_ff, big = 64, 64, 50.0
    n = rows * d_ff
    preact = torch.ones(rows, d_ff)
    preact[17, 33] = big  # relu: h is 1 everywhere and `big` once
    s = summarize(_stats(torch.randn(rows, 8).to(device), preact.to(device), "relu", False))
    rms = math.sqrt((n - 1 + big**2) / n)
    assert big > 6 * rms > 1
    assert s["h_max_over_rms"] == pytest.approx(big / rms, rel=1e-6)
    assert s["h_outlier_frac"] == 1 / n
    mean = (n - 1 + big) / n
    var = ((n - 1) * (1 - mean) ** 2 + (big - mean) ** 2) / n
    m4 = ((n - 1) * (1 - mean) ** 4 + (big - mean) ** 4) / n
    assert s["h_kurtosis"] == pytest.approx(m4 / var**2, rel=1e-5)
    assert s["down_in_mean"] == pytest.approx(mean, rel=1e-6)
    # Gate entries are undefined for a plain FFN.
    for key in ("gate_preact_mean", "gate_preact_std", "gate_near_zero_frac", "gate_large_frac"):
        assert math.isnan(s[key])


def test_gaussian_kurtosis_is_three(device):
    g = torch.Generator().manual_seed(3)
    rows, d_ff = 512, 128
    up = torch.randn(rows, d_ff, generator=g, dtype=torch.float64)
    preact = torch.cat([torch.ones(rows, d_ff, dtype=torch.float64), up], dim=1)  # relu(1) * up = up
    s = summarize(_stats(torch.randn(rows, 8, dtype=torch.float64).to(device), preact.to(device), "relu", True))
    centered = up - up.mean()
    sample_kurtosis = (centered**4).mean() / (centered**2).mean() ** 2
    assert s["h_kurtosis"] == pytest.approx(sample_kurtosis.item(), rel=1e-9)
    assert abs(s["h_kurtosis"] - 3) < 0.1  # standard error sqrt(24/n) = 0.02


# ----------------------------------------------------------------------------- against the reference
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_matches_reference(activation, gated, dtype, device):
    # Odd sizes: partial vector steps, uneven row chunks.
    x, preact = _random_inputs(rows=37, d=50, d_ff=45, gated=gated, dtype=dtype, device=device)
    out = _stats(x, preact, activation, gated)
    ref = reference_stats(x, preact, activation, gated)
    assert out.device == x.device
    assert out[FIELD["h_outliers"]] > 0 and (not gated or out[FIELD["gate_large"]] > 0)
    assert_stats_close(out, ref, _rtol(dtype))


def test_thresholds_are_arguments(device):
    x, preact = _random_inputs(rows=33, d=20, d_ff=70, gated=True, dtype=torch.float32, device=device)
    kw = dict(near_zero=0.2, large=2.5, outlier=3.0)
    out = _stats(x, preact, "gelu", True, **kw)
    assert_stats_close(out, reference_stats(x, preact, "gelu", True, **kw), _rtol(torch.float32))
    assert not torch.equal(out, _stats(x, preact, "gelu", True))


def test_non_contiguous_and_mixed_dtypes(device):
    x, preact = _random_inputs(rows=48, d=40, d_ff=36, gated=True, dtype=torch.float32, device=device)
    x3d = x.view(4, 12, 40).transpose(0, 1)  # [12, 4, 40], not contiguous: tokens in another order
    wide = torch.cat([preact, preact], dim=1)[:, ::2]  # [48, 72] with stride 2
    tokens_in_x3d_order = x.view(4, 12, 40).transpose(0, 1).reshape(48, 40)
    out = _stats(x3d, wide, "silu", True)
    assert_stats_close(
        out, reference_stats(tokens_in_x3d_order, wide.contiguous(), "silu", True), _rtol(torch.float32)
    )
    # Autocast layout: float32 norm output, bfloat16 pre-activation.
    out = _stats(x, preact.bfloat16(), "silu", True)
    assert_stats_close(out, reference_stats(x, preact.bfloat16(), "silu", True), _rtol(torch.float32))


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_zero_tokens(gated, device):
    x = torch.empty(0, 16, device=device)
    preact = torch.empty(0, 24 if gated else 12, device=device)
    out = _stats(x, preact, "silu", gated)
    assert torch.equal(out.cpu(), torch.zeros(len(STAT_FIELDS), dtype=torch.float64))
    assert_stats_close(out, reference_stats(x, preact, "silu", gated), 0)
    assert all(math.isnan(v) for v in summarize(out).values())


def test_h_is_the_forward_hidden_activation(device):
    """The h the telemetry describes is what the FFN forward feeds its down projection."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 9, 32, generator=g).to(device)
    w_gate_up = (torch.randn(2 * 48, 32, generator=g) / 6).to(device)
    b_gate_up = torch.randn(2 * 48, generator=g).to(device)
    w_down = (torch.randn(32, 48, generator=g) / 7).to(device)
    _out, preact = torch.ops.ffn._gated_ffn_fwd(x, w_gate_up, b_gate_up, w_down, None, "gelu")
    h = torch.ops.ffn.gated_activation(preact, "gelu").double()
    s = summarize(_stats(x, preact, "gelu", True))
    assert s["down_in_mean"] == pytest.approx(h.mean().item(), rel=1e-5)
    assert s["h_max_over_rms"] == pytest.approx((h.abs().max() / h.square().mean().sqrt()).item(), rel=1e-5)
    assert s["input_mean"] == pytest.approx(x.double().mean().item(), abs=1e-6)


def test_nan_shows_up(device):
    x, preact = _random_inputs(rows=20, d=8, d_ff=16, gated=True, dtype=torch.float32, device=device)
    preact[5, 20] = math.nan  # an up entry
    s = summarize(_stats(x, preact, "silu", True))
    assert math.isnan(s["h_max_over_rms"]) and math.isnan(s["down_in_mean"])


# ----------------------------------------------------------------------------- combining
def test_combine_two_halves_equals_one_call(device):
    x, preact = _random_inputs(rows=64, d=24, d_ff=40, gated=True, dtype=torch.float32, device=device)
    whole = _stats(x, preact, "silu", True)
    first, second = _stats(x[:30], preact[:30], "silu", True), _stats(x[30:], preact[30:], "silu", True)
    combined = combine([first, second])
    outliers = FIELD["h_outliers"]
    # The outlier count is per call (each against its own rms): it adds, but need not match.
    assert combined[outliers] == first[outliers] + second[outliers]
    expected = whole.clone()
    expected[outliers] = combined[outliers]
    assert_stats_close(combined, expected, 1e-6)
    assert combined[FIELD["h_abs_max"]] == whole[FIELD["h_abs_max"]]


def test_combine_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        combine([])
    with pytest.raises(ValueError, match="shape"):
        combine([torch.zeros(3, dtype=torch.float64)])


def test_combine_stacks_of_layers_and_the_neutral_element():
    calls = [torch.stack([_stats(torch.randn(5, 8), torch.randn(5, 12), act, True) for act in ("silu", "relu")])
             for _ in range(3)]
    combined = combine(calls)
    assert combined.shape == (2, len(STAT_FIELDS))
    for layer in range(2):
        assert torch.equal(combined[layer], combine([c[layer] for c in calls]))
    empty = telemetry.neutral(2)
    assert torch.equal(combine([empty, calls[0]]), calls[0])
    assert empty[0, FIELD["h_abs_max"]] == -math.inf and empty[0, FIELD["tokens"]] == 0
    with pytest.raises(ValueError, match="all the same"):
        combine([calls[0], calls[0][0]])


def test_all_reduce_on_one_rank_is_the_identity(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        stats = torch.stack([_stats(torch.randn(5, 8), torch.randn(5, 12), "silu", True) for _ in range(2)])
        assert torch.equal(telemetry.all_reduce_(stats.clone()), stats)
    finally:
        dist.destroy_process_group()


def test_max_fields_are_fields():
    assert set(telemetry.MAX_FIELDS) <= set(STAT_FIELDS)
    assert len(_stats(torch.randn(3, 4), torch.randn(3, 6), "relu", True)) == len(STAT_FIELDS)


# ----------------------------------------------------------------------------- op contract
def test_deterministic(device):
    x, preact = _random_inputs(rows=300, d=64, d_ff=100, gated=True, dtype=torch.float32, device=device)
    first = _stats(x, preact, "gelu", True)
    assert torch.equal(first, _stats(x, preact, "gelu", True))
    if device == "cpu":
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            assert torch.equal(first, _stats(x, preact, "gelu", True))
        finally:
            torch.set_num_threads(threads)


def test_opcheck(device):
    x, preact = _random_inputs(rows=10, d=12, d_ff=8, gated=True, dtype=torch.float32, device=device)
    op = torch.ops.ffn.ffn_stats.default
    kwargs = {"near_zero": 0.1, "large": 1.0, "outlier": 2.0}
    torch.library.opcheck(op, (x.requires_grad_(), preact, "silu", True), kwargs)
    # The plain layout: schema and fake kernel only (the full check compiles, which is slow).
    torch.library.opcheck(op, (x, preact[:, :8], "gelu_tanh", False), test_utils=("test_schema", "test_faketensor"))


def test_not_differentiable():
    x = torch.randn(4, 8, requires_grad=True)
    assert not _stats(x * 2, torch.randn(4, 6), "silu", True).requires_grad


@pytest.mark.parametrize(
    "args, message",
    [
        ((torch.randn(4, 8), torch.randn(5, 6), "silu", True), r"preact must be a 2-D \[4, 2\*d_ff\]"),
        ((torch.randn(4, 8), torch.randn(4, 5), "silu", True), "even number of columns"),
        ((torch.randn(4, 8), torch.randn(4, 6), "swish", True), "activation must be"),
        ((torch.randn(4, 0), torch.randn(4, 6), "silu", True), "at least one feature"),
        ((torch.randn(4, 8), torch.randn(4, 6).int(), "silu", True), "preact must be float64"),
        ((torch.randn(4, 8), torch.randn(4, 6), "silu", True, -0.1), "near_zero must be"),
        ((torch.randn(4, 8), torch.randn(4, 6), "silu", True, 0.01, 6.0, math.inf), "outlier must be"),
    ],
)
def test_argument_errors(args, message):
    with pytest.raises(RuntimeError, match=message):
        ffn.ops.ffn_stats(*args)
