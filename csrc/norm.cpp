// layer_norm and rms_norm op bodies: checks, layout and allocation. The row
// kernels live in cpu/norm.cpp and cuda/norm.cu.
#include "common.h"
#include "ffn.h"

#include <ATen/ATen.h>
#include <c10/util/accumulate.h>

namespace ffn {

namespace {

at::ScalarType stat_dtype(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<Tensor, Tensor, Tensor> norm_forward(std::string_view op, const Tensor& x,
                                                const OptTensor& weight, const OptTensor& bias,
                                                double eps, bool center,
                                                const NormKernels& kernels) {
  check_input(op, "x", x);
  const int64_t d = x.size(-1);
  if (weight.has_value() && weight->defined()) {
    check_vector_param(op, "weight", *weight, x, d, /*allow_float32=*/true);
  }
  if (bias.has_value() && bias->defined()) {
    check_vector_param(op, "bias", *bias, x, d, /*allow_float32=*/true);
  }
  if (weight.has_value() && weight->defined() && bias.has_value() && bias->defined()) {
    check_same_dtype(op, "bias", *bias, "weight", *weight);
  }
  check_eps(op, eps);

  const Tensor x2d = as_rows(x);
  const auto stat_sizes = x.sizes().slice(0, x.dim() - 1);
  Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  Tensor rstd = at::empty(stat_sizes, x.options().dtype(stat_dtype(x)));
  Tensor mean = center ? at::empty(stat_sizes, rstd.options()) : Tensor();
  kernels.forward(x2d, contiguous_or_undefined(weight), contiguous_or_undefined(bias), eps, center,
                  as_rows(y), center ? mean.view({-1}) : mean, rstd.view({-1}));
  return {y, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> norm_backward(std::string_view op, const Tensor& grad_y,
                                                 const Tensor& x, const Tensor& mean,
                                                 const Tensor& rstd, const OptTensor& weight,
                                                 const OptTensor& bias, bool weight_grad,
                                                 bool bias_grad, bool center,
                                                 const NormKernels& kernels) {
  check_input(op, "x", x);
  check_grad(op, grad_y, x.sizes(), x);
  const int64_t d = x.size(-1);
  const Tensor w = contiguous_or_undefined(weight);
  if (w.defined()) {
    check_vector_param(op, "weight", w, x, d, /*allow_float32=*/true);
  }
  const int64_t rows = c10::multiply_integers(x.sizes().slice(0, x.dim() - 1));
  TORCH_CHECK(rstd.numel() == rows && rstd.scalar_type() == stat_dtype(x), "ffn.", op,
              ": rstd must hold one ", stat_dtype(x), " per row (", rows, "), got ", rstd.numel(),
              " of ", rstd.scalar_type());
  TORCH_CHECK(!center || (mean.numel() == rows && mean.scalar_type() == stat_dtype(x)), "ffn.",
              op, ": mean must hold one ", stat_dtype(x), " per row (", rows, ")");
  const Tensor b = contiguous_or_undefined(bias);
  if (b.defined()) {
    check_vector_param(op, "bias", b, x, d, /*allow_float32=*/true);
  }
  if (w.defined() && b.defined()) {
    check_same_dtype(op, "bias", b, "weight", w);
  }
  TORCH_CHECK(!weight_grad || w.defined(), "ffn.", op, ": weight_grad needs the weight");
  TORCH_CHECK(!bias_grad || b.defined(), "ffn.", op, ": bias_grad needs the bias");
  // Parameter gradients take the parameter's dtype (float32 weights with half x).
  Tensor grad_x = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  Tensor grad_weight = at::empty({weight_grad ? d : 0}, w.defined() ? w.options() : x.options());
  Tensor grad_bias = at::empty({bias_grad ? d : 0}, b.defined() ? b.options() : x.options());
  kernels.backward(as_rows(grad_y), as_rows(x),
                   center ? mean.contiguous().view({-1}) : Tensor(), rstd.contiguous().view({-1}),
                   w, center, as_rows(grad_x), weight_grad ? grad_weight : Tensor(),
                   bias_grad ? grad_bias : Tensor());
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> layer_norm_forward(const Tensor& x, const OptTensor& weight,
                                                      const OptTensor& bias, double eps,
                                                      const NormKernels& kernels) {
  return norm_forward("layer_norm", x, weight, bias, eps, /*center=*/true, kernels);
}

std::tuple<Tensor, Tensor> rms_norm_forward(const Tensor& x, const OptTensor& weight,
                                            const OptTensor& bias, double eps,
                                            const NormKernels& kernels) {
  auto [y, mean, rstd] = norm_forward("rms_norm", x, weight, bias, eps, /*center=*/false, kernels);
  return {y, rstd};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_backward(const Tensor& grad_y, const Tensor& x,
                                                       const Tensor& mean, const Tensor& rstd,
                                                       const OptTensor& weight, const OptTensor& bias,
                                                       bool weight_grad, bool bias_grad,
                                                       const NormKernels& kernels) {
  return norm_backward("layer_norm", grad_y, x, mean, rstd, weight, bias, weight_grad, bias_grad,
                       /*center=*/true, kernels);
}

std::tuple<Tensor, Tensor, Tensor> rms_norm_backward(const Tensor& grad_y, const Tensor& x,
                                                     const Tensor& rstd, const OptTensor& weight,
                                                     const OptTensor& bias, bool weight_grad,
                                                     bool bias_grad, const NormKernels& kernels) {
  return norm_backward("rms_norm", grad_y, x, Tensor(), rstd, weight, bias, weight_grad, bias_grad,
                       /*center=*/false, kernels);
}

}  // namespace ffn
