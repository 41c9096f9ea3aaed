"""ffn as a Hugging Face kernel (ffn.hub): the repository built in the session from
the installed package (layout, metadata and the variant kernels picks), kernelize of
tiny offline models (norms, and MLPs marked by ffn.hub.mark_mlps) on CPU (and CUDA
when present) in the modes TRAINING and INFERENCE,
with torch.compile(fullgraph=True), against each model's unkernelized twin (logits,
gradients, state_dict, ffn op calls), the output dtypes of each norm form, the split of
transformers' "RMSNorm" classes that the RMSNorm layer relies on, and the repository's
own copy of ffn in a fresh interpreter."""

import copy
import os
import platform
import re
import subprocess
import sys
import textwrap
import zipfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ffn
import test_patch

pytest.importorskip("kernels")
T = pytest.importorskip("transformers")
from kernels import Mode, get_kernelized_layers, kernelize, use_kernel_mapping  # noqa: E402
from kernels._rust import Backend, Digest, DigestAlgorithm, Metadata  # noqa: E402
from kernels.resolver import resolve_local_kernel  # noqa: E402

hub = pytest.importorskip("ffn.hub")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

VOCAB, BATCH, SEQ = 97, 2, 8
ATTN = dict(num_attention_heads=4, num_key_value_heads=2)
DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, vocab_size=VOCAB)

# name -> (config factory, model class, {layer name: modules kernelize gives an ffn layer})
SWIGLU = {"SwiGLUMLP": 2}  # the two layers' MLPs, marked by mark_mlps
ARCHS = {
    "llama": (lambda: T.LlamaConfig(**DECODER, **ATTN), "LlamaForCausalLM", {"RMSNorm": 5, **SWIGLU}),
    "mistral": (lambda: T.MistralConfig(**DECODER, **ATTN), "MistralForCausalLM", {"RMSNorm": 5, **SWIGLU}),
    "qwen3": (lambda: T.Qwen3Config(**DECODER, **ATTN, head_dim=8), "Qwen3ForCausalLM", {"RMSNorm": 9, **SWIGLU}),
    # Phi3's MLP packs gate and up in one layer: only ffn.patch reaches it.
    "phi3": (lambda: T.Phi3Config(**DECODER, **ATTN, pad_token_id=0, eos_token_id=1, bos_token_id=1),
             "Phi3ForCausalLM", {"RMSNorm": 5}),
    # Olmo2's norms multiply before the cast (hub.PRODUCT_THEN_CAST).
    "olmo2": (lambda: T.Olmo2Config(**DECODER, **ATTN, pad_token_id=0, eos_token_id=1), "Olmo2ForCausalLM",
              {"RMSNorm": 9, **SWIGLU}),
    # Zero-centered norms; the gated norm of the linear-attention layer keeps its forward.
    "qwen3_5": (lambda: T.Qwen3_5TextConfig(**DECODER, **ATTN, head_dim=8, linear_num_key_heads=2,
                                            linear_num_value_heads=4, linear_key_head_dim=8,
                                            linear_value_head_dim=8,
                                            layer_types=["linear_attention", "full_attention"]),
                "Qwen3_5ForCausalLM", {"RMSNormZeroCentered": 7, **SWIGLU}),
    # Gemma's norms carry no hub decorator (only ffn.patch reaches them); its MLP is a tanh GeGLU.
    "gemma": (lambda: T.GemmaConfig(**DECODER, **ATTN, head_dim=8), "GemmaForCausalLM", {"GeGLUMLP": 2}),
}
NORM_LAYERS = ("RMSNorm", "RMSNormZeroCentered")
_MARKED = {}  # classes mark_mlps marked during a test, unmarked after it


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(autouse=True)
def _unmark_mlps():
    """mark_mlps marks classes, as kernels' replace_kernel_forward_from_hub does: undone after each test."""
    yield
    for cls in _MARKED:
        del cls.kernel_layer_name, cls.kernel_condition
    _MARKED.clear()


