"""ffn as a Hugging Face kernel repository: `kernels.kernelize` runs the norms that
transformers decorates with `@use_kernel_forward_from_hub(...)` on the ffn ops.

    from kernels import Mode, kernelize, use_kernel_mapping
    from ffn.hub import kernel_mapping, mark_mlps

    model = LlamaForCausalLM.from_pretrained(...)
    mark_mlps(model)   # the MLPs too (transformers marks only its norms)
    with use_kernel_mapping(kernel_mapping("build/hub")):
        kernelize(model, mode=Mode.TRAINING | Mode.TORCH_COMPILE, device="cuda")

The repository is built from ffn's wheel by `make hub` (or
`python -m ffn.hub build --wheel dist/ffn-*.whl --out build/hub`):

    build/hub/build/torch-stable-abi211-cpu-x86_64-linux/     (a CPU torch)
    build/hub/build/torch-stable-abi211-cu130-x86_64-linux/   (a CUDA 13.x torch)
        metadata.json   name "ffn", backend, digest of the files beside it
        __init__.py     the kernel module: imports ffn, `layers` = this module
        ffn/            the ffn package of the wheel, binary included

`torch-stable-abi211` is `kernels`' name for a build on the LibTorch stable ABI of
torch 2.11 (the wheel's `torch>=2.11`): it loads into every torch from 2.11 on. Both
variants hold the same files (the one binary has the CPU and the CUDA kernels); there
are two because `kernels` picks the variant by the torch build, not by the tensors'
device: a CPU torch takes the cpu variant, a CUDA torch the cu variant, named after
the CUDA release the binary was compiled with (kernels accepts it for a torch of the
same CUDA major version and a minor version at least as new). The variant only
exists when the binary has CUDA kernels. torch.ops.ffn can be registered once per
process, so the kernel module uses the `ffn` the process already imported and
otherwise imports its own copy under the name `ffn`.

Layers, under the names transformers gives them (each is a forward with no state of
its own that runs ffn.patching's implementation on the module's own parameters):

    RMSNorm              the "RMSNorm" classes: Llama's weight * x_hat.to(x.dtype), or
                         (weight * x_hat).to(x.dtype) for the classes in
                         PRODUCT_THEN_CAST (Olmo2, GPT-OSS, ...)
    RMSNormZeroCentered  Qwen3.5's x_hat * (1 + weight) in float32
    SwiGLUMLP, GeGLUMLP  a Llama-style MLP, down_proj(act_fn(gate_proj(x)) * up_proj(x)),
                         as the fused gated op for the module's own act_fn (silu: swiglu,
                         gelu / gelu_tanh: geglu, relu: reglu); another act_fn runs the
                         module's own forward

transformers 5.23 decorates no MLP class (its default mapping's "SwiGLUMLP" and
"GeGLUMLP" have no users): mark_mlps(model) marks a model's Llama-style MLP classes
for kernelize with kernels' own replace_kernel_forward_from_hub. Gemma's, T5's and
OLMo's norms and the other MLP layouts (Phi3's packed gate_up_proj, GPT-2, GPT-NeoX,
Falcon, T5) carry no hub name: ffn.patch puts those on the ffn ops.
"""

import argparse
import ast
import hashlib
import inspect
import json
import platform
import re
import shutil
import sys
import textwrap
import zipfile
from pathlib import Path

from torch import nn

from .patching import _activation_of, _GatedSplit, _GemmaRMSNorm, _LlamaRMSNorm, _Olmo2RMSNorm, fused_op_of, run_mlp

__all__ = ["LAYERS", "PRODUCT_THEN_CAST", "GeGLUMLP", "RMSNorm", "RMSNormZeroCentered", "SwiGLUMLP",
           "build_repository", "kernel_mapping", "mark_mlps"]

