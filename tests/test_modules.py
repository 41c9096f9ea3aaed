"""The nn.Modules: drop-in state_dict compatibility with torch.nn.LayerNorm /
torch.nn.RMSNorm, state_dict round trips, from_linear, backend parity, deepcopy."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ffn
from helpers import OpsCalled, assert_accurate, randn, run_three_ways

pytestmark = pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight:UserWarning")


def randomize(module):
    """Parameters away from their ones/zeros init, so a swapped weight and bias would show."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + 1.0)
    return module


def assert_same(ours, theirs):
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs)


def load_into(ours, theirs):
    """Loads torch's state_dict into ours (strict) and checks the keys are the same."""
    state = theirs.state_dict()
    assert set(ours.state_dict()) == set(state)
    ours.load_state_dict(state)
    return ours


LAYER_NORM_CONFIGS = {
    "default": ((16,), {}),
    "int-shape": (16, {}),
    "no-affine": ((16,), {"elementwise_affine": False}),
    "no-bias": ((16,), {"bias": False}),
    "multi-dim": ((4, 8), {}),
    "eps": ((16,), {"eps": 1e-2}),
}


@pytest.mark.parametrize("config", LAYER_NORM_CONFIGS.values(), ids=LAYER_NORM_CONFIGS.keys())
def test_layer_norm_loads_torch_state_dict(config, device):
    shape, kwargs = config
    theirs = randomize(nn.LayerNorm(shape, device=device, **kwargs))
    ours = load_into(ffn.LayerNorm(shape, device=device, **kwargs), theirs)
    trailing = (shape,) if isinstance(shape, int) else shape
    x = randn(2, 3, *trailing, device=device, scale=2.0, shift=1.0, requires_grad=True)
    assert_same(ours(x), theirs(x))
    grad = torch.randn_like(x)
    for got, expected in zip(torch.autograd.grad(ours(x), [x, *ours.parameters()], grad),
                             torch.autograd.grad(theirs(x), [x, *theirs.parameters()], grad)):
        assert_same(got, expected)


RMS_NORM_CONFIGS = {
    "default": ((16,), {}),
    "eps": ((16,), {"eps": 1e-3}),
    "no-affine": ((16,), {"elementwise_affine": False}),
    "multi-dim": ((4, 8), {}),
}


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64), ids=str)
@pytest.mark.parametrize("config", RMS_NORM_CONFIGS.values(), ids=RMS_NORM_CONFIGS.keys())
def test_rms_norm_loads_torch_state_dict(config, dtype, device):
    """Includes eps=None (torch: the machine epsilon of the computation type)."""
    shape, kwargs = config
    theirs = randomize(nn.RMSNorm(shape, device=device, dtype=dtype, **kwargs))
    ours = load_into(ffn.RMSNorm(shape, device=device, dtype=dtype, **kwargs), theirs)
    # Small inputs: eps matters, so a wrong default eps would show.
    x = randn(2, 3, *shape, dtype=dtype, device=device, scale=1e-3)
    assert_same(ours(x), theirs(x))
    # Gradients at unit scale (where grad_x does not cancel down to its rounding errors).
    x = randn(2, 3, *shape, dtype=dtype, device=device, requires_grad=True)
    grad = torch.randn_like(x)
    for got, expected in zip(torch.autograd.grad(ours(x), [x, *ours.parameters()], grad),
                             torch.autograd.grad(theirs(x), [x, *theirs.parameters()], grad)):
        assert_same(got, expected)


def test_rms_norm_default_eps_matters():
    """The eps=None default is really float32's machine epsilon, not 0 nor 1e-6."""
    x = torch.full((1, 4), 1e-4)
    y = ffn.RMSNorm(4)(x)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(torch.float32).eps)
    torch.testing.assert_close(y, expected)
    assert not torch.allclose(y, ffn.RMSNorm(4, eps=0.0)(x))


