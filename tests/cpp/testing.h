// Shared helpers of the C++ tests: the ffn ops through their C++ API
// (ffn_ops.h, typed dispatcher calls), the op bodies of csrc/ called with
// ATen tensors (converted to and from the stable ABI's tensors),
// tolerance-based comparison, autograd on ATen composites, error matching.
#pragma once

#include "ffn.h"
#include "ffn_ops.h"
#include "norm.h"
#include "telemetry.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <gtest/gtest.h>
#include <torch/csrc/inductor/aoti_torch/utils.h>

#include <array>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace ffn::testing {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using Tensors3 = std::tuple<Tensor, Tensor, Tensor>;
using Tensors2 = std::tuple<Tensor, Tensor>;
using Tensors5 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

// ---------------------------------------------------------------------------
// The ops as a LibTorch user calls them (ffn_ops.h): the public ops and, for
// the forward-with-statistics and backward ops, ffn::ops::internal.
namespace ops {
using namespace ::ffn::ops;
using namespace ::ffn::ops::internal;
}  // namespace ops

// ---------------------------------------------------------------------------
// at::Tensor <-> torch::stable::Tensor, both handles of the same TensorImpl (an
// AtenTensorHandle is an at::Tensor*; torch's own helpers in aoti_torch/utils.h).
inline torch::stable::Tensor to_stable(const Tensor& t) {
  return torch::stable::Tensor(torch::aot_inductor::new_tensor_handle(Tensor(t)));
}
inline Tensor to_aten(const torch::stable::Tensor& t) {
  return *torch::aot_inductor::tensor_handle_to_tensor_pointer(t.get());
}

namespace detail {
template <typename T>
const T& stable_arg(const T& value) {
  return value;
}
inline torch::stable::Tensor stable_arg(const Tensor& t) { return to_stable(t); }
inline std::optional<torch::stable::Tensor> stable_arg(const OptTensor& t) {
  return t ? std::optional(to_stable(*t)) : std::nullopt;
}
// The backward ops' grad_mask.
inline std::vector<bool> stable_arg(const std::array<bool, 5>& mask) {
  return std::vector<bool>(mask.begin(), mask.end());
}

inline Tensor aten_result(const torch::stable::Tensor& t) { return to_aten(t); }
template <typename... Ts>
auto aten_result(const std::tuple<Ts...>& results) {
  return std::apply([](const auto&... r) { return std::make_tuple(aten_result(r)...); }, results);
}
}  // namespace detail

// fn (an op body of csrc/: norm.h, ffn.h, telemetry.h) on ATen arguments:
// at::Tensor, optional at::Tensor and std::array<bool, 5> become their stable
// ABI counterparts, the rest is passed on; tensors come back as at::Tensor.
//   call_body(rms_norm_fwd<cpu::kNormKernels>, x, w, std::nullopt, 1e-6, 0.0, false)
template <typename Fn, typename... Args>
auto call_body(const Fn& fn, const Args&... args) {
  return detail::aten_result(fn(detail::stable_arg(args)...));
}

// ---------------------------------------------------------------------------
// Comparison. Tolerances are torch.testing.assert_close's defaults per dtype.
struct Tolerance {
  double rtol;
  double atol;
};

inline Tolerance tolerance_for(at::ScalarType dtype) {
  switch (dtype) {
    case at::kDouble: return {1e-7, 1e-7};
    case at::kFloat: return {1.3e-6, 1e-5};
    case at::kHalf: return {1e-3, 1e-5};
    case at::kBFloat16: return {1.6e-2, 1e-5};
    default: ADD_FAILURE() << "no tolerance for " << dtype; return {0, 0};
  }
}

// What an op on `dtype` inputs computes in: float32 for the half types (their
// statistics and accumulation), the dtype itself otherwise. References for half
// inputs run ATen in this dtype on the upcast inputs and round once at the end.
inline at::ScalarType compute_dtype(at::ScalarType dtype) {
  return dtype == at::kHalf || dtype == at::kBFloat16 ? at::kFloat : dtype;
}

