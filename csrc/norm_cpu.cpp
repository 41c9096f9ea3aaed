// CPU kernels of layer_norm and rms_norm: one row at a time, rows in parallel.
//
// Forward reads a row three times (mean, centered sum of squares, output); the
// row is in L1/L2 after the first read, so DRAM sees it once. The two-pass
// variance avoids the cancellation of E[x^2] - E[x]^2 on rows with a large mean
// (exactly the shifted inputs this library is about).
//
// Backward, per row (g = dy * w, xhat = (x - mean) * rstd):
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat))       (RMSNorm: no mean(g))
// Weight/bias gradients are sums over rows. Each of a fixed number of row chunks
// accumulates its own float32 partial sums and the chunks are added in order,
// so the result does not depend on the thread count and is bit-reproducible.
#include "cpu_vec.h"
#include "ffn.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>

namespace ffn {
namespace cpu {
namespace {

// Rows per parallel task: about this many elements, so small d still splits well.
constexpr int64_t kGrainElements = 32768;
// Row chunks of the weight/bias gradient reduction (fixed: determinism).
constexpr int64_t kMaxParamGradChunks = 64;

int64_t row_grain(int64_t d) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(d, 1)); }

// Sum over a row of term(i, count) -> Pack, two accumulators for instruction-level parallelism.
template <typename T, typename Term>
C10_ALWAYS_INLINE acc_t<T> sum_row(int64_t n, const Term& term) {
  Pack<T> acc0(0), acc1(0);
  int64_t i = 0;
  for (; i + 2 * kStep<T> <= n; i += 2 * kStep<T>) {
    acc0 = acc0 + term(i, kStep<T>);
    acc1 = acc1 + term(i + kStep<T>, kStep<T>);
  }
  for (; i < n; i += kStep<T>) {
    acc0 = acc0 + term(i, std::min(kStep<T>, n - i));
  }
  return sum_lanes<T>(acc0 + acc1);
}

// Zeroes the lanes past `count` (loads already do; derived values like x - mean need it).
template <typename T>
C10_ALWAYS_INLINE Pack<T> valid_lanes(const Pack<T>& v, int64_t count) {
  return count == kStep<T> ? v : Pack<T>::set(Pack<T>(0), v, count);
}

template <typename T, typename P>
void forward_kernel(const Tensor& x, const Tensor& weight, const Tensor& bias, double eps,
                    bool center, const Tensor& y, const Tensor& mean, const Tensor& rstd) {
  using A = acc_t<T>;
  const int64_t rows = x.size(0), d = x.size(1);
  const T* X = x.const_data_ptr<T>();
  const P* W = weight.defined() ? weight.const_data_ptr<P>() : nullptr;
  const P* B = bias.defined() ? bias.const_data_ptr<P>() : nullptr;
  T* Y = y.mutable_data_ptr<T>();
  A* M = center ? mean.mutable_data_ptr<A>() : nullptr;
  A* R = rstd.mutable_data_ptr<A>();

  at::parallel_for(0, rows, row_grain(d), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = X + r * d;
      T* yr = Y + r * d;
      const A mu =
          center ? sum_row<T>(d, [&](int64_t i, int64_t n) C10_ALWAYS_INLINE_ATTRIBUTE { return load<T>(xr + i, n); }) / d : A(0);
      const Pack<T> mu_v(mu);
      const A var = sum_row<T>(d, [&](int64_t i, int64_t n) C10_ALWAYS_INLINE_ATTRIBUTE {
                      const auto c = valid_lanes<T>(load<T>(xr + i, n) - mu_v, n);
                      return c * c;
                    }) / d;
      const A rs = A(1) / std::sqrt(var + static_cast<A>(eps));
      const Pack<T> rs_v(rs);
      for_each_step<T>(d, [&](int64_t i, int64_t n) C10_ALWAYS_INLINE_ATTRIBUTE {
        auto v = (load<T>(xr + i, n) - mu_v) * rs_v;
        if (W != nullptr) v = v * load<T>(W + i, n);
        if (B != nullptr) v = v + load<T>(B + i, n);
        store<T>(yr + i, v, n);
      });
      if (center) M[r] = mu;
      R[r] = rs;
    }
  });
}

// dx for rows [begin, end); if dw_acc/db_acc are given, adds dy * xhat and dy into them.
template <typename T, typename P>
void backward_rows(int64_t begin, int64_t end, int64_t d, const T* DY, const T* X, const acc_t<T>* M,
                   const acc_t<T>* R, const P* W, T* DX, acc_t<T>* dw_acc, acc_t<T>* db_acc) {
  using A = acc_t<T>;
  for (int64_t r = begin; r < end; ++r) {
    const T* xr = X + r * d;
    const T* dyr = DY + r * d;
    const Pack<T> mu_v(M != nullptr ? M[r] : A(0));
    const Pack<T> rs_v(R[r]);
    auto g_at = [&](int64_t i, int64_t n) C10_ALWAYS_INLINE_ATTRIBUTE {
      auto g = load<T>(dyr + i, n);
      return W != nullptr ? g * load<T>(W + i, n) : g;
    };
    // Tail lanes: g is zero there (dy loads as zero), so g * xhat is zero too.
    const A mean_g = M != nullptr ? sum_row<T>(d, g_at) / d : A(0);
    const A mean_gx = sum_row<T>(d, [&](int64_t i, int64_t n) C10_ALWAYS_INLINE_ATTRIBUTE {
                        return g_at(i, n) * ((load<T>(xr + i, n) - mu_v) * rs_v);
                      }) / d;
    const Pack<T> mean_g_v(mean_g), mean_gx_v(mean_gx);
    for_each_step<T>(d, [&](int64_t i, int64_t n) C10_ALWAYS_INLINE_ATTRIBUTE {
      const auto xhat = (load<T>(xr + i, n) - mu_v) * rs_v;
      store<T>(DX + r * d + i, rs_v * (g_at(i, n) - mean_g_v - xhat * mean_gx_v), n);
      if (dw_acc != nullptr || db_acc != nullptr) {
        const auto dy = load<T>(dyr + i, n);
        if (dw_acc != nullptr) {
          store<T>(dw_acc + i, fmadd(dy, xhat, load<T>(dw_acc + i, n)), n);
        }
        if (db_acc != nullptr) {
          store<T>(db_acc + i, load<T>(db_acc + i, n) + dy, n);
        }
      }
    });
  }
}

