// Dtype dispatch of the norm kernels, shared by the CPU and CUDA backends.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <type_traits>

namespace ffn {

// Calls fn(T{}, P{}) with T = x's dtype and P = the parameters' dtype: T, or
// float32 for a half precision x with float32 parameters. `param` is the
// weight (or, without one, the bias or its gradient); undefined means P = T.
template <typename Fn>
void dispatch_norm_types(const at::Tensor& x, const at::Tensor& param, const Fn& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ffn_norm", [&] {
    if constexpr (!std::is_same_v<scalar_t, float> && !std::is_same_v<scalar_t, double>) {
      if (param.defined() && param.scalar_type() == at::kFloat) {
        fn(scalar_t{}, float{});
        return;
      }
    }
    fn(scalar_t{}, scalar_t{});
  });
}

}  // namespace ffn
