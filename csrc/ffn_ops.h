// The ffn ops for LibTorch C++ programs: one inline function per op, with the
// schema's arguments and defaults (csrc/ops.cpp), calling the op through the
// c10 dispatcher, so it runs the kernel of the tensors' device (CPU, CUDA) and
// whatever else is registered for it (autocast rules, and autograd when the
// Python package is loaded).
//
// Header-only; it needs LibTorch (ATen, c10) and, at run time, the ffn library
// loaded into the process: libffn.so (the CMake target `ffn`; link it with
// --no-as-needed, since nothing here references a symbol of it) or the Python
// extension ffn/_C*.so. Both register the same ops (STABLE_TORCH_LIBRARY).
//
//   #include "ffn_ops.h"
//   #include <dlfcn.h>
//
//   dlopen("libffn.so", RTLD_NOW | RTLD_GLOBAL);  // or link it, or `import ffn`
//   at::Tensor x = at::randn({8, 512}), residual = at::randn({8, 512});
//   at::Tensor gamma = at::ones({512});
//   at::Tensor y = ffn::ops::rms_norm(x, gamma, std::nullopt);  // eps = 1e-6
//   auto [y2, s] = ffn::ops::add_rms_norm(x, residual, gamma, std::nullopt);
//   at::Tensor out = ffn::ops::swiglu(x, w_gate_up, std::nullopt, w_down, std::nullopt);
//
// The public ops (ffn::layer_norm, ffn::rms_norm, ..., ffn::swiglu) are
// composites registered by the Python package (ops/_registrations.py): each runs
// an internal forward op (_rms_norm_fwd, _gated_ffn_fwd, ...) and returns its
// first output(s). The functions below do the same from C++, so they need no
// Python. Autograd of the internal ops is registered in Python too: in a
// process without it the ops are forward-only (autograd's fallback warns, or
// raises in backward, when a gradient is asked for through them); a C++
// torch::autograd::Function can call the backward ops in ffn::ops::internal,
// as ops/_registrations.py does.
//
// Errors (bad shapes, dtypes, devices, arguments) come from the op's kernel;
// their messages name the op and the argument ("ffn.rms_norm: weight must have
// shape [512], got [7]").
#pragma once

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/grad_mode.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <array>
#include <optional>
#include <string_view>
#include <tuple>

namespace ffn::ops {

using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;

namespace detail {

// The typed handle of ffn::<name>; an error naming what to load when the ffn
// library is not in the process. Callers keep it in a function-local static
// (a failed lookup is retried on the next call).
template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  const auto handle = c10::Dispatcher::singleton().findSchema({name, ""});
  TORCH_CHECK(handle.has_value(), name,
              " is not registered: load the ffn library first (libffn.so, linked with "
              "--no-as-needed or dlopen()ed, or the Python package: import ffn)");
  return handle->template typed<Signature>();
}

using Tensors2 = std::tuple<Tensor, Tensor>;
using Tensors3 = std::tuple<Tensor, Tensor, Tensor>;
using Tensors4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using Tensors5 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

// Whether autograd would record an FFN call on these arguments: when not, the public FFNs ask
// their internal op for no pre-activation (keep_preact false), as ops/_registrations.py does.
inline bool grad_recorded(const Tensor& x, const Tensor& w_in, const OptTensor& b_in,
                          const Tensor& w_out, const OptTensor& b_out) {
  const auto requires_grad = [](const OptTensor& t) {
    return t.has_value() && t->defined() && t->requires_grad();
  };
  return at::GradMode::is_enabled() &&
         (x.requires_grad() || w_in.requires_grad() || requires_grad(b_in) ||
          w_out.requires_grad() || requires_grad(b_out));
}

}  // namespace detail