def test_rms_norm_with_bias():
    """RMSNorm(bias=True): F.rms_norm + a learnable beta; state_dict keys weight and bias."""
    ours = randomize(ffn.RMSNorm(16, bias=True, eps=1e-6))
    assert set(ours.state_dict()) == {"weight", "bias"}
    x = randn(4, 16, scale=2.0, shift=1.0)
    assert_same(ours(x), F.rms_norm(x, (16,), ours.weight, 1e-6) + ours.bias)


@pytest.mark.parametrize("cls,kwargs", [
    (ffn.LayerNorm, {}),
    (ffn.RMSNorm, {"bias": True}),
    (ffn.GeluFFN, {"d_ff": 24}),
    (ffn.GeluFFN, {"d_ff": 24, "bias": False, "approximate": "tanh", "d_out": 8}),
    (ffn.SwiGLU, {"d_ff": 24}),
    (ffn.SwiGLU, {"d_ff": 24, "bias": True, "d_out": 8}),
    (ffn.GeGLU, {"d_ff": 24}),
    (ffn.GeGLU, {"d_ff": 24, "approximate": "tanh"}),
    (ffn.ReGLU, {"d_ff": 24, "bias": True}),
    (ffn.ReluFFN, {"d_ff": 24}),
    (ffn.LayerNorm, {"weight_offset": 1.0}),
    (ffn.GemmaRMSNorm, {}),
], ids=lambda v: v.__name__ if isinstance(v, type) else "-".join(f"{k}={w}" for k, w in v.items()))
def test_state_dict_round_trip_and_deepcopy(cls, kwargs):
    module = randomize(cls(16, **kwargs))
    fresh = cls(16, **kwargs)
    fresh.load_state_dict(module.state_dict())
    twin = copy.deepcopy(module)
    assert all(a is not b for a, b in zip(module.parameters(), twin.parameters()))
    x = randn(2, 5, 16)
    expected = module(x)
    assert_same(fresh(x), expected)
    assert_same(twin(x), expected)
    # The same module on the other backend gives the same numbers.
    other = cls(16, backend="torch", **kwargs)
    other.load_state_dict(module.state_dict())
    assert_same(other(x), expected)


@pytest.mark.parametrize("cls,act", [(ffn.SwiGLU, F.silu), (ffn.GeGLU, F.gelu), (ffn.ReGLU, F.relu)],
                         ids=("SwiGLU", "GeGLU", "ReGLU"))
@pytest.mark.parametrize("bias", (False, True), ids=("nobias", "bias"))
def test_from_linear_equals_three_linear_block(cls, act, bias, device):
    gate, up = nn.Linear(16, 40, bias=bias, device=device), nn.Linear(16, 40, bias=bias, device=device)
    down = nn.Linear(40, 12, bias=bias, device=device)
    module = cls.from_linear(gate, up, down)
    assert module.gate_up_proj.weight.shape == (80, 16) and module.down_proj.weight.shape == (12, 40)
    x = randn(3, 7, 16, device=device, requires_grad=True)
    assert_same(module(x), down(act(gate(x)) * up(x)))
    grad = torch.randn(3, 7, 12, device=device)
    (gx_ours,) = torch.autograd.grad(module(x), x, grad)
    (gx_theirs,) = torch.autograd.grad(down(act(gate(x)) * up(x)), x, grad)
    assert_same(gx_ours, gx_theirs)


