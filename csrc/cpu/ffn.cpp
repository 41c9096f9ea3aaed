// CPU kernels of the FFN ops' fused elementwise passes: bias + activation
// (+ gate * up) forward, the activation's derivative backward (formulas:
// activation.h) with the biases' gradients summed in the same pass over the rows.
#include "activation.h"
#include "ffn.h"
#include "parallel.h"
#include "vec.h"

#include <torch/csrc/stable/ops.h>

namespace ffn {
namespace cpu {
namespace {

// z + bias as the pre-activation the forward stored (rounded to T).
template <typename T>
C10_ALWAYS_INLINE Pack<T> preact_at(const T* z, const T* bias, int64_t i, int64_t n) {
  const auto v = load<T>(z + i, n);
  return bias == nullptr ? v : round_to<T>(v + load<T>(bias + i, n));
}

template <typename T, typename A>
void forward_kernel(const Tensor& z, const Tensor& bias, bool gated, const Tensor& h) {
  const int64_t rows = h.size(0), F = h.size(1), z_cols = z.size(1);
  const T* Z = z.const_data_ptr<T>();
  const T* B = bias.defined() ? bias.const_data_ptr<T>() : nullptr;
  T* H = h.mutable_data_ptr<T>();
  torch::stable::parallel_for(0, rows, row_grain(z_cols), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* zr = Z + r * z_cols;
      T* hr = H + r * F;
      for_each_step<T>(F, [&](int64_t i, int64_t n) C10_ALWAYS_INLINE_ATTRIBUTE {
        const auto g = preact_at<T>(zr, B, i, n);
        auto out = A::value(g);
        if (gated) {
          const auto u = preact_at<T>(zr + F, B != nullptr ? B + F : nullptr, i, n);
          out = out * u;
        }
        store<T>(hr + i, out, n);
      });
    }
  });
}

// Adds a step's values as stored (rounded to T; the product that made them not contracted
// into this add) into a row of float64 partial sums.
template <typename T>
C10_ALWAYS_INLINE void add_to_sums(double* sums, const Pack<T>& v, int64_t n) {
  add_to_double_sums<T>(sums, round_to<T>(unfused<T>(v)), n);
}

template <typename T, typename A>
void backward_kernel(const Tensor& z, const Tensor& bias, const Tensor& grad_h, bool gated,
                     const Tensor& grad_z, const Tensor& h, const Tensor& grad_bias,
                     const Tensor& grad_out, const Tensor& grad_out_bias) {
  const int64_t rows = grad_h.size(0), F = grad_h.size(1), z_cols = z.size(1);
  const T* Z = z.const_data_ptr<T>();
  const T* B = bias.defined() ? bias.const_data_ptr<T>() : nullptr;
  const T* DH = grad_h.const_data_ptr<T>();
  // DZ (plain) or H (gated) may alias DH: each step reads its dh before it writes.
  T* DZ = grad_z.mutable_data_ptr<T>();
  T* H = h.defined() ? h.mutable_data_ptr<T>() : nullptr;
  const T* G = grad_out_bias.defined() ? grad_out.const_data_ptr<T>() : nullptr;
  const int64_t d_out = grad_out_bias.defined() ? grad_out.size(1) : 0;

  // Rows [begin, end); grad_z's and grad_out's column sums added into dz_sums and g_sums (if not null).
  const auto backward_rows = [&](int64_t begin, int64_t end, double* dz_sums, double* g_sums) {
    for (int64_t r = begin; r < end; ++r) {
      const T* zr = Z + r * z_cols;
      const T* dhr = DH + r * F;
      T* dzr = DZ + r * z_cols;
      for_each_step<T>(F, [&](int64_t i, int64_t n) C10_ALWAYS_INLINE_ATTRIBUTE {
        const auto g = preact_at<T>(zr, B, i, n);
        const auto dh = load<T>(dhr + i, n);
        if (!gated) {
          const auto [act, grad_g] = A::value_and_grad(g, dh);
          store<T>(dzr + i, grad_g, n);
          if (dz_sums != nullptr) add_to_sums<T>(dz_sums + i, grad_g, n);
          if (H != nullptr) store<T>(H + r * F + i, act, n);
          return;
        }
        const auto u = preact_at<T>(zr + F, B != nullptr ? B + F : nullptr, i, n);
        const auto [act, grad_g] = A::value_and_grad(g, dh * u);
        const auto grad_u = dh * act;
        store<T>(dzr + i, grad_g, n);
        store<T>(dzr + F + i, grad_u, n);
        if (dz_sums != nullptr) {
          add_to_sums<T>(dz_sums + i, grad_g, n);
          add_to_sums<T>(dz_sums + F + i, grad_u, n);
        }
        if (H != nullptr) store<T>(H + r * F + i, act * u, n);
      });
      if (g_sums != nullptr) {
        for_each_step<T>(d_out, [&](int64_t i, int64_t n) C10_ALWAYS_INLINE_ATTRIBUTE {
          add_to_sums<T>(g_sums + i, load<T>(G + r * d_out + i, n), n);
        });
      }
    }
  };
  if (!grad_bias.defined() && !grad_out_bias.defined()) {
    torch::stable::parallel_for(0, rows, row_grain(z_cols), [&](int64_t begin, int64_t end) {
      backward_rows(begin, end, nullptr, nullptr);
    });
    return;
  }
  // Each chunk zeroes and fills its own partial sums; the ordered reduction over chunks follows.
  const int64_t chunks = param_grad_chunks(rows, z_cols);
  const Tensor dz_partial = grad_bias.defined() ? empty({chunks, z_cols}, scalar_type_of<double>(), z) : Tensor();
  const Tensor g_partial = grad_out_bias.defined() ? empty({chunks, d_out}, scalar_type_of<double>(), z) : Tensor();
  double* dz_acc = dz_partial.defined() ? dz_partial.mutable_data_ptr<double>() : nullptr;
  double* g_acc = g_partial.defined() ? g_partial.mutable_data_ptr<double>() : nullptr;
  for_each_row_chunk(rows, z_cols, chunks, [&](int64_t c, int64_t begin, int64_t end) {
    double* dz_c = dz_acc != nullptr ? dz_acc + c * z_cols : nullptr;
    double* g_c = g_acc != nullptr ? g_acc + c * d_out : nullptr;
    if (dz_c != nullptr) std::fill_n(dz_c, z_cols, 0.0);
    if (g_c != nullptr) std::fill_n(g_c, d_out, 0.0);
    backward_rows(begin, end, dz_c, g_c);
  });
  if (dz_acc != nullptr) sum_chunk_columns(dz_acc, chunks, z_cols, grad_bias.mutable_data_ptr<T>());
  if (g_acc != nullptr) sum_chunk_columns(g_acc, chunks, d_out, grad_out_bias.mutable_data_ptr<T>());
}

void activation_forward(const Tensor& z, const Tensor& bias, Activation act, bool gated,
                        const Tensor& h) {
  dispatch_float_types(z.scalar_type(), "ffn_act_fwd_cpu", [&](auto tag) {
    using scalar_t = decltype(tag);
    dispatch_activation<Act>(act, [&](auto a) {
      forward_kernel<scalar_t, decltype(a)>(z, bias, gated, h);
    });
  });
}

void activation_backward(const Tensor& z, const Tensor& bias, const Tensor& grad_h, Activation act,
                         bool gated, const Tensor& grad_z, const Tensor& h, const Tensor& grad_bias,
                         const Tensor& grad_out, const Tensor& grad_out_bias) {
  dispatch_float_types(z.scalar_type(), "ffn_act_bwd_cpu", [&](auto tag) {
    using scalar_t = decltype(tag);
    dispatch_activation<Act>(act, [&](auto a) {
      backward_kernel<scalar_t, decltype(a)>(z, bias, grad_h, gated, grad_z, h, grad_bias, grad_out,
                                               grad_out_bias);
    });
  });
}

}  // namespace

const ActivationKernels kActivationKernels{&activation_forward, &activation_backward};

}  // namespace cpu

}  // namespace ffn