// ---------------------------------------------------------------------------
// The internal ops: forwards that also return what backward needs, and the
// backward ops (for a C++ autograd::Function). Gradients not asked for
// (weight_grad/bias_grad false, grad_mask entries false) come back as empty [0]
// tensors.
namespace internal {

// (y, mean, rstd); mean/rstd float32 per row (float64 for float64 x).
inline detail::Tensors3 layer_norm_fwd(const Tensor& x, const OptTensor& weight,
                                       const OptTensor& bias, double eps,
                                       double weight_offset = 0.0,
                                       bool in_place_backward = false) {
  static const auto op =
      detail::find_op<detail::Tensors3(const Tensor&, const OptTensor&, const OptTensor&, double,
                                       double, bool)>("ffn::_layer_norm_fwd");
  return op.call(x, weight, bias, eps, weight_offset, in_place_backward);
}

// (y, rstd)
inline detail::Tensors2 rms_norm_fwd(const Tensor& x, const OptTensor& weight,
                                     const OptTensor& bias, double eps, double weight_offset = 0.0,
                                     bool in_place_backward = false) {
  static const auto op =
      detail::find_op<detail::Tensors2(const Tensor&, const OptTensor&, const OptTensor&, double,
                                       double, bool)>("ffn::_rms_norm_fwd");
  return op.call(x, weight, bias, eps, weight_offset, in_place_backward);
}

// (y, s, mean, rstd), s = x + residual in x's dtype, y = layer_norm(s).
inline detail::Tensors4 add_layer_norm_fwd(const Tensor& x, const Tensor& residual,
                                           const OptTensor& weight, const OptTensor& bias,
                                           double eps, double weight_offset = 0.0,
                                           bool in_place_backward = false) {
  static const auto op =
      detail::find_op<detail::Tensors4(const Tensor&, const Tensor&, const OptTensor&,
                                       const OptTensor&, double, double, bool)>(
          "ffn::_add_layer_norm_fwd");
  return op.call(x, residual, weight, bias, eps, weight_offset, in_place_backward);
}

// (y, s, rstd)
inline detail::Tensors3 add_rms_norm_fwd(const Tensor& x, const Tensor& residual,
                                         const OptTensor& weight, const OptTensor& bias,
                                         double eps, double weight_offset = 0.0,
                                         bool in_place_backward = false) {
  static const auto op =
      detail::find_op<detail::Tensors3(const Tensor&, const Tensor&, const OptTensor&,
                                       const OptTensor&, double, double, bool)>(
          "ffn::_add_rms_norm_fwd");
  return op.call(x, residual, weight, bias, eps, weight_offset, in_place_backward);
}

// (grad_x, grad_weight, grad_bias). x is the normalized input (s for the fused
// add); grad_s, the gradient of the fused add's s output, is added to grad_x.
// The bias is passed for its dtype only.
inline detail::Tensors3 layer_norm_bwd(const Tensor& grad_y, const Tensor& x, const Tensor& mean,
                                       const Tensor& rstd, const OptTensor& weight,
                                       const OptTensor& bias, bool weight_grad, bool bias_grad,
                                       double weight_offset = 0.0,
                                       const OptTensor& grad_s = std::nullopt) {
  static const auto op = detail::find_op<detail::Tensors3(
      const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
      const OptTensor&, bool, bool, double, const OptTensor&)>("ffn::_layer_norm_bwd");
  return op.call(grad_y, x, mean, rstd, weight, bias, weight_grad, bias_grad, weight_offset,
                 grad_s);
}

inline detail::Tensors3 rms_norm_bwd(const Tensor& grad_y, const Tensor& x, const Tensor& rstd,
                                     const OptTensor& weight, const OptTensor& bias,
                                     bool weight_grad, bool bias_grad, double weight_offset = 0.0,
                                     const OptTensor& grad_s = std::nullopt) {
  static const auto op = detail::find_op<detail::Tensors3(
      const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, bool, bool,
      double, const OptTensor&)>("ffn::_rms_norm_bwd");
  return op.call(grad_y, x, rstd, weight, bias, weight_grad, bias_grad, weight_offset, grad_s);
}

// The in-place backward: grad_x is written into grad_y (contiguous, x's shape
// and dtype); returns (grad_weight, grad_bias).
inline detail::Tensors2 layer_norm_bwd_(const Tensor& grad_y, const Tensor& x, const Tensor& mean,
                                        const Tensor& rstd, const OptTensor& weight,
                                        const OptTensor& bias, bool weight_grad, bool bias_grad,
                                        double weight_offset = 0.0,
                                        const OptTensor& grad_s = std::nullopt) {
  static const auto op = detail::find_op<detail::Tensors2(
      const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
      const OptTensor&, bool, bool, double, const OptTensor&)>("ffn::_layer_norm_bwd_");
  return op.call(grad_y, x, mean, rstd, weight, bias, weight_grad, bias_grad, weight_offset,
                 grad_s);
}

inline detail::Tensors2 rms_norm_bwd_(const Tensor& grad_y, const Tensor& x, const Tensor& rstd,
                                      const OptTensor& weight, const OptTensor& bias,
                                      bool weight_grad, bool bias_grad, double weight_offset = 0.0,
                                      const OptTensor& grad_s = std::nullopt) {
  static const auto op = detail::find_op<detail::Tensors2(
      const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, bool, bool,
      double, const OptTensor&)>("ffn::_rms_norm_bwd_");
  return op.call(grad_y, x, rstd, weight, bias, weight_grad, bias_grad, weight_offset, grad_s);
}

// (out, preact): preact = x w1^T + b1 as a [rows, w1.size(0)] matrix; with keep_preact false
// (no backward to follow), an empty [0] tensor (the plain FFNs write their activation over it).
inline detail::Tensors2 gelu_ffn_fwd(const Tensor& x, const Tensor& w1, const OptTensor& b1,
                                     const Tensor& w2, const OptTensor& b2,
                                     std::string_view approximate, bool keep_preact = true) {
  static const auto op =
      detail::find_op<detail::Tensors2(const Tensor&, const Tensor&, const OptTensor&,
                                       const Tensor&, const OptTensor&, std::string_view, bool)>(
          "ffn::_gelu_ffn_fwd");
  return op.call(x, w1, b1, w2, b2, approximate, keep_preact);
}

// (grad_x, grad_w1, grad_b1, grad_w2, grad_b2), those in grad_mask.
inline detail::Tensors5 gelu_ffn_bwd(const Tensor& grad_out, const Tensor& x, const Tensor& preact,
                                     const Tensor& w1, const Tensor& w2,
                                     std::string_view approximate, std::array<bool, 5> grad_mask) {
  static const auto op = detail::find_op<detail::Tensors5(
      const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, std::string_view,
      std::array<bool, 5>)>("ffn::_gelu_ffn_bwd");
  return op.call(grad_out, x, preact, w1, w2, approximate, grad_mask);
}

inline detail::Tensors2 relu_ffn_fwd(const Tensor& x, const Tensor& w1, const OptTensor& b1,
                                     const Tensor& w2, const OptTensor& b2,
                                     bool keep_preact = true) {
  static const auto op = detail::find_op<detail::Tensors2(
      const Tensor&, const Tensor&, const OptTensor&, const Tensor&, const OptTensor&, bool)>(
      "ffn::_relu_ffn_fwd");
  return op.call(x, w1, b1, w2, b2, keep_preact);
}

inline detail::Tensors5 relu_ffn_bwd(const Tensor& grad_out, const Tensor& x, const Tensor& preact,
                                     const Tensor& w1, const Tensor& w2,
                                     std::array<bool, 5> grad_mask) {
  static const auto op = detail::find_op<detail::Tensors5(
      const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
      std::array<bool, 5>)>("ffn::_relu_ffn_bwd");
  return op.call(grad_out, x, preact, w1, w2, grad_mask);
}

// The gated FFN with gate activation "silu", "gelu", "gelu_tanh" or "relu":
// (out, preact [rows, 2F], gate columns then up).
inline detail::Tensors2 gated_ffn_fwd(const Tensor& x, const Tensor& w_gate_up,
                                      const OptTensor& b_gate_up, const Tensor& w_down,
                                      const OptTensor& b_down, std::string_view activation,
                                      bool keep_preact = true) {
  static const auto op =
      detail::find_op<detail::Tensors2(const Tensor&, const Tensor&, const OptTensor&,
                                       const Tensor&, const OptTensor&, std::string_view, bool)>(
          "ffn::_gated_ffn_fwd");
  return op.call(x, w_gate_up, b_gate_up, w_down, b_down, activation, keep_preact);
}

inline detail::Tensors5 gated_ffn_bwd(const Tensor& grad_out, const Tensor& x, const Tensor& preact,
                                      const Tensor& w_gate_up, const Tensor& w_down,
                                      std::string_view activation,
                                      std::array<bool, 5> grad_mask) {
  static const auto op = detail::find_op<detail::Tensors5(
      const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, std::string_view,
      std::array<bool, 5>)>("ffn::_gated_ffn_bwd");
  return op.call(grad_out, x, preact, w_gate_up, w_down, activation, grad_mask);
}

// The gradient of gated_activation with respect to gate_up.
inline Tensor gated_activation_bwd(const Tensor& grad, const Tensor& gate_up,
                                   std::string_view activation) {
  static const auto op =
      detail::find_op<Tensor(const Tensor&, const Tensor&, std::string_view)>(
          "ffn::_gated_activation_bwd");
  return op.call(grad, gate_up, activation);
}

// (grad_x, grad_bias)
inline detail::Tensors2 bias_gelu_bwd(const Tensor& grad, const Tensor& x, const OptTensor& bias,
                                      std::string_view approximate, bool bias_grad) {
  static const auto op =
      detail::find_op<detail::Tensors2(const Tensor&, const Tensor&, const OptTensor&,
                                       std::string_view, bool)>("ffn::_bias_gelu_bwd");
  return op.call(grad, x, bias, approximate, bias_grad);
}

}  // namespace internal

