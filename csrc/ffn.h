// The FFN ops (gelu_ffn, relu_ffn, the gated family) and the elementwise pieces.
//
// Every op is written once: argument checks, output allocation and the GEMMs
// (aten::mm through the dispatcher: MKL/oneDNN on CPU, cuBLAS on CUDA) in
// ffn.cpp. What differs per backend is the table of elementwise kernels
// (ActivationKernels) that the CPU files (csrc/cpu/) and the CUDA files
// (csrc/cuda/) supply. Each internal op is one function template below, its
// parameters the schema's (ops.cpp), instantiated with a backend's table where
// the backend registers it (cpu/ops.cpp, cuda/ops.cpp).
#pragma once

#include "activation_table.h"

#include "tensor.h"

#include <vector>
#include <string_view>
#include <tuple>

namespace ffn {

// ---------------------------------------------------------------------------
// Fused elementwise passes of the FFN ops. z is the pre-activation, [rows, F]
// (or [rows, 2F] gate|up when gated), h the hidden activation [rows, F].
struct ActivationKernels {
  // h = act(z + bias)                      (plain)
  // h = act(z_g + b_g) * (z_u + b_u)       (gated)
  // h may be z itself (plain): each step reads its z before it writes h there.
  void (*forward)(const Tensor& z, const Tensor& bias, Activation act, bool gated, const Tensor& h);
  // grad_z = d h / d z * grad_h, with z + bias as the pre-activation. If h is defined
  // it receives the recomputed hidden activation (what the down projection's weight
  // gradient needs). grad_z (plain) or h (gated) may alias grad_h. With bias_grad it returns
  // grad_z's column sums [z.size(1)], the pre-activation bias's gradient (else undefined).
  Tensor (*backward)(const Tensor& z, const Tensor& bias, const Tensor& grad_h, Activation act,
                     bool gated, const Tensor& grad_z, const Tensor& h, bool bias_grad);
};

namespace cpu {
extern const ActivationKernels kActivationKernels;
}  // namespace cpu
namespace cuda {  // csrc/cuda/, built when the extension has CUDA
extern const ActivationKernels kActivationKernels;
}  // namespace cuda

// out = down(act(x w_in^T + b_in)) for gelu_ffn and relu_ffn (gated = false) and the gated
// family (gated = true, w_in = w_gate_up). Returns (out, preact [rows, w_in.size(0)]); with
// keep_preact false (no backward to come), (out, an empty [0] tensor), and a plain FFN writes
// its activation over the pre-activation: one [rows, d_ff] buffer fewer.
std::tuple<Tensor, Tensor> ffn_forward(std::string_view op, const Tensor& x, const Tensor& w_in,
                                       const OptTensor& b_in, const Tensor& w_out,
                                       const OptTensor& b_out, Activation act, bool gated,
                                       const ActivationKernels& kernels, bool keep_preact);
// Gradients (x, w_in, b_in, w_out, b_out); those not in grad_mask are empty [0].
// op names the backward op in messages.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> ffn_backward(
    std::string_view op, const Tensor& grad_out, const Tensor& x, const Tensor& preact,
    const Tensor& w_in, const Tensor& w_out, Activation act, bool gated,
    const std::vector<bool>& grad_mask, const ActivationKernels& kernels);

// The elementwise pieces (gated_activation, bias_gelu), kernels given.
Tensor gated_activation_forward(const Tensor& gate_up, std::string_view activation,
                                const ActivationKernels& kernels);
Tensor gated_activation_backward(const Tensor& grad, const Tensor& gate_up,
                                 std::string_view activation, const ActivationKernels& kernels);
Tensor bias_gelu_forward(const Tensor& x, const OptTensor& bias, std::string_view approximate,
                         const ActivationKernels& kernels);
std::tuple<Tensor, Tensor> bias_gelu_backward(const Tensor& grad, const Tensor& x,
                                              const OptTensor& bias, std::string_view approximate,
                                              bool bias_grad, const ActivationKernels& kernels);