def mark_mlps(model):
    marked = hub.mark_mlps(model)
    _MARKED.update(marked)
    return marked


@pytest.fixture(scope="session")
def hub_repo(tmp_path_factory):
    """The repository built from the ffn package under test (the editable ops/ and its binary)."""
    out = tmp_path_factory.mktemp("hub") / "ffn"
    hub.build_repository(out)
    return out


def build(arch, seed=0):
    """The model in eval mode, norm weights away from their init (test_patch's builder),
    its MLP classes marked for kernelize."""
    model = test_patch.build(arch, seed, archs=ARCHS)
    mark_mlps(model)
    return model


def kernelized_copy(model, repo, mode, device):
    twin = copy.deepcopy(model)
    with use_kernel_mapping(hub.kernel_mapping(repo), inherit_mapping=False):
        kernelize(twin, mode=mode, device=device)
    return twin


def input_ids(device, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (BATCH, SEQ), generator=g).to(device)


def fwd_bwd(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(ids).logits
    g = torch.Generator().manual_seed(2)
    (logits * torch.randn(logits.shape, generator=g).to(logits.device)).sum().backward()
    return logits.detach()


def assert_grads_match(ref, ours):
    g_ref = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    g_ours = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    assert g_ref.keys() == g_ours.keys() and g_ref
    diff = max((g_ref[n] - g_ours[n]).abs().max().item() for n in g_ref)
    scale = max(g.abs().max().item() for g in g_ref.values())
    assert diff <= 2e-5 * scale, (diff, scale)


def assert_matches_plain(ref, ours, run, ids, mode, no_grad):
    """Logits of `run` (ours, or ours compiled) equal the plain model's within float32 rounding,
    and in training the gradients that land in ours' parameters too; without training under
    `no_grad` (inference_mode, or no_grad where Dynamo traces)."""
    if Mode.TRAINING in mode:
        logits_ref, logits_ours = fwd_bwd(ref, ids), fwd_bwd(run, ids)
        assert_grads_match(ref, ours)
    else:
        with no_grad():
            logits_ref, logits_ours = ref(ids).logits, run(ids).logits
    torch.testing.assert_close(logits_ours, logits_ref, rtol=1e-5, atol=1e-5)


class CountFfnOps(TorchDispatchMode):
    """Counts the torch.ops.ffn calls that reach the kernels, by op name."""

    def __init__(self):
        super().__init__()
        self.calls = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "ffn":
            name = func.overloadpacket.__name__
            self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def expected_layers(model, arch):
    """{module name: layer name} of the modules whose class transformers decorates with a name in LAYERS."""
    names = {name: type(m).kernel_layer_name for name, m in model.named_modules()
             if getattr(type(m), "kernel_layer_name", None) in hub.LAYERS}
    assert Counter(names.values()) == ARCHS[arch][2]
    return names


# ----------------------------------------------------------------------------- the repository
def test_repository_layout_and_metadata(hub_repo):
    variants = {p.name for p in (hub_repo / "build").iterdir()}
    cpu = f"torch-stable-abi211-cpu-{platform.machine()}-linux"  # ffn requires torch>=2.11
    cuda = variants - {cpu}
    binary = Path(ffn._C.__file__)
    # A cu variant exactly when the binary carries CUDA kernels (a fat binary section).
    assert cpu in variants and len(cuda) == (b".nv_fatbin" in binary.read_bytes())
    assert all(re.fullmatch(rf"torch-stable-abi211-cu\d+-{platform.machine()}-linux", v) for v in cuda)
    ids = set()
    for name in variants:
        variant = hub_repo / "build" / name
        meta = Metadata.read_from_file(variant / "metadata.json")
        assert str(meta.name) == "ffn" and meta.python_depends == []
        assert meta.backend.backend_type == (Backend.CPU if "-cpu-" in name else Backend.CUDA)
        meta.digest.validate(Digest.hash_variant(DigestAlgorithm.SHA256, variant))  # raises on a difference
        assert (variant / "ffn" / binary.name).read_bytes() == binary.read_bytes()
        ids.add(meta.id)
    assert len(ids) == len(variants)  # the id names the module in sys.modules: one per build
    # kernels picks by the torch build: cpu for a CPU torch, the cu variant for a CUDA torch.
    picked = resolve_local_kernel(hub_repo, backend=None).variant_path.name
    assert (picked == cpu) if torch.version.cuda is None else (picked in cuda)
    assert resolve_local_kernel(hub_repo, backend="cpu").variant_path.name == cpu


def _write_wheel(path, files, tag="cp310-abi3-linux_x86_64"):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(f"ffn/{name}", data)
        zf.writestr("ffn-0.1.0.dist-info/METADATA", "Metadata-Version: 2.4\nName: ffn\nVersion: 0.1.0\n"
                                                    "Requires-Dist: torch>=2.11\n")
        zf.writestr("ffn-0.1.0.dist-info/WHEEL", f"Wheel-Version: 1.0\nRoot-Is-Purelib: false\nTag: {tag}\n")


def test_wheel_build_matches_the_installed_package(hub_repo, tmp_path):
    root = Path(ffn.__file__).parent
    files = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
             if p.is_file() and "__pycache__" not in p.parts}
    _write_wheel(tmp_path / "ffn.whl", files, tag=f"cp310-abi3-manylinux_2_28_{platform.machine()}")
    variants = hub.build_repository(tmp_path / "repo", wheel=tmp_path / "ffn.whl")
    assert sorted(v.name for v in variants) == sorted(p.name for p in (hub_repo / "build").iterdir())
    for v in variants:
        ours = Metadata.read_from_file(v / "metadata.json")
        theirs = Metadata.read_from_file(hub_repo / "build" / v.name / "metadata.json")
        assert ours.digest.files == theirs.digest.files and ours.id == theirs.id
    # A wheel built before ffn.hub existed cannot serve the layers.
    del files["hub.py"]
    _write_wheel(tmp_path / "old.whl", files)
    with pytest.raises(ValueError, match="no ffn.hub"):
        hub.build_repository(tmp_path / "old", wheel=tmp_path / "old.whl")


