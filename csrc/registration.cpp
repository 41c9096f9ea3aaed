// The ffn op library: schemas, the public ops and their autocast rules.
//
// Public ops (layer_norm, rms_norm, gelu_ffn, swiglu, geglu, reglu) are
// CompositeImplicitAutograd, like aten::layer_norm over aten::native_layer_norm:
// each calls an internal `_<op>_fwd` that also returns what backward needs
// (mean/rstd, the pre-activation). The internal ops have one kernel per backend
// (registration.h), autograd and fake kernels in ops/_registrations.py, and an
// `_<op>_bwd` op for their backward. The elementwise pieces (gated_activation,
// bias_gelu) need nothing saved and have backend kernels directly. The
// telemetry op ffn_stats (telemetry.h) has backend kernels and is not
// differentiable.
#include "ffn.h"

#include <ATen/autocast_mode.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#ifdef FFN_PYTHON_MODULE
#include <Python.h>
#endif

namespace ffn {
namespace {

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// ---------------------------------------------------------------------------
// Public ops.
Tensor layer_norm(const Tensor& x, const OptTensor& weight, const OptTensor& bias, double eps) {
  static const auto fwd =
      find_op<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const OptTensor&, const OptTensor&,
                                                 double)>("ffn::_layer_norm_fwd");
  return std::get<0>(fwd.call(x, weight, bias, eps));
}

Tensor rms_norm(const Tensor& x, const OptTensor& weight, const OptTensor& bias, double eps) {
  static const auto fwd = find_op<std::tuple<Tensor, Tensor>(const Tensor&, const OptTensor&,
                                                             const OptTensor&, double)>(
      "ffn::_rms_norm_fwd");
  return std::get<0>(fwd.call(x, weight, bias, eps));
}

Tensor gelu_ffn(const Tensor& x, const Tensor& w1, const OptTensor& b1, const Tensor& w2,
                const OptTensor& b2, std::string_view approximate) {
  static const auto fwd =
      find_op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&,
                                         const Tensor&, const OptTensor&, std::string_view)>(
          "ffn::_gelu_ffn_fwd");
  return std::get<0>(fwd.call(x, w1, b1, w2, b2, approximate));
}

Tensor gated_ffn(const Tensor& x, const Tensor& w_gate_up, const OptTensor& b_gate_up,
                 const Tensor& w_down, const OptTensor& b_down, std::string_view activation) {
  static const auto fwd =
      find_op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&,
                                         const Tensor&, const OptTensor&, std::string_view)>(
          "ffn::_gated_ffn_fwd");
  return std::get<0>(fwd.call(x, w_gate_up, b_gate_up, w_down, b_down, activation));
}

// The gated family: one kernel, parameterized by the gate's activation.
template <const char* kActivation>
Tensor gated_ffn_with(const Tensor& x, const Tensor& w_gate_up, const OptTensor& b_gate_up,
                      const Tensor& w_down, const OptTensor& b_down) {
  return gated_ffn(x, w_gate_up, b_gate_up, w_down, b_down, kActivation);
}
constexpr char kSilu[] = "silu";
constexpr char kGelu[] = "gelu";
constexpr char kRelu[] = "relu";

// ---------------------------------------------------------------------------
// Autocast: the ops follow the torch ops they replace. The FFN ops are linear
// layers (lower-precision list on every device); layer_norm/rms_norm run in
// float32 under CUDA autocast and untouched under CPU autocast; gelu and silu
// are left alone on both.
template <c10::DeviceType kDevice>
struct Autocast {
  static constexpr c10::DispatchKey kKey = kDevice == c10::DeviceType::CUDA
                                               ? c10::DispatchKey::AutocastCUDA
                                               : c10::DispatchKey::AutocastCPU;

  static at::ScalarType lower() { return at::autocast::get_autocast_dtype(kDevice); }

  template <typename T>
  static auto cast(at::ScalarType dtype, const T& t) {
    return at::autocast::cached_cast(dtype, t, kDevice);
  }

  static Tensor gelu_ffn(const Tensor& x, const Tensor& w1, const OptTensor& b1, const Tensor& w2,
                         const OptTensor& b2, std::string_view approximate) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(kKey);
    const auto dt = lower();
    return ffn::gelu_ffn(cast(dt, x), cast(dt, w1), cast(dt, b1), cast(dt, w2), cast(dt, b2),
                         approximate);
  }

  template <const char* kActivation>
  static Tensor gated(const Tensor& x, const Tensor& w_gate_up, const OptTensor& b_gate_up,
                      const Tensor& w_down, const OptTensor& b_down) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(kKey);
    const auto dt = lower();
    return gated_ffn(cast(dt, x), cast(dt, w_gate_up), cast(dt, b_gate_up), cast(dt, w_down),
                     cast(dt, b_down), kActivation);
  }

  template <Tensor (*kNorm)(const Tensor&, const OptTensor&, const OptTensor&, double)>
  static Tensor norm_in_float32(const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                                double eps) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(kKey);
    return kNorm(cast(at::kFloat, x), cast(at::kFloat, weight), cast(at::kFloat, bias), eps);
  }
};

// ffn_stats is not differentiable: its Autograd kernel runs the backend kernel
// below autograd, so the stats never require grad (like torch.argmax), even
// when the FFN input they describe does.
Tensor ffn_stats_without_grad(const Tensor& ffn_input, const Tensor& preact,
                              std::string_view activation, bool gated, double near_zero,
                              double large, double outlier) {
  static const auto op = find_op<Tensor(const Tensor&, const Tensor&, std::string_view, bool,
                                        double, double, double)>("ffn::ffn_stats");
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(ffn_input, preact, activation, gated, near_zero, large, outlier);
}

}  // namespace

