// Shared helpers of the emulated CUDA kernel tests: the op bodies of csrc/ run
// once with the CUDA kernel tables (emulated, on CPU tensors) and once with the
// CPU ones, and the results are compared.
#pragma once

#include "cpp/testing.h"

namespace ffn::testing {

// |actual - expected| <= rtol * (|expected| + rms(expected)) + atol, with
// torch.testing's tolerances of `dtype`: the kernels differ from the CPU ones
// only in their order of float32 (float64) additions, so the error scales with
// the size of the terms, which rms(expected) stands for where a result cancels.
inline ::testing::AssertionResult matches(const Tensor& actual, const Tensor& expected,
                                          at::ScalarType dtype) {
  const Tolerance tol = tolerance_for(dtype);
  return all_close(actual, expected, {tol.rtol, tol.atol + tol.rtol * rms(expected)});
}

// x viewed 2 bytes past a 16-byte boundary: the kernels' element-wise path.
inline Tensor misaligned_copy(const Tensor& x) {
  const int64_t shift = std::max<int64_t>(1, 2 / x.element_size());
  Tensor storage = at::empty({x.numel() + shift}, x.options());
  Tensor view = storage.narrow(0, shift, x.numel()).view(x.sizes());
  view.copy_(x);
  return view;
}

}  // namespace ffn::testing