def test_command_line_build(tmp_path, capsys):
    assert hub.main(["build", "--out", str(tmp_path / "repo")]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(printed) == sorted(str(p) for p in (tmp_path / "repo" / "build").iterdir())
    with pytest.raises(SystemExit, match="1"):
        hub.main(["build", "--wheel", str(tmp_path / "missing.whl"), "--out", str(tmp_path / "x")])
    assert "missing.whl" in capsys.readouterr().err


def test_kernel_mapping(hub_repo, tmp_path):
    mapping = hub.kernel_mapping(hub_repo)
    modes = {Mode.TRAINING, Mode.INFERENCE, Mode.TRAINING | Mode.TORCH_COMPILE, Mode.INFERENCE | Mode.TORCH_COMPILE}
    assert set(mapping) == set(hub.LAYERS)
    for name, per_device in mapping.items():
        assert set(per_device) == {"cpu", "cuda"}
        for per_mode in per_device.values():
            assert set(per_mode) == modes
            assert {r.layer_name for r in per_mode.values()} == {name}
    with pytest.raises(FileNotFoundError, match="make hub"):
        hub.kernel_mapping(tmp_path)


# ----------------------------------------------------------------------------- kernelize
@pytest.mark.parametrize("mode", [Mode.TRAINING, Mode.INFERENCE], ids=["training", "inference"])
@pytest.mark.parametrize("arch", ARCHS)
def test_kernelize_matches_the_unkernelized_model(hub_repo, arch, mode, device):
    ref = build(arch).to(device)
    sd_before = {k: v.clone() for k, v in ref.state_dict().items()}
    ours = kernelized_copy(ref, hub_repo, mode, device)
    want = expected_layers(ours, arch)
    layers = get_kernelized_layers(ours).layers
    assert {name: k.repo.layer_name for name, k in layers.items()} == want
    assert all(k.repo == hub.kernel_mapping(hub_repo)[k.repo.layer_name][device][mode] for k in layers.values())

    ids = input_ids(device)
    with torch.no_grad(), CountFfnOps() as counted:
        ours(ids)
    # One ffn op per kernelized module: a norm op per norm, a fused gated FFN op per MLP.
    kinds = Counter("norm" if "rms_norm" in op else "mlp" if "ffn" in op else op
                    for op, n in counted.calls.items() for _ in range(n))
    layers_of = Counter(want.values())
    assert kinds == Counter(norm=sum(layers_of[n] for n in NORM_LAYERS),
                            mlp=layers_of["SwiGLUMLP"] + layers_of["GeGLUMLP"]) - Counter(), counted.calls

    assert_matches_plain(ref, ours, ours, ids, mode, torch.inference_mode)

    sd = ours.state_dict()
    assert list(sd) == list(sd_before)
    assert all(torch.equal(sd[k], v) for k, v in sd_before.items())


def _counting_aot_eager(seen):
    """aot_eager (Dynamo + AOTAutograd through the fake kernels), recording the ffn ops in Dynamo's graphs."""
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes
                    if n.op == "call_function" and str(n.target).startswith("ffn."))
        return aot_eager(gm, example_inputs)

    return backend


