// The CPU kernels of every op that has per-backend kernels: the op bodies
// (norm.h, ffn.h, telemetry.h) with the CPU kernel tables (cpu/norm.cpp,
// cpu/ffn.cpp, cpu/telemetry.cpp).
#include "ffn.h"
#include "norm.h"
#include "telemetry.h"

namespace ffn::cpu {

STABLE_TORCH_LIBRARY_IMPL(ffn, CPU, m) {
  m.impl("_layer_norm_fwd", TORCH_BOX(&layer_norm_fwd<kNormKernels>));
  m.impl("_layer_norm_bwd", TORCH_BOX(&layer_norm_bwd<kNormKernels>));
  m.impl("_layer_norm_bwd_", TORCH_BOX(&layer_norm_bwd_<kNormKernels>));
  m.impl("_rms_norm_fwd", TORCH_BOX(&rms_norm_fwd<kNormKernels>));
  m.impl("_rms_norm_bwd", TORCH_BOX(&rms_norm_bwd<kNormKernels>));
  m.impl("_rms_norm_bwd_", TORCH_BOX(&rms_norm_bwd_<kNormKernels>));
  m.impl("_add_layer_norm_fwd", TORCH_BOX(&add_layer_norm_fwd<kNormKernels>));
  m.impl("_add_rms_norm_fwd", TORCH_BOX(&add_rms_norm_fwd<kNormKernels>));
  m.impl("_gelu_ffn_fwd", TORCH_BOX(&gelu_ffn_fwd<kActivationKernels>));
  m.impl("_gelu_ffn_bwd", TORCH_BOX(&gelu_ffn_bwd<kActivationKernels>));
  m.impl("_relu_ffn_fwd", TORCH_BOX(&relu_ffn_fwd<kActivationKernels>));
  m.impl("_relu_ffn_bwd", TORCH_BOX(&relu_ffn_bwd<kActivationKernels>));
  m.impl("_gated_ffn_fwd", TORCH_BOX(&gated_ffn_fwd<kActivationKernels>));
  m.impl("_gated_ffn_bwd", TORCH_BOX(&gated_ffn_bwd<kActivationKernels>));
  m.impl("gated_activation", TORCH_BOX(&gated_activation<kActivationKernels>));
  m.impl("_gated_activation_bwd", TORCH_BOX(&gated_activation_bwd<kActivationKernels>));
  m.impl("bias_gelu", TORCH_BOX(&bias_gelu<kActivationKernels>));
  m.impl("_bias_gelu_bwd", TORCH_BOX(&bias_gelu_bwd<kActivationKernels>));
  m.impl("ffn_stats", TORCH_BOX(&ffn_stats<kTelemetryKernels>));
}

}  // namespace ffn::cpu
