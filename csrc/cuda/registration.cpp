// Registers the CUDA kernels of every op (norm kernels: cuda/norm.cu, FFN
// elementwise kernels: cuda/activation.cu, telemetry: cuda/telemetry.cu). A host
// C++ file: the registration headers are heavy, and nvcc would parse them once
// per GPU architecture.
#include "ffn.h"
#include "registration.h"

namespace ffn {

TORCH_LIBRARY_IMPL(ffn, CUDA, m) {
  register_norm_kernels<cuda::kNormKernels>(m);
  register_activation_kernels<cuda::kActivationKernels>(m);
  register_telemetry_kernels<cuda::kTelemetryKernels>(m);
}

}  // namespace ffn