template <typename T, typename P>
void backward_kernel(const Tensor& grad_y, const Tensor& x, const Tensor& mean, const Tensor& rstd,
                     const Tensor& weight, bool center, const Tensor& grad_x,
                     const Tensor& grad_weight, const Tensor& grad_bias) {
  using A = acc_t<T>;
  const int64_t rows = x.size(0), d = x.size(1);
  const T* DY = grad_y.const_data_ptr<T>();
  const T* X = x.const_data_ptr<T>();
  const A* M = center ? mean.const_data_ptr<A>() : nullptr;
  const A* R = rstd.const_data_ptr<A>();
  const P* W = weight.defined() ? weight.const_data_ptr<P>() : nullptr;
  T* DX = grad_x.mutable_data_ptr<T>();

  if (!grad_weight.defined() && !grad_bias.defined()) {
    at::parallel_for(0, rows, row_grain(d), [&](int64_t begin, int64_t end) {
      backward_rows<T, P>(begin, end, d, DY, X, M, R, W, DX, nullptr, nullptr);
    });
    return;
  }

  const int64_t chunks = std::max<int64_t>(1, std::min(rows, kMaxParamGradChunks));
  const auto acc_options = x.options().dtype(c10::CppTypeToScalarType<A>::value);
  const Tensor dw_partial = grad_weight.defined() ? at::zeros({chunks, d}, acc_options) : Tensor();
  const Tensor db_partial = grad_bias.defined() ? at::zeros({chunks, d}, acc_options) : Tensor();
  A* dw_acc = dw_partial.defined() ? dw_partial.mutable_data_ptr<A>() : nullptr;
  A* db_acc = db_partial.defined() ? db_partial.mutable_data_ptr<A>() : nullptr;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      backward_rows<T, P>(c * rows / chunks, (c + 1) * rows / chunks, d, DY, X, M, R, W, DX,
                          dw_acc != nullptr ? dw_acc + c * d : nullptr,
                          db_acc != nullptr ? db_acc + c * d : nullptr);
    }
  });

  // Chunk partial sums -> parameter gradient, chunks added in order.
  auto reduce_chunks = [&](const A* partial, P* out) {
    at::parallel_for(0, d, row_grain(chunks), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        A sum = 0;
        for (int64_t c = 0; c < chunks; ++c) sum += partial[c * d + i];
        out[i] = static_cast<P>(sum);
      }
    });
  };
  if (dw_acc != nullptr) reduce_chunks(dw_acc, grad_weight.mutable_data_ptr<P>());
  if (db_acc != nullptr) reduce_chunks(db_acc, grad_bias.mutable_data_ptr<P>());
}

// Calls fn(T{}, P{}) with T = x's dtype and P = the parameters' dtype (T, or
// float32 for half x).
template <typename Fn>
void dispatch_norm(const Tensor& x, const Tensor& param, const Fn& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ffn_norm_cpu", [&] {
    if constexpr (!std::is_same_v<scalar_t, float> && !std::is_same_v<scalar_t, double>) {
      if (param.defined() && param.scalar_type() == at::kFloat) {
        fn(scalar_t{}, float{});
        return;
      }
    }
    fn(scalar_t{}, scalar_t{});
  });
}

void norm_forward(const Tensor& x, const Tensor& weight, const Tensor& bias, double eps,
                  bool center, const Tensor& y, const Tensor& mean, const Tensor& rstd) {
  dispatch_norm(x, weight.defined() ? weight : bias, [&](auto t, auto p) {
    forward_kernel<decltype(t), decltype(p)>(x, weight, bias, eps, center, y, mean, rstd);
  });
}

void norm_backward(const Tensor& grad_y, const Tensor& x, const Tensor& mean, const Tensor& rstd,
                   const Tensor& weight, bool center, const Tensor& grad_x,
                   const Tensor& grad_weight, const Tensor& grad_bias) {
  dispatch_norm(x, weight.defined() ? weight : grad_bias, [&](auto t, auto p) {
    backward_kernel<decltype(t), decltype(p)>(grad_y, x, mean, rstd, weight, center, grad_x,
                                              grad_weight, grad_bias);
  });
}

}  // namespace

const NormKernels kNormKernels{&norm_forward, &norm_backward};

}  // namespace cpu

}  // namespace ffn
