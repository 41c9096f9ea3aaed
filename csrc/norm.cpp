// layer_norm and rms_norm op bodies (and their fused residual-add forms): checks,
// layout and allocation. The row kernels live in cpu/norm.cpp and cuda/norm.cu.
#include "common.h"
#include "ffn.h"

#include <ATen/ATen.h>
#include <c10/util/accumulate.h>

#include <cmath>

namespace ffn {

namespace {

at::ScalarType stat_dtype(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_params(std::string_view op, const Tensor& x, const Tensor& weight, const Tensor& bias,
                  double weight_offset) {
  const int64_t d = x.size(-1);
  if (weight.defined()) check_vector_param(op, "weight", weight, x, d, /*allow_float32=*/true);
  if (bias.defined()) check_vector_param(op, "bias", bias, x, d, /*allow_float32=*/true);
  if (weight.defined() && bias.defined()) check_same_dtype(op, "bias", bias, "weight", weight);
  TORCH_CHECK(std::isfinite(weight_offset), "ffn.", op,
              ": weight_offset must be a finite number, got ", weight_offset);
  TORCH_CHECK(weight_offset == 0 || weight.defined(), "ffn.", op, ": weight_offset (",
              weight_offset, ") scales a weight, but weight is None");
}

struct NormOutputs {
  Tensor y, sum, mean, rstd;
};

// residual undefined: the plain norm (no sum output).
NormOutputs norm_forward(std::string_view op, const Tensor& x, const Tensor& residual,
                         const OptTensor& weight, const OptTensor& bias, double eps,
                         double weight_offset, bool center, const NormKernels& kernels) {
  check_input(op, "x", x);
  if (residual.defined()) {
    check_same_device(op, "residual", residual, x);
    TORCH_CHECK(residual.sizes() == x.sizes() && residual.scalar_type() == x.scalar_type(), "ffn.",
                op, ": residual must have x's shape ", x.sizes(), " and dtype ", x.scalar_type(),
                ", got ", residual.sizes(), " of ", residual.scalar_type());
  }
  const Tensor w = contiguous_or_undefined(weight);
  const Tensor b = contiguous_or_undefined(bias);
  check_params(op, x, w, b, weight_offset);
  check_eps(op, eps);

  const auto stat_sizes = x.sizes().slice(0, x.dim() - 1);
  const auto contiguous = x.options().memory_format(at::MemoryFormat::Contiguous);
  NormOutputs out;
  out.y = at::empty(x.sizes(), contiguous);
  out.sum = residual.defined() ? at::empty(x.sizes(), contiguous) : Tensor();
  out.rstd = at::empty(stat_sizes, x.options().dtype(stat_dtype(x)));
  out.mean = center ? at::empty(stat_sizes, out.rstd.options()) : Tensor();
  kernels.forward(as_rows(x), residual.defined() ? as_rows(residual) : Tensor(), w, b, eps,
                  weight_offset, center, as_rows(out.y),
                  residual.defined() ? as_rows(out.sum) : Tensor(),
                  center ? out.mean.view({-1}) : Tensor(), out.rstd.view({-1}));
  return out;
}

// in_place: grad_x is written into grad_y (and returned).
std::tuple<Tensor, Tensor, Tensor> norm_backward(std::string_view op, const Tensor& grad_y,
                                                 const Tensor& x, const Tensor& mean,
                                                 const Tensor& rstd, const OptTensor& weight,
                                                 const OptTensor& bias, bool weight_grad,
                                                 bool bias_grad, double weight_offset,
                                                 const OptTensor& grad_s, bool center,
                                                 bool in_place, const NormKernels& kernels) {
  check_input(op, "x", x);
  check_grad(op, grad_y, x.sizes(), x);
  const Tensor gs = grad_s.has_value() ? *grad_s : Tensor();
  if (gs.defined()) check_grad(op, gs, x.sizes(), x);
  const int64_t d = x.size(-1);
  const Tensor w = contiguous_or_undefined(weight);
  const Tensor b = contiguous_or_undefined(bias);
  check_params(op, x, w, b, weight_offset);
  const int64_t rows = c10::multiply_integers(x.sizes().slice(0, x.dim() - 1));
  TORCH_CHECK(rstd.numel() == rows && rstd.scalar_type() == stat_dtype(x), "ffn.", op,
              ": rstd must hold one ", stat_dtype(x), " per row (", rows, "), got ", rstd.numel(),
              " of ", rstd.scalar_type());
  TORCH_CHECK(!center || (mean.numel() == rows && mean.scalar_type() == stat_dtype(x)), "ffn.",
              op, ": mean must hold one ", stat_dtype(x), " per row (", rows, ")");
  TORCH_CHECK(!weight_grad || w.defined(), "ffn.", op, ": weight_grad needs the weight");
  TORCH_CHECK(!bias_grad || b.defined(), "ffn.", op, ": bias_grad needs the bias");
  TORCH_CHECK(!in_place || grad_y.is_contiguous(), "ffn.", op,
              ": the in-place backward writes grad_x into grad_y, which must be contiguous");
  TORCH_CHECK(!in_place || !gs.defined() || !gs.is_same(grad_y), "ffn.", op,
              ": the in-place backward needs grad_s and grad_y to be different tensors");
  // Parameter gradients take the parameter's dtype (float32 weights with half x).
  Tensor grad_x = in_place ? grad_y
                           : at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  Tensor grad_weight = at::empty({weight_grad ? d : 0}, w.defined() ? w.options() : x.options());
  Tensor grad_bias = at::empty({bias_grad ? d : 0}, b.defined() ? b.options() : x.options());
  kernels.backward(as_rows(grad_y), gs.defined() ? as_rows(gs) : Tensor(), as_rows(x),
                   center ? mean.contiguous().view({-1}) : Tensor(), rstd.contiguous().view({-1}),
                   w, weight_offset, center, as_rows(grad_x), weight_grad ? grad_weight : Tensor(),
                   bias_grad ? grad_bias : Tensor());
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> layer_norm_forward(const Tensor& x, const OptTensor& weight,
                                                      const OptTensor& bias, double eps,
                                                      double weight_offset,
                                                      bool /*in_place_backward: for autograd*/,
                                                      const NormKernels& kernels) {
  auto out = norm_forward("layer_norm", x, Tensor(), weight, bias, eps, weight_offset,
                          /*center=*/true, kernels);
  return {out.y, out.mean, out.rstd};
}

std::tuple<Tensor, Tensor> rms_norm_forward(const Tensor& x, const OptTensor& weight,
                                            const OptTensor& bias, double eps,
                                            double weight_offset,
                                            bool /*in_place_backward: for autograd*/,
                                            const NormKernels& kernels) {
  auto out = norm_forward("rms_norm", x, Tensor(), weight, bias, eps, weight_offset,
                          /*center=*/false, kernels);
  return {out.y, out.rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> add_layer_norm_forward(
    const Tensor& x, const Tensor& residual, const OptTensor& weight, const OptTensor& bias,
    double eps, double weight_offset, bool /*in_place_backward: for autograd*/,
    const NormKernels& kernels) {
  auto out = norm_forward("add_layer_norm", x, residual, weight, bias, eps, weight_offset,
                          /*center=*/true, kernels);
  return {out.y, out.sum, out.mean, out.rstd};
}

std::tuple<Tensor, Tensor, Tensor> add_rms_norm_forward(const Tensor& x, const Tensor& residual,
                                                        const OptTensor& weight,
                                                        const OptTensor& bias, double eps,
                                                        double weight_offset,
                                                        bool /*in_place_backward: for autograd*/,
                                                        const NormKernels& kernels) {
  auto out = norm_forward("add_rms_norm", x, residual, weight, bias, eps, weight_offset,
                          /*center=*/false, kernels);
  return {out.y, out.sum, out.rstd};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_backward(
    const Tensor& grad_y, const Tensor& x, const Tensor& mean, const Tensor& rstd,
    const OptTensor& weight, const OptTensor& bias, bool weight_grad, bool bias_grad,
    double weight_offset, const OptTensor& grad_s, const NormKernels& kernels) {
  return norm_backward("layer_norm", grad_y, x, mean, rstd, weight, bias, weight_grad, bias_grad,
                       weight_offset, grad_s, /*center=*/true, /*in_place=*/false, kernels);
}

std::tuple<Tensor, Tensor, Tensor> rms_norm_backward(
    const Tensor& grad_y, const Tensor& x, const Tensor& rstd, const OptTensor& weight,
    const OptTensor& bias, bool weight_grad, bool bias_grad, double weight_offset,
    const OptTensor& grad_s, const NormKernels& kernels) {
  return norm_backward("rms_norm", grad_y, x, Tensor(), rstd, weight, bias, weight_grad, bias_grad,
                       weight_offset, grad_s, /*center=*/false, /*in_place=*/false, kernels);
}

std::tuple<Tensor, Tensor> layer_norm_backward_in_place(
    const Tensor& grad_y, const Tensor& x, const Tensor& mean, const Tensor& rstd,
    const OptTensor& weight, const OptTensor& bias, bool weight_grad, bool bias_grad,
    double weight_offset, const OptTensor& grad_s, const NormKernels& kernels) {
  auto [grad_x, grad_weight, grad_bias] =
      norm_backward("_layer_norm_bwd_", grad_y, x, mean, rstd, weight, bias, weight_grad, bias_grad,
                    weight_offset, grad_s, /*center=*/true, /*in_place=*/true, kernels);
  return {grad_weight, grad_bias};
}

std::tuple<Tensor, Tensor> rms_norm_backward_in_place(
    const Tensor& grad_y, const Tensor& x, const Tensor& rstd, const OptTensor& weight,
    const OptTensor& bias, bool weight_grad, bool bias_grad, double weight_offset,
    const OptTensor& grad_s, const NormKernels& kernels) {
  auto [grad_x, grad_weight, grad_bias] =
      norm_backward("_rms_norm_bwd_", grad_y, x, Tensor(), rstd, weight, bias, weight_grad,
                    bias_grad, weight_offset, grad_s, /*center=*/false, /*in_place=*/true, kernels);
  return {grad_weight, grad_bias};
}

}  // namespace ffn
