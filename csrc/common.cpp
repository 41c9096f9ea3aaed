#include "common.h"

#include <c10/util/Exception.h>
#include <c10/util/accumulate.h>

#include <cmath>

namespace ffn {

namespace {
bool is_supported_float(at::ScalarType t) {
  return t == at::kDouble || t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}
}  // namespace

at::Tensor as_rows(const at::Tensor& t) {
  const int64_t rows = c10::multiply_integers(t.sizes().slice(0, t.dim() - 1));
  return t.contiguous().view({rows, t.size(-1)});
}

at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous() : at::Tensor();
}

void check_input(std::string_view op, std::string_view name, const at::Tensor& x) {
  TORCH_CHECK(x.defined(), "ffn.", op, ": ", name, " is undefined");
  TORCH_CHECK(x.dim() >= 1, "ffn.", op, ": ", name,
              " must have at least 1 dimension (features last), got a 0-dim tensor");
  TORCH_CHECK(is_supported_float(x.scalar_type()), "ffn.", op, ": ", name,
              " must be float64, float32, float16 or bfloat16, got ", x.scalar_type());
}

void check_same_device(std::string_view op, std::string_view name, const at::Tensor& t,
                       const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), "ffn.", op, ": ", name, " is on ", t.device(),
              " but x is on ", x.device(), "; all tensors must be on the same device");
}

void check_vector_param(std::string_view op, std::string_view name, const at::Tensor& param,
                        const at::Tensor& x, int64_t size, bool allow_float32) {
  check_same_device(op, name, param, x);
  TORCH_CHECK(param.dim() == 1 && param.size(0) == size, "ffn.", op, ": ", name,
              " must have shape [", size, "], got ",
              param.sizes());
  const bool half_x = x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
  const bool ok = param.scalar_type() == x.scalar_type() ||
                  (allow_float32 && half_x && param.scalar_type() == at::kFloat);
  TORCH_CHECK(ok, "ffn.", op, ": ", name, " must have x's dtype (", x.scalar_type(), ")",
              (allow_float32 && half_x) ? " or float32" : "", ", got ", param.scalar_type());
}

void check_linear_weight(std::string_view op, std::string_view name, const at::Tensor& weight,
                         const at::Tensor& x, int64_t rows, int64_t cols) {
  check_same_device(op, name, weight, x);
  TORCH_CHECK(weight.dim() == 2, "ffn.", op, ": ", name,
              " must be a 2-D [out_features, in_features] weight, got shape ", weight.sizes());
  TORCH_CHECK(weight.size(1) == cols && (rows < 0 || weight.size(0) == rows), "ffn.", op, ": ",
              name, " must have shape [", rows < 0 ? std::string("*") : std::to_string(rows), ", ",
              cols, "], got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "ffn.", op, ": ", name,
              " must have x's dtype (", x.scalar_type(), "), got ", weight.scalar_type(),
              " (cast the weights, or run under torch.autocast)");
}

void check_same_dtype(std::string_view op, std::string_view name, const at::Tensor& t,
                      std::string_view other_name, const at::Tensor& other) {
  TORCH_CHECK(t.scalar_type() == other.scalar_type(), "ffn.", op, ": ", name, " must have ",
              other_name, "'s dtype (", other.scalar_type(), "), got ", t.scalar_type());
}

void check_eps(std::string_view op, double eps) {
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "ffn.", op,
              ": eps must be a finite number >= 0, got ", eps);
}

void check_grad(std::string_view op, const at::Tensor& grad, at::IntArrayRef sizes,
                const at::Tensor& like) {
  TORCH_CHECK(grad.sizes() == sizes && grad.scalar_type() == like.scalar_type(), "ffn.", op,
              ": the output gradient must have shape ", sizes, " and dtype ", like.scalar_type(),
              ", got ", grad.sizes(), " and ", grad.scalar_type());
  check_same_device(op, "the output gradient", grad, like);
}

}  // namespace ffn