// ---------------------------------------------------------------------------
// The public ops, as torch.ops.ffn.* computes them.

// weight_offset: the weight scales as (weight + weight_offset); 1 for Gemma's
// zero-centered gamma. in_place_backward: backward may write grad_x into
// grad_y's storage (read by the Python autograd).
inline Tensor layer_norm(const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                         double eps = 1e-05, double weight_offset = 0.0,
                         bool in_place_backward = false) {
  return std::get<0>(internal::layer_norm_fwd(x, weight, bias, eps, weight_offset, in_place_backward));
}

inline Tensor rms_norm(const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                       double eps = 1e-06, double weight_offset = 0.0,
                       bool in_place_backward = false) {
  return std::get<0>(internal::rms_norm_fwd(x, weight, bias, eps, weight_offset, in_place_backward));
}

// Fused residual add + norm: (y, s), s = x + residual in x's dtype, y = norm(s).
inline std::tuple<Tensor, Tensor> add_layer_norm(const Tensor& x, const Tensor& residual,
                                                 const OptTensor& weight, const OptTensor& bias,
                                                 double eps = 1e-05, double weight_offset = 0.0,
                                                 bool in_place_backward = false) {
  auto out = internal::add_layer_norm_fwd(x, residual, weight, bias, eps, weight_offset,
                                          in_place_backward);
  return {std::get<0>(out), std::get<1>(out)};
}

