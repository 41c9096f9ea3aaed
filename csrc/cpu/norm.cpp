// CPU kernels of layer_norm and rms_norm: one row at a time, rows in parallel.
//
// Forward reads a row twice (statistics, output); the row is in L1/L2 after the
// first read, so DRAM sees it once. LayerNorm's variance falls back to a second,
// centered pass on rows whose mean is large next to their spread, where
// E[x^2] - E[x]^2 would cancel (exactly the shifted inputs this library is about).
//
// The fused residual add first writes s = x + residual (rounded to T) and then
// normalizes s from there, still in cache. The weight scales as w + weight_offset.
//
// Backward, per row (g = dy * (w + weight_offset), xhat = (x - mean) * rstd):
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat))       (RMSNorm: no mean(g))
// in two passes: both row sums together, then dx (plus the fused add's gradient
// of s, when given). Weight/bias gradients are sums
// over rows, reduced in fixed row chunks (parallel.h): bit-reproducible.
// LayerNorm and RMSNorm are separate instantiations (kCenter), so RMSNorm does no
// mean arithmetic.
#include "norm.h"
#include "parallel.h"
#include "vec.h"

#include <torch/csrc/stable/ops.h>
#include <torch/headeronly/macros/Macros.h>

#include <algorithm>
#include <cmath>
#include <utility>

