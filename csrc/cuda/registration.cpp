// Registers the CUDA kernels of every op with per-backend kernels: norms
// (cuda/norm.cu), FFN elementwise passes (cuda/ffn.cu), telemetry
// (cuda/telemetry.cu). A host C++ file: the registration headers are heavy, and
// nvcc would parse them once per GPU architecture.
#include "ffn.h"
#include "registration.h"
#include "telemetry.h"

namespace ffn {

TORCH_LIBRARY_IMPL(ffn, CUDA, m) {
  register_backend_kernels<cuda::kNormKernels, cuda::kActivationKernels, cuda::kTelemetryKernels>(m);
}

}  // namespace ffn