# The "RMSNorm"-decorated classes of transformers 5.23 whose forward returns
# (weight * x_hat).to(input_dtype); the other 129 return weight * x_hat.to(input_dtype).
# The two differ in the output dtype when x is half precision and the weight float32
# (autocast): x's dtype here, float32 for Llama. tests/test_hub.py checks the split
# against transformers' source.
PRODUCT_THEN_CAST = frozenset({
    "AfmoeRMSNorm", "BeamRMSNorm", "DeepseekV4RMSNorm", "FlexOlmoRMSNorm", "FlintRMSNorm", "GptOssRMSNorm",
    "Inkling2RMSNorm", "NemotronHRMSNorm", "NemotronH_Omni_RMSNorm", "Olmo2RMSNorm", "Olmo3RMSNorm",
    "OlmoHybridRMSNorm", "OpenAIPrivacyFilterRMSNorm",
})


# kernels replaces a decorated module's forward with the layer's forward bound to
# that module and refuses layers with members of their own (constructor,
# attributes, methods) other than these two flags.
class RMSNorm(nn.Module):
    """transformers' "RMSNorm": x / sqrt(mean(x^2) + variance_epsilon) * weight."""

    can_torch_compile = True
    has_backward = True

    def forward(self, hidden_states):
        # By the class or a base: a subclass (ffn.patch's, a user's) computes its base's form.
        cast = any(cls.__name__ in PRODUCT_THEN_CAST for cls in type(self).__mro__)
        return (_Olmo2RMSNorm if cast else _LlamaRMSNorm).forward(self, hidden_states)


class RMSNormZeroCentered(nn.Module):
    """transformers' "RMSNormZeroCentered" (Qwen3.5): x_hat * (1 + weight) in float32, with the module's `eps`."""

    can_torch_compile = True
    has_backward = True
    forward = _GemmaRMSNorm.forward


def _gated_mlp_forward(self, x):
    activation = _activation_of(self.act_fn)
    if activation is None:  # no ffn op for it: the module's own forward
        return type(self).forward(self, x)
    return run_mlp(self, x, _GatedSplit, activation, fused_op_of(activation, gated=True))


class SwiGLUMLP(nn.Module):
    """transformers' "SwiGLUMLP": a Llama-style MLP (gate_proj, up_proj, down_proj, act_fn)."""

    can_torch_compile = True
    has_backward = True
    forward = _gated_mlp_forward


class GeGLUMLP(nn.Module):
    """transformers' "GeGLUMLP": the same layout with a GELU act_fn (Gemma)."""

    can_torch_compile = True
    has_backward = True
    forward = _gated_mlp_forward


LAYERS = ("RMSNorm", "RMSNormZeroCentered", "SwiGLUMLP", "GeGLUMLP")


def _mlp_layer_of(activation):
    """The hub name of a Llama-style MLP with this activation: "GeGLUMLP" for the GELUs, else "SwiGLUMLP"."""
    op = fused_op_of(activation, gated=True) if activation else None
    return None if op is None else "GeGLUMLP" if op == "geglu" else "SwiGLUMLP"


