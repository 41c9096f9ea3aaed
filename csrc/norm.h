// layer_norm and rms_norm (and their fused residual-add forms): the op bodies,
// backend-independent, and the kernel table each backend supplies.
//
// Each internal op (schemas in ops.cpp) is one function template below, its
// parameters the schema's, instantiated with a backend's kernel table where the
// backend registers it (cpu/ops.cpp, cuda/ops.cpp). The shared work (checks,
// layout, allocation) is norm_forward / norm_backward in norm.cpp; the row
// kernels are in cpu/norm.cpp and cuda/norm.cu.
#pragma once

#include "tensor.h"

#include <string_view>
#include <tuple>

namespace ffn {

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

// Calls fn(T{}, P{}) with T = x's dtype and P = the parameters' dtype: T, or
// float32 for a half precision x with float32 parameters. `param` is the weight
// (or, without one, the bias or its gradient); undefined means P = T. Both
// backends' kernels dispatch through it.
template <typename Fn>
void dispatch_norm_types(const Tensor& x, const Tensor& param, const Fn& fn) {
  dispatch_float_types(x.scalar_type(), "ffn_norm", [&](auto t) {
    using T = decltype(t);
    if constexpr (!std::is_same_v<T, acc_type<T>>) {
      if (param.defined() && param.scalar_type() == kFloat) return fn(t, float{});
    }
    fn(t, t);
  });
}

namespace cpu {
extern const NormKernels kNormKernels;
}  // namespace cpu
namespace cuda {  // csrc/cuda/, built when the extension has CUDA
extern const NormKernels kNormKernels;
}  // namespace cuda

struct NormOutputs {
  Tensor y, sum, mean, rstd;
};

// residual undefined: the plain norm (no sum output).
NormOutputs norm_forward(std::string_view op, const Tensor& x, const Tensor& residual,
                         const OptTensor& weight, const OptTensor& bias, double eps,
                         double weight_offset, bool center, const NormKernels& kernels);

// (grad_x, grad_weight, grad_bias); parameter gradients take the parameter's
// dtype, and those nobody asked for come back as empty [0] tensors. The bias is
// passed only for its dtype. grad_s (the fused add's gradient of its sum
// output) is added to grad_x when given. in_place: grad_x is grad_y, overwritten.
std::tuple<Tensor, Tensor, Tensor> norm_backward(std::string_view op, const Tensor& grad_y,
                                                 const Tensor& x, const Tensor& mean,
                                                 const Tensor& rstd, const OptTensor& weight,
                                                 const OptTensor& bias, bool weight_grad,
                                                 bool bias_grad, double weight_offset,
                                                 const OptTensor& grad_s, bool center,
                                                 bool in_place, const NormKernels& kernels);

// --- the internal ops ------------------------------------------------------------
// in_place_backward is read by the ops' autograd (ops/_registrations.py).

template <const NormKernels& K>
std::tuple<Tensor, Tensor, Tensor> layer_norm_fwd(const Tensor& x, const OptTensor& weight,
                                                  const OptTensor& bias, double eps,
                                                  double weight_offset, bool /*in_place_backward*/) {
  auto out = norm_forward("layer_norm", x, Tensor(), weight, bias, eps, weight_offset, true, K);
  return {out.y, out.mean, out.rstd};
}

template <const NormKernels& K>
std::tuple<Tensor, Tensor> rms_norm_fwd(const Tensor& x, const OptTensor& weight,
                                        const OptTensor& bias, double eps, double weight_offset,
                                        bool /*in_place_backward*/) {
  auto out = norm_forward("rms_norm", x, Tensor(), weight, bias, eps, weight_offset, false, K);
  return {out.y, out.rstd};
}

// Fused residual add + norm: s = x + residual in x's dtype, y = norm(s), the
// same numbers as the unfused pair.
template <const NormKernels& K>
std::tuple<Tensor, Tensor, Tensor, Tensor> add_layer_norm_fwd(
    const Tensor& x, const Tensor& residual, const OptTensor& weight, const OptTensor& bias,
    double eps, double weight_offset, bool /*in_place_backward*/) {
  auto out = norm_forward("add_layer_norm", x, residual, weight, bias, eps, weight_offset, true, K);
  return {out.y, out.sum, out.mean, out.rstd};
}

template <const NormKernels& K>
std::tuple<Tensor, Tensor, Tensor> add_rms_norm_fwd(const Tensor& x, const Tensor& residual,
                                                    const OptTensor& weight, const OptTensor& bias,
                                                    double eps, double weight_offset,
                                                    bool /*in_place_backward*/) {
  auto out = norm_forward("add_rms_norm", x, residual, weight, bias, eps, weight_offset, false, K);
  return {out.y, out.sum, out.rstd};
}

template <const NormKernels& K>
std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd(const Tensor& grad_y, const Tensor& x,
                                                  const Tensor& mean, const Tensor& rstd,
                                                  const OptTensor& weight, const OptTensor& bias,
                                                  bool weight_grad, bool bias_grad,
                                                  double weight_offset, const OptTensor& grad_s) {
  return norm_backward("layer_norm", grad_y, x, mean, rstd, weight, bias, weight_grad, bias_grad,
                       weight_offset, grad_s, /*center=*/true, /*in_place=*/false, K);
}

template <const NormKernels& K>
std::tuple<Tensor, Tensor, Tensor> rms_norm_bwd(const Tensor& grad_y, const Tensor& x,
                                                const Tensor& rstd, const OptTensor& weight,
                                                const OptTensor& bias, bool weight_grad,
                                                bool bias_grad, double weight_offset,
                                                const OptTensor& grad_s) {
  return norm_backward("rms_norm", grad_y, x, Tensor(), rstd, weight, bias, weight_grad, bias_grad,
                       weight_offset, grad_s, /*center=*/false, /*in_place=*/false, K);
}

// The in-place backward: grad_x written into grad_y; returns (grad_weight, grad_bias).
template <const NormKernels& K>
std::tuple<Tensor, Tensor> layer_norm_bwd_(const Tensor& grad_y, const Tensor& x,
                                           const Tensor& mean, const Tensor& rstd,
                                           const OptTensor& weight, const OptTensor& bias,
                                           bool weight_grad, bool bias_grad, double weight_offset,
                                           const OptTensor& grad_s) {
  auto grads = norm_backward("_layer_norm_bwd_", grad_y, x, mean, rstd, weight, bias, weight_grad,
                             bias_grad, weight_offset, grad_s, /*center=*/true, /*in_place=*/true, K);
  return {std::get<1>(grads), std::get<2>(grads)};
}

template <const NormKernels& K>
std::tuple<Tensor, Tensor> rms_norm_bwd_(const Tensor& grad_y, const Tensor& x, const Tensor& rstd,
                                         const OptTensor& weight, const OptTensor& bias,
                                         bool weight_grad, bool bias_grad, double weight_offset,
                                         const OptTensor& grad_s) {
  auto grads = norm_backward("_rms_norm_bwd_", grad_y, x, Tensor(), rstd, weight, bias, weight_grad,
                             bias_grad, weight_offset, grad_s, /*center=*/false, /*in_place=*/true, K);
  return {std::get<1>(grads), std::get<2>(grads)};
}

}  // namespace ffn
