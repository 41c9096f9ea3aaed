// Registers one backend's kernels (cpu/registration.cpp, cuda/registration.cpp).
//
// Each op with per-backend kernels has one C++ declaration, the op body in
// ffn.h / telemetry.h: the op's parameters in schema order, then the backend's
// kernel table. The registered kernel is that function with the table bound
// (WithKernels), and schemas.cpp calls the op through a handle typed by the same
// declaration (OpSignature), so the parameter list is written nowhere else.
#pragma once

#include "ffn.h"
#include "telemetry.h"

#include <torch/library.h>

#include <cstddef>
#include <tuple>
#include <utility>

namespace ffn {

namespace detail {

template <auto kBody, typename = decltype(kBody)>
struct OpBody;

// kBody: R(P..., const Kernels&); Args = P... without the trailing table.
template <auto kBody, typename R, typename... P>
struct OpBody<kBody, R (*)(P...)> {
  template <size_t I>
  using Arg = std::tuple_element_t<I, std::tuple<P...>>;
  using Indices = std::make_index_sequence<sizeof...(P) - 1>;

  template <typename Seq>
  struct Bound;
  template <size_t... I>
  struct Bound<std::index_sequence<I...>> {
    using Signature = R(Arg<I>...);
    template <const auto& kKernels>
    static R call(Arg<I>... args) {
      return kBody(args..., kKernels);
    }
  };
};

}  // namespace detail

// The op's signature: kBody's, without the kernel table.
template <auto kBody>
using OpSignature =
    typename detail::OpBody<kBody>::template Bound<typename detail::OpBody<kBody>::Indices>::Signature;

// kBody with the kernel table bound: the backend kernel of the op.
template <auto kBody, const auto& kKernels>
constexpr auto WithKernels = &detail::OpBody<kBody>::template Bound<
    typename detail::OpBody<kBody>::Indices>::template call<kKernels>;

template <const NormKernels& kNorm, const ActivationKernels& kAct, const TelemetryKernels& kStats>
void register_backend_kernels(torch::Library& m) {
  m.impl("_layer_norm_fwd", WithKernels<&layer_norm_forward, kNorm>);
  m.impl("_layer_norm_bwd", WithKernels<&layer_norm_backward, kNorm>);
  m.impl("_rms_norm_fwd", WithKernels<&rms_norm_forward, kNorm>);
  m.impl("_rms_norm_bwd", WithKernels<&rms_norm_backward, kNorm>);
  m.impl("_layer_norm_bwd_", WithKernels<&layer_norm_backward_in_place, kNorm>);
  m.impl("_rms_norm_bwd_", WithKernels<&rms_norm_backward_in_place, kNorm>);
  m.impl("_add_layer_norm_fwd", WithKernels<&add_layer_norm_forward, kNorm>);
  m.impl("_add_rms_norm_fwd", WithKernels<&add_rms_norm_forward, kNorm>);
  m.impl("_gelu_ffn_fwd", WithKernels<&gelu_ffn_forward, kAct>);
  m.impl("_gelu_ffn_bwd", WithKernels<&gelu_ffn_backward, kAct>);
  m.impl("_relu_ffn_fwd", WithKernels<&relu_ffn_forward, kAct>);
  m.impl("_relu_ffn_bwd", WithKernels<&relu_ffn_backward, kAct>);
  m.impl("_gated_ffn_fwd", WithKernels<&gated_ffn_forward, kAct>);
  m.impl("_gated_ffn_bwd", WithKernels<&gated_ffn_backward, kAct>);
  m.impl("gated_activation", WithKernels<&gated_activation_forward, kAct>);
  m.impl("_gated_activation_bwd", WithKernels<&gated_activation_backward, kAct>);
  m.impl("bias_gelu", WithKernels<&bias_gelu_forward, kAct>);
  m.impl("_bias_gelu_bwd", WithKernels<&bias_gelu_backward, kAct>);
  m.impl("ffn_stats", WithKernels<&ffn_stats, kStats>);
}

}  // namespace ffn
