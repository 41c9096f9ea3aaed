// Backend-independent op bodies of the ffn library.
//
// Every op is written once here: argument checks, output allocation and (for the
// FFN ops) the GEMMs through ATen. What differs per backend is a small table of
// kernels (NormKernels, ActivationKernels) that the CPU files (csrc/cpu/) and the
// CUDA files (csrc/cuda/) pass in when they register the op (registration.h).
//
// Each internal op has one function here whose parameters are the op's, in
// schema order, followed by the kernel table: registration.h derives the
// registered kernel and the op's typed handle from that declaration.
#pragma once

#include "activation_table.h"

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <string_view>
#include <tuple>

namespace ffn {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// ---------------------------------------------------------------------------
// Norm kernels. All tensors are 2-D [rows, d] (or 1-D [d] / [rows]) and
// contiguous; an absent weight/bias, or a gradient nobody asked for, is an
// undefined Tensor. `center` selects LayerNorm (subtract the mean) over RMSNorm.
// mean/rstd are float32 (float64 for float64 inputs); mean is undefined for RMSNorm.
// The weight scales as (weight + weight_offset), formed in the accumulation type
// (weight_offset 1: Gemma's zero-centered gamma).
struct NormKernels {
  // With a residual (fused residual add), the row normalized is s = x + residual
  // rounded to x's dtype, written to `sum`; else residual and sum are undefined.
  void (*forward)(const Tensor& x, const Tensor& residual, const Tensor& weight, const Tensor& bias,
                  double eps, double weight_offset, bool center, const Tensor& y, const Tensor& sum,
                  const Tensor& mean, const Tensor& rstd);
  // x is the normalized input (s for the fused add). grad_sum, if defined, is
  // added to grad_x (the fused add's gradient of s). grad_x may be grad_y itself
  // (the in-place backward): every element of grad_y is read before grad_x is
  // written there, and never after.
  void (*backward)(const Tensor& grad_y, const Tensor& grad_sum, const Tensor& x,
                   const Tensor& mean, const Tensor& rstd, const Tensor& weight,
                   double weight_offset, bool center, const Tensor& grad_x,
                   const Tensor& grad_weight, const Tensor& grad_bias);
};

// in_place_backward is read by the ops' autograd (ops/_registrations.py): backward
// then writes grad_x into grad_y's storage when nothing else holds grad_y.
std::tuple<Tensor, Tensor, Tensor> layer_norm_forward(const Tensor& x, const OptTensor& weight,
                                                      const OptTensor& bias, double eps,
                                                      double weight_offset, bool in_place_backward,
                                                      const NormKernels& kernels);
std::tuple<Tensor, Tensor> rms_norm_forward(const Tensor& x, const OptTensor& weight,
                                            const OptTensor& bias, double eps,
                                            double weight_offset, bool in_place_backward,
                                            const NormKernels& kernels);
// Fused residual add + norm: (y, s, [mean,] rstd) with s = x + residual in x's
// dtype and y = norm(s), the same numbers as the unfused pair.
std::tuple<Tensor, Tensor, Tensor, Tensor> add_layer_norm_forward(
    const Tensor& x, const Tensor& residual, const OptTensor& weight, const OptTensor& bias,
    double eps, double weight_offset, bool in_place_backward, const NormKernels& kernels);
std::tuple<Tensor, Tensor, Tensor> add_rms_norm_forward(const Tensor& x, const Tensor& residual,
                                                        const OptTensor& weight,
                                                        const OptTensor& bias, double eps,
                                                        double weight_offset, bool in_place_backward,
                                                        const NormKernels& kernels);
// Returns (grad_x, grad_weight, grad_bias); parameter gradients take the
// parameter's dtype, and those nobody asked for come back as empty [0] tensors.
// The bias is passed only for its dtype. grad_s (the fused add's gradient of its
// sum output) is added to grad_x when given.
std::tuple<Tensor, Tensor, Tensor> layer_norm_backward(
    const Tensor& grad_y, const Tensor& x, const Tensor& mean, const Tensor& rstd,
    const OptTensor& weight, const OptTensor& bias, bool weight_grad, bool bias_grad,
    double weight_offset, const OptTensor& grad_s, const NormKernels& kernels);
std::tuple<Tensor, Tensor, Tensor> rms_norm_backward(
    const Tensor& grad_y, const Tensor& x, const Tensor& rstd, const OptTensor& weight,
    const OptTensor& bias, bool weight_grad, bool bias_grad, double weight_offset,
    const OptTensor& grad_s, const NormKernels& kernels);
// The same, with grad_x written into grad_y (contiguous, x's dtype and shape);
// returns (grad_weight, grad_bias).
std::tuple<Tensor, Tensor> layer_norm_backward_in_place(
    const Tensor& grad_y, const Tensor& x, const Tensor& mean, const Tensor& rstd,
    const OptTensor& weight, const OptTensor& bias, bool weight_grad, bool bias_grad,
    double weight_offset, const OptTensor& grad_s, const NormKernels& kernels);
std::tuple<Tensor, Tensor> rms_norm_backward_in_place(
    const Tensor& grad_y, const Tensor& x, const Tensor& rstd, const OptTensor& weight,
    const OptTensor& bias, bool weight_grad, bool bias_grad, double weight_offset,
    const OptTensor& grad_s, const NormKernels& kernels);

// ---------------------------------------------------------------------------
// Fused elementwise passes of the FFN ops. z is the pre-activation, [rows, F]
// (or [rows, 2F] gate|up when gated), h the hidden activation [rows, F].
struct ActivationKernels {
  // h = act(z + bias)                      (plain)
  // h = act(z_g + b_g) * (z_u + b_u)       (gated)
  void (*forward)(const Tensor& z, const Tensor& bias, Activation act, bool gated, const Tensor& h);
  // grad_z = d h / d z * grad_h, with z + bias as the pre-activation; grad_z may
  // alias grad_h when not gated. If h is defined it receives the recomputed
  // hidden activation (what the down projection's weight gradient needs).
  void (*backward)(const Tensor& z, const Tensor& bias, const Tensor& grad_h, Activation act,
                   bool gated, const Tensor& grad_z, const Tensor& h);
};

// out = down(act(x w_in^T + b_in)) for gelu_ffn and relu_ffn (gated = false) and the gated
// family (gated = true, w_in = w_gate_up). Returns (out, preact [rows, w_in.size(0)]).
std::tuple<Tensor, Tensor> ffn_forward(std::string_view op, const Tensor& x, const Tensor& w_in,
                                       const OptTensor& b_in, const Tensor& w_out,
                                       const OptTensor& b_out, Activation act, bool gated,
                                       const ActivationKernels& kernels);
// Gradients (x, w_in, b_in, w_out, b_out); those not in grad_mask are empty [0].
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> ffn_backward(
    const Tensor& grad_out, const Tensor& x, const Tensor& preact, const Tensor& w_in,
    const Tensor& w_out, Activation act, bool gated, std::array<bool, 5> grad_mask,
    const ActivationKernels& kernels);

// The internal FFN ops, as their schemas declare them.
std::tuple<Tensor, Tensor> gelu_ffn_forward(const Tensor& x, const Tensor& w1, const OptTensor& b1,
                                            const Tensor& w2, const OptTensor& b2,
                                            std::string_view approximate,
                                            const ActivationKernels& kernels);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> gelu_ffn_backward(
    const Tensor& grad_out, const Tensor& x, const Tensor& preact, const Tensor& w1,
    const Tensor& w2, std::string_view approximate, std::array<bool, 5> grad_mask,
    const ActivationKernels& kernels);
std::tuple<Tensor, Tensor> relu_ffn_forward(const Tensor& x, const Tensor& w1, const OptTensor& b1,
                                            const Tensor& w2, const OptTensor& b2,
                                            const ActivationKernels& kernels);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> relu_ffn_backward(
    const Tensor& grad_out, const Tensor& x, const Tensor& preact, const Tensor& w1,
    const Tensor& w2, std::array<bool, 5> grad_mask, const ActivationKernels& kernels);
std::tuple<Tensor, Tensor> gated_ffn_forward(const Tensor& x, const Tensor& w_gate_up,
                                             const OptTensor& b_gate_up, const Tensor& w_down,
                                             const OptTensor& b_down, std::string_view activation,
                                             const ActivationKernels& kernels);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> gated_ffn_backward(
    const Tensor& grad_out, const Tensor& x, const Tensor& preact, const Tensor& w_gate_up,
    const Tensor& w_down, std::string_view activation, std::array<bool, 5> grad_mask,
    const ActivationKernels& kernels);

// The elementwise pieces, for users who run their own GEMMs.
Tensor gated_activation_forward(const Tensor& gate_up, std::string_view activation,
                                const ActivationKernels& kernels);
Tensor gated_activation_backward(const Tensor& grad, const Tensor& gate_up,
                                 std::string_view activation, const ActivationKernels& kernels);
Tensor bias_gelu_forward(const Tensor& x, const OptTensor& bias, std::string_view approximate,
                         const ActivationKernels& kernels);
std::tuple<Tensor, Tensor> bias_gelu_backward(const Tensor& grad, const Tensor& x,
                                              const OptTensor& bias, std::string_view approximate,
                                              bool bias_grad, const ActivationKernels& kernels);

// ---------------------------------------------------------------------------
// Kernel tables of each backend.
namespace cpu {
extern const NormKernels kNormKernels;
extern const ActivationKernels kActivationKernels;
}  // namespace cpu
namespace cuda {  // csrc/cuda/, built when the extension has CUDA
extern const NormKernels kNormKernels;
extern const ActivationKernels kActivationKernels;
}  // namespace cuda

}  // namespace ffn
