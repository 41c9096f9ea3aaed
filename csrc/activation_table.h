// The activations of the FFN ops, declared once: the enum the kernels switch
// on, the string each op accepts for it, and the public gated FFN op it makes.
// The parse functions, their error messages, the swiglu/geglu/reglu schemas
// (schemas.cpp) and the op names in messages all read this table.
#pragma once

#include <string_view>

namespace ffn {

enum class Activation { kGelu, kGeluTanh, kSilu, kRelu };

struct ActivationInfo {
  Activation act;
  // The `activation` argument of the gated ops (gated_activation, _gated_ffn_*, ffn_stats).
  const char* name;
  // gelu_ffn's and bias_gelu's `approximate` argument (as in F.gelu); null when not a GELU.
  const char* approximate;
  // The gated FFN with this gate activation, as named in messages.
  const char* gated_op;
  // Whether gated_op is a public op (swiglu, geglu, reglu) with its own schema.
  bool public_gated_op;
};

// In the order the error messages list them.
inline constexpr ActivationInfo kActivations[] = {
    {Activation::kSilu, "silu", nullptr, "swiglu", true},
    {Activation::kGelu, "gelu", "none", "geglu", true},
    {Activation::kGeluTanh, "gelu_tanh", "tanh", "geglu_tanh", false},
    {Activation::kRelu, "relu", nullptr, "reglu", true},
};

constexpr const ActivationInfo& activation_info(Activation act) {
  for (const ActivationInfo& info : kActivations) {
    if (info.act == act) return info;
  }
  return kActivations[0];  // unreachable: every enum value is in the table
}

// Calls fn(Act<act>{}), with Act a backend's functor template (cpu::Act, cuda::Act).
template <template <Activation> class Act, typename Fn>
void dispatch_activation(Activation act, const Fn& fn) {
  switch (act) {
    case Activation::kGelu: return fn(Act<Activation::kGelu>{});
    case Activation::kGeluTanh: return fn(Act<Activation::kGeluTanh>{});
    case Activation::kSilu: return fn(Act<Activation::kSilu>{});
    case Activation::kRelu: return fn(Act<Activation::kRelu>{});
  }
}

// gelu_ffn's `approximate` ("none" | "tanh"), as in F.gelu.
Activation parse_gelu_approximate(std::string_view op, std::string_view approximate);
// Gated family: "silu" (SwiGLU), "gelu" (GeGLU), "gelu_tanh", "relu" (ReGLU).
Activation parse_gated_activation(std::string_view op, std::string_view activation);
// The gated op an activation belongs to ("swiglu", "geglu", ...), for messages.
inline const char* gated_ffn_name(Activation act) { return activation_info(act).gated_op; }

}  // namespace ffn