TORCH_LIBRARY(ffn, m) {
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};
  // Public ops.
  m.def("layer_norm(Tensor x, Tensor? weight, Tensor? bias, float eps=1e-05) -> Tensor", tags);
  m.def("rms_norm(Tensor x, Tensor? weight, Tensor? bias, float eps=1e-06) -> Tensor", tags);
  m.def("gelu_ffn(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, "
        "str approximate=\"none\") -> Tensor", tags);
  m.def("swiglu(Tensor x, Tensor w_gate_up, Tensor? b_gate_up, Tensor w_down, Tensor? b_down) "
        "-> Tensor", tags);
  m.def("geglu(Tensor x, Tensor w_gate_up, Tensor? b_gate_up, Tensor w_down, Tensor? b_down) "
        "-> Tensor", tags);
  m.def("reglu(Tensor x, Tensor w_gate_up, Tensor? b_gate_up, Tensor w_down, Tensor? b_down) "
        "-> Tensor", tags);
  m.def("gated_activation(Tensor gate_up, str activation=\"silu\") -> Tensor", tags);
  m.def("bias_gelu(Tensor x, Tensor? bias, str approximate=\"none\") -> Tensor", tags);

  // Internal: forward with what backward needs, and the backward ops.
  m.def("_layer_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, float eps) "
        "-> (Tensor y, Tensor mean, Tensor rstd)", tags);
  m.def("_layer_norm_bwd(Tensor grad_y, Tensor x, Tensor mean, Tensor rstd, Tensor? weight, "
        "Tensor? bias, bool weight_grad, bool bias_grad) "
        "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)", tags);
  m.def("_rms_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, float eps) "
        "-> (Tensor y, Tensor rstd)", tags);
  m.def("_rms_norm_bwd(Tensor grad_y, Tensor x, Tensor rstd, Tensor? weight, Tensor? bias, "
        "bool weight_grad, bool bias_grad) "
        "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)", tags);
  m.def("_gelu_ffn_fwd(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, str approximate) "
        "-> (Tensor out, Tensor preact)", tags);
  m.def("_gelu_ffn_bwd(Tensor grad_out, Tensor x, Tensor preact, Tensor w1, Tensor w2, "
        "str approximate, bool[5] grad_mask) "
        "-> (Tensor grad_x, Tensor grad_w1, Tensor grad_b1, Tensor grad_w2, Tensor grad_b2)", tags);
  m.def("_gated_ffn_fwd(Tensor x, Tensor w_gate_up, Tensor? b_gate_up, Tensor w_down, "
        "Tensor? b_down, str activation) -> (Tensor out, Tensor preact)", tags);
  m.def("_gated_ffn_bwd(Tensor grad_out, Tensor x, Tensor preact, Tensor w_gate_up, "
        "Tensor w_down, str activation, bool[5] grad_mask) "
        "-> (Tensor grad_x, Tensor grad_w_gate_up, Tensor grad_b_gate_up, Tensor grad_w_down, "
        "Tensor grad_b_down)", tags);
  m.def("_gated_activation_bwd(Tensor grad, Tensor gate_up, str activation) -> Tensor", tags);
  m.def("_bias_gelu_bwd(Tensor grad, Tensor x, Tensor? bias, str approximate, bool bias_grad) "
        "-> (Tensor grad_x, Tensor grad_bias)", tags);

  // Telemetry (telemetry.h): raw float64 sums over one FFN call's tokens.
  m.def("ffn_stats(Tensor ffn_input, Tensor preact, str activation, bool gated, "
        "float near_zero=0.01, float large=6.0, float outlier=6.0) -> Tensor", tags);
}

TORCH_LIBRARY_IMPL(ffn, CompositeImplicitAutograd, m) {
  m.impl("layer_norm", &layer_norm);
  m.impl("rms_norm", &rms_norm);
  m.impl("gelu_ffn", &gelu_ffn);
  m.impl("swiglu", &gated_ffn_with<kSilu>);
  m.impl("geglu", &gated_ffn_with<kGelu>);
  m.impl("reglu", &gated_ffn_with<kRelu>);
}

TORCH_LIBRARY_IMPL(ffn, Autograd, m) {
  m.impl("ffn_stats", &ffn_stats_without_grad);
}

TORCH_LIBRARY_IMPL(ffn, AutocastCPU, m) {
  using A = Autocast<c10::DeviceType::CPU>;
  m.impl("gelu_ffn", &A::gelu_ffn);
  m.impl("swiglu", &A::gated<kSilu>);
  m.impl("geglu", &A::gated<kGelu>);
  m.impl("reglu", &A::gated<kRelu>);
}

TORCH_LIBRARY_IMPL(ffn, AutocastCUDA, m) {
  using A = Autocast<c10::DeviceType::CUDA>;
  m.impl("gelu_ffn", &A::gelu_ffn);
  m.impl("swiglu", &A::gated<kSilu>);
  m.impl("geglu", &A::gated<kGelu>);
  m.impl("reglu", &A::gated<kRelu>);
  m.impl("layer_norm", &A::norm_in_float32<&layer_norm>);
  m.impl("rms_norm", &A::norm_in_float32<&rms_norm>);
}

}  // namespace ffn

#ifdef FFN_PYTHON_MODULE
// `import ffn._C` loads this library, whose static initializers register the ops.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif
