// FFN op bodies (gelu_ffn and the gated family) and the elementwise pieces.
//
// The GEMMs go through ATen (MKL/oneDNN on CPU, cuBLAS on CUDA); everything
// between them is one fused elementwise pass per direction, supplied by the
// backend's ActivationKernels:
//   forward   z = x w_in^T + b_in;  [h = act(z) (or act(z_g) * z_u)];  out = h w_out^T + b_out
//   backward  dh = dout w_out;  [h = act(z); dz = act'(z) dh];  dW_out = dout^T h;  dx = dz w_in ...
// Only x and the pre-activation z are kept for backward; h is recomputed in
// the backward pass, which is what saves a [rows, d_ff] tensor per FFN.
#include "common.h"
#include "ffn.h"

#include <ATen/ATen.h>

#include <iterator>
#include <string>

namespace ffn {

Activation parse_gelu_approximate(std::string_view op, std::string_view approximate) {
  std::string expected;
  for (const ActivationInfo& info : kActivations) {
    if (info.approximate == nullptr) continue;
    if (approximate == info.approximate) return info.act;
    expected += (expected.empty() ? "'" : "' or '") + std::string(info.approximate);
  }
  TORCH_CHECK(false, "ffn.", op, ": approximate must be ", expected, "' (as in F.gelu), got '",
              approximate, "'");
}

Activation parse_gated_activation(std::string_view op, std::string_view activation) {
  std::string expected;
  const size_t count = std::size(kActivations);
  for (size_t i = 0; i < count; ++i) {
    if (activation == kActivations[i].name) return kActivations[i].act;
    expected += std::string(i == 0 ? "'" : i + 1 < count ? ", '" : " or '") +
                kActivations[i].name + "'";
  }
  TORCH_CHECK(false, "ffn.", op, ": activation must be ", expected, ", got '", activation, "'");
}

namespace {

Tensor empty_placeholder(const Tensor& like) { return at::empty({0}, like.options()); }

std::vector<int64_t> with_last_dim(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> out(sizes.begin(), sizes.end());
  out.back() = last;
  return out;
}

}  // namespace

std::tuple<Tensor, Tensor> ffn_forward(std::string_view op, const Tensor& x, const Tensor& w_in,
                                       const OptTensor& b_in, const Tensor& w_out,
                                       const OptTensor& b_out, Activation act, bool gated,
                                       const ActivationKernels& kernels) {
  const char* w_in_name = gated ? "w_gate_up" : "w1";
  const char* b_in_name = gated ? "b_gate_up" : "b1";
  const char* w_out_name = gated ? "w_down" : "w2";
  const char* b_out_name = gated ? "b_down" : "b2";
  check_input(op, "x", x);
  const int64_t d = x.size(-1);
  check_linear_weight(op, w_in_name, w_in, x, /*rows=*/-1, d);
  TORCH_CHECK(!gated || w_in.size(0) % 2 == 0, "ffn.", op,
              ": w_gate_up must have an even number of rows ([2*d_ff, d]: gate rows, then up "
              "rows), got ",
              w_in.size(0));
  const int64_t d_ff = gated ? w_in.size(0) / 2 : w_in.size(0);
  check_linear_weight(op, w_out_name, w_out, x, /*rows=*/-1, d_ff);
  const Tensor bias_in = contiguous_or_undefined(b_in);
  if (bias_in.defined()) check_vector_param(op, b_in_name, bias_in, x, w_in.size(0), false);
  if (b_out.has_value() && b_out->defined()) {
    check_vector_param(op, b_out_name, *b_out, x, w_out.size(0), false);
  }

  // The pre-activation exactly as F.linear computes it: the bias added inside the
  // GEMM's accumulation and rounded once. Adding it after a rounded x w_in^T (in
  // the activation pass) rounds twice, and in half precision that flips the sign
  // of z + b where it is near 0: ReLU/GELU gates open or close wrongly.
  const Tensor x2d = as_rows(x);
  Tensor z = bias_in.defined() ? at::addmm(bias_in, x2d, w_in.t()) : at::mm(x2d, w_in.t());
  Tensor h = at::empty({z.size(0), d_ff}, z.options());
  kernels.forward(z, Tensor(), act, gated, h);
  // The output is allocated in its final shape and the GEMM writes into a [rows, d_out]
  // view of it, so the op returns a tensor of its own, never a view of an internal
  // [rows, d_out] buffer (autograd refuses in-place updates of such views, e.g.
  // Falcon's `mlp_output += attention_output`), as the fake kernel does.
  Tensor out = at::empty(with_last_dim(x.sizes(), w_out.size(0)), h.options());
  Tensor out2d = out.view({h.size(0), w_out.size(0)});
  if (b_out.has_value() && b_out->defined()) {
    at::addmm_out(out2d, *b_out, h, w_out.t());
  } else {
    at::mm_out(out2d, h, w_out.t());
  }
  return {out, z};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> ffn_backward(
    const Tensor& grad_out, const Tensor& x, const Tensor& preact, const Tensor& w_in,
    const Tensor& w_out, Activation act, bool gated, std::array<bool, 5> grad_mask,
    const ActivationKernels& kernels) {
  const char* op = gated ? "_gated_ffn_bwd" : "_gelu_ffn_bwd";
  check_input(op, "x", x);
  const int64_t d_ff = w_out.size(1);
  const Tensor x2d = as_rows(x);
  check_linear_weight(op, gated ? "w_gate_up" : "w1", w_in, x, (gated ? 2 : 1) * d_ff, x.size(-1));
  check_linear_weight(op, gated ? "w_down" : "w2", w_out, x, /*rows=*/-1, d_ff);
  check_grad(op, grad_out, with_last_dim(x.sizes(), w_out.size(0)), x);
  TORCH_CHECK(preact.dim() == 2 && preact.size(0) == x2d.size(0) && preact.size(1) == w_in.size(0) &&
                  preact.scalar_type() == x.scalar_type() && preact.device() == x.device(),
              "ffn.", op, ": preact must be a [", x2d.size(0), ", ", w_in.size(0), "] ",
              x.scalar_type(), " tensor on x's device, got ", preact.sizes(), " ",
              preact.scalar_type(), " on ", preact.device());
  const auto [need_x, need_w_in, need_b_in, need_w_out, need_b_out] = grad_mask;
  const Tensor g2d = as_rows(grad_out);
  const Tensor z = preact.contiguous();

  Tensor grad_z;
  Tensor h = need_w_out ? at::empty({z.size(0), d_ff}, z.options()) : Tensor();
  if (need_x || need_w_in || need_b_in) {
    Tensor grad_h = at::mm(g2d, w_out);
    grad_z = gated ? at::empty_like(z) : grad_h;  // plain: overwrite grad_h in place
    kernels.backward(z, Tensor(), grad_h, act, gated, grad_z, h);
  } else if (need_w_out) {
    kernels.forward(z, Tensor(), act, gated, h);
  }
  // grad_x in x's shape, written through a [rows, d] view: a tensor of its own, as the fake's.
  Tensor grad_x = empty_placeholder(x);
  if (need_x) {
    grad_x = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
    Tensor grad_x2d = grad_x.view({x2d.size(0), x2d.size(1)});
    at::mm_out(grad_x2d, grad_z, w_in);
  }
  return {
      grad_x,
      need_w_in ? at::mm(grad_z.t(), x2d) : empty_placeholder(x),
      need_b_in ? grad_z.sum(0) : empty_placeholder(x),
      need_w_out ? at::mm(g2d.t(), h) : empty_placeholder(x),
      need_b_out ? g2d.sum(0) : empty_placeholder(x),
  };
}

std::tuple<Tensor, Tensor> gelu_ffn_forward(const Tensor& x, const Tensor& w1, const OptTensor& b1,
                                            const Tensor& w2, const OptTensor& b2,
                                            std::string_view approximate,
                                            const ActivationKernels& kernels) {
  return ffn_forward("gelu_ffn", x, w1, b1, w2, b2, parse_gelu_approximate("gelu_ffn", approximate),
                     /*gated=*/false, kernels);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> gelu_ffn_backward(
    const Tensor& grad_out, const Tensor& x, const Tensor& preact, const Tensor& w1,
    const Tensor& w2, std::string_view approximate, std::array<bool, 5> grad_mask,
    const ActivationKernels& kernels) {
  return ffn_backward(grad_out, x, preact, w1, w2, parse_gelu_approximate("gelu_ffn", approximate),
                      /*gated=*/false, grad_mask, kernels);
}

std::tuple<Tensor, Tensor> relu_ffn_forward(const Tensor& x, const Tensor& w1, const OptTensor& b1,
                                            const Tensor& w2, const OptTensor& b2,
                                            const ActivationKernels& kernels) {
  return ffn_forward("relu_ffn", x, w1, b1, w2, b2, Activation::kRelu, /*gated=*/false, kernels);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> relu_ffn_backward(
    const Tensor& grad_out, const Tensor& x, const Tensor& preact, const Tensor& w1,
    const Tensor& w2, std::array<bool, 5> grad_mask, const ActivationKernels& kernels) {
  return ffn_backward(grad_out, x, preact, w1, w2, Activation::kRelu, /*gated=*/false, grad_mask,
                      kernels);
}

std::tuple<Tensor, Tensor> gated_ffn_forward(const Tensor& x, const Tensor& w_gate_up,
                                             const OptTensor& b_gate_up, const Tensor& w_down,
                                             const OptTensor& b_down, std::string_view activation,
                                             const ActivationKernels& kernels) {
  const Activation act = parse_gated_activation("_gated_ffn_fwd", activation);
  return ffn_forward(gated_ffn_name(act), x, w_gate_up, b_gate_up, w_down, b_down, act,
                     /*gated=*/true, kernels);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> gated_ffn_backward(
    const Tensor& grad_out, const Tensor& x, const Tensor& preact, const Tensor& w_gate_up,
    const Tensor& w_down, std::string_view activation, std::array<bool, 5> grad_mask,
    const ActivationKernels& kernels) {
  return ffn_backward(grad_out, x, preact, w_gate_up, w_down,
                      parse_gated_activation("_gated_ffn_bwd", activation), /*gated=*/true,
                      grad_mask, kernels);
}

Tensor gated_activation_forward(const Tensor& gate_up, std::string_view activation,
                                const ActivationKernels& kernels) {
  constexpr std::string_view op = "gated_activation";
  check_input(op, "gate_up", gate_up);
  const Activation act = parse_gated_activation(op, activation);
  TORCH_CHECK(gate_up.size(-1) % 2 == 0, "ffn.", op,
              ": gate_up's last dimension must be even ([..., 2*d_ff]: gate, then up), got ",
              gate_up.size(-1));
  Tensor h = at::empty(with_last_dim(gate_up.sizes(), gate_up.size(-1) / 2), gate_up.options());
  kernels.forward(as_rows(gate_up), Tensor(), act, /*gated=*/true, as_rows(h));
  return h;
}

Tensor gated_activation_backward(const Tensor& grad, const Tensor& gate_up,
                                 std::string_view activation, const ActivationKernels& kernels) {
  constexpr std::string_view op = "_gated_activation_bwd";
  check_input(op, "gate_up", gate_up);
  const Activation act = parse_gated_activation(op, activation);
  check_grad(op, grad, with_last_dim(gate_up.sizes(), gate_up.size(-1) / 2), gate_up);
  Tensor grad_gate_up = at::empty(gate_up.sizes(), gate_up.options());
  kernels.backward(as_rows(gate_up), Tensor(), as_rows(grad), act, /*gated=*/true,
                   as_rows(grad_gate_up), Tensor());
  return grad_gate_up;
}

Tensor bias_gelu_forward(const Tensor& x, const OptTensor& bias, std::string_view approximate,
                         const ActivationKernels& kernels) {
  constexpr std::string_view op = "bias_gelu";
  check_input(op, "x", x);
  const Activation act = parse_gelu_approximate(op, approximate);
  const Tensor b = contiguous_or_undefined(bias);
  if (b.defined()) check_vector_param(op, "bias", b, x, x.size(-1), false);
  Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  kernels.forward(as_rows(x), b, act, /*gated=*/false, as_rows(y));
  return y;
}

std::tuple<Tensor, Tensor> bias_gelu_backward(const Tensor& grad, const Tensor& x,
                                              const OptTensor& bias, std::string_view approximate,
                                              bool bias_grad, const ActivationKernels& kernels) {
  constexpr std::string_view op = "_bias_gelu_bwd";
  check_input(op, "x", x);
  const Activation act = parse_gelu_approximate(op, approximate);
  check_grad(op, grad, x.sizes(), x);
  const Tensor b = contiguous_or_undefined(bias);
  if (b.defined()) check_vector_param(op, "bias", b, x, x.size(-1), false);
  TORCH_CHECK(!bias_grad || b.defined(), "ffn.", op, ": bias_grad needs the bias");
  Tensor grad_x = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const Tensor grad_x2d = as_rows(grad_x);
  kernels.backward(as_rows(x), b, as_rows(grad), act, /*gated=*/false, grad_x2d, Tensor());
  return {grad_x, bias_grad ? grad_x2d.sum(0) : empty_placeholder(x)};
}

}  // namespace ffn
