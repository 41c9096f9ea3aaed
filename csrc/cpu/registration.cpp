// Registers the CPU kernels of every op with per-backend kernels: norms
// (cpu/norm.cpp), FFN elementwise passes (cpu/ffn.cpp), telemetry
// (cpu/telemetry.cpp).
#include "ffn.h"
#include "registration.h"
#include "telemetry.h"

namespace ffn {

TORCH_LIBRARY_IMPL(ffn, CPU, m) {
  register_backend_kernels<cpu::kNormKernels, cpu::kActivationKernels, cpu::kTelemetryKernels>(m);
}

}  // namespace ffn