// --- the ops with backend kernels, as their schemas declare them -------------------

template <const ActivationKernels& K>
std::tuple<Tensor, Tensor> gelu_ffn_fwd(const Tensor& x, const Tensor& w1, const OptTensor& b1,
                                        const Tensor& w2, const OptTensor& b2,
                                        std::string_view approximate, bool keep_preact) {
  return ffn_forward("gelu_ffn", x, w1, b1, w2, b2, parse_gelu_approximate("gelu_ffn", approximate),
                     /*gated=*/false, K, keep_preact);
}

template <const ActivationKernels& K>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> gelu_ffn_bwd(
    const Tensor& grad_out, const Tensor& x, const Tensor& preact, const Tensor& w1,
    const Tensor& w2, std::string_view approximate, const std::vector<bool>& grad_mask) {
  return ffn_backward("_gelu_ffn_bwd", grad_out, x, preact, w1, w2,
                      parse_gelu_approximate("_gelu_ffn_bwd", approximate), /*gated=*/false,
                      grad_mask, K);
}

template <const ActivationKernels& K>
std::tuple<Tensor, Tensor> relu_ffn_fwd(const Tensor& x, const Tensor& w1, const OptTensor& b1,
                                        const Tensor& w2, const OptTensor& b2, bool keep_preact) {
  return ffn_forward("relu_ffn", x, w1, b1, w2, b2, Activation::kRelu, /*gated=*/false, K,
                     keep_preact);
}

template <const ActivationKernels& K>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> relu_ffn_bwd(
    const Tensor& grad_out, const Tensor& x, const Tensor& preact, const Tensor& w1,
    const Tensor& w2, const std::vector<bool>& grad_mask) {
  return ffn_backward("_relu_ffn_bwd", grad_out, x, preact, w1, w2, Activation::kRelu,
                      /*gated=*/false, grad_mask, K);
}

template <const ActivationKernels& K>
std::tuple<Tensor, Tensor> gated_ffn_fwd(const Tensor& x, const Tensor& w_gate_up,
                                         const OptTensor& b_gate_up, const Tensor& w_down,
                                         const OptTensor& b_down, std::string_view activation,
                                         bool keep_preact) {
  const Activation act = parse_gated_activation("_gated_ffn_fwd", activation);
  return ffn_forward(gated_ffn_name(act), x, w_gate_up, b_gate_up, w_down, b_down, act,
                     /*gated=*/true, K, keep_preact);
}

template <const ActivationKernels& K>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> gated_ffn_bwd(
    const Tensor& grad_out, const Tensor& x, const Tensor& preact, const Tensor& w_gate_up,
    const Tensor& w_down, std::string_view activation, const std::vector<bool>& grad_mask) {
  return ffn_backward("_gated_ffn_bwd", grad_out, x, preact, w_gate_up, w_down,
                      parse_gated_activation("_gated_ffn_bwd", activation), /*gated=*/true,
                      grad_mask, K);
}

template <const ActivationKernels& K>
Tensor gated_activation(const Tensor& gate_up, std::string_view activation) {
  return gated_activation_forward(gate_up, activation, K);
}

template <const ActivationKernels& K>
Tensor gated_activation_bwd(const Tensor& grad, const Tensor& gate_up, std::string_view activation) {
  return gated_activation_backward(grad, gate_up, activation, K);
}

template <const ActivationKernels& K>
Tensor bias_gelu(const Tensor& x, const OptTensor& bias, std::string_view approximate) {
  return bias_gelu_forward(x, bias, approximate, K);
}

template <const ActivationKernels& K>
std::tuple<Tensor, Tensor> bias_gelu_bwd(const Tensor& grad, const Tensor& x,
                                         const OptTensor& bias, std::string_view approximate,
                                         bool bias_grad) {
  return bias_gelu_backward(grad, x, bias, approximate, bias_grad, K);
}

}  // namespace ffn
