// The ffn op library: schemas, the public ops and their autocast rules.
//
// Public ops (layer_norm, rms_norm, add_layer_norm, add_rms_norm, gelu_ffn,
// relu_ffn, swiglu, geglu, reglu) are CompositeImplicitAutograd, like
// aten::layer_norm over aten::native_layer_norm: each calls an internal
// `_<op>_fwd` that also returns what backward needs (mean/rstd, the
// pre-activation). The fused add + norms share the norms' backward ops. The internal ops have one kernel per backend
// (registration.h; cpu/ and cuda/), autograd and fake kernels in
// ops/_registrations.py, and an `_<op>_bwd` op for their backward. The
// elementwise pieces (gated_activation, bias_gelu) need nothing saved and have
// backend kernels directly. The telemetry op ffn_stats (telemetry.h) has backend
// kernels and is not differentiable.
#include "activation_table.h"
#include "ffn.h"
#include "registration.h"
#include "telemetry.h"

#include <ATen/autocast_mode.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <array>
#include <iterator>
#include <string>
#include <utility>

#ifdef FFN_PYTHON_MODULE
#include <Python.h>
#endif

namespace ffn {
namespace {

constexpr char kLayerNormFwd[] = "ffn::_layer_norm_fwd";
constexpr char kRmsNormFwd[] = "ffn::_rms_norm_fwd";
constexpr char kAddLayerNormFwd[] = "ffn::_add_layer_norm_fwd";
constexpr char kAddRmsNormFwd[] = "ffn::_add_rms_norm_fwd";
constexpr char kGeluFfnFwd[] = "ffn::_gelu_ffn_fwd";
constexpr char kReluFfnFwd[] = "ffn::_relu_ffn_fwd";
constexpr char kGatedFfnFwd[] = "ffn::_gated_ffn_fwd";
constexpr char kFfnStats[] = "ffn::ffn_stats";

// The op kName, typed by its C++ declaration kBody (registration.h).
template <auto kBody, const char* kName>
const c10::TypedOperatorHandle<OpSignature<kBody>>& op_handle() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow(kName, "").typed<OpSignature<kBody>>();
  return op;
}

// Kernels that call the op itself again, one per wrapper, for any signature.
template <typename Signature>
struct Call;

template <typename R, typename... Args>
struct Call<R(Args...)> {
  // A public op: the first output of its internal forward op.
  template <auto kBody, const char* kName>
  static auto first_output(Args... args) {
    return std::get<0>(op_handle<kBody, kName>().call(args...));
  }

  // A public fused add + norm: (y, s), the first two outputs of its internal op.
  template <auto kBody, const char* kName>
  static std::tuple<Tensor, Tensor> first_two_outputs(Args... args) {
    auto out = op_handle<kBody, kName>().call(args...);
    return {std::get<0>(out), std::get<1>(out)};
  }

  // Autocast: the FFN ops are linear layers (lower-precision list on every
  // device); layer_norm/rms_norm run in float32 under CUDA autocast and
  // untouched under CPU autocast; gelu and silu are left alone on both. The
  // rules are on the internal forward ops, which the public ops call, so a
  // caller of the internal op (for the pre-activation) gets the same casts.
  template <auto kBody, const char* kName, c10::DeviceType kDevice, bool kFloat32>
  static R autocast(Args... args) {
    constexpr c10::DispatchKey kKey = kDevice == c10::DeviceType::CUDA
                                          ? c10::DispatchKey::AutocastCUDA
                                          : c10::DispatchKey::AutocastCPU;
    c10::impl::ExcludeDispatchKeyGuard no_autocast(kKey);
    const at::ScalarType dtype = kFloat32 ? at::kFloat : at::autocast::get_autocast_dtype(kDevice);
    return op_handle<kBody, kName>().call(at::autocast::cached_cast(dtype, args, kDevice)...);
  }