inline std::tuple<Tensor, Tensor> add_rms_norm(const Tensor& x, const Tensor& residual,
                                               const OptTensor& weight, const OptTensor& bias,
                                               double eps = 1e-06, double weight_offset = 0.0,
                                               bool in_place_backward = false) {
  auto out = internal::add_rms_norm_fwd(x, residual, weight, bias, eps, weight_offset,
                                        in_place_backward);
  return {std::get<0>(out), std::get<1>(out)};
}

// w2 (gelu(x w1^T + b1)) + b2; approximate "none" or "tanh", as in F.gelu.
inline Tensor gelu_ffn(const Tensor& x, const Tensor& w1, const OptTensor& b1, const Tensor& w2,
                       const OptTensor& b2, std::string_view approximate = "none") {
  return std::get<0>(internal::gelu_ffn_fwd(
      x, w1, b1, w2, b2, approximate,
      detail::grad_recorded(x, w1, b1, w2, b2)));
}

inline Tensor relu_ffn(const Tensor& x, const Tensor& w1, const OptTensor& b1, const Tensor& w2,
                       const OptTensor& b2) {
  return std::get<0>(internal::relu_ffn_fwd(
      x, w1, b1, w2, b2,
      detail::grad_recorded(x, w1, b1, w2, b2)));
}