@pytest.mark.parametrize("cls,kwargs,act", [
    (ffn.GeluFFN, {}, F.gelu),
    (ffn.GeluFFN, {"approximate": "tanh"}, lambda z: F.gelu(z, approximate="tanh")),
    (ffn.ReluFFN, {}, F.relu),
], ids=("gelu", "gelu-tanh", "relu"))
@pytest.mark.parametrize("bias", (False, True), ids=("nobias", "bias"))
def test_plain_from_linear_equals_two_linear_block(cls, kwargs, act, bias, device):
    fc1, fc2 = nn.Linear(16, 40, bias=bias, device=device), nn.Linear(40, 12, bias=bias, device=device)
    module = cls.from_linear(fc1, fc2, **kwargs)
    assert module.fc1.weight.shape == (40, 16) and module.fc2.weight.shape == (12, 40)
    assert (module.fc1.bias is None) == (not bias)
    assert module.fc1 is not fc1 and module.fc1.weight.data_ptr() != fc1.weight.data_ptr()  # copies
    x = randn(3, 7, 16, device=device, requires_grad=True)
    assert_same(module(x), fc2(act(fc1(x))))
    grad = torch.randn(3, 7, 12, device=device)
    (gx_ours,) = torch.autograd.grad(module(x), x, grad)
    (gx_theirs,) = torch.autograd.grad(fc2(act(fc1(x))), x, grad)
    assert_same(gx_ours, gx_theirs)
    with pytest.raises(ValueError, match="fc1's out_features \\(40\\) must be fc2's in_features \\(12\\)"):
        cls.from_linear(fc1, nn.Linear(12, 4))


def test_geglu_tanh_from_linear():
    gate, up, down = nn.Linear(16, 40), nn.Linear(16, 40), nn.Linear(40, 16)
    module = ffn.GeGLU.from_linear(gate, up, down, approximate="tanh")
    assert module.activation == "gelu_tanh" and "approximate='tanh'" in repr(module)
    x = randn(5, 16)
    assert_same(module(x), down(F.gelu(gate(x), approximate="tanh") * up(x)))
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh'"):
        ffn.GeGLU(16, 8, approximate="fast")


def test_gelu_ffn_module_equals_two_linear_block():
    module = randomize(ffn.GeluFFN(16, 48, approximate="tanh"))
    x = randn(4, 16)
    expected = module.fc2(F.gelu(module.fc1(x), approximate="tanh"))
    assert_same(module(x), expected)


BACKEND_CASES = [
    (ffn.LayerNorm, {}, (16, 1)),
    (ffn.RMSNorm, {"bias": True, "eps": 1e-5}, (16, 1)),
    (ffn.GeluFFN, {"d_ff": 32}, (32, 32)),
    (ffn.SwiGLU, {"d_ff": 20, "bias": True}, (40, 40)),
    (ffn.GeGLU, {"d_ff": 20}, (40, 40)),
    (ffn.GeGLU, {"d_ff": 20, "approximate": "tanh"}, (40, 40)),
    (ffn.ReGLU, {"d_ff": 20}, (40, 40)),
    (ffn.ReluFFN, {"d_ff": 32}, (32, 32)),
    (ffn.GemmaRMSNorm, {}, (16, 1)),
]


@pytest.mark.parametrize("case", BACKEND_CASES, ids=[f"{c[0].__name__}-{i}" for i, c in enumerate(BACKEND_CASES)])
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_backends_agree_forward_and_backward(case, dtype, device):
    """backend="ffn" and backend="torch": same outputs and gradients, to the accuracy of
    the dtype (judged as in helpers.assert_accurate, against the float64 module; terms and
    rounded terms: the longest sum over d = 16, d_ff or 2 * d_ff, and the 15 rows)."""
    cls, kwargs, (terms, rounded_terms) = case
    ours = randomize(cls(16, dtype=dtype, device=device, **kwargs))
    theirs = cls(16, dtype=dtype, device=device, backend="torch", **kwargs)
    theirs.load_state_dict(ours.state_dict())
    names = [name for name, _ in ours.named_parameters()]

    def call(module):
        return lambda x, *params: torch.func.functional_call(module, dict(zip(names, params)), (x,))

    x = randn(3, 5, 16, dtype=dtype, device=device, requires_grad=True)
    inputs = [x, *(p.detach().requires_grad_() for p in ours.parameters())]
    (out, out_torch, out_ref), grads = run_three_ways(call(ours), call(theirs), inputs,
                                                      torch.randn(3, 5, 16, dtype=dtype, device=device))
    assert_accurate(out, out_ref, out_torch, terms=terms, rounded_terms=rounded_terms)
    for name, (g, g_torch, g_ref) in zip(["x", *names], grads):
        assert_accurate(g, g_ref, g_torch, terms=terms, rounded_terms=rounded_terms, name=f"grad {name}")


