// FFN op bodies (gelu_ffn and the gated family) and the elementwise pieces.
//
// The GEMMs are aten::linear/mm through the dispatcher (MKL/oneDNN on CPU, cuBLAS on CUDA); everything
// between them is one fused elementwise pass per direction, supplied by the
// backend's ActivationKernels:
//   forward   z = x w_in^T + b_in;  [h = act(z) (or act(z_g) * z_u)];  out = h w_out^T + b_out
//   backward  dh = dout w_out;  [h = act(z); dz = act'(z) dh (on CPU also db_in = sum of dz)];
//             dW_out = dout^T h;  dx = dz w_in ...
// Only x and the pre-activation z are kept for backward; h is recomputed in
// the backward pass, which is what saves a [rows, d_ff] tensor per FFN.
#include "common.h"
#include "ffn.h"

#include <iterator>
#include <stdexcept>
#include <string>

namespace ffn {

Activation parse_gelu_approximate(std::string_view op, std::string_view approximate) {
  std::string expected;
  for (const ActivationInfo& info : kActivations) {
    if (info.approximate == nullptr) continue;
    if (approximate == info.approximate) return info.act;
    expected += (expected.empty() ? "'" : "' or '") + std::string(info.approximate);
  }
  throw std::runtime_error("ffn." + std::string(op) + ": approximate must be " + expected +
                           "' (as in F.gelu), got '" + std::string(approximate) + "'");
}

Activation parse_gated_activation(std::string_view op, std::string_view activation) {
  std::string expected;
  const size_t count = std::size(kActivations);
  for (size_t i = 0; i < count; ++i) {
    if (activation == kActivations[i].name) return kActivations[i].act;
    expected += std::string(i == 0 ? "'" : i + 1 < count ? ", '" : " or '") +
                kActivations[i].name + "'";
  }
  throw std::runtime_error("ffn." + std::string(op) + ": activation must be " + expected + ", got '" +
                           std::string(activation) + "'");
}

namespace {

Tensor empty_placeholder(const Tensor& like) { return empty({0}, like); }

Sizes with_last_dim(const Tensor& t, int64_t last) {
  Sizes out = sizes_of(t);
  out.back() = last;
  return out;
}

}  // namespace

std::tuple<Tensor, Tensor> ffn_forward(std::string_view op, const Tensor& x, const Tensor& w_in,
                                       const OptTensor& b_in, const Tensor& w_out,
                                       const OptTensor& b_out, Activation act, bool gated,
                                       const ActivationKernels& kernels, bool keep_preact) {
  const char* w_in_name = gated ? "w_gate_up" : "w1";
  const char* b_in_name = gated ? "b_gate_up" : "b1";
  const char* w_out_name = gated ? "w_down" : "w2";
  const char* b_out_name = gated ? "b_down" : "b2";
  check_input(op, "x", x);
  const int64_t d = x.size(-1);
  check_linear_weight(op, w_in_name, w_in, x, /*rows=*/-1, d);
  FFN_CHECK(!gated || w_in.size(0) % 2 == 0, "ffn.", op,
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
  // Without a backward to feed, z is a temporary (scratch) and a plain FFN's h overwrites it:
  // no buffer to allocate and fault in, and the down GEMM reads the same layout as otherwise,
  // so the same bits. (A gated h written over z's gate columns would reach the GEMM with z's
  // row stride, which changes BLAS's rounding: its h keeps a buffer of its own.)
  Tensor z;
  if (keep_preact) {
    z = linear(x2d, w_in, b_in);
  } else {
    z = scratch(Scratch::kPreact, {x2d.size(0), w_in.size(0)}, x);
    linear_into(z, x2d, w_in, b_in);
  }
  const Tensor h = keep_preact || gated ? scratch(Scratch::kHidden, {z.size(0), d_ff}, z) : z;
  kernels.forward(z, Tensor(), act, gated, h);
  // The output is allocated in its final shape and the GEMM writes into a [rows, d_out]
  // view of it, so the op returns a tensor of its own, never a view of an internal
  // [rows, d_out] buffer (autograd refuses in-place updates of such views, e.g.
  // Falcon's `mlp_output += attention_output`), as the fake kernel does.
  Tensor out = empty(with_last_dim(x, w_out.size(0)), h);
  linear_into(as_view(out, {h.size(0), w_out.size(0)}), h, w_out, b_out);
  return {out, keep_preact ? z : empty_placeholder(x)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> ffn_backward(
    std::string_view op, const Tensor& grad_out, const Tensor& x, const Tensor& preact,
    const Tensor& w_in, const Tensor& w_out, Activation act, bool gated,
    const std::vector<bool>& grad_mask, const ActivationKernels& kernels) {
  FFN_CHECK(grad_mask.size() == 5, "ffn.", op, ": grad_mask must hold 5 flags, got ",
            grad_mask.size());
  check_input(op, "x", x);
  const int64_t d_ff = w_out.size(1);
  const Tensor x2d = as_rows(x);
  check_linear_weight(op, gated ? "w_gate_up" : "w1", w_in, x, (gated ? 2 : 1) * d_ff, x.size(-1));
  check_linear_weight(op, gated ? "w_down" : "w2", w_out, x, /*rows=*/-1, d_ff);
  check_grad(op, grad_out, with_last_dim(x, w_out.size(0)), x);
  FFN_CHECK(preact.dim() == 2 && preact.size(0) == x2d.size(0) && preact.size(1) == w_in.size(0) &&
            preact.scalar_type() == x.scalar_type() && same_device(preact, x),
            "ffn.", op, ": preact must be a [", x2d.size(0), ", ", w_in.size(0), "] ",
            x.scalar_type(), " tensor on x's device, got ", shape_str(preact.sizes()), " ",
            preact.scalar_type(), " on ", device_str(preact));
  const bool need_x = grad_mask[0], need_w_in = grad_mask[1], need_b_in = grad_mask[2],
             need_w_out = grad_mask[3], need_b_out = grad_mask[4];
  const Tensor g2d = as_rows(grad_out);
  const Tensor z = as_contiguous(preact);

  // grad_h, grad_z and h are temporaries (scratch). The activation pass reads each element of
  // grad_h before it writes that element, so one of its outputs overwrites grad_h in place:
  // grad_z when plain (same shape), h when gated; one [rows, d_ff] buffer fewer.
  Tensor grad_z, h, grad_b_in;
  if (need_x || need_w_in || need_b_in) {
    const Tensor grad_h = scratch(Scratch::kHiddenGrad, {z.size(0), d_ff}, z);
    mm_into(grad_h, g2d, w_out);
    if (gated) {
      grad_z = scratch(Scratch::kPreact, sizes_of(z), z);
      if (need_w_out) h = grad_h;
    } else {
      grad_z = grad_h;
      if (need_w_out) h = scratch(Scratch::kHidden, {z.size(0), d_ff}, z);
    }
    grad_b_in = kernels.backward(z, Tensor(), grad_h, act, gated, grad_z, h, need_b_in);
  } else if (need_w_out) {
    h = scratch(Scratch::kHidden, {z.size(0), d_ff}, z);
    kernels.forward(z, Tensor(), act, gated, h);
  }
  // grad_x in x's shape, written through a [rows, d] view: a tensor of its own, as the fake's.
  Tensor grad_x = empty_placeholder(x);
  if (need_x) {
    grad_x = empty(sizes_of(x), x);
    mm_into(as_view(grad_x, {x2d.size(0), x2d.size(1)}), grad_z, w_in);
  }
  return {
      grad_x,
      need_w_in ? mm(t(grad_z), x2d) : empty_placeholder(x),
      need_b_in ? grad_b_in : empty_placeholder(x),
      need_w_out ? mm(t(g2d), h) : empty_placeholder(x),
      need_b_out ? sum_rows(g2d) : empty_placeholder(x),
  };
}

Tensor gated_activation_forward(const Tensor& gate_up, std::string_view activation,
                                const ActivationKernels& kernels) {
  constexpr std::string_view op = "gated_activation";
  check_input(op, "gate_up", gate_up);
  const Activation act = parse_gated_activation(op, activation);
  FFN_CHECK(gate_up.size(-1) % 2 == 0, "ffn.", op,
            ": gate_up's last dimension must be even ([..., 2*d_ff]: gate, then up), got ",
            gate_up.size(-1));
  Tensor h = empty(with_last_dim(gate_up, gate_up.size(-1) / 2), gate_up);
  kernels.forward(as_rows(gate_up), Tensor(), act, /*gated=*/true, as_rows(h));
  return h;
}

Tensor gated_activation_backward(const Tensor& grad, const Tensor& gate_up,
                                 std::string_view activation, const ActivationKernels& kernels) {
  constexpr std::string_view op = "_gated_activation_bwd";
  check_input(op, "gate_up", gate_up);
  const Activation act = parse_gated_activation(op, activation);
  check_grad(op, grad, with_last_dim(gate_up, gate_up.size(-1) / 2), gate_up);
  Tensor grad_gate_up = empty(sizes_of(gate_up), gate_up);
  kernels.backward(as_rows(gate_up), Tensor(), as_rows(grad), act, /*gated=*/true,
                   as_rows(grad_gate_up), Tensor(), /*bias_grad=*/false);
  return grad_gate_up;
}

Tensor bias_gelu_forward(const Tensor& x, const OptTensor& bias, std::string_view approximate,
                         const ActivationKernels& kernels) {
  constexpr std::string_view op = "bias_gelu";
  check_input(op, "x", x);
  const Activation act = parse_gelu_approximate(op, approximate);
  const Tensor b = contiguous_or_undefined(bias);
  if (b.defined()) check_vector_param(op, "bias", b, x, x.size(-1), false);
  Tensor y = empty(sizes_of(x), x);
  kernels.forward(as_rows(x), b, act, /*gated=*/false, as_rows(y));
  return y;
}

std::tuple<Tensor, Tensor> bias_gelu_backward(const Tensor& grad, const Tensor& x,
                                              const OptTensor& bias, std::string_view approximate,
                                              bool bias_grad, const ActivationKernels& kernels) {
  constexpr std::string_view op = "_bias_gelu_bwd";
  check_input(op, "x", x);
  const Activation act = parse_gelu_approximate(op, approximate);
  check_grad(op, grad, sizes_of(x), x);
  const Tensor b = contiguous_or_undefined(bias);
  if (b.defined()) check_vector_param(op, "bias", b, x, x.size(-1), false);
  FFN_CHECK(!bias_grad || b.defined(), "ffn.", op, ": bias_grad needs the bias");
  Tensor grad_x = empty(sizes_of(x), x);
  const Tensor grad_b = kernels.backward(as_rows(x), b, as_rows(grad), act, /*gated=*/false,
                                         as_rows(grad_x), Tensor(), bias_grad);
  return {grad_x, bias_grad ? grad_b : empty_placeholder(x)};
}

}  // namespace ffn