@pytest.mark.slow
@pytest.mark.parametrize("arch, mode", [("llama", Mode.TRAINING | Mode.TORCH_COMPILE),
                                        ("olmo2", Mode.INFERENCE | Mode.TORCH_COMPILE),
                                        ("gemma", Mode.TRAINING | Mode.TORCH_COMPILE)],
                         ids=["llama-training", "olmo2-inference", "gemma-training"])
def test_compile_fullgraph(hub_repo, arch, mode, device):
    torch._dynamo.reset()
    ref = build(arch).to(device)
    ours = kernelized_copy(ref, hub_repo, mode, device)
    seen = []
    compiled = torch.compile(ours, fullgraph=True, backend=_counting_aot_eager(seen))  # a graph break raises
    ids = input_ids(device)
    assert_matches_plain(ref, ours, compiled, ids, mode, torch.no_grad)
    layers_of = ARCHS[arch][2]
    want = Counter({"ffn.rms_norm": sum(layers_of.get(n, 0) for n in NORM_LAYERS),
                    "ffn.swiglu": layers_of.get("SwiGLUMLP", 0), "ffn.geglu": layers_of.get("GeGLUMLP", 0)})
    assert Counter(seen) == want - Counter()


# ----------------------------------------------------------------------------- the norm forms
def _norm(cls_path, dim=32):
    module, cls = cls_path.rsplit(".", 1)
    return getattr(__import__(f"transformers.models.{module}", fromlist=[cls]), cls)(dim, eps=1e-5)


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("cls_path", ["llama.modeling_llama.LlamaRMSNorm", "olmo2.modeling_olmo2.Olmo2RMSNorm",
                                      "qwen3_5.modeling_qwen3_5.Qwen3_5RMSNorm"])
def test_norm_output_dtype_and_values_follow_transformers(hub_repo, cls_path, x_dtype, w_dtype):
    # Half x with a float32 weight (autocast) is where the forms differ: float32 out for
    # Llama, x's dtype for Olmo2 and Qwen3.5.
    ref = _norm(cls_path)
    with torch.no_grad():
        ref.weight.add_(0.1 * torch.randn_like(ref.weight))
    ref.to(w_dtype)
    ours = kernelized_copy(ref, hub_repo, Mode.INFERENCE, "cpu")
    assert get_kernelized_layers(ours).layers
    x = torch.randn(3, 5, 32, dtype=x_dtype)
    want, got = ref(x), ours(x)
    assert got.dtype == want.dtype
    if torch.bfloat16 in (x_dtype, w_dtype):  # Llama rounds x_hat to bfloat16 before a float32 weight, ffn not
        torch.testing.assert_close(got, want, rtol=1.6e-2, atol=1e-5)
    else:  # transformers normalizes float64 x in float32
        torch.testing.assert_close(got, want, rtol=1.3e-6, atol=1e-5)


def test_subclass_keeps_its_base_form(hub_repo):
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm

    class MyNorm(Olmo2RMSNorm):
        pass

    ref = MyNorm(32)
    ours = kernelized_copy(ref, hub_repo, Mode.INFERENCE, "cpu")
    assert get_kernelized_layers(ours).layers
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    assert ours(x).dtype == ref(x).dtype == torch.bfloat16


# ----------------------------------------------------------------------------- the MLP layers
def test_mark_mlps_marks_llama_style_classes_once():
    from transformers.models.gemma.modeling_gemma import GemmaMLP
    from transformers.models.llama.modeling_llama import LlamaMLP
    from transformers.models.phi3.modeling_phi3 import Phi3MLP

    def unmarked(arch):
        return test_patch.build(arch, archs=ARCHS)

    assert not hasattr(LlamaMLP, "kernel_layer_name")
    assert mark_mlps(unmarked("llama")) == {LlamaMLP: "SwiGLUMLP"}
    assert mark_mlps(unmarked("llama")) == {}  # marked already
    assert mark_mlps(unmarked("gemma")) == {GemmaMLP: "GeGLUMLP"}
    assert mark_mlps(unmarked("phi3")) == {} and not hasattr(Phi3MLP, "kernel_layer_name")


def test_only_mlps_that_compute_the_llama_form_are_marked():
    """Many transformers MLPs with gate/up/down layers add a clamp, scale, dropout or norm:
    mark_mlps must leave those to their own forward."""
    from transformers.models.bitnet.modeling_bitnet import BitNetMLP
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4MLP
    from transformers.models.falcon_h1.modeling_falcon_h1 import FalconH1MLP
    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP
    from transformers.models.t5gemma.modeling_t5gemma import T5GemmaMLP

    assert hub._computes_llama_mlp(Qwen2MLP)  # `return self.down_proj(...)` directly
    for cls in (BitNetMLP, DeepseekV4MLP, FalconH1MLP, T5GemmaMLP):
        assert not hub._computes_llama_mlp(cls), cls

    class Scaled(torch.nn.Module):
        def forward(self, x):
            return 2 * self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    assert not hub._computes_llama_mlp(Scaled)


def _kernelized_mlp(hub_repo, arch):
    ref = build(arch).model.layers[0].mlp
    return ref, kernelized_copy(ref, hub_repo, Mode.TRAINING, "cpu")


def test_mlp_with_a_hooked_projection_runs_it_as_a_module(hub_repo):
    ref, ours = _kernelized_mlp(hub_repo, "llama")
    for m in (ref, ours):
        m.up_proj.register_forward_hook(lambda mod, args, out: out * 2)
    x = torch.randn(3, 4, 32)
    with pytest.warns(UserWarning, match=r"ffn.hub: LlamaMLP.up_proj \(.*\) has hooks"), CountFfnOps() as counted:
        got = ours(x)
    assert counted.calls.get("swiglu", 0) == 0 and counted.calls  # the elementwise ffn op, not the fused one
    torch.testing.assert_close(got, ref(x), rtol=1e-5, atol=1e-6)


def test_mlp_with_an_activation_ffn_lacks_runs_its_own_forward(hub_repo):
    ref, ours = _kernelized_mlp(hub_repo, "llama")
    ref.act_fn = ours.act_fn = torch.nn.Softplus()
    x = torch.randn(3, 4, 32)
    with CountFfnOps() as counted:
        got = ours(x)
    assert counted.calls == {}
    torch.testing.assert_close(got, ref(x), rtol=0, atol=0)