  // ffn_stats is not differentiable: its Autograd kernel runs the backend kernel
  // below autograd, so the stats never require grad (like torch.argmax), even
  // when the FFN input they describe does.
  template <auto kBody, const char* kName>
  static R below_autograd(Args... args) {
    const at::AutoDispatchBelowADInplaceOrView below;
    return op_handle<kBody, kName>().call(args...);
  }
};

template <auto kBody, const char* kName>
constexpr auto kFirstOutput = &Call<OpSignature<kBody>>::template first_output<kBody, kName>;
template <auto kBody, const char* kName>
constexpr auto kFirstTwoOutputs = &Call<OpSignature<kBody>>::template first_two_outputs<kBody, kName>;
template <auto kBody, const char* kName, c10::DeviceType kDevice, bool kFloat32 = false>
constexpr auto kAutocast = &Call<OpSignature<kBody>>::template autocast<kBody, kName, kDevice, kFloat32>;

// The gate activation of a public gated op: the table's, or for a GELU gate its
// tanh form when approximate is "tanh" (as in F.gelu).
const char* gate_activation(const ActivationInfo& info, std::string_view approximate) {
  if (info.approximate != nullptr) {
    return activation_info(parse_gelu_approximate(info.gated_op, approximate)).name;
  }
  TORCH_CHECK(approximate == "none", "ffn.", info.gated_op,
              ": approximate applies to GELU gates (geglu) only; expected \"none\", got \"",
              approximate, "\"");
  return info.name;
}

// The public gated ops (activation_table.h): _gated_ffn_fwd with the table's activation.
template <size_t kIndex>
Tensor gated_ffn(const Tensor& x, const Tensor& w_gate_up, const OptTensor& b_gate_up,
                 const Tensor& w_down, const OptTensor& b_down, std::string_view approximate) {
  return std::get<0>(op_handle<&gated_ffn_forward, kGatedFfnFwd>().call(
      x, w_gate_up, b_gate_up, w_down, b_down, gate_activation(kActivations[kIndex], approximate)));
}

template <size_t... kIndex>
constexpr auto gated_ffn_kernels(std::index_sequence<kIndex...>) {
  return std::array{&gated_ffn<kIndex>...};
}
constexpr auto kGatedFfnKernels = gated_ffn_kernels(std::make_index_sequence<std::size(kActivations)>{});

}  // namespace

TORCH_LIBRARY(ffn, m) {
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};
  // Public ops.
  // weight_offset: the weight scales as (weight + weight_offset); 1 for Gemma's
  // zero-centered gamma.
  // in_place_backward: backward writes grad_x into grad_y's storage when autograd
  // holds the only reference to grad_y (ops/_registrations.py), saving a buffer.
  m.def("layer_norm(Tensor x, Tensor? weight, Tensor? bias, float eps=1e-05, "
        "float weight_offset=0.0, bool in_place_backward=False) -> Tensor", tags);
  m.def("rms_norm(Tensor x, Tensor? weight, Tensor? bias, float eps=1e-06, "
        "float weight_offset=0.0, bool in_place_backward=False) -> Tensor", tags);
  // Fused residual add + norm: s = x + residual (in x's dtype), y = norm(s).
  m.def("add_layer_norm(Tensor x, Tensor residual, Tensor? weight, Tensor? bias, "
        "float eps=1e-05, float weight_offset=0.0, bool in_place_backward=False) "
        "-> (Tensor y, Tensor s)", tags);
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor? weight, Tensor? bias, "
        "float eps=1e-06, float weight_offset=0.0, bool in_place_backward=False) "
        "-> (Tensor y, Tensor s)", tags);
  m.def("gelu_ffn(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, "
        "str approximate=\"none\") -> Tensor", tags);
  m.def("relu_ffn(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2) -> Tensor", tags);
  // swiglu, geglu, reglu: one schema, named by activation_table.h.
  for (const ActivationInfo& info : kActivations) {
    if (!info.public_gated_op) continue;
    const std::string schema =
        std::string(info.gated_op) +
        "(Tensor x, Tensor w_gate_up, Tensor? b_gate_up, Tensor w_down, Tensor? b_down, "
        "str approximate=\"none\") -> Tensor";
    m.def(schema.c_str(), tags);
  }
  m.def("gated_activation(Tensor gate_up, str activation=\"silu\") -> Tensor", tags);
  m.def("bias_gelu(Tensor x, Tensor? bias, str approximate=\"none\") -> Tensor", tags);

  // Internal: forward with what backward needs, and the backward ops.
  // The backward ops serve the fused add + norms too: x is then s, and grad_s
  // (the gradient of the s output) is added to grad_x.
  m.def("_layer_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, float eps, "
        "float weight_offset=0.0, bool in_place_backward=False) "
        "-> (Tensor y, Tensor mean, Tensor rstd)", tags);
  m.def("_layer_norm_bwd(Tensor grad_y, Tensor x, Tensor mean, Tensor rstd, Tensor? weight, "
        "Tensor? bias, bool weight_grad, bool bias_grad, float weight_offset=0.0, "
        "Tensor? grad_s=None) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)", tags);
  m.def("_rms_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, float eps, "
        "float weight_offset=0.0, bool in_place_backward=False) -> (Tensor y, Tensor rstd)", tags);
  m.def("_rms_norm_bwd(Tensor grad_y, Tensor x, Tensor rstd, Tensor? weight, Tensor? bias, "
        "bool weight_grad, bool bias_grad, float weight_offset=0.0, Tensor? grad_s=None) "
        "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)", tags);
  m.def("_add_layer_norm_fwd(Tensor x, Tensor residual, Tensor? weight, Tensor? bias, float eps, "
        "float weight_offset=0.0, bool in_place_backward=False) "
        "-> (Tensor y, Tensor s, Tensor mean, Tensor rstd)", tags);
  m.def("_add_rms_norm_fwd(Tensor x, Tensor residual, Tensor? weight, Tensor? bias, float eps, "
        "float weight_offset=0.0, bool in_place_backward=False) "
        "-> (Tensor y, Tensor s, Tensor rstd)", tags);
  // The in-place backward: grad_x written into grad_y.
  m.def("_layer_norm_bwd_(Tensor(a!) grad_y, Tensor x, Tensor mean, Tensor rstd, Tensor? weight, "
        "Tensor? bias, bool weight_grad, bool bias_grad, float weight_offset=0.0, "
        "Tensor? grad_s=None) -> (Tensor grad_weight, Tensor grad_bias)", tags);
  m.def("_rms_norm_bwd_(Tensor(a!) grad_y, Tensor x, Tensor rstd, Tensor? weight, Tensor? bias, "
        "bool weight_grad, bool bias_grad, float weight_offset=0.0, Tensor? grad_s=None) "
        "-> (Tensor grad_weight, Tensor grad_bias)", tags);
  m.def("_gelu_ffn_fwd(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, str approximate) "
        "-> (Tensor out, Tensor preact)", tags);
  m.def("_gelu_ffn_bwd(Tensor grad_out, Tensor x, Tensor preact, Tensor w1, Tensor w2, "
        "str approximate, bool[5] grad_mask) "
        "-> (Tensor grad_x, Tensor grad_w1, Tensor grad_b1, Tensor grad_w2, Tensor grad_b2)", tags);
  m.def("_relu_ffn_fwd(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2) "
        "-> (Tensor out, Tensor preact)", tags);
  m.def("_relu_ffn_bwd(Tensor grad_out, Tensor x, Tensor preact, Tensor w1, Tensor w2, "
        "bool[5] grad_mask) "
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
  m.impl("layer_norm", kFirstOutput<&layer_norm_forward, kLayerNormFwd>);
  m.impl("rms_norm", kFirstOutput<&rms_norm_forward, kRmsNormFwd>);
  m.impl("add_layer_norm", kFirstTwoOutputs<&add_layer_norm_forward, kAddLayerNormFwd>);
  m.impl("add_rms_norm", kFirstTwoOutputs<&add_rms_norm_forward, kAddRmsNormFwd>);
  m.impl("gelu_ffn", kFirstOutput<&gelu_ffn_forward, kGeluFfnFwd>);
  m.impl("relu_ffn", kFirstOutput<&relu_ffn_forward, kReluFfnFwd>);
  for (size_t i = 0; i < std::size(kActivations); ++i) {
    if (kActivations[i].public_gated_op) m.impl(kActivations[i].gated_op, kGatedFfnKernels[i]);
  }
}

