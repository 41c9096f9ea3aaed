// Argument checks and layout helpers shared by the op bodies. Each check's
// message names the op, the argument and what was expected, so a user can fix
// the call without reading C++.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string_view>

namespace ffn {

// t as a contiguous [rows, t.size(-1)] matrix (rows = product of the leading
// dims; also right for an empty last dim, where view({-1, 0}) is ambiguous).
at::Tensor as_rows(const at::Tensor& t);

// The tensor of an optional argument, contiguous; undefined when absent.
at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t);

// x: at least 1-D, a floating dtype we have kernels for (float64/32/16, bfloat16).
void check_input(std::string_view op, std::string_view name, const at::Tensor& x);

// A 1-D parameter (norm weight/bias, FFN bias) of `size` elements on x's device. With allow_float32, a
// float32 parameter is accepted for a half precision x (the mixed-precision layout of many training setups).
void check_vector_param(std::string_view op, std::string_view name, const at::Tensor& param,
                        const at::Tensor& x, int64_t size, bool allow_float32);

// A 2-D linear weight [rows, cols] on x's device with x's dtype (rows < 0: any).
void check_linear_weight(std::string_view op, std::string_view name, const at::Tensor& weight,
                         const at::Tensor& x, int64_t rows, int64_t cols);

void check_same_device(std::string_view op, std::string_view name, const at::Tensor& t,
                       const at::Tensor& x);

void check_same_dtype(std::string_view op, std::string_view name, const at::Tensor& t,
                      std::string_view other_name, const at::Tensor& other);

// eps must be finite and >= 0.
void check_eps(std::string_view op, double eps);

// `grad` has the given shape and the dtype and device of `like` (a forward input).
void check_grad(std::string_view op, const at::Tensor& grad, at::IntArrayRef sizes,
                const at::Tensor& like);

}  // namespace ffn