def test_gated_modules_use_d_ff_as_given_and_linear_init():
    module = ffn.SwiGLU(64, 100, bias=True, d_out=32)
    (w_gate_up, b_gate_up), (w_down, b_down) = module.in_proj(), module.out_proj()
    assert w_gate_up.shape == (200, 64) and b_gate_up.shape == (200,)
    assert w_down.shape == (32, 100) and b_down.shape == (32,)
    # nn.Linear's init: uniform within 1/sqrt(fan_in), gate and up each drawn like their own Linear.
    bound_in, bound_out = 64**-0.5, 100**-0.5
    assert w_gate_up.abs().max() <= bound_in and w_down.abs().max() <= bound_out
    assert w_gate_up.abs().max() > 0.9 * bound_in and b_gate_up.abs().max() <= bound_in
    assert not torch.equal(w_gate_up[:100], w_gate_up[100:])


def test_norm_modules_initialize_like_torch():
    assert torch.equal(ffn.LayerNorm(8).weight, torch.ones(8))
    assert torch.equal(ffn.LayerNorm(8).bias, torch.zeros(8))
    assert torch.equal(ffn.RMSNorm(8).weight, torch.ones(8)) and ffn.RMSNorm(8).bias is None
    assert ffn.LayerNorm(8, elementwise_affine=False).weight is None


def test_modules_factory_kwargs():
    module = ffn.SwiGLU(8, 16, dtype=torch.bfloat16, device="meta")
    assert all(p.dtype == torch.bfloat16 and p.device.type == "meta" for p in module.parameters())
    norm = ffn.LayerNorm(8, dtype=torch.float64)
    assert norm.weight.dtype == torch.float64


FFN_CASES = [
    (ffn.GeluFFN, {"d_ff": 24}),
    (ffn.GeluFFN, {"d_ff": 24, "bias": False, "approximate": "tanh"}),
    (ffn.SwiGLU, {"d_ff": 24, "bias": True}),
    (ffn.GeGLU, {"d_ff": 24}),
    (ffn.GeGLU, {"d_ff": 24, "approximate": "tanh"}),
    (ffn.ReGLU, {"d_ff": 24, "bias": True}),
    (ffn.ReluFFN, {"d_ff": 24}),
]


