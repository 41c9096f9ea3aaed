"""Builds the `ffn` package (Python sources in ops/) and its extension `ffn._C`.

The extension uses only the LibTorch stable ABI (torch/csrc/stable, the stable C
shim, torch/headeronly), targeting torch 2.11, and Python's limited API: one
binary (`_C.abi3.so`, in an abi3 wheel: `make wheel`) loads into every torch from
2.11 on and every Python from 3.10 on. It links libtorch_cpu for the C shim and
nothing else of torch; the CUDA runtime is linked statically, so the same file
also loads where torch has no CUDA.

CPU sources are always built. The CUDA sources in csrc/cuda/ are built when the
installed torch has CUDA and nvcc is found (FFN_CUDA=0 or 1 forces the choice),
for the architectures in TORCH_CUDA_ARCH_LIST (default "8.0;9.0+PTX": sm_80,
sm_90 and PTX that newer GPUs compile at load time).

CPU kernels are compiled for AVX2+FMA when the build machine has it (x86-64),
the baseline otherwise. FFN_CPU_CAPABILITY=DEFAULT builds a portable binary on
an AVX2 machine.

FFN_NO_EXTENSION=1 installs the Python package alone (`make build` does that
editable, with the extension taken from the wheel).
"""

import glob
import os
import platform
import shutil

from setuptools import setup

# torch.utils.cpp_extension takes CUDA_HOME from the nvcc on PATH; a wrapper
# script such as /usr/local/bin/nvcc would make that /usr/local. Prefer the
# toolkit directory when there is one.
if not os.environ.get("CUDA_HOME") and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cpu_has(*flags):
    try:
        with open("/proc/cpuinfo") as f:
            cpu_flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return all(flag in cpu_flags for flag in flags)


def cpu_capability_flags():
    capability = os.environ.get("FFN_CPU_CAPABILITY")
    if capability is None:
        on_x86 = platform.machine() in ("x86_64", "AMD64")
        capability = "AVX2" if on_x86 and _cpu_has("avx2", "fma", "f16c") else "DEFAULT"
    if capability == "AVX2":
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    if capability == "DEFAULT":
        return []
    raise ValueError(f"FFN_CPU_CAPABILITY must be AVX2 or DEFAULT, got {capability!r}")


def want_cuda():
    forced = os.environ.get("FFN_CUDA")
    if forced is not None:
        return forced == "1"
    return torch.version.cuda is not None and CUDA_HOME is not None and (
        shutil.which("nvcc") is not None or os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    )


# The stable ABI of torch 2.11: the oldest torch the binary loads into.
TORCH_TARGET_VERSION = "-DTORCH_TARGET_VERSION=0x020b000000000000"


def extension():
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    cpu_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx_flags = ["-O3", "-DFFN_PYTHON_MODULE", TORCH_TARGET_VERSION] + cpu_capability_flags()
    include_dirs = [os.path.join(ROOT, "csrc")]
    if want_cuda():
        cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
        ext = CUDAExtension(
            "ffn._C",
            cpu_sources + cuda_sources,
            include_dirs=include_dirs,
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr", TORCH_TARGET_VERSION],
            },
            py_limited_api=True,
        )
        # The C shim lives in libtorch_cpu (the CUDA stream shim is looked up at run
        # time, cuda/runtime.cuh); the CUDA runtime is static: no libtorch_cuda,
        # libc10_cuda or libcudart dependency, so the binary loads into a CPU torch.
        ext.libraries = ["torch_cpu", "cudart_static", "dl", "rt", "pthread"]
        return ext
    ext = CppExtension(
        "ffn._C",
        cpu_sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags},
        py_limited_api=True,
    )
    ext.libraries = ["torch_cpu"]
    return ext


setup(
    name="ffn",
    version="0.1.0",
    description="Fused normalization + feed-forward ops for Transformers (CPU and CUDA) and an A/B harness",
    packages=["ffn", "ffn.harness", "ffn.harness.report"],
    package_dir={"ffn": "ops"},
    ext_modules=[] if os.environ.get("FFN_NO_EXTENSION") == "1" else [extension()],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
    python_requires=">=3.10",
    install_requires=["torch>=2.11"],
)
