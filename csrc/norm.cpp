// layer_norm and rms_norm op bodies (and their fused residual-add forms): checks,
// layout and allocation. The row kernels live in cpu/norm.cpp and cuda/norm.cu.
#include "norm.h"

#include "common.h"

#include <cmath>

namespace ffn {

namespace {

ScalarType stat_dtype(const Tensor& x) { return x.scalar_type() == kDouble ? kDouble : kFloat; }

Sizes leading_sizes(const Tensor& x) {
  Sizes sizes = sizes_of(x);
  sizes.pop_back();
  return sizes;
}

void check_params(std::string_view op, const Tensor& x, const Tensor& weight, const Tensor& bias,
                  double weight_offset) {
  const int64_t d = x.size(-1);
  if (weight.defined()) check_vector_param(op, "weight", weight, x, d, /*allow_float32=*/true);
  if (bias.defined()) check_vector_param(op, "bias", bias, x, d, /*allow_float32=*/true);
  if (weight.defined() && bias.defined()) check_same_dtype(op, "bias", bias, "weight", weight);
  FFN_CHECK(std::isfinite(weight_offset), "ffn.", op,
            ": weight_offset must be a finite number, got ", weight_offset);
  FFN_CHECK(weight_offset == 0 || weight.defined(), "ffn.", op, ": weight_offset (",
            weight_offset, ") scales a weight, but weight is None");
}

}  // namespace

NormOutputs norm_forward(std::string_view op, const Tensor& x, const Tensor& residual,
                         const OptTensor& weight, const OptTensor& bias, double eps,
                         double weight_offset, bool center, const NormKernels& kernels) {
  check_input(op, "x", x);
  if (residual.defined()) {
    check_same_device(op, "residual", residual, x);
    FFN_CHECK(sizes_of(residual) == sizes_of(x) && residual.scalar_type() == x.scalar_type(),
              "ffn.", op, ": residual must have x's shape ", shape_str(x.sizes()),
              " and dtype ", x.scalar_type(), ", got ", shape_str(residual.sizes()), " of ",
              residual.scalar_type());
  }
  const Tensor w = contiguous_or_undefined(weight);
  const Tensor b = contiguous_or_undefined(bias);
  check_params(op, x, w, b, weight_offset);
  check_eps(op, eps);

  const Sizes sizes = sizes_of(x);
  const Sizes stat_sizes = leading_sizes(x);
  const int64_t rows = leading_rows(x);
  NormOutputs out;
  out.y = empty(sizes, x);
  out.sum = residual.defined() ? empty(sizes, x) : Tensor();
  out.rstd = empty(stat_sizes, stat_dtype(x), x);
  out.mean = center ? empty(stat_sizes, stat_dtype(x), x) : Tensor();
  kernels.forward(as_rows(x), residual.defined() ? as_rows(residual) : Tensor(), w, b, eps,
                  weight_offset, center, as_rows(out.y),
                  residual.defined() ? as_rows(out.sum) : Tensor(),
                  center ? as_view(out.mean, {rows}) : Tensor(), as_view(out.rstd, {rows}));
  return out;
}

std::tuple<Tensor, Tensor, Tensor> norm_backward(std::string_view op, const Tensor& grad_y,
                                                 const Tensor& x, const Tensor& mean,
                                                 const Tensor& rstd, const OptTensor& weight,
                                                 const OptTensor& bias, bool weight_grad,
                                                 bool bias_grad, double weight_offset,
                                                 const OptTensor& grad_s, bool center,
                                                 bool in_place, const NormKernels& kernels) {
  check_input(op, "x", x);
  const Sizes sizes = sizes_of(x);
  check_grad(op, grad_y, sizes, x);
  const Tensor gs = grad_s.has_value() ? *grad_s : Tensor();
  if (gs.defined()) check_grad(op, gs, sizes, x);
  const int64_t d = x.size(-1);
  const Tensor w = contiguous_or_undefined(weight);
  const Tensor b = contiguous_or_undefined(bias);
  check_params(op, x, w, b, weight_offset);
  const int64_t rows = leading_rows(x);
  FFN_CHECK(rstd.numel() == rows && rstd.scalar_type() == stat_dtype(x), "ffn.", op,
            ": rstd must hold one ", stat_dtype(x), " per row (", rows, "), got ",
            rstd.numel(), " of ", rstd.scalar_type());
  FFN_CHECK(!center || (mean.numel() == rows && mean.scalar_type() == stat_dtype(x)), "ffn.",
            op, ": mean must hold one ", stat_dtype(x), " per row (", rows, ")");
  FFN_CHECK(!weight_grad || w.defined(), "ffn.", op, ": weight_grad needs the weight");
  FFN_CHECK(!bias_grad || b.defined(), "ffn.", op, ": bias_grad needs the bias");
  FFN_CHECK(!in_place || grad_y.is_contiguous(), "ffn.", op,
            ": the in-place backward writes grad_x into grad_y, which must be contiguous");
  FFN_CHECK(!in_place || !gs.defined() || gs.numel() == 0 ||
            gs.const_data_ptr() != grad_y.const_data_ptr(),
            "ffn.", op, ": the in-place backward needs grad_s and grad_y to be different tensors");
  // Parameter gradients take the parameter's dtype (float32 weights with half x).
  Tensor grad_x = in_place ? grad_y : empty(sizes, x);
  Tensor grad_weight = empty({weight_grad ? d : 0}, w.defined() ? w.scalar_type() : x.scalar_type(), x);
  Tensor grad_bias = empty({bias_grad ? d : 0}, b.defined() ? b.scalar_type() : x.scalar_type(), x);
  kernels.backward(as_rows(grad_y), gs.defined() ? as_rows(gs) : Tensor(), as_rows(x),
                   center ? as_view(as_contiguous(mean), {rows}) : Tensor(), as_view(as_contiguous(rstd), {rows}),
                   w, weight_offset, center, as_rows(grad_x), weight_grad ? grad_weight : Tensor(),
                   bias_grad ? grad_bias : Tensor());
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace ffn
