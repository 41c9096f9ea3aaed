"""A fused FFN never bypasses what wraps a Linear: a patched MLP whose projections are wrapped
(a PEFT LoRA adapter, a quantized Linear, a Linear subclass, a module hook), whether the
wrapper came before or after ffn.patch, runs the wrapped layers as modules and gives the
unpatched model's logits and gradients; the fused op runs only on plain layers."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ffn
from helpers import OpsCalled
from test_patch import build, fwd_bwd, inputs, max_grad_diff, patched_copy

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

M = ffn.modules




@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Every test sees the once-per-process warnings afresh."""
    monkeypatch.setattr(M, "_warned", set())


def assert_matches(ref, ours, arch="llama"):
    torch.testing.assert_close(fwd_bwd(ours, arch), fwd_bwd(ref, arch), rtol=1e-5, atol=1e-5)
    diff, scale = max_grad_diff(ref, ours)
    assert diff <= 2e-5 * scale, (diff, scale)


def forward_ops(model, arch="llama"):
    with torch.no_grad(), OpsCalled() as rec:
        model(**inputs(arch))
    return rec.names


def test_plain_layers_run_the_fused_op_without_a_warning():
    ours = patched_copy(build("llama"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        names = forward_ops(ours)
    assert "swiglu" in names and "gated_activation" not in names


# ----------------------------------------------------------------------------- PEFT LoRA
LORA_TARGETS = ["gate_proj", "up_proj", "down_proj"]


def lora(model, seed=7):
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False)
    return peft.get_peft_model(model, config)


@pytest.mark.parametrize("order", ["patch_then_lora", "lora_then_patch"])
def test_lora_adapters_are_not_bypassed(order):
    ref = lora(build("llama"))
    if order == "patch_then_lora":
        ours = lora(patched_copy(build("llama")))
    else:
        ours = patched_copy(ref)
    assert {n: p for n, p in ours.named_parameters() if "lora_" in n}.keys() == \
        {n for n, _ in ref.named_parameters() if "lora_" in n}
    for (n, p), (_, q) in zip(ref.named_parameters(), ours.named_parameters()):
        assert torch.equal(p, q), n  # the same adapters (seeded), so the same numbers are due
    with pytest.warns(UserWarning, match=r"ffn.patch: LlamaMLP.gate_proj is a peft\.tuners\.lora\.layer\.Linear: "
                                         r"running it as a module, the fused FFN op is not used"):
        names = forward_ops(ours)
    assert "swiglu" not in names and "gated_activation" in names  # ffn's activation between the GEMMs
    assert_matches(ref, ours)
    lora_grads = [n for n, p in ours.named_parameters() if "lora_" in n and p.grad is not None]
    assert len(lora_grads) == 2 * 2 * len(LORA_TARGETS)  # A and B of every adapter, 2 layers


def test_lora_merged_and_unloaded_runs_the_fused_op_again():
    ref = lora(build("llama"))
    ours = patched_copy(ref)
    merged = ours.merge_and_unload()  # plain nn.Linear layers again, the adapters folded in
    assert "swiglu" in forward_ops(merged)
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs("llama")).logits, ref(**inputs("llama")).logits,
                                   rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- quantized and subclassed Linears
class FakeQuantLinear(nn.Linear):
    """A Linear subclass whose forward is not F.linear of its weight: an int8 fake-quantized
    weight (per output row, straight-through gradient), as QAT / weight-only quantizers do."""

    def forward(self, x):
        scale = self.weight.detach().abs().amax(dim=1, keepdim=True) / 127
        q = (self.weight / scale).round().clamp(-127, 127) * scale
        return F.linear(x, self.weight + (q - self.weight).detach(), self.bias)


def swap_linear(mlp, name, cls):
    old = getattr(mlp, name)
    new = cls(old.in_features, old.out_features, bias=old.bias is not None)
    new.load_state_dict(old.state_dict())
    setattr(mlp, name, new)


@pytest.mark.parametrize("arch,name", [("llama", "up_proj"), ("llama", "down_proj"), ("t5_v1_1", "wi_0"),
                                       ("gpt_neox", "dense_h_to_4h"), ("phi3", "gate_up_proj")])
@pytest.mark.parametrize("when", ["before_patch", "after_patch"])
def test_linear_subclass_is_run_as_a_module(arch, name, when):
    ref = build(arch)
    mlps = lambda model: [m for n, m in model.named_modules() if hasattr(m, name) and n.endswith(("mlp", "DenseReluDense"))]  # noqa: E731
    for mlp in mlps(ref):
        swap_linear(mlp, name, FakeQuantLinear)
    if when == "before_patch":
        ours = patched_copy(ref)
    else:
        ours = patched_copy(build(arch))
        for mlp in mlps(ours):
            swap_linear(mlp, name, FakeQuantLinear)
        ours.load_state_dict(ref.state_dict())
    assert mlps(ours) and all(isinstance(m, M.FFN) for m in mlps(ours))
    with pytest.warns(UserWarning, match=f"{name} is a {__name__}.FakeQuantLinear"):
        ours(**inputs(arch))
    assert_matches(ref, ours, arch)


