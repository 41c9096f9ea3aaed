"""ffn: fused normalization + feed-forward ops for Transformers, on CPU and CUDA.

`import ffn` registers the ops as torch.ops.ffn.*:

    layer_norm(x, weight, bias, eps=1e-5, weight_offset=0.)
    rms_norm(x, weight, bias, eps=1e-6, weight_offset=0.)
    add_layer_norm / add_rms_norm(x, residual, weight, bias, eps, weight_offset) -> (y, x + residual)
    gelu_ffn(x, w1, b1, w2, b2, approximate="none")      relu_ffn(x, w1, b1, w2, b2)
    swiglu / geglu / reglu(x, w_gate_up, b_gate_up, w_down, b_down, approximate="none")
    gated_activation(gate_up, activation="silu")   bias_gelu(x, bias, approximate="none")

    ffn_stats(ffn_input, preact, activation, gated, ...)   (per-layer FFN telemetry)

and provides drop-in modules (LayerNorm, RMSNorm, GemmaRMSNorm, AddLayerNorm,
AddRMSNorm, GeluFFN, ReluFFN, SwiGLU, GeGLU, ReGLU;
the FFN modules share the ffn.modules.FFN interface). ffn.reference holds the same
math in plain PyTorch; ffn.telemetry names, combines and summarizes the telemetry
sums; ffn.activations is the table of activations and ffn.schema reads the ops'
defaults. ffn.patch(model) puts a Hugging Face transformers model on the ops
and ffn.unpatch(model) takes it off (both from ffn.patching; ffn.telemetry.record
records a patched model's FFN telemetry);
ffn.distributed holds their DTensor sharding strategies and tensor-parallel plans.
The A/B harness is the separate subpackage ffn.harness, which `import ffn` does
not load.
"""

import torch

from . import _C  # noqa: F401  (loads the C++/CUDA library: schemas and kernels)
from . import _registrations  # noqa: F401  (autograd and fake kernels)
from . import distributed  # noqa: F401  (DTensor strategies, registered when torch.distributed.tensor loads)
from . import activations, modules, patching, reference, schema, telemetry
from .modules import (FFN, AddLayerNorm, AddRMSNorm, GatedFFN, GeGLU, GeluFFN, GemmaRMSNorm, LayerNorm, ReGLU,
                      ReluFFN, RMSNorm, SwiGLU)
from .patching import patch, unpatch  # HF transformers models (import transformers only when called)

ops = torch.ops.ffn


def release_cpu_scratch():
    """Frees the calling thread's CPU scratch buffers: the FFN ops' temporaries (hidden activation,
    its gradient, the pre-activation's gradient, and without autograd the pre-activation), which
    each thread keeps between calls up to FFN_CPU_SCRATCH_LIMIT_MB MiB each (128 by default), as
    the CUDA caching allocator keeps memory. The thread's next FFN call allocates them again.
    Other threads keep theirs (they free them when they exit). Nothing to free on CUDA."""
    _C.release_cpu_scratch()


__all__ = ["FFN", "AddLayerNorm", "AddRMSNorm", "GatedFFN", "GeGLU", "GeluFFN", "GemmaRMSNorm", "LayerNorm", "ReGLU",
           "ReluFFN", "RMSNorm", "SwiGLU", "activations",
           "distributed", "modules", "ops", "patch", "patching", "reference", "release_cpu_scratch", "schema", "telemetry",
           "unpatch"]
__version__ = "0.1.0"
