// CUDA kernels of the FFN ops' fused elementwise passes (the ActivationKernels
// table): bias + activation (+ gate * up) forward, the activation's derivative
// backward, recomputing the hidden activation when asked.
//
// A 2-D grid over [rows, F]: each thread handles one 128-bit word of a row
// (gate, up, bias, h and the gradients at the same columns), threads of a block
// along a row's words first, then over rows; both dimensions stride, with 64-bit
// indices. Math in float32 (float64 for float64).
//
// Activation formulas: activation.cuh. The gated products are formed in float32
// before the single rounding to the output dtype.
#include "activation.cuh"
#include "ffn.h"
#include "runtime.cuh"
#include "vec.cuh"

#include <algorithm>
#include <cmath>
#include <type_traits>

namespace ffn {
namespace cuda {
namespace {

template <typename T>
struct ActivationArgs {
  const T* z;       // [rows, z_cols]: pre-activation (gate | up when gated)
  const T* bias;    // [z_cols] or null
  const T* grad_h;  // [rows, F] (backward)
  T* grad_z;        // [rows, z_cols] (backward; may alias grad_h when not gated)
  T* h;             // [rows, F] or null in the backward (may alias grad_h when gated)
  int64_t rows, F, z_cols;
  bool gated, vectorized;
};

// z + bias at columns [col, col + V) of a row, rounded to T as the stored
// pre-activation is.
template <typename T>
__device__ __forceinline__ void load_preact(const T* z, const T* bias, int64_t count,
                                            bool vectorized, acc_t<T> (&out)[kVecWidth<T>]) {
  using A = acc_t<T>;
  constexpr int V = kVecWidth<T>;
  load<V>(z, count, vectorized, out);
  if (bias == nullptr) return;
  A b[V];
  load<V>(bias, count, vectorized, b);
#pragma unroll
  for (int k = 0; k < V; ++k) out[k] = static_cast<A>(static_cast<T>(out[k] + b[k]));
}

// Calls fn(row, col, count) for every word of [rows, F] this thread owns.
template <typename T, typename Fn>
__device__ __forceinline__ void for_each_word(const ActivationArgs<T>& a, const Fn& fn) {
  constexpr int V = kVecWidth<T>;
  const int64_t words = ceil_div(a.F, V);
  for (int64_t row = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; row < a.rows;
       row += static_cast<int64_t>(gridDim.y) * blockDim.y) {
    for (int64_t w = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; w < words;
         w += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      fn(row, w * V, a.F - w * V);
    }
  }
}

template <typename T, typename ActFn>
__global__ void activation_forward_kernel(const ActivationArgs<T> a) {
  using A = acc_t<T>;
  constexpr int V = kVecWidth<T>;
  for_each_word(a, [&](int64_t row, int64_t col, int64_t count) {
    const T* z = a.z + row * a.z_cols + col;
    A gate[V], out[V];
    load_preact(z, a.bias != nullptr ? a.bias + col : nullptr, count, a.vectorized, gate);
#pragma unroll
    for (int k = 0; k < V; ++k) out[k] = ActFn::value(gate[k]);
    if (a.gated) {
      A up[V];
      load_preact(z + a.F, a.bias != nullptr ? a.bias + a.F + col : nullptr, count, a.vectorized,
                  up);
#pragma unroll
      for (int k = 0; k < V; ++k) out[k] = out[k] * up[k];
    }
    store<V>(a.h + row * a.F + col, count, a.vectorized, out);
  });
}

template <typename T, typename ActFn>
__global__ void activation_backward_kernel(const ActivationArgs<T> a) {
  using A = acc_t<T>;
  constexpr int V = kVecWidth<T>;
  for_each_word(a, [&](int64_t row, int64_t col, int64_t count) {
    const T* z = a.z + row * a.z_cols + col;
    T* grad_z = a.grad_z + row * a.z_cols + col;
    A gate[V], grad_h[V];
    load_preact(z, a.bias != nullptr ? a.bias + col : nullptr, count, a.vectorized, gate);
    // Read before grad_z or h is written: either may be the same memory.
    load<V>(a.grad_h + row * a.F + col, count, a.vectorized, grad_h);
    T* h = a.h != nullptr ? a.h + row * a.F + col : nullptr;
    if (!a.gated) {
      A grad_gate[V], act[V];
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const auto [value, grad] = ActFn::value_and_grad(gate[k], grad_h[k]);
        act[k] = value;
        grad_gate[k] = grad;
      }
      store<V>(grad_z, count, a.vectorized, grad_gate);
      if (h != nullptr) store<V>(h, count, a.vectorized, act);
      return;
    }
    A up[V], grad_gate[V], grad_up[V], hidden[V];
    load_preact(z + a.F, a.bias != nullptr ? a.bias + a.F + col : nullptr, count, a.vectorized,
                up);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const auto [act, grad] = ActFn::value_and_grad(gate[k], grad_h[k] * up[k]);
      grad_gate[k] = grad;
      grad_up[k] = grad_h[k] * act;
      hidden[k] = act * up[k];
    }
    store<V>(grad_z, count, a.vectorized, grad_gate);
    store<V>(grad_z + a.F, count, a.vectorized, grad_up);
    if (h != nullptr) store<V>(h, count, a.vectorized, hidden);
  });
}

constexpr int kBlockThreads = 256;
constexpr int64_t kMaxGridDim = 65535;

// Threads along a row's words (a power of two up to a block), the rest over rows.
template <typename T>
void launch_activation(void (*kernel)(ActivationArgs<T>), ActivationArgs<T> a) {
  constexpr int V = kVecWidth<T>;
  const int64_t words = ceil_div(a.F, V);
  if (a.rows == 0 || words == 0) return;
  a.vectorized = a.F % V == 0 && all_aligned16({a.z, a.bias, a.grad_h, a.grad_z, a.h});
  int threads_x = 1;
  while (threads_x < words && threads_x < kBlockThreads) threads_x *= 2;
  const dim3 block(threads_x, kBlockThreads / threads_x);
  const dim3 grid(static_cast<unsigned>(std::min(ceil_div(words, block.x), kMaxGridDim)),
                  static_cast<unsigned>(std::min(ceil_div(a.rows, block.y), kMaxGridDim)));
  launch(kernel, {grid, block}, a);
}

void activation_forward(const Tensor& z, const Tensor& bias, Activation act, bool gated,
                        const Tensor& h) {
  const DeviceGuard guard(z.get_device_index());
  dispatch_float_types(z.scalar_type(), "ffn_act_fwd_cuda", [&](auto t) {
    using scalar_t = decltype(t);
    ActivationArgs<scalar_t> a{z.const_data_ptr<scalar_t>(),
                               bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
                               nullptr,
                               nullptr,
                               h.mutable_data_ptr<scalar_t>(),
                               h.size(0),
                               h.size(1),
                               z.size(1),
                               gated,
                               false};
    dispatch_activation<Act>(act, [&](auto fn) {
      launch_activation(activation_forward_kernel<scalar_t, decltype(fn)>, a);
    });
  });
}

Tensor activation_backward(const Tensor& z, const Tensor& bias, const Tensor& grad_h, Activation act,
                           bool gated, const Tensor& grad_z, const Tensor& h, bool bias_grad) {
  const DeviceGuard guard(z.get_device_index());
  dispatch_float_types(z.scalar_type(), "ffn_act_bwd_cuda", [&](auto t) {
    using scalar_t = decltype(t);
    ActivationArgs<scalar_t> a{z.const_data_ptr<scalar_t>(),
                               bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
                               grad_h.const_data_ptr<scalar_t>(),
                               grad_z.mutable_data_ptr<scalar_t>(),
                               h.defined() ? h.mutable_data_ptr<scalar_t>() : nullptr,
                               grad_h.size(0),
                               grad_h.size(1),
                               z.size(1),
                               gated,
                               false};
    dispatch_activation<Act>(act, [&](auto fn) {
      launch_activation(activation_backward_kernel<scalar_t, decltype(fn)>, a);
    });
  });
  return bias_grad ? sum_rows(grad_z) : Tensor();
}

}  // namespace

const ActivationKernels kActivationKernels{&activation_forward, &activation_backward};

}  // namespace cuda
}  // namespace ffn