def _computes_llama_mlp(cls):
    """Whether cls.forward is exactly `return self.down_proj(self.act_fn(self.gate_proj(x)) *
    self.up_proj(x))` (or the same through one local variable), read from its source: many
    transformers MLPs with these layers add a clamp, a scale, dropout or a norm."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
    except (OSError, TypeError, SyntaxError):
        return False
    fn = tree.body[0]
    args = fn.args
    if (not isinstance(fn, ast.FunctionDef) or len(args.args) != 2 or args.vararg or args.kwarg
            or args.kwonlyargs or args.defaults):
        return False
    x = args.args[1].arg
    body = [stmt for stmt in fn.body
            if not (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant))]  # docstring
    want = ast.dump(ast.parse(f"self.down_proj(self.act_fn(self.gate_proj({x})) * self.up_proj({x}))",
                              mode="eval").body)
    if len(body) == 1 and isinstance(body[0], ast.Return):
        return body[0].value is not None and ast.dump(body[0].value) == want
    if len(body) == 2 and isinstance(body[0], ast.Assign) and isinstance(body[1], ast.Return):
        (target,) = body[0].targets
        return (isinstance(target, ast.Name) and ast.dump(body[0].value) == want
                and isinstance(body[1].value, ast.Name) and body[1].value.id == target.id)
    return False


def mark_mlps(model):
    """Marks the classes of `model`'s Llama-style MLPs for kernels.kernelize, as "SwiGLUMLP" or
    "GeGLUMLP", with kernels.replace_kernel_forward_from_hub (transformers decorates no MLP
    class). A class is marked when its forward is exactly down_proj(act_fn(gate_proj(x)) *
    up_proj(x)) (no clamp, scale, dropout or norm: _computes_llama_mlp) and its act_fn is one
    ffn runs; classes that already carry a hub name are left as they are. It marks the class
    (every model of it), as kernels does; forward is unchanged until kernelize. Returns
    {class: layer name} of the classes it marked."""
    from kernels import replace_kernel_forward_from_hub

    marked, checked = {}, set()  # a class's source is read once, not once per module
    for module in model.modules():
        cls = type(module)
        if cls in checked:
            continue
        checked.add(cls)
        if hasattr(cls, "kernel_layer_name") or not _computes_llama_mlp(cls):
            continue
        layer = _mlp_layer_of(_activation_of(getattr(module, "act_fn", None)))
        if layer is not None:
            replace_kernel_forward_from_hub(cls, layer)
            marked[cls] = layer
    return marked


def kernel_mapping(repo_path):
    """The mapping for kernels.use_kernel_mapping / register_kernel_mapping that sends
    every name in LAYERS to the ffn repository at `repo_path`, on "cpu" and "cuda", for
    the modes TRAINING and INFERENCE, each with and without TORCH_COMPILE."""
    from kernels import LocalLayerRepository, Mode

    path = Path(repo_path).resolve()
    if not (path / "build").is_dir():
        raise FileNotFoundError(f"{path} is not an ffn kernel repository (no build/): build it with `make hub` "
                                "or `python -m ffn.hub build`")
    modes = (Mode.TRAINING, Mode.INFERENCE, Mode.TRAINING | Mode.TORCH_COMPILE, Mode.INFERENCE | Mode.TORCH_COMPILE)
    return {name: {device: {mode: LocalLayerRepository(path, layer_name=name) for mode in modes}
                   for device in ("cpu", "cuda")}
            for name in LAYERS}


# ----------------------------------------------------------------------------- the repository
_KERNEL_MODULE = '''"""ffn's layers for the Hugging Face `kernels` library (written by `python -m ffn.hub build`).

`layers` is ffn.hub: the layer classes under the names transformers decorates.
"""

import importlib.util
import sys
from pathlib import Path

# torch.ops.ffn can be registered once per process: a process that already imported
# ffn keeps it; otherwise this repository's copy of the package becomes `ffn`.
if "ffn" not in sys.modules:
    _spec = importlib.util.spec_from_file_location("ffn", Path(__file__).parent / "ffn" / "__init__.py")
    _ffn = importlib.util.module_from_spec(_spec)
    sys.modules["ffn"] = _ffn
    try:
        _spec.loader.exec_module(_ffn)
    except BaseException:
        del sys.modules["ffn"]
        raise

from ffn import hub as layers  # noqa: E402
'''

_README = """---
library_name: kernels
---

# ffn

ffn's fused RMSNorm and gated MLPs for `kernels.kernelize` (layers: {layers}), on
CPU and CUDA, training and inference, with and without torch.compile. Variants:
{variants}.