namespace detail {
// The gate activation of a public gated op, as ops/_registrations.py picks it:
// for a GELU gate, approximate "tanh" selects the tanh form; other gates take
// "none" only.
inline const char* gate_activation(const char* op, const char* gate, std::string_view approximate) {
  if (std::string_view(gate) == "gelu") {
    if (approximate == "none") return "gelu";
    if (approximate == "tanh") return "gelu_tanh";
    TORCH_CHECK(false, "ffn.", op, ": approximate must be 'none' or 'tanh' (as in F.gelu), got '",
                approximate, "'");
  }
  TORCH_CHECK(approximate == "none", "ffn.", op,
              ": approximate applies to GELU gates (geglu) only; expected \"none\", got \"",
              approximate, "\"");
  return gate;
}
}  // namespace detail

// The gated FFNs: w_down (act(gate) * up) + b_down with [gate; up] = x w_gate_up^T
// + b_gate_up (w_gate_up: [2F, d], gate rows first).
inline Tensor swiglu(const Tensor& x, const Tensor& w_gate_up, const OptTensor& b_gate_up,
                     const Tensor& w_down, const OptTensor& b_down,
                     std::string_view approximate = "none") {
  return std::get<0>(internal::gated_ffn_fwd(
      x, w_gate_up, b_gate_up, w_down, b_down, detail::gate_activation("swiglu", "silu", approximate),
      detail::grad_recorded(x, w_gate_up, b_gate_up, w_down, b_down)));
}

inline Tensor geglu(const Tensor& x, const Tensor& w_gate_up, const OptTensor& b_gate_up,
                    const Tensor& w_down, const OptTensor& b_down,
                    std::string_view approximate = "none") {
  return std::get<0>(internal::gated_ffn_fwd(
      x, w_gate_up, b_gate_up, w_down, b_down, detail::gate_activation("geglu", "gelu", approximate),
      detail::grad_recorded(x, w_gate_up, b_gate_up, w_down, b_down)));
}

inline Tensor reglu(const Tensor& x, const Tensor& w_gate_up, const OptTensor& b_gate_up,
                    const Tensor& w_down, const OptTensor& b_down,
                    std::string_view approximate = "none") {
  return std::get<0>(internal::gated_ffn_fwd(
      x, w_gate_up, b_gate_up, w_down, b_down, detail::gate_activation("reglu", "relu", approximate),
      detail::grad_recorded(x, w_gate_up, b_gate_up, w_down, b_down)));
}

// act(gate) * up on a packed [..., 2F] tensor (gate half first); activation
// "silu", "gelu", "gelu_tanh" or "relu".
inline Tensor gated_activation(const Tensor& gate_up, std::string_view activation = "silu") {
  static const auto op =
      detail::find_op<Tensor(const Tensor&, std::string_view)>("ffn::gated_activation");
  return op.call(gate_up, activation);
}

// gelu(x + bias), x + bias rounded to x's dtype first.
inline Tensor bias_gelu(const Tensor& x, const OptTensor& bias,
                        std::string_view approximate = "none") {
  static const auto op = detail::find_op<Tensor(const Tensor&, const OptTensor&, std::string_view)>(
      "ffn::bias_gelu");
  return op.call(x, bias, approximate);
}

// Telemetry of one FFN call: float64 raw sums, counts and one max over its
// tokens, in the order of ops/telemetry.py's STAT_FIELDS (csrc/telemetry.h's
// StatField). preact is the FFN's pre-activation ([rows, 2F] when gated).
// Never requires grad (run below autograd, as the Python package registers it).
inline Tensor ffn_stats(const Tensor& ffn_input, const Tensor& preact, std::string_view activation,
                        bool gated, double near_zero = 0.01, double large = 6.0,
                        double outlier = 6.0) {
  static const auto op = detail::find_op<Tensor(const Tensor&, const Tensor&, std::string_view,
                                                bool, double, double, double)>("ffn::ffn_stats");
  const at::AutoDispatchBelowAutograd below_autograd;
  return op.call(ffn_input, preact, activation, gated, near_zero, large, outlier);
}

}  // namespace ffn::ops
