// Argument checks shared by the op bodies. Each check's message names the op,
// the argument and what was expected, so a user can fix the call without
// reading C++.
#pragma once

#include "tensor.h"

#include <string_view>

namespace ffn {

// The tensor of an optional argument, contiguous; undefined when absent.
Tensor contiguous_or_undefined(const OptTensor& t);

// x: at least 1-D, a floating dtype we have kernels for (float64/32/16, bfloat16).
void check_input(std::string_view op, std::string_view name, const Tensor& x);

// A 1-D parameter (norm weight/bias, FFN bias) of `size` elements on x's device. With allow_float32, a
// float32 parameter is accepted for a half precision x (the mixed-precision layout of many training setups).
void check_vector_param(std::string_view op, std::string_view name, const Tensor& param,
                        const Tensor& x, int64_t size, bool allow_float32);

// A 2-D linear weight [rows, cols] on x's device with x's dtype (rows < 0: any).
void check_linear_weight(std::string_view op, std::string_view name, const Tensor& weight,
                         const Tensor& x, int64_t rows, int64_t cols);

void check_same_device(std::string_view op, std::string_view name, const Tensor& t,
                       const Tensor& x);

void check_same_dtype(std::string_view op, std::string_view name, const Tensor& t,
                      std::string_view other_name, const Tensor& other);

// eps must be finite and >= 0.
void check_eps(std::string_view op, double eps);

// `grad` has the given shape and the dtype and device of `like` (a forward input).
void check_grad(std::string_view op, const Tensor& grad, const Sizes& sizes, const Tensor& like);

}  // namespace ffn