```python
from kernels import Mode, kernelize, use_kernel_mapping
from ffn.hub import kernel_mapping, mark_mlps

mark_mlps(model)   # transformers decorates its norms, not its MLPs
with use_kernel_mapping(kernel_mapping("path/to/this/repository")):
    kernelize(model, mode=Mode.INFERENCE, device="cuda")
```
"""

_CUDA_RELEASE = re.compile(rb"Cuda compilation tools, release (\d+)\.(\d+)")
_LINUX_TAG = re.compile(r"(?:many)?linux(?:\d+|_\d+_\d+)?_(\w+)")
# No license is declared by the project; SPDX's value for "none stated".
_LICENSE = "NOASSERTION"


def _wheel_contents(wheel):
    """(files {path in the package: bytes}, Requires-Dist lines, (cpu, os)) of a wheel of ffn."""
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        files = {n[len("ffn/"):]: zf.read(n) for n in names if n.startswith("ffn/") and not n.endswith("/")}
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        requires = [line.split(":", 1)[1].strip() for line in zf.read(f"{info}/METADATA").decode().splitlines()
                    if line.startswith("Requires-Dist:")]
        tags = [line.split(":", 1)[1].strip() for line in zf.read(f"{info}/WHEEL").decode().splitlines()
                if line.startswith("Tag:")]
    platforms = {tag.rsplit("-", 1)[1] for tag in tags}
    if len(platforms) != 1 or not _LINUX_TAG.fullmatch(next(iter(platforms))):
        raise ValueError(f"{wheel}: expected a wheel for one Linux platform, got the tags {tags}")
    return files, requires, (_LINUX_TAG.fullmatch(platforms.pop()).group(1), "linux")


def _installed_contents():
    """The same for the ffn package this process imported (an installed or editable ffn)."""
    from importlib.metadata import requires

    root = Path(__file__).parent
    files = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
             if p.is_file() and "__pycache__" not in p.parts}
    return files, requires("ffn") or [], (platform.machine(), platform.system().lower())


def _min_torch(requires):
    """(major, minor) of the `torch>=X.Y` requirement: the stable ABI the binary targets."""
    from packaging.requirements import Requirement

    for line in requires:
        req = Requirement(line)
        if req.name == "torch":
            for spec in req.specifier:
                if spec.operator == ">=":
                    major, minor = spec.version.split(".")[:2]
                    return int(major), int(minor)
    raise ValueError(f"ffn's requirements {requires} name no minimum torch (torch>=X.Y)")


def build_repository(out, wheel=None):
    """Writes the kernel repository into `out` (replacing it) from `wheel`, a wheel of
    ffn, or from the ffn package this process imported when wheel is None. Returns the
    variant directories."""
    files, requires, (cpu, os_name) = _wheel_contents(wheel) if wheel else _installed_contents()
    if "hub.py" not in files:
        raise ValueError(f"{wheel}: this ffn has no ffn.hub (a wheel built before it): rebuild it (make -B wheel)")
    binaries = [name for name in files if re.fullmatch(r"_C\.[\w.-]*so", name)]
    if len(binaries) != 1:
        raise ValueError(f"expected one binary ffn/_C*.so, found {binaries}")
    abi = "torch-stable-abi{}{}".format(*_min_torch(requires))
    backends = ["cpu"]
    cuda = _CUDA_RELEASE.search(files[binaries[0]])
    if cuda:  # the binary has CUDA kernels: the CUDA runtime it links statically
        backends.append(f"cu{int(cuda.group(1))}{int(cuda.group(2))}")

    from kernels._rust import Digest, DigestAlgorithm

    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    variants = []
    for backend in backends:
        variant = out / "build" / f"{abi}-{backend}-{cpu}-{os_name}"
        for name, data in files.items():
            path = variant / "ffn" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        (variant / "__init__.py").write_text(_KERNEL_MODULE)
        digest = Digest.hash_variant(DigestAlgorithm.SHA256, variant)
        # The id names the kernel module in sys.modules: unique per build and backend.
        build_id = hashlib.sha256(json.dumps(digest.files, sort_keys=True).encode()).hexdigest()[:12]
        metadata = {
            "id": f"_ffn_{backend}_{build_id}",
            "name": "ffn",
            "version": 1,
            "license": _LICENSE,
            "python-depends": [],
            "backend": {"type": "cpu" if backend == "cpu" else "cuda"},
            "digest": {"algorithm": "sha256", "files": digest.files},
        }
        (variant / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
        variants.append(variant)
    (out / "README.md").write_text(_README.format(layers=", ".join(LAYERS),
                                                  variants=", ".join(v.name for v in variants)))
    return variants


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m ffn.hub", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="write the kernel repository")
    build.add_argument("--wheel", help="a wheel of ffn (default: the installed ffn package)")
    build.add_argument("--out", default="build/hub", help="the repository directory (default: build/hub)")
    args = parser.parse_args(argv)
    try:
        variants = build_repository(args.out, wheel=args.wheel)
    except (OSError, ValueError) as e:
        parser.exit(1, f"{parser.prog} build: {e}\n")
    for variant in variants:
        print(variant)
    return 0


if __name__ == "__main__":
    sys.exit(main())