// |actual - expected| <= atol + rtol * |expected| everywhere, same shape; the
// failure message shows the worst element.
inline ::testing::AssertionResult all_close(const Tensor& actual, const Tensor& expected,
                                            Tolerance tol) {
  if (actual.sizes() != expected.sizes()) {
    return ::testing::AssertionFailure()
           << "shape " << actual.sizes() << " != expected " << expected.sizes();
  }
  if (actual.numel() == 0) return ::testing::AssertionSuccess();
  const Tensor a = actual.to(at::kDouble), e = expected.to(at::kDouble);
  const Tensor excess = (a - e).abs() - (tol.atol + tol.rtol * e.abs());
  if (!(excess > 0).any().item<bool>() && !a.isnan().any().item<bool>()) {
    return ::testing::AssertionSuccess();
  }
  const int64_t worst = excess.nan_to_num(INFINITY).reshape(-1).argmax().item<int64_t>();
  return ::testing::AssertionFailure()
         << "max |actual - expected| = " << (a - e).abs().max().item<double>() << " (rtol "
         << tol.rtol << ", atol " << tol.atol << "); worst at flat index " << worst << ": "
         << a.reshape(-1)[worst].item<double>() << " vs " << e.reshape(-1)[worst].item<double>();
}

inline double rms(const Tensor& t) {
  return t.numel() == 0 ? 0.0 : t.to(at::kDouble).pow(2).mean().sqrt().item<double>();
}

// Gradients of sum(output * grad_output) with respect to `inputs` (undefined
// entries give undefined gradients), by autograd through whatever ATen ops
// `forward` runs on its arguments (leaves that require grad).
template <typename Forward>
std::vector<Tensor> autograd_grads(const Forward& forward, const std::vector<Tensor>& inputs,
                                   const Tensor& grad_output) {
  std::vector<Tensor> leaves;
  for (const Tensor& t : inputs) {
    leaves.push_back(t.defined() ? t.detach().clone().requires_grad_(true) : Tensor());
  }
  forward(leaves).backward(grad_output);
  std::vector<Tensor> grads;
  for (const Tensor& leaf : leaves) {
    // A leaf the output does not depend on gets no .grad(): its gradient is zero.
    grads.push_back(!leaf.defined()      ? Tensor()
                    : leaf.grad().defined() ? leaf.grad()
                                            : at::zeros_like(leaf));
  }
  return grads;
}

inline OptTensor opt(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// Short description of a case for SCOPED_TRACE.
template <typename... Parts>
std::string describe(const Parts&... parts) {
  std::ostringstream os;
  ((os << parts << ' '), ...);
  return os.str();
}

// ---------------------------------------------------------------------------
// `statement` throws an error whose message contains `expected`. The kernels
// of the stable ABI raise std::runtime_error (STD_TORCH_CHECK), which the
// dispatcher passes on as is; ffn_ops.h's own checks and ATen's raise c10::Error.
template <typename Fn>
::testing::AssertionResult throws_error_with(const Fn& statement, std::string_view expected) {
  std::string message;
  try {
    statement();
    return ::testing::AssertionFailure() << "did not throw (expected \"" << expected << "\")";
  } catch (const c10::Error& e) {
    message = e.what_without_backtrace();
  } catch (const std::exception& e) {
    message = e.what();
  }
  if (message.find(expected) != std::string::npos) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << "message \"" << message << "\" does not contain \"" << expected << "\"";
}

#define EXPECT_ERROR_WITH(statement, expected) \
  EXPECT_TRUE(::ffn::testing::throws_error_with([&] { (void)(statement); }, expected))

// Seeds ATen's generator per test, so each test (ctest runs them one per
// process) sees the same inputs whatever runs before it.
class SeededTest : public ::testing::Test {
 protected:
  void SetUp() override { at::manual_seed(0); }
};

}  // namespace ffn::testing
