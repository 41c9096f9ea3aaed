"""Patched models save like unpatched ones: every checkpoint tool (safetensors, save_pretrained,
accelerate) saves and reloads every weight of a patched model, on each architecture whose
gate and up projections the fused gated ops take packed. Shared storage between distinct
parameters is what these tools read as tied weights (and drop, or refuse)."""

import collections
import re

import pytest
import torch

from test_patch import ARCHS, T, assert_no_shared_storage, build, fwd_bwd, inputs, max_grad_diff, patched_copy

safetensors_torch = pytest.importorskip("safetensors.torch")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

# The architectures with gate and up as two Linear layers.
PACKED = ["llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "gemma", "gemma2", "t5_v1_1"]


def assert_same_state(model, want):
    got = model.state_dict()
    assert list(got) == list(want)
    for k, v in want.items():
        assert torch.equal(got[k], v), k


def logits(model, arch):
    with torch.no_grad():
        return model(**inputs(arch)).logits


@pytest.mark.parametrize("arch", PACKED)
def test_patched_gate_and_up_have_their_own_storage(arch):
    ours = patched_copy(build(arch))
    assert_no_shared_storage(ours)
    fwd_bwd(ours, arch)
    assert_no_shared_storage(ours)


@pytest.mark.parametrize("arch", PACKED)
def test_safetensors_save_model_load_model(arch, tmp_path):
    ref = build(arch)
    ours = patched_copy(ref)
    safetensors_torch.save_model(ours, tmp_path / "model.safetensors")
    fresh = patched_copy(build(arch, seed=3))
    missing, unexpected = safetensors_torch.load_model(fresh, tmp_path / "model.safetensors")
    assert not missing and not unexpected
    assert_same_state(fresh, ref.state_dict())
    torch.testing.assert_close(logits(fresh, arch), logits(ref, arch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", PACKED)
def test_save_pretrained_and_from_pretrained(arch, tmp_path):
    ref = build(arch)
    ours = patched_copy(ref)
    ours.save_pretrained(tmp_path, safe_serialization=True)
    loaded, info = type(ref).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert_same_state(loaded, ref.state_dict())
    torch.testing.assert_close(logits(loaded.eval(), arch), logits(ref, arch), rtol=0, atol=0)


@pytest.mark.parametrize("arch", PACKED)
def test_accelerate_save_model_keeps_every_weight(arch, tmp_path):
    accelerate = pytest.importorskip("accelerate")
    ref = build(arch)
    ours = patched_copy(ref)
    # accelerate drops all but one of the tensors that share storage ("Removed shared tensor"),
    # as it does for the declared tied weights of the unpatched model.
    accelerate.Accelerator(cpu=True).save_model(ref, tmp_path / "ref", safe_serialization=True)
    accelerate.Accelerator(cpu=True).save_model(ours, tmp_path / "ours", safe_serialization=True)
    saved_ref = safetensors_torch.load_file(tmp_path / "ref" / "model.safetensors")
    saved = safetensors_torch.load_file(tmp_path / "ours" / "model.safetensors")
    assert sorted(saved) == sorted(saved_ref)
    fresh = patched_copy(build(arch, seed=3))
    missing, unexpected = fresh.load_state_dict(saved, strict=False)
    assert not unexpected and set(missing) <= set(ref._tied_weights_keys or ()), missing
    assert_same_state(fresh, ref.state_dict())


@pytest.mark.parametrize("arch", PACKED)
def test_hf_tied_weights_check(arch):
    """What transformers' ModelTesterMixin.test_tied_weights_keys checks: with tied embeddings,
    the only state_dict entries sharing storage are those `_tied_weights_keys` declares."""
    from transformers.pytorch_utils import id_tensor_storage

    make_config, cls_name, _ = ARCHS[arch]
    config = make_config()
    config.tie_word_embeddings = True
    model = patched_copy(getattr(T, cls_name)(config))
    ptrs = collections.defaultdict(list)
    for name, tensor in model.state_dict().items():
        ptrs[id_tensor_storage(tensor)].append(name)
    tied = [names for names in ptrs.values() if len(names) > 1]
    tied_keys = list(model._tied_weights_keys or ())
    for key in tied_keys:
        assert any(re.search(key, p) for group in tied for p in group), key
        tied = [[p for p in group if re.search(key, p) is None] for group in tied]
    assert [group for group in tied if len(group) > 1] == []


@pytest.mark.parametrize("arch", PACKED)
def test_reloaded_checkpoint_trains_like_the_unpatched_model(arch, tmp_path):
    """save_pretrained of a patched model, reloaded and patched again: the unpatched model's
    logits and gradients (float32 rounding)."""
    ref = build(arch)
    patched_copy(ref).save_pretrained(tmp_path, safe_serialization=True)
    ours = patched_copy(type(ref).from_pretrained(tmp_path).eval())
    torch.testing.assert_close(fwd_bwd(ours, arch), fwd_bwd(ref, arch), rtol=1e-5, atol=1e-5)
    diff, scale = max_grad_diff(ref, ours)
    assert diff <= 2e-5 * scale, (diff, scale)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5_v1_1"])
def test_patched_model_pickles(arch, tmp_path):
    """torch.save of the whole model (pickle) works patched: the Ffn* classes are made at run time, so
    a patched module pickles as its original class and is patched again on load."""
    import pickle

    ours = patched_copy(build(arch))
    path = tmp_path / "model.pt"
    torch.save(ours, path)
    loaded = torch.load(path, weights_only=False)
    assert [type(m) for m in loaded.modules()] == [type(m) for m in ours.modules()]
    torch.testing.assert_close(logits(loaded, arch), logits(ours, arch), rtol=0, atol=0)
    again = pickle.loads(pickle.dumps(loaded.model if hasattr(loaded, "model") else loaded))
    assert any(type(m).__name__.startswith("Ffn") for m in again.modules())
