// Shared helpers of the C++ tests: the ffn ops as typed dispatcher calls,
// tolerance-based comparison, autograd on ATen composites, error matching.
#pragma once

#include "ffn.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <gtest/gtest.h>

#include <array>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

namespace ffn::testing {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using Tensors3 = std::tuple<Tensor, Tensor, Tensor>;
using Tensors2 = std::tuple<Tensor, Tensor>;
using Tensors5 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

// ---------------------------------------------------------------------------
// The ops through the dispatcher (what torch.ops.ffn.* calls), by schema name.
template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using NormSig = Tensor(const Tensor&, const OptTensor&, const OptTensor&, double, double, bool);
using FfnSig = Tensor(const Tensor&, const Tensor&, const OptTensor&, const Tensor&,
                      const OptTensor&, std::string_view);
using FfnFwdSig = Tensors2(const Tensor&, const Tensor&, const OptTensor&, const Tensor&,
                           const OptTensor&, std::string_view);
using FfnBwdSig = Tensors5(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                           const Tensor&, std::string_view, std::array<bool, 5>);

namespace ops {
inline Tensor layer_norm(const Tensor& x, const OptTensor& w, const OptTensor& b, double eps) {
  static const auto h = op<NormSig>("ffn::layer_norm");
  return h.call(x, w, b, eps, 0.0, false);
}
inline Tensor rms_norm(const Tensor& x, const OptTensor& w, const OptTensor& b, double eps) {
  static const auto h = op<NormSig>("ffn::rms_norm");
  return h.call(x, w, b, eps, 0.0, false);
}
inline Tensors3 layer_norm_fwd(const Tensor& x, const OptTensor& w, const OptTensor& b,
                               double eps) {
  static const auto h =
      op<Tensors3(const Tensor&, const OptTensor&, const OptTensor&, double, double, bool)>(
          "ffn::_layer_norm_fwd");
  return h.call(x, w, b, eps, 0.0, false);
}
inline Tensors2 rms_norm_fwd(const Tensor& x, const OptTensor& w, const OptTensor& b, double eps) {
  static const auto h =
      op<Tensors2(const Tensor&, const OptTensor&, const OptTensor&, double, double, bool)>(
          "ffn::_rms_norm_fwd");
  return h.call(x, w, b, eps, 0.0, false);
}
inline Tensors3 layer_norm_bwd(const Tensor& gy, const Tensor& x, const Tensor& mean,
                               const Tensor& rstd, const OptTensor& w, const OptTensor& b,
                               bool weight_grad, bool bias_grad) {
  static const auto h =
      op<Tensors3(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                  const OptTensor&, bool, bool, double, const OptTensor&)>("ffn::_layer_norm_bwd");
  return h.call(gy, x, mean, rstd, w, b, weight_grad, bias_grad, 0.0, std::nullopt);
}
inline Tensors3 rms_norm_bwd(const Tensor& gy, const Tensor& x, const Tensor& rstd,
                             const OptTensor& w, const OptTensor& b, bool weight_grad,
                             bool bias_grad) {
  static const auto h =
      op<Tensors3(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                  bool, bool, double, const OptTensor&)>("ffn::_rms_norm_bwd");
  return h.call(gy, x, rstd, w, b, weight_grad, bias_grad, 0.0, std::nullopt);
}

inline Tensor gelu_ffn(const Tensor& x, const Tensor& w1, const OptTensor& b1, const Tensor& w2,
                       const OptTensor& b2, std::string_view approximate) {
  static const auto h = op<Tensor(const Tensor&, const Tensor&, const OptTensor&, const Tensor&,
                                  const OptTensor&, std::string_view)>("ffn::gelu_ffn");
  return h.call(x, w1, b1, w2, b2, approximate);
}
// swiglu, geglu or reglu (the public op of that name).
inline Tensor gated_ffn(const char* name, const Tensor& x, const Tensor& w_gate_up,
                        const OptTensor& b_gate_up, const Tensor& w_down, const OptTensor& b_down) {
  return op<FfnSig>(name).call(x, w_gate_up, b_gate_up, w_down, b_down, "none");
}
inline Tensors2 gelu_ffn_fwd(const Tensor& x, const Tensor& w1, const OptTensor& b1,
                             const Tensor& w2, const OptTensor& b2, std::string_view approximate) {
  static const auto h = op<FfnFwdSig>("ffn::_gelu_ffn_fwd");
  return h.call(x, w1, b1, w2, b2, approximate);
}
inline Tensors2 gated_ffn_fwd(const Tensor& x, const Tensor& w_gate_up, const OptTensor& b_gate_up,
                              const Tensor& w_down, const OptTensor& b_down,
                              std::string_view activation) {
  static const auto h = op<FfnFwdSig>("ffn::_gated_ffn_fwd");
  return h.call(x, w_gate_up, b_gate_up, w_down, b_down, activation);
}
inline Tensors5 gelu_ffn_bwd(const Tensor& g, const Tensor& x, const Tensor& preact,
                             const Tensor& w1, const Tensor& w2, std::string_view approximate,
                             std::array<bool, 5> mask) {
  static const auto h = op<FfnBwdSig>("ffn::_gelu_ffn_bwd");
  return h.call(g, x, preact, w1, w2, approximate, mask);
}
inline Tensors5 gated_ffn_bwd(const Tensor& g, const Tensor& x, const Tensor& preact,
                              const Tensor& w_gate_up, const Tensor& w_down,
                              std::string_view activation, std::array<bool, 5> mask) {
  static const auto h = op<FfnBwdSig>("ffn::_gated_ffn_bwd");
  return h.call(g, x, preact, w_gate_up, w_down, activation, mask);
}

inline Tensor gated_activation(const Tensor& gate_up, std::string_view activation) {
  static const auto h = op<Tensor(const Tensor&, std::string_view)>("ffn::gated_activation");
  return h.call(gate_up, activation);
}
inline Tensor gated_activation_bwd(const Tensor& grad, const Tensor& gate_up,
                                   std::string_view activation) {
  static const auto h = op<Tensor(const Tensor&, const Tensor&, std::string_view)>(
      "ffn::_gated_activation_bwd");
  return h.call(grad, gate_up, activation);
}
inline Tensor bias_gelu(const Tensor& x, const OptTensor& bias, std::string_view approximate) {
  static const auto h =
      op<Tensor(const Tensor&, const OptTensor&, std::string_view)>("ffn::bias_gelu");
  return h.call(x, bias, approximate);
}
inline Tensors2 bias_gelu_bwd(const Tensor& grad, const Tensor& x, const OptTensor& bias,
                              std::string_view approximate, bool bias_grad) {
  static const auto h = op<Tensors2(const Tensor&, const Tensor&, const OptTensor&,
                                    std::string_view, bool)>("ffn::_bias_gelu_bwd");
  return h.call(grad, x, bias, approximate, bias_grad);
}
}  // namespace ops

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
// `statement` throws a c10::Error whose message contains `expected`.
template <typename Fn>
::testing::AssertionResult throws_error_with(const Fn& statement, std::string_view expected) {
  try {
    statement();
  } catch (const c10::Error& e) {
    const std::string message = e.what_without_backtrace();
    if (message.find(expected) != std::string::npos) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure()
           << "message \"" << message << "\" does not contain \"" << expected << "\"";
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure() << "threw a non-c10 exception: " << e.what();
  }
  return ::testing::AssertionFailure() << "did not throw (expected \"" << expected << "\")";
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