@pytest.mark.parametrize("backend", ("ffn", "torch"))
@pytest.mark.parametrize("cls,kwargs", FFN_CASES, ids=[f"{c.__name__}-{i}" for i, (c, _) in enumerate(FFN_CASES)])
def test_ffn_modules_share_one_interface(cls, kwargs, backend, device):
    """What telemetry and the quantization probes use, the same for every FFN module."""
    module = randomize(cls(16, backend=backend, device=device, **kwargs))
    assert isinstance(module, ffn.modules.FFN)
    (w_in, b_in), (w_out, b_out) = module.in_proj(), module.out_proj()
    assert w_in.shape == ((2 if module.gated else 1) * 24, 16) and w_out.shape == (16, 24)
    assert {id(p) for p in module.parameters()} == {id(t) for t in (w_in, b_in, w_out, b_out) if t is not None}
    x = randn(2, 5, 16, device=device)
    out, preact = module.forward_with_preact(x)
    assert_same(out, module(x))
    assert_same(preact, F.linear(x, w_in, b_in).reshape(10, -1))  # the pre-activation, bias included
    stats = torch.ops.ffn.ffn_stats(x, preact, module.activation, module.gated)
    torch.testing.assert_close(stats, ffn.telemetry.reference_stats(x, preact, module.activation, module.gated),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cls,kwargs", FFN_CASES, ids=[f"{c.__name__}-{i}" for i, (c, _) in enumerate(FFN_CASES)])
def test_forward_with_preact_follows_autocast_like_forward(cls, kwargs):
    module = randomize(cls(16, **kwargs))
    x = randn(3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = module(x)
        out, preact = module.forward_with_preact(x)
    assert out.dtype == preact.dtype == torch.bfloat16
    assert_same(out, expected)


# ----------------------------------------------------------------------------- nn.Linear projections
PROJECTIONS = {ffn.GeluFFN: ("fc1", "fc2"), ffn.ReluFFN: ("fc1", "fc2"), ffn.SwiGLU: ("gate_up_proj", "down_proj"),
               ffn.GeGLU: ("gate_up_proj", "down_proj"), ffn.ReGLU: ("gate_up_proj", "down_proj")}
OLD_KEYS = {"fc1.weight": "w1", "fc1.bias": "b1", "fc2.weight": "w2", "fc2.bias": "b2",
            "gate_up_proj.weight": "w_gate_up", "gate_up_proj.bias": "b_gate_up",
            "down_proj.weight": "w_down", "down_proj.bias": "b_down"}


class Net(nn.Module):
    """nanoGPT-style owner of an FFN: its init loop touches every nn.Linear."""

    def __init__(self, ffn_module):
        super().__init__()
        self.mlp = ffn_module

    def forward(self, x):
        return self.mlp(x)


def reference_output(module, x):
    """The FFN computed from its projection modules (whatever wraps them) and F's activations."""
    preact = getattr(module, PROJECTIONS[type(module)][0])(x)
    if module.gated:
        h = ffn.reference.gated_activation(preact, module.activation)
    else:
        h = F.relu(preact) if module.activation == "relu" else F.gelu(preact, approximate=module.approximate)
    return getattr(module, PROJECTIONS[type(module)][1])(h)




@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(ffn.modules, "_warned", set())


@pytest.mark.parametrize("cls,kwargs", FFN_CASES, ids=[f"{c.__name__}-{i}" for i, (c, _) in enumerate(FFN_CASES)])
def test_ffn_projections_are_nn_linear_submodules(cls, kwargs):
    module = cls(16, **kwargs)
    names = PROJECTIONS[cls]
    assert [n for n, m in module.named_modules() if isinstance(m, nn.Linear)] == list(names)
    # An init loop over nn.Linear (nanoGPT's _init_weights) reaches the FFN.
    net = Net(module)
    net.apply(lambda m: nn.init.normal_(m.weight, std=0.02) if isinstance(m, nn.Linear) else None)
    assert 0.015 < getattr(module, names[0]).weight.std().item() < 0.025
    with OpsCalled() as rec:
        net(randn(3, 16))
    assert (module.op if module.gated else f"{module.activation.split('_')[0]}_ffn") in rec.names


@pytest.mark.parametrize("cls,kwargs", FFN_CASES, ids=[f"{c.__name__}-{i}" for i, (c, _) in enumerate(FFN_CASES)])
def test_state_dicts_with_the_old_parameter_names_load(cls, kwargs):
    module = randomize(cls(16, **kwargs))
    old = {OLD_KEYS[k]: v for k, v in module.state_dict().items()}
    fresh = cls(16, **kwargs)
    fresh.load_state_dict(old)  # strict
    nested = Net(cls(16, **kwargs))
    nested.load_state_dict({f"mlp.{k}": v for k, v in old.items()})
    x = randn(2, 5, 16)
    assert_same(fresh(x), module(x))
    assert_same(nested(x), module(x))
    with pytest.raises(RuntimeError, match="Unexpected key"):
        cls(16, **kwargs).load_state_dict({**old, "w3": old[OLD_KEYS["fc2.weight" if not module.gated
                                                                         else "down_proj.weight"]]})


@pytest.mark.parametrize("cls", [ffn.GeluFFN, ffn.SwiGLU], ids=lambda c: c.__name__)
@pytest.mark.parametrize("bias", (False, True), ids=("nobias", "bias"))
def test_init_draws_what_the_raw_parameters_drew(cls, bias):
    """The RNG stream of a model that builds an FFN is unchanged by the projections becoming
    nn.Linear layers: the same weights, and the same draws after them."""
    from ffn.modules import _linear_init

    torch.manual_seed(0)
    module = cls(16, 40, bias=bias)
    after = torch.rand(4)
    torch.manual_seed(0)
    halves = 2 if module.gated else 1
    want = []
    for shape in [(40, 16)] * halves + [(16, 40)]:
        w, b = torch.empty(shape), torch.empty(shape[0]) if bias else None
        _linear_init(w, b)
        want.append((w, b))
    assert torch.equal(torch.rand(4), after)
    (w_in, b_in), (w_out, b_out) = module.in_proj(), module.out_proj()
    assert torch.equal(w_in, torch.cat([w for w, _ in want[:halves]])) and torch.equal(w_out, want[-1][0])
    if bias:
        assert torch.equal(b_in, torch.cat([b for _, b in want[:halves]])) and torch.equal(b_out, want[-1][1])


@pytest.mark.parametrize("cls", list(PROJECTIONS), ids=lambda c: c.__name__)
def test_lora_on_the_projections_is_not_bypassed(cls, fresh_warnings):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    net = peft.get_peft_model(Net(randomize(cls(16, 24))), peft.LoraConfig(
        r=4, target_modules=list(PROJECTIONS[cls]), init_lora_weights=False))
    module = net.base_model.model.mlp
    x = randn(3, 5, 16, requires_grad=True)
    with pytest.warns(UserWarning, match=f"ffn.{cls.__name__}.{PROJECTIONS[cls][0]} is a "
                                         r"peft\.tuners\.lora\.layer\.Linear: running it as a module"), \
            OpsCalled() as rec:
        out = net(x)
    assert not set(ffn.modules.FFN_MODULES) & rec.names
    want = reference_output(module, x)
    assert_same(out, want)
    out_p, preact = module.forward_with_preact(x)
    assert_same(out_p, want)
    assert_same(preact, getattr(module, PROJECTIONS[cls][0])(x).reshape(15, -1))
    lora_params = [p for n, p in net.named_parameters() if "lora_" in n]
    assert len(lora_params) == 4
    grad = torch.randn_like(out)
    for got, expected in zip(torch.autograd.grad(out, [x, *lora_params], grad),
                             torch.autograd.grad(want, [x, *lora_params], grad)):
        # ffn's GELU backward and PyTorch's round differently: float32 rounding of the largest term.
        torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-5 * expected.abs().max().item())


@pytest.mark.parametrize("cls", [ffn.GeluFFN, ffn.SwiGLU], ids=lambda c: c.__name__)
@pytest.mark.parametrize("backend", ("ffn", "torch"))
def test_a_hooked_projection_is_called_as_a_module(cls, backend, fresh_warnings):
    module = randomize(cls(16, 24, backend=backend))
    x = randn(4, 16, requires_grad=True)
    plain = module(x)
    handle = getattr(module, PROJECTIONS[cls][1]).register_forward_hook(lambda m, args, out: out * 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hooked = module(x)
    assert_same(hooked, 2 * plain)
    assert [str(w.message) for w in caught] == ([f"ffn.{cls.__name__}.{PROJECTIONS[cls][1]} "
                                                 "(torch.nn.modules.linear.Linear) has hooks: running it as a "
                                                 "module, the fused FFN op is not used"] if backend == "ffn" else [])
    handle.remove()
    assert_same(module(x), plain)


def test_from_linear_refuses_a_wrapped_linear():
    gate, up, down = nn.Linear(16, 40), nn.Linear(16, 40), nn.Linear(40, 16)
    up.register_forward_hook(lambda m, args, out: out * 2)
    with pytest.raises(TypeError, match="up \\(torch.nn.modules.linear.Linear\\) has hooks: merge or remove"):
        ffn.SwiGLU.from_linear(gate, up, down)