def _forward_returns(source, layer_name):
    """{class name: the forward's return statement, whitespace and comments removed} of the
    classes in `source` decorated with @use_kernel_forward_from_hub(layer_name)."""
    out = {}
    pattern = rf'@use_kernel_forward_from_hub\("{layer_name}"\)\nclass (\w+)\(.*?\n(?=\S)'
    for match in re.finditer(pattern, source, re.S):
        body = re.sub(r"#[^\n]*", "", match.group(0))
        start = body.index("\n    def forward")
        end = body.find("\n    def ", start + 1)
        forward = body[start:end if end != -1 else len(body)]
        out[match.group(1)] = (re.sub(r"\s+", "", forward[forward.rindex("return"):]), body)
    return out


def test_rms_norm_forms_cover_transformers():
    """Every class transformers decorates "RMSNorm" computes Llama's or Olmo2's form,
    PRODUCT_THEN_CAST lists exactly the latter, and the "RMSNormZeroCentered" classes
    compute Gemma's form (what _GemmaRMSNorm implements)."""
    forms = {"returnself.weight*hidden_states.to(input_dtype)": "llama",
             "return(self.weight*hidden_states).to(input_dtype)": "product_then_cast",
             "return(self.weight.to(torch.float32)*hidden_states).to(input_dtype)": "product_then_cast"}
    found = {"llama": set(), "product_then_cast": set()}
    zero_centered = set()
    for path in sorted((Path(T.__file__).parent / "models").glob("*/modeling_*.py")):
        source = path.read_text()
        for cls, (ret, body) in _forward_returns(source, "RMSNorm").items():
            assert ret in forms, f"{path.name}: {cls} returns {ret}"
            assert "hidden_states*torch.rsqrt(variance+self.variance_epsilon)" in re.sub(r"\s+", "", body), cls
            found[forms[ret]].add(cls)
        for cls, (ret, body) in _forward_returns(source, "RMSNormZeroCentered").items():
            flat = re.sub(r"\s+", "", body)
            assert ret == "returnoutput.type_as(x)" and "output*(1.0+self.weight.float())" in flat, cls
            assert "self._norm(x.float())" in flat and "+self.eps)" in flat, cls
            zero_centered.add(cls)
    assert found["product_then_cast"] == hub.PRODUCT_THEN_CAST
    assert {"LlamaRMSNorm", "Qwen3RMSNorm", "MistralRMSNorm"} <= found["llama"]
    assert "Qwen3_5RMSNorm" in zero_centered


# ----------------------------------------------------------------------------- the repository's own ffn
def test_repository_loads_its_own_ffn_in_a_fresh_interpreter(hub_repo):
    """Without an imported ffn, loading the repository imports its copy as `ffn`
    (the variant kernels picks), and a kernelized Llama runs on it."""
    script = textwrap.dedent(f"""
        from pathlib import Path
        import torch, transformers as T
        from kernels import Mode, get_local_kernel, kernelize, use_kernel_mapping
        from torch.utils._python_dispatch import TorchDispatchMode

        repo = Path({str(hub_repo)!r})
        layers = get_local_kernel(repo).layers
        import ffn
        assert Path(ffn.__file__).parents[2] == repo / "build", ffn.__file__
        assert layers is ffn.hub

        class Count(TorchDispatchMode):
            calls = 0

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                Count.calls += func.namespace == "ffn"
                return func(*args, **(kwargs or {{}}))

        torch.manual_seed(0)
        model = T.LlamaForCausalLM(T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                 vocab_size=97, num_attention_heads=4, num_key_value_heads=2))
        ids = torch.randint(2, 97, (2, 8))
        want = model(ids).logits
        ffn.hub.mark_mlps(model)
        with use_kernel_mapping(ffn.hub.kernel_mapping(repo), inherit_mapping=False):
            kernelize(model, mode=Mode.TRAINING, device="cpu")
        with Count():
            got = model(ids).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        print(Count.calls)
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-1] == "7"  # one ffn.rms_norm per RMSNorm, one ffn.swiglu per MLP
