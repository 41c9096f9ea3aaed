// Registers one backend's kernels for every op that has per-backend kernels.
// CPU (ffn_cpu.cpp) and CUDA (cuda/registration.cpp) differ only in the kernel
// tables they pass, so the op signatures are written once, here.
#pragma once

#include "ffn.h"
#include "telemetry.h"

#include <torch/library.h>

namespace ffn {

template <const NormKernels& K>
void register_norm_kernels(torch::Library& m) {
  m.impl("_layer_norm_fwd", [](const Tensor& x, const OptTensor& w, const OptTensor& b, double eps) {
    return layer_norm_forward(x, w, b, eps, K);
  });
  m.impl("_layer_norm_bwd", [](const Tensor& grad_y, const Tensor& x, const Tensor& mean,
                               const Tensor& rstd, const OptTensor& w, const OptTensor& b,
                               bool weight_grad, bool bias_grad) {
    return layer_norm_backward(grad_y, x, mean, rstd, w, b, weight_grad, bias_grad, K);
  });
  m.impl("_rms_norm_fwd", [](const Tensor& x, const OptTensor& w, const OptTensor& b, double eps) {
    return rms_norm_forward(x, w, b, eps, K);
  });
  m.impl("_rms_norm_bwd", [](const Tensor& grad_y, const Tensor& x, const Tensor& rstd,
                             const OptTensor& w, const OptTensor& b, bool weight_grad,
                             bool bias_grad) {
    return rms_norm_backward(grad_y, x, rstd, w, b, weight_grad, bias_grad, K);
  });
}

template <const ActivationKernels& K>
void register_activation_kernels(torch::Library& m) {
  m.impl("_gelu_ffn_fwd", [](const Tensor& x, const Tensor& w1, const OptTensor& b1,
                             const Tensor& w2, const OptTensor& b2, std::string_view approximate) {
    return ffn_forward("gelu_ffn", x, w1, b1, w2, b2,
                       parse_gelu_approximate("gelu_ffn", approximate), /*gated=*/false, K);
  });
  m.impl("_gelu_ffn_bwd", [](const Tensor& grad_out, const Tensor& x, const Tensor& preact,
                             const Tensor& w1, const Tensor& w2, std::string_view approximate,
                             std::array<bool, 5> grad_mask) {
    return ffn_backward(grad_out, x, preact, w1, w2,
                        parse_gelu_approximate("gelu_ffn", approximate), /*gated=*/false,
                        grad_mask, K);
  });
  m.impl("_gated_ffn_fwd", [](const Tensor& x, const Tensor& w_gate_up, const OptTensor& b_gate_up,
                              const Tensor& w_down, const OptTensor& b_down,
                              std::string_view activation) {
    const Activation act = parse_gated_activation("_gated_ffn_fwd", activation);
    return ffn_forward(gated_ffn_name(act), x, w_gate_up, b_gate_up, w_down, b_down, act,
                       /*gated=*/true, K);
  });
  m.impl("_gated_ffn_bwd", [](const Tensor& grad_out, const Tensor& x, const Tensor& preact,
                              const Tensor& w_gate_up, const Tensor& w_down,
                              std::string_view activation, std::array<bool, 5> grad_mask) {
    return ffn_backward(grad_out, x, preact, w_gate_up, w_down,
                        parse_gated_activation("_gated_ffn_bwd", activation), /*gated=*/true,
                        grad_mask, K);
  });
  m.impl("gated_activation", [](const Tensor& gate_up, std::string_view activation) {
    return gated_activation_forward(gate_up, activation, K);
  });
  m.impl("_gated_activation_bwd",
         [](const Tensor& grad, const Tensor& gate_up, std::string_view activation) {
           return gated_activation_backward(grad, gate_up, activation, K);
         });
  m.impl("bias_gelu", [](const Tensor& x, const OptTensor& bias, std::string_view approximate) {
    return bias_gelu_forward(x, bias, approximate, K);
  });
  m.impl("_bias_gelu_bwd", [](const Tensor& grad, const Tensor& x, const OptTensor& bias,
                              std::string_view approximate, bool bias_grad) {
    return bias_gelu_backward(grad, x, bias, approximate, bias_grad, K);
  });
}

template <const TelemetryKernels& K>
void register_telemetry_kernels(torch::Library& m) {
  m.impl("ffn_stats", [](const Tensor& ffn_input, const Tensor& preact,
                         std::string_view activation, bool gated, double near_zero, double large,
                         double outlier) {
    return ffn_stats(ffn_input, preact, activation, gated, near_zero, large, outlier, K);
  });
}

}  // namespace ffn