namespace ffn {
namespace cpu {
namespace {

// Mean and biased variance of a row. One pass sums x and x^2; only when the mean
// is large next to the spread (mean^2 > var, where E[x^2] - mean^2 would lose more
// than a bit to cancellation: the shifted rows this library is about) does a
// second pass sum the squares of the centered row.
template <typename T>
C10_ALWAYS_INLINE std::pair<acc_t<T>, acc_t<T>> row_moments(const T* xr, int64_t d) {
  using A = acc_t<T>;
  const auto [sum, sum_sq] = sum_row_pair<T>(
      d, [&](int64_t i, int64_t n, Pack<T>& s, Pack<T>& q) C10_ALWAYS_INLINE_ATTRIBUTE {
        const auto v = load<T>(xr + i, n);
        s = s + v;
        q = fmadd(v, v, q);
      });
  const A mu = sum / d;
  const A var = sum_sq / d - mu * mu;
  if (mu * mu <= var) return {mu, var};  // also false for NaN: the two-pass result propagates it
  const Pack<T> mu_v(mu);
  return {mu, sum_row<T>(d, [&](int64_t i, int64_t n) C10_ALWAYS_INLINE_ATTRIBUTE {
            const auto c = valid_lanes<T>(load<T>(xr + i, n) - mu_v, n);
            return c * c;
          }) / d};
}

// mean(x^2) of a row (RMSNorm's statistic).
template <typename T>
C10_ALWAYS_INLINE acc_t<T> mean_square(const T* xr, int64_t d) {
  return sum_row<T>(d, [&](int64_t i, int64_t n) C10_ALWAYS_INLINE_ATTRIBUTE {
           const auto v = load<T>(xr + i, n);
           return v * v;
         }) / d;
}

template <typename T, typename P, bool kCenter>
void forward_kernel(const Tensor& x, const Tensor& residual, const Tensor& weight,
                    const Tensor& bias, double eps, double weight_offset, const Tensor& y,
                    const Tensor& sum, const Tensor& mean, const Tensor& rstd) {
  using A = acc_t<T>;
  const int64_t rows = x.size(0), d = x.size(1);
  const T* X = x.const_data_ptr<T>();
  const T* Res = residual.defined() ? residual.const_data_ptr<T>() : nullptr;
  const P* W = weight.defined() ? weight.const_data_ptr<P>() : nullptr;
  const P* B = bias.defined() ? bias.const_data_ptr<P>() : nullptr;
  T* Y = y.mutable_data_ptr<T>();
  T* S = Res != nullptr ? sum.mutable_data_ptr<T>() : nullptr;
  A* M = kCenter ? mean.mutable_data_ptr<A>() : nullptr;
  A* R = rstd.mutable_data_ptr<A>();
  const Pack<T> offset_v(static_cast<A>(weight_offset));

  torch::stable::parallel_for(0, rows, row_grain(d), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = X + r * d;
      if (Res != nullptr) {
        // s = x + residual rounded to T, then normalized from where it was stored
        // (in L1 for the passes below).
        T* sr = S + r * d;
        const T* rr = Res + r * d;
        for_each_step<T>(d, [&](int64_t i, int64_t n) C10_ALWAYS_INLINE_ATTRIBUTE {
          store<T>(sr + i, load<T>(xr + i, n) + load<T>(rr + i, n), n);
        });
        xr = sr;
      }
      T* yr = Y + r * d;
      const auto [mu, var] = kCenter ? row_moments<T>(xr, d) : std::pair{A(0), mean_square<T>(xr, d)};
      const Pack<T> mu_v(mu);
      const A rs = A(1) / std::sqrt(var + static_cast<A>(eps));
      const Pack<T> rs_v(rs);
      for_each_step<T>(d, [&](int64_t i, int64_t n) C10_ALWAYS_INLINE_ATTRIBUTE {
        const auto xhat = (kCenter ? load<T>(xr + i, n) - mu_v : load<T>(xr + i, n)) * rs_v;
        if (W != nullptr && B != nullptr) {
          store<T>(yr + i, fmadd(xhat, load<T>(W + i, n) + offset_v, load<T>(B + i, n)), n);
        } else if (W != nullptr) {
          store<T>(yr + i, xhat * (load<T>(W + i, n) + offset_v), n);
        } else if (B != nullptr) {
          store<T>(yr + i, xhat + load<T>(B + i, n), n);
        } else {
          store<T>(yr + i, xhat, n);
        }
      });
      if (kCenter) M[r] = mu;
      R[r] = rs;
    }
  });
}

// dx for rows [begin, end); if dw_acc/db_acc are given, adds dy * xhat and dy into them.
// Two passes over the row: one for both row sums, one for the outputs.
template <typename T, typename P, bool kCenter>
void backward_rows(int64_t begin, int64_t end, int64_t d, const T* DY, const T* DS, const T* X,
                   const acc_t<T>* M, const acc_t<T>* R, const P* W, acc_t<T> weight_offset, T* DX,
                   acc_t<T>* dw_acc, acc_t<T>* db_acc) {
  using A = acc_t<T>;
  const Pack<T> offset_v(weight_offset);
  for (int64_t r = begin; r < end; ++r) {
    const T* xr = X + r * d;
    const T* dyr = DY + r * d;
    const A mu = kCenter ? M[r] : A(0);
    const A rs = R[r];
    const Pack<T> mu_v(mu), rs_v(rs);
    auto g_of = [&](const Pack<T>& dy, int64_t i, int64_t n) C10_ALWAYS_INLINE_ATTRIBUTE {
      // Unfused, so both passes see the same g and d = 1 gives dx = 0 exactly.
      return W != nullptr ? unfused<T>(dy * (load<T>(W + i, n) + offset_v)) : dy;
    };
    auto centered_at = [&](int64_t i, int64_t n) C10_ALWAYS_INLINE_ATTRIBUTE {
      return kCenter ? load<T>(xr + i, n) - mu_v : load<T>(xr + i, n);
    };
    // sum(g) and sum(g * (x - mean)). Tail lanes: g loads as zero there, so both terms are zero.
    const auto [sum_g, sum_gc] = sum_row_pair<T>(
        d, [&](int64_t i, int64_t n, Pack<T>& sg, Pack<T>& sgc) C10_ALWAYS_INLINE_ATTRIBUTE {
          const auto g = g_of(load<T>(dyr + i, n), i, n);
          sg = sg + g;
          sgc = fmadd(g, centered_at(i, n), sgc);
        });
    const A mean_g = kCenter ? sum_g / d : A(0);
    const A mean_gx = sum_gc * rs / d;  // mean(g * xhat)
    // dx = rstd * (g - (xhat * mean(g * xhat) + mean(g))). Subtracting before scaling keeps
    // exact cancellations exact (d = 1: dx = 0).
    const Pack<T> mean_gx_v(mean_gx), mean_g_v(mean_g);
    // dy is read before dx is stored at the same place: DX may be DY (the in-place backward).
    for_each_step<T>(d, [&](int64_t i, int64_t n) C10_ALWAYS_INLINE_ATTRIBUTE {
      const auto dy = load<T>(dyr + i, n);
      const auto xhat = centered_at(i, n) * rs_v;
      const auto dx = (g_of(dy, i, n) - fmadd(xhat, mean_gx_v, mean_g_v)) * rs_v;
      // The fused add's gradient of s is added to dx rounded to T (and not contracted
      // into an FMA with dx's product), as autograd adds the unfused pair's two gradients of s.
      store<T>(DX + r * d + i, DS != nullptr ? round_to<T>(unfused<T>(dx)) + load<T>(DS + r * d + i, n) : dx, n);
      if (dw_acc != nullptr) {
        store<T>(dw_acc + i, fmadd(dy, xhat, load<T>(dw_acc + i, n)), n);
      }
      if (db_acc != nullptr) {
        store<T>(db_acc + i, load<T>(db_acc + i, n) + dy, n);
      }
    });
  }
}

template <typename T, typename P, bool kCenter>
void backward_kernel(const Tensor& grad_y, const Tensor& grad_sum, const Tensor& x,
                     const Tensor& mean, const Tensor& rstd, const Tensor& weight,
                     double weight_offset, const Tensor& grad_x, const Tensor& grad_weight,
                     const Tensor& grad_bias) {
  using A = acc_t<T>;
  const int64_t rows = x.size(0), d = x.size(1);
  const T* DY = grad_y.const_data_ptr<T>();
  const T* DS = grad_sum.defined() ? grad_sum.const_data_ptr<T>() : nullptr;
  const T* X = x.const_data_ptr<T>();
  const A offset = static_cast<A>(weight_offset);
  const A* M = kCenter ? mean.const_data_ptr<A>() : nullptr;
  const A* R = rstd.const_data_ptr<A>();
  const P* W = weight.defined() ? weight.const_data_ptr<P>() : nullptr;
  T* DX = grad_x.mutable_data_ptr<T>();

  if (!grad_weight.defined() && !grad_bias.defined()) {
    torch::stable::parallel_for(0, rows, row_grain(d), [&](int64_t begin, int64_t end) {
      backward_rows<T, P, kCenter>(begin, end, d, DY, DS, X, M, R, W, offset, DX, nullptr, nullptr);
    });
    return;
  }

  // Each chunk zeroes and fills its own partial sums; the (small) ordered reduction
  // over chunks follows on this thread.
  const int64_t chunks = param_grad_chunks(rows, d);
  const Tensor dw_partial = grad_weight.defined() ? empty({chunks, d}, scalar_type_of<A>(), x) : Tensor();
  const Tensor db_partial = grad_bias.defined() ? empty({chunks, d}, scalar_type_of<A>(), x) : Tensor();
  A* dw_acc = dw_partial.defined() ? dw_partial.mutable_data_ptr<A>() : nullptr;
  A* db_acc = db_partial.defined() ? db_partial.mutable_data_ptr<A>() : nullptr;
  for_each_row_chunk(rows, d, chunks, [&](int64_t c, int64_t begin, int64_t end) {
    A* dw_c = dw_acc != nullptr ? dw_acc + c * d : nullptr;
    A* db_c = db_acc != nullptr ? db_acc + c * d : nullptr;
    if (dw_c != nullptr) std::fill_n(dw_c, d, A(0));
    if (db_c != nullptr) std::fill_n(db_c, d, A(0));
    backward_rows<T, P, kCenter>(begin, end, d, DY, DS, X, M, R, W, offset, DX, dw_c, db_c);
  });
  if (dw_acc != nullptr) sum_chunk_columns(dw_acc, chunks, d, grad_weight.mutable_data_ptr<P>());
  if (db_acc != nullptr) sum_chunk_columns(db_acc, chunks, d, grad_bias.mutable_data_ptr<P>());
}

void norm_forward(const Tensor& x, const Tensor& residual, const Tensor& weight,
                  const Tensor& bias, double eps, double weight_offset, bool center,
                  const Tensor& y, const Tensor& sum, const Tensor& mean, const Tensor& rstd) {
  dispatch_norm_types(x, weight.defined() ? weight : bias, [&](auto t, auto p) {
    using T = decltype(t);
    using P = decltype(p);
    if (center) {
      forward_kernel<T, P, true>(x, residual, weight, bias, eps, weight_offset, y, sum, mean, rstd);
    } else {
      forward_kernel<T, P, false>(x, residual, weight, bias, eps, weight_offset, y, sum, mean, rstd);
    }
  });
}

void norm_backward(const Tensor& grad_y, const Tensor& grad_sum, const Tensor& x,
                   const Tensor& mean, const Tensor& rstd, const Tensor& weight,
                   double weight_offset, bool center, const Tensor& grad_x,
                   const Tensor& grad_weight, const Tensor& grad_bias) {
  dispatch_norm_types(x, weight.defined() ? weight : grad_bias, [&](auto t, auto p) {
    using T = decltype(t);
    using P = decltype(p);
    if (center) {
      backward_kernel<T, P, true>(grad_y, grad_sum, x, mean, rstd, weight, weight_offset, grad_x,
                                  grad_weight, grad_bias);
    } else {
      backward_kernel<T, P, false>(grad_y, grad_sum, x, mean, rstd, weight, weight_offset, grad_x,
                                   grad_weight, grad_bias);
    }
  });
}

}  // namespace

const NormKernels kNormKernels{&norm_forward, &norm_backward};

}  // namespace cpu

}  // namespace ffn