def test_dynamic_quantized_linear_is_run_as_a_module():
    ref = build("llama")
    targets = {f"model.layers.{i}.mlp.{n}" for i in range(2) for n in LORA_TARGETS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = torch.ao.quantization.quantize_dynamic(ref, targets, dtype=torch.qint8)
    ours = patched_copy(ref)
    assert type(ours.model.layers[0].mlp.gate_proj).__module__.startswith("torch.ao.nn.quantized.dynamic")
    with pytest.warns(UserWarning, match="LlamaMLP.gate_proj is a torch.ao.nn.quantized.dynamic"):
        logits = ours(**inputs("llama")).logits
    torch.testing.assert_close(logits, ref(**inputs("llama")).logits, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- hooks
def scale_output(module, args, output):
    return output * 1.5


def shift_input(module, args):
    return (args[0] + 0.25,)


@pytest.mark.parametrize("kind", ["forward_hook", "forward_pre_hook"])
@pytest.mark.parametrize("when", ["before_patch", "after_patch"])
def test_linear_with_a_hook_is_run_as_a_module(kind, when):
    ref = build("llama")
    ours = copy.deepcopy(ref)

    def hook(model):
        for layer in model.model.layers:
            if kind == "forward_hook":
                layer.mlp.up_proj.register_forward_hook(scale_output)
            else:
                layer.mlp.down_proj.register_forward_pre_hook(shift_input)

    hook(ref)
    if when == "before_patch":
        hook(ours)
        ours = patched_copy(ours)
    else:
        ours = patched_copy(ours)
        hook(ours)
    with pytest.warns(UserWarning, match="has hooks: running it as a module"):
        ours(**inputs("llama"))
    assert_matches(ref, ours)


def test_full_backward_hook_on_a_projection_sees_the_same_gradients():
    ref = build("llama")
    ours = patched_copy(ref)
    seen = {"ref": [], "ours": []}
    for key, model in (("ref", ref), ("ours", ours)):
        model.model.layers[1].mlp.gate_proj.register_full_backward_hook(
            lambda m, gin, gout, key=key: seen[key].append(gout[0].clone()))
    with pytest.warns(UserWarning, match="LlamaMLP.gate_proj .* has hooks"):
        assert_matches(ref, ours)
    assert len(seen["ours"]) == len(seen["ref"]) == 1
    torch.testing.assert_close(seen["ours"][0], seen["ref"][0], rtol=1e-5, atol=1e-6)


def test_the_fused_op_returns_when_the_hook_is_removed():
    ours = patched_copy(build("llama"))
    handles = [layer.mlp.gate_proj.register_forward_hook(scale_output) for layer in ours.model.layers]
    with pytest.warns(UserWarning, match="LlamaMLP.gate_proj .* has hooks"):
        assert "swiglu" not in forward_ops(ours)
    for handle in handles:
        handle.remove()
    assert "swiglu" in forward_ops(ours)


# ----------------------------------------------------------------------------- instance forwards
def test_projection_with_a_forward_set_on_the_instance_is_run_as_a_module():
    """A forward wrapped on the layer instance (not a hook) runs too, as in the unpatched model."""
    ref = build("llama")
    ours = patched_copy(ref)
    for model in (ref, ours):
        up = model.model.layers[0].mlp.up_proj
        up.forward = lambda x, inner=up.forward: inner(x) * 0.5
    with pytest.warns(UserWarning, match="LlamaMLP.up_proj .* has a forward of its own"):
        assert "gated_activation" in forward_ops(ours)
    assert_matches(ref, ours)


def test_module_with_a_forward_set_on_the_instance_is_left_alone():
    """Swapping the class of a module whose forward is an instance attribute would change nothing that
    runs: patch() lists it as skipped, with a warning, instead of counting it."""
    model = build("llama")
    mlp = model.model.layers[0].mlp
    mlp.forward = lambda x, inner=mlp.forward: inner(x)
    with pytest.warns(UserWarning, match="LlamaMLP: its forward is set on the instance"):
        report = ffn.patch(model)
    assert report["LlamaMLP"] == len(model.model.layers) - 1 and "LlamaMLP" in report.skipped
    assert type(mlp).__name__ == "LlamaMLP"


# ----------------------------------------------------------------------------- accelerate
def test_accelerate_cpu_offload_runs_the_patched_model():
    """cpu_offload keeps the weights on the meta device until each Linear's hook loads them: the
    patched MLPs call those layers (the hook is a forward of their own) instead of reading meta weights."""
    accelerate = pytest.importorskip("accelerate")
    ref = build("llama").eval()
    ours = patched_copy(ref).eval()
    accelerate.cpu_offload(ours, execution_device=torch.device("cpu"))
    with torch.no_grad(), pytest.warns(UserWarning, match="has a forward of its own"):
        torch.testing.assert_close(ours(**inputs("llama")).logits, ref(**inputs("llama")).logits,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("when", ["before_patch", "after_patch"])
def test_accelerate_device_map_offload_runs_the_ffn_ops(when, tmp_path):
    """from_pretrained with a device_map that offloads a layer to disk hooks every module's instance
    forward: patch() points the hook at the patched class (unpatch() back), so the ffn ops run and the
    logits stay the unpatched model's."""
    pytest.importorskip("accelerate")
    ref = build("llama").eval()
    ref.save_pretrained(tmp_path / "model")
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    loaded = type(ref).from_pretrained(tmp_path / "model", device_map=device_map,
                                       offload_folder=tmp_path / "offload").eval()
    if when == "after_patch":
        ffn.patch(loaded)
    with torch.no_grad(), OpsCalled() as rec, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the offloaded projections run as modules
        if when == "before_patch":
            ffn.patch(loaded)
        got = loaded(**inputs("llama")).logits
    torch.testing.assert_close(got, ref(**inputs("llama")).logits, rtol=1e-5, atol=1e-5)
    assert "rms_norm" in rec.names and "gated_activation" in rec.names
    ffn.unpatch(loaded)
    with torch.no_grad(), OpsCalled() as rec:
        loaded(**inputs("llama"))
    assert not rec.names & {"rms_norm", "gated_activation", "swiglu"}