TORCH_LIBRARY_IMPL(ffn, Autograd, m) {
  m.impl("ffn_stats", &Call<OpSignature<&ffn_stats>>::below_autograd<&ffn_stats, kFfnStats>);
}

// The public ops have no autocast kernel: the Autocast keys fall through to
// their composite kernel, which calls the internal op, and the rule there.
TORCH_LIBRARY_IMPL(ffn, AutocastCPU, m) {
  constexpr auto kCpu = c10::DeviceType::CPU;
  m.impl("_gelu_ffn_fwd", kAutocast<&gelu_ffn_forward, kGeluFfnFwd, kCpu>);
  m.impl("_relu_ffn_fwd", kAutocast<&relu_ffn_forward, kReluFfnFwd, kCpu>);
  m.impl("_gated_ffn_fwd", kAutocast<&gated_ffn_forward, kGatedFfnFwd, kCpu>);
}

TORCH_LIBRARY_IMPL(ffn, AutocastCUDA, m) {
  constexpr auto kCuda = c10::DeviceType::CUDA;
  m.impl("_gelu_ffn_fwd", kAutocast<&gelu_ffn_forward, kGeluFfnFwd, kCuda>);
  m.impl("_relu_ffn_fwd", kAutocast<&relu_ffn_forward, kReluFfnFwd, kCuda>);
  m.impl("_gated_ffn_fwd", kAutocast<&gated_ffn_forward, kGatedFfnFwd, kCuda>);
  m.impl("_layer_norm_fwd", kAutocast<&layer_norm_forward, kLayerNormFwd, kCuda, /*kFloat32=*/true>);
  m.impl("_rms_norm_fwd", kAutocast<&rms_norm_forward, kRmsNormFwd, kCuda, /*kFloat32=*/true>);
  m.impl("_add_layer_norm_fwd",
         kAutocast<&add_layer_norm_forward, kAddLayerNormFwd, kCuda, /*kFloat32=*/true>);
  m.impl("_add_rms_norm_fwd",
         kAutocast<&add_rms_norm_forward, kAddRmsNormFwd, kCuda, /*kFloat32=*/true>);
}

}  // namespace ffn

#ifdef FFN_PYTHON_MODULE
// `import ffn._C` loads this library, whose static initializers register the ops.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif
