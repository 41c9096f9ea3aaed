// CUDA kernels of layer_norm and rms_norm (the NormKernels table).
//
// These ops are memory bound, so the kernels aim at reading x (and dy) once from
// HBM and writing y (dx) once, with 128-bit accesses.
//
// Register kernels (norm_forward_kernel, norm_backward_kernel): a group of
// `threads_per_row` threads holds a row in registers as raw 128-bit words while
// the statistics are reduced in float32: shuffles within a warp, shared memory
// across warps. Blocks are 256 threads (several rows per block for short rows);
// row_plan picks threads per row from d as quack's norms do and the words per
// thread (1, 2, 4 or 8, a template parameter, with the vectorization) from
// that, up to 256 threads x 8 words (16384 bf16/fp16, 8192 fp32, 4096 fp64
// elements) forward and 256 x 4 (8192 16-bit) or 256 x 8 backward, where x, dy
// and the weight/bias gradient accumulators share the registers. Each
// instantiation's __launch_bounds__ minimum of resident blocks is the
// occupancy it is built for, and the grid is one wave of what the occupancy
// calculator then gives. The forward loads the next row while it reduces and
// stores the current one, and keeps small weights and biases in registers.
//
// For benchmarking, FFN_NORM_FORWARD_PLAN and FFN_NORM_BACKWARD_PLAN force the
// register kernels' plan (see forced_plan; scripts/norm_plan_sweep.py sweeps
// them); unset, row_plan decides.
//
// Longer rows (norm_*_long_row_kernel): one 1024-thread block per row loops over
// it, keeping the words it read in shared memory when they fit (else the second
// pass re-reads them, mostly from L2).
//
// Weight/bias gradients, without atomics and bit-reproducible: each block adds
// dy * xhat and dy over the rows it handles (register kernel: in registers, its
// row groups then summed through shared memory in a fixed order; long rows: in
// shared memory) and writes one float32 row of partial sums; sum_partials adds
// these rows in order. Those grids are one wave of resident blocks, a function
// of the device and the shape only. Rows too long even for shared accumulators
// go to norm_param_grad_columns_kernel, which re-reads x and dy.
//
// Formulas (as the CPU kernels, two-pass variance, statistics in float32 or
// float64 for double; g = dy * w, xhat = (x - mean) * rstd):
//   mean = sum(x) / d,  rstd = 1 / sqrt(sum((x - mean)^2) / d + eps)   (RMSNorm: mean = 0)
//   y = xhat * (w + weight_offset) + b
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat))                   (RMSNorm: no mean(g))
// with g = dy * (w + weight_offset). The fused residual add normalizes
// s = x + residual (rounded to T), which the kernel writes as it loads x, and
// its backward adds the gradient of s to dx (rounded to T first, as autograd
// adds the unfused pair's two gradients).
#include "norm.h"
#include "reduce.cuh"
#include "runtime.cuh"
#include "vec.cuh"

#include <algorithm>
#include <charconv>
#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>

namespace ffn {
namespace cuda {
namespace {

// Register kernels: blocks of kRowBlock threads, 1-8 words per thread, threads
// per row from row_plan. The occupancy each instantiation is built for is its
// __launch_bounds__ minimum of resident blocks: register budgets that hold the
// row (forward: and the prefetched next row; backward: x, dy and the weight and
// bias gradient accumulators) without spills, for 16-64 KiB of loads in flight
// per SM (scripts/cuda_report.py shows what ptxas made of them).
constexpr int kRowBlock = 256;
constexpr int kMaxForwardWords = 8;
template <int kWords>
inline constexpr int kForwardMinBlocks = kWords >= 8 ? 1 : kWords >= 4 ? 2 : kWords >= 2 ? 3 : 4;
// Backward: the accumulators take V floats per word, so 16-bit rows (V = 8)
// stop at 4 words per thread.
template <typename T>
inline constexpr int kMaxBackwardWords = sizeof(T) == 2 ? 4 : 8;
template <int kWords>
inline constexpr int kBackwardMinBlocks = kWords >= 4 ? 1 : kWords >= 2 ? 2 : 3;
// One block per row for rows too long for registers.
constexpr int kLongRowBlock = 1024;

int sm_count() { return device_limits().sm_count; }

// Threads per row and words per thread of a register kernel, or
// words_per_thread = 0 for rows it cannot hold. Threads per row follow the
// row length as quack's norms do (8 / 16 / 64 / 128 / 256 threads up to 64 /
// 128 / 3072 / 6144 / 16384 elements, fewer for rows of fewer words): enough
// words per thread to keep loads in flight, few enough threads per row that
// most of the reduction stays within warps.
struct RowPlan {
  int threads_per_row;   // a power of two <= kRowBlock
  int words_per_thread;  // 1, 2, 4 or 8 (<= max_words), or 0
};

RowPlan row_plan(int64_t d, int64_t words, int max_words) {
  const int target = d <= 64 ? 8 : d <= 128 ? 16 : d <= 3072 ? 64 : d <= 6144 ? 128 : kRowBlock;
  int threads = 1;
  while (threads < target && threads < words) threads *= 2;
  while (ceil_div(words, threads) > max_words && threads < kRowBlock) threads *= 2;
  const int64_t needed = ceil_div(words, threads);
  if (needed > max_words) return {threads, 0};
  int per_thread = 1;
  while (per_thread < needed) per_thread *= 2;
  return {threads, per_thread};
}

// The row plan override, for benchmarking (scripts/norm_plan_sweep.py): an
// environment variable, FFN_NORM_FORWARD_PLAN or FFN_NORM_BACKWARD_PLAN, set to
// THREADSxWORDS or THREADSxWORDS@BLOCKS forces the register kernel's threads per
// row, words per thread and resident blocks per SM (the grid is then SMs x
// BLOCKS; without @BLOCKS, as many as the occupancy calculator gives). It is
// read at every launch (getenv costs far less than a launch, and Python's
// os.environ writes reach it), so a sweep changes plans between calls without
// an op of its own; unset or empty, row_plan decides as always. A plan the
// kernels cannot run is an error naming the plan and why, never replaced:
// threads per row are a power of two from 1 to kRowBlock (what row_plan picks),
// words per thread one of the instantiations (1, 2, 4, 8; backward 16-bit rows
// up to 4), enough words to cover d, and blocks per SM from 1 to the occupancy
// calculator's answer for that kernel. The two passes have their own
// variables because their instantiations differ.
constexpr const char* kForwardPlanVariable = "FFN_NORM_FORWARD_PLAN";
constexpr const char* kBackwardPlanVariable = "FFN_NORM_BACKWARD_PLAN";

struct ForcedPlan {
  const char* variable;
  std::string text;    // the variable's value, for errors
  RowPlan rows;        // words_per_thread > 0
  int blocks_per_sm;   // 0: as many as the occupancy calculator gives
};

// The plan `variable` forces for rows of d elements (`words` 128-bit words of
// `dtype`) with at most max_words words per thread, or nullopt where it is unset.
std::optional<ForcedPlan> forced_plan(const char* variable, int64_t d, int64_t words,
                                      int max_words, ScalarType dtype) {
  const char* value = std::getenv(variable);
  if (value == nullptr || *value == '\0') return std::nullopt;
  ForcedPlan plan{variable, value, {0, 0}, 0};
  // THREADSxWORDS[@BLOCKS], decimal numbers.
  std::string_view rest(plan.text);
  const auto number = [&rest](int& out) {
    const auto [end, error] = std::from_chars(rest.data(), rest.data() + rest.size(), out);
    if (error != std::errc{}) return false;
    rest.remove_prefix(static_cast<size_t>(end - rest.data()));
    return true;
  };
  const auto skip = [&rest](char c) {
    if (rest.empty() || rest.front() != c) return false;
    rest.remove_prefix(1);
    return true;
  };
  bool parsed = number(plan.rows.threads_per_row) && skip('x') && number(plan.rows.words_per_thread);
  const bool blocks_given = parsed && skip('@');
  if (blocks_given) parsed = number(plan.blocks_per_sm);
  FFN_CHECK(parsed && rest.empty(), "ffn: expected ", variable,
            " to be THREADSxWORDS or THREADSxWORDS@BLOCKS (threads per row, words per thread, "
            "blocks per SM; e.g. 64x4@2), got '", plan.text, "'");
  const int threads = plan.rows.threads_per_row, per_thread = plan.rows.words_per_thread;
  const auto is_power_of_two = [](int v) { return v > 0 && (v & (v - 1)) == 0; };
  FFN_CHECK(is_power_of_two(threads) && threads <= kRowBlock, "ffn: ", variable, "=", plan.text,
            ": threads per row must be a power of two from 1 to ", kRowBlock, ", got ", threads);
  FFN_CHECK(is_power_of_two(per_thread) && per_thread <= max_words, "ffn: ", variable, "=",
            plan.text, ": words per thread must be one of the instantiations for ", dtype,
            " rows (1, 2, 4", max_words >= 8 ? ", 8" : "", "), got ", per_thread);
  FFN_CHECK(int64_t{threads} * per_thread >= words, "ffn: ", variable, "=", plan.text, ": ",
            threads, " threads x ", per_thread, " words cover ", int64_t{threads} * per_thread,
            " 128-bit words, but a row of d = ", d, " ", dtype, " elements takes ", words);
  FFN_CHECK(!blocks_given || plan.blocks_per_sm >= 1, "ffn: ", variable, "=", plan.text,
            ": blocks per SM must be at least 1, got ", plan.blocks_per_sm);
  return plan;
}

// Calls fn(std::integral_constant<int, W>{}, std::bool_constant<V>{}) with the
// plan's words per thread W (1, 2, 4 or 8, at most kMaxWords) and V = vectorized:
// one kernel instantiation per row shape.
template <int kMaxWords, typename Fn>
void dispatch_row_kernel(const RowPlan& plan, bool vectorized, const Fn& fn) {
  const auto with_words = [&](auto vec) {
    switch (plan.words_per_thread) {
      case 1: fn(std::integral_constant<int, 1>{}, vec); return;
      case 2: fn(std::integral_constant<int, 2>{}, vec); return;
      case 4:
        if constexpr (kMaxWords >= 4) {
          fn(std::integral_constant<int, 4>{}, vec);
          return;
        }
        break;
      case 8:
        if constexpr (kMaxWords >= 8) {
          fn(std::integral_constant<int, 8>{}, vec);
          return;
        }
        break;
    }
    FFN_CHECK(false, "ffn: internal error: expected 1, 2, 4 or 8 (at most ", kMaxWords,
              ") words per thread for a register kernel, got ", plan.words_per_thread);
  };
  if (vectorized) {
    with_words(std::true_type{});
  } else {
    with_words(std::false_type{});
  }
}

// Blocks of `kernel` in one wave on the whole device: SMs times the blocks of
// this size and dynamic shared memory one SM holds (the occupancy calculator's
// answer, cached by runtime.cuh), or times the blocks per SM a forced plan asks
// for, which must not exceed that answer.
template <typename Kernel>
int64_t resident_grid(Kernel kernel, int block, size_t dynamic_smem,
                      const std::optional<ForcedPlan>& forced = std::nullopt) {
  const int resident = resident_blocks_per_sm(kernel, block, dynamic_smem);
  if (forced && forced->blocks_per_sm > 0) {
    FFN_CHECK(forced->blocks_per_sm <= resident, "ffn: ", forced->variable, "=", forced->text,
              ": ", forced->blocks_per_sm, " blocks per SM, but the occupancy calculator allows ",
              resident, " of this kernel (", block, " threads, ", dynamic_smem,
              " bytes of dynamic shared memory) on this device");
    return int64_t{sm_count()} * forced->blocks_per_sm;
  }
  return int64_t{sm_count()} * std::max(resident, 1);
}

template <typename T>
const T* data_or_null(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

template <typename T>
T* mutable_data_or_null(const Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

__device__ __forceinline__ float sqrt_acc(float v) { return sqrtf(v); }
__device__ __forceinline__ double sqrt_acc(double v) { return sqrt(v); }

// A product rounded on its own, never contracted into an FMA with what follows:
// backward forms g = dy * w in both passes, and the dx pass must subtract mean(g)
// from the very g that was summed (at d = 1 LayerNorm's dx is then exactly 0, not
// rstd times the product's rounding error).
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
// A sum rounded on its own: the fused add's grad_s joins dx after dx is rounded,
// never contracted into an FMA with the product that formed dx (as autograd adds
// the unfused pair's two gradients of s).
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

// ---------------------------------------------------------------------------
// Forward.
template <typename T, typename P>
struct ForwardArgs {
  const T* __restrict__ x;
  const T* __restrict__ residual;  // nullable: no fused add
  const P* __restrict__ weight;    // nullable
  const P* __restrict__ bias;      // nullable
  T* __restrict__ y;
  T* __restrict__ sum;          // s = x + residual, with residual
  acc_t<T>* __restrict__ mean;  // nullable: RMSNorm
  acc_t<T>* __restrict__ rstd;
  int64_t rows, d;
  acc_t<T> eps, weight_offset;
  int threads_per_row;
  bool vectorized;
};

// s = x + residual for one word, rounded to T (what the unfused add stores).
template <typename T>
__device__ __forceinline__ Vec<T> sum_word(const Vec<T>& xw, const Vec<T>& rw) {
  Vec<T> s;
#pragma unroll
  for (int k = 0; k < kVecWidth<T>; ++k) {
    s.val[k] = static_cast<T>(static_cast<acc_t<T>>(xw.val[k]) + static_cast<acc_t<T>>(rw.val[k]));
  }
  return s;
}

// The word of the row to normalize at index = row * d + col: x's, or with a
// residual s = x + residual, which is also stored.
template <typename T, typename P>
__device__ __forceinline__ Vec<T> input_word(const ForwardArgs<T, P>& a, Vec<T> xw, int64_t index,
                                             int64_t count) {
  if (a.residual == nullptr) return xw;
  const Vec<T> s = sum_word(xw, load_word(a.residual + index, count, a.vectorized));
  store_word(a.sum + index, count, a.vectorized, s);
  return s;
}

// y for one word at column `col` (< d) of a row; index = row * d + col. w and b
// are the word's weight (plus weight_offset) and bias when the caller holds them
// in registers, else null: then they are read here (from L1/L2, the same columns
// for every row).
template <typename T, typename P>
__device__ __forceinline__ void store_output(const ForwardArgs<T, P>& a, const Vec<T>& xw,
                                             int64_t index, int64_t col, acc_t<T> mu,
                                             acc_t<T> rs, const acc_t<T>* w = nullptr,
                                             const acc_t<T>* b = nullptr) {
  using A = acc_t<T>;
  constexpr int V = kVecWidth<T>;
  const int64_t count = a.d - col;
  A out[V];
#pragma unroll
  for (int k = 0; k < V; ++k) out[k] = (static_cast<A>(xw.val[k]) - mu) * rs;
  if (a.weight != nullptr) {
    A loaded[V];
    if (w == nullptr) {
      load<V>(a.weight + col, count, a.vectorized, loaded);
#pragma unroll
      for (int k = 0; k < V; ++k) loaded[k] += a.weight_offset;
      w = loaded;
    }
#pragma unroll
    for (int k = 0; k < V; ++k) out[k] = out[k] * w[k];
  }
  if (a.bias != nullptr) {
    A loaded[V];
    if (b == nullptr) {
      load<V>(a.bias + col, count, a.vectorized, loaded);
      b = loaded;
    }
#pragma unroll
    for (int k = 0; k < V; ++k) out[k] = out[k] + b[k];
  }
  store<V>(a.y + index, count, a.vectorized, out);
}

// Sum over the valid elements of a word (loads zero-fill, but x - mean does not
// vanish past the end of the row).
template <typename T>
__device__ __forceinline__ acc_t<T> word_sum_sq(const Vec<T>& xw, acc_t<T> mu, int64_t count) {
  acc_t<T> s = 0;
#pragma unroll
  for (int k = 0; k < kVecWidth<T>; ++k) {
    const acc_t<T> c = static_cast<acc_t<T>>(xw.val[k]) - mu;
    if (k < count) s += c * c;
  }
  return s;
}

template <typename T>
__device__ __forceinline__ acc_t<T> word_sum(const Vec<T>& xw) {
  acc_t<T> s = 0;
#pragma unroll
  for (int k = 0; k < kVecWidth<T>; ++k) s += static_cast<acc_t<T>>(xw.val[k]);
  return s;
}

// Register rows (see the top of the file): kWords words per thread; the grid
// strides over groups of rows, and each thread loads its words of the next
// group's row before reducing and storing the current one, so HBM stays busy
// during the reductions. A thread keeps the same columns for every row, so the
// weight and bias stay in registers when they are small (kWords * V <= 8
// elements each); longer rows re-read them, from L1/L2.
template <typename T, typename P, int kWords, bool kVectorized>
__global__ void __launch_bounds__(kRowBlock, kForwardMinBlocks<kWords>)
    norm_forward_kernel(const ForwardArgs<T, P> args) {
  using A = acc_t<T>;
  constexpr int V = kVecWidth<T>;
  ForwardArgs<T, P> a = args;
  a.vectorized = kVectorized;  // a constant from here on: no runtime branches on it
  constexpr bool kParamsInRegisters = kWords * V <= 8;
  constexpr int kParamWords = kParamsInRegisters ? kWords : 1;
  FFN_SHARED(scratch, A[kMaxWarps]);
  const int tpr = a.threads_per_row;
  const int lane = threadIdx.x % tpr;
  const int groups = kRowBlock / tpr;
  const int d = static_cast<int>(a.d);  // a row fits a block: small
  const int64_t stride = static_cast<int64_t>(gridDim.x) * groups;

  A w[kParamWords][V], b[kParamWords][V];
  if constexpr (kParamsInRegisters) {
#pragma unroll
    for (int j = 0; j < kWords; ++j) {
      const int col = (j * tpr + lane) * V;
      if (col >= d) continue;
      if (a.weight != nullptr) {
        load<V>(a.weight + col, d - col, a.vectorized, w[j]);
#pragma unroll
        for (int k = 0; k < V; ++k) w[j][k] += a.weight_offset;
      }
      if (a.bias != nullptr) load<V>(a.bias + col, d - col, a.vectorized, b[j]);
    }
  }
  // This thread's words of `row` (of s with the fused add), zero past the end
  // of the row or of the rows. Vectorized rows are whole words (d % V == 0): one
  // 128-bit load each.
  const auto load_row = [&](int64_t row, Vec<T> (&words)[kWords]) {
#pragma unroll
    for (int j = 0; j < kWords; ++j) {
      const int col = (j * tpr + lane) * V;
      if (row >= a.rows || col >= d) {
        words[j] = zero_word<T>();
      } else {
        const int64_t index = row * d + col;
        const Vec<T> xw = kVectorized ? *reinterpret_cast<const Vec<T>*>(a.x + index)
                                      : load_word(a.x + index, d - col, false);
        words[j] = input_word(a, xw, index, d - col);
      }
    }
  };

  int64_t row = static_cast<int64_t>(blockIdx.x) * groups + threadIdx.x / tpr;
  Vec<T> xw[kWords];
  load_row(row, xw);
  // `first` is the same for the whole block: every thread runs every row_sum.
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * groups; first < a.rows;
       first += stride, row += stride) {
    Vec<T> next[kWords];
    load_row(row + stride, next);

    A mu = 0;
    if (a.mean != nullptr) {
      A s[1] = {0};
#pragma unroll
      for (int j = 0; j < kWords; ++j) s[0] += word_sum(xw[j]);
      row_sum<1>(s, tpr, scratch);
      mu = s[0] / static_cast<A>(d);
    }
    A sq[1] = {0};
#pragma unroll
    for (int j = 0; j < kWords; ++j) sq[0] += word_sum_sq(xw[j], mu, d - (j * tpr + lane) * V);
    row_sum<1>(sq, tpr, scratch);
    const A rs = A(1) / sqrt_acc(sq[0] / static_cast<A>(d) + a.eps);

    if (row < a.rows) {
#pragma unroll
      for (int j = 0; j < kWords; ++j) {
        const int col = (j * tpr + lane) * V;
        if (col >= d) continue;
        if constexpr (kParamsInRegisters) {
          store_output(a, xw[j], row * d + col, col, mu, rs, w[j], b[j]);
        } else {
          store_output(a, xw[j], row * d + col, col, mu, rs);
        }
      }
      if (lane == 0) {
        if (a.mean != nullptr) a.mean[row] = mu;
        a.rstd[row] = rs;
      }
    }
#pragma unroll
    for (int j = 0; j < kWords; ++j) xw[j] = next[j];
  }
}

// One block per row; `cache` (dynamic shared memory for a row, or null) keeps
// the words read in the first pass for the others. Each thread only reads back
// the words it stored, so the cache needs no synchronization.
template <typename T, typename P>
__global__ void __launch_bounds__(kLongRowBlock)
    norm_forward_long_row_kernel(const ForwardArgs<T, P> a, bool cache_row) {
  using A = acc_t<T>;
  constexpr int V = kVecWidth<T>;
  FFN_DYNAMIC_SHARED(dynamic_smem);
  FFN_SHARED(scratch, A[kMaxWarps]);
  Vec<T>* cache = cache_row ? reinterpret_cast<Vec<T>*>(dynamic_smem) : nullptr;
  const int64_t d = a.d;
  const int64_t words = ceil_div(d, V);

  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const T* x = a.x + row * d;
    // Later passes re-read the row they normalize: the cache, else x, or s as
    // this thread stored it in the first pass.
    auto word = [&](int64_t i) {
      if (cache != nullptr) return cache[i];
      return load_word((a.residual != nullptr ? a.sum : a.x) + row * d + i * V, d - i * V,
                       a.vectorized);
    };

    A mu = 0;
    A s[1] = {0};
    for (int64_t i = threadIdx.x; i < words; i += blockDim.x) {
      const Vec<T> xw =
          input_word(a, load_word(x + i * V, d - i * V, a.vectorized), row * d + i * V, d - i * V);
      if (cache != nullptr) cache[i] = xw;
      s[0] += a.mean != nullptr ? word_sum(xw) : word_sum_sq(xw, A(0), d - i * V);
    }
    row_sum<1>(s, blockDim.x, scratch);
    A var_sum = s[0];
    if (a.mean != nullptr) {
      mu = s[0] / static_cast<A>(d);
      A sq[1] = {0};
      for (int64_t i = threadIdx.x; i < words; i += blockDim.x) {
        sq[0] += word_sum_sq(word(i), mu, d - i * V);
      }
      row_sum<1>(sq, blockDim.x, scratch);
      var_sum = sq[0];
    }
    const A rs = A(1) / sqrt_acc(var_sum / static_cast<A>(d) + a.eps);

    for (int64_t i = threadIdx.x; i < words; i += blockDim.x) {
      store_output(a, word(i), row * d + i * V, i * V, mu, rs);
    }
    if (threadIdx.x == 0) {
      if (a.mean != nullptr) a.mean[row] = mu;
      a.rstd[row] = rs;
    }
  }
}

template <typename T, typename P>
void forward(const Tensor& x, const Tensor& residual, const Tensor& weight, const Tensor& bias,
             double eps, double weight_offset, bool center, const Tensor& y, const Tensor& sum,
             const Tensor& mean, const Tensor& rstd) {
  using A = acc_t<T>;
  constexpr int V = kVecWidth<T>;
  ForwardArgs<T, P> a{x.const_data_ptr<T>(),
                      data_or_null<T>(residual),
                      data_or_null<P>(weight),
                      data_or_null<P>(bias),
                      y.mutable_data_ptr<T>(),
                      mutable_data_or_null<T>(sum),
                      center ? mean.mutable_data_ptr<A>() : nullptr,
                      rstd.mutable_data_ptr<A>(),
                      x.size(0),
                      x.size(1),
                      static_cast<A>(eps),
                      static_cast<A>(weight_offset),
                      1,
                      false};
  if (a.rows == 0) return;
  a.vectorized =
      a.d % V == 0 && all_aligned16({a.x, a.residual, a.weight, a.bias, a.y, a.sum});
  const int64_t words = ceil_div(a.d, V);

  const std::optional<ForcedPlan> forced =
      forced_plan(kForwardPlanVariable, a.d, words, kMaxForwardWords, scalar_type_of<T>());
  const RowPlan plan = forced ? forced->rows : row_plan(a.d, words, kMaxForwardWords);
  if (plan.words_per_thread > 0) {
    a.threads_per_row = plan.threads_per_row;
    dispatch_row_kernel<kMaxForwardWords>(plan, a.vectorized, [&](auto words_per_thread, auto vectorized) {
      const auto kernel = norm_forward_kernel<T, P, decltype(words_per_thread)::value,
                                              decltype(vectorized)::value>;
      // One wave of the blocks the SMs actually hold (registers decide, not threads).
      const int64_t grid = std::min<int64_t>(ceil_div(a.rows, kRowBlock / plan.threads_per_row),
                                             resident_grid(kernel, kRowBlock, 0, forced));
      launch(kernel, {static_cast<unsigned>(grid), kRowBlock}, a);
    });
    return;
  }
  const auto kernel = norm_forward_long_row_kernel<T, P>;
  const size_t cache_bytes = static_cast<size_t>(words) * sizeof(Vec<T>);
  const bool cache_row = cache_bytes <= allow_dynamic_shared_memory(kernel);
  const size_t smem = cache_row ? cache_bytes : 0;
  const int64_t grid = std::min<int64_t>(a.rows, resident_grid(kernel, kLongRowBlock, smem));
  launch(kernel, {static_cast<unsigned>(grid), kLongRowBlock, smem}, a, cache_row);
}

// ---------------------------------------------------------------------------
// Backward.
// dx may be dy (the in-place backward): each thread reads its words of dy, and
// computes dx from them, before it stores dx there, and never reads them again.
template <typename T, typename P>
struct BackwardArgs {
  const T* __restrict__ dy;
  const T* __restrict__ dsum;  // nullable: the fused add's gradient of s, added to dx
  const T* __restrict__ x;
  const acc_t<T>* __restrict__ mean;  // nullable: RMSNorm
  const acc_t<T>* __restrict__ rstd;
  const P* __restrict__ weight;  // nullable
  T* __restrict__ dx;
  acc_t<T>* __restrict__ dw_partial;  // nullable: [partial rows, d]
  acc_t<T>* __restrict__ db_partial;  // nullable: [partial rows, d]
  int64_t rows, d;
  acc_t<T> weight_offset;
  int threads_per_row;
  bool vectorized;
};

// g = dy * (w + weight_offset) and xhat = (x - mean) * rstd for one word. Past the end of the row
// dy loads as zero, so g and every product with it vanish there.
template <typename T>
struct WordTerms {
  acc_t<T> dy[kVecWidth<T>], g[kVecWidth<T>], xhat[kVecWidth<T>];
};

template <typename T, typename P>
__device__ __forceinline__ WordTerms<T> word_terms(const BackwardArgs<T, P>& a, const Vec<T>& xw,
                                                   const Vec<T>& dyw, int64_t col, acc_t<T> mu,
                                                   acc_t<T> rs) {
  using A = acc_t<T>;
  constexpr int V = kVecWidth<T>;
  A w[V];
  if (a.weight != nullptr) {
    load<V>(a.weight + col, a.d - col, a.vectorized, w);
#pragma unroll
    for (int k = 0; k < V; ++k) w[k] += a.weight_offset;
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) w[k] = A(1);
  }
  WordTerms<T> t;
#pragma unroll
  for (int k = 0; k < V; ++k) {
    t.dy[k] = static_cast<A>(dyw.val[k]);
    t.g[k] = mul_rn(t.dy[k], w[k]);
    t.xhat[k] = (static_cast<A>(xw.val[k]) - mu) * rs;
  }
  return t;
}

// Adds sum(g) and sum(g * xhat) of a word into sums.
template <typename T>
__device__ __forceinline__ void add_row_sums(const WordTerms<T>& t, acc_t<T> (&sums)[2]) {
#pragma unroll
  for (int k = 0; k < kVecWidth<T>; ++k) {
    sums[0] += t.g[k];
    sums[1] += t.g[k] * t.xhat[k];
  }
}

template <typename T, typename P>
__device__ __forceinline__ void store_grad_input(const BackwardArgs<T, P>& a, const Vec<T>& xw,
                                                 const Vec<T>& dyw, int64_t index, int64_t col,
                                                 acc_t<T> mu, acc_t<T> rs, acc_t<T> mean_g,
                                                 acc_t<T> mean_gx) {
  using A = acc_t<T>;
  constexpr int V = kVecWidth<T>;
  const WordTerms<T> t = word_terms(a, xw, dyw, col, mu, rs);
  A out[V];
#pragma unroll
  for (int k = 0; k < V; ++k) out[k] = rs * (t.g[k] - mean_g - t.xhat[k] * mean_gx);
  if (a.dsum != nullptr) {
    A ds[V];
    load<V>(a.dsum + index, a.d - col, a.vectorized, ds);
#pragma unroll
    for (int k = 0; k < V; ++k) out[k] = add_rn(static_cast<A>(static_cast<T>(out[k])), ds[k]);
  }
  store<V>(a.dx + index, a.d - col, a.vectorized, out);
}

// Writes the sum over the block's row groups of acc (each thread's accumulators
// for its words) as row blockIdx.x of `partial`. Groups are added in order.
// buffer: blockDim.x * kWords * V values of shared memory (unused with one group).
template <int kWords, int V, typename A>
__device__ __forceinline__ void write_block_partial(const A (&acc)[kWords][V], A* partial,
                                                    int d, int tpr, bool vectorized, A* buffer) {
  const int lane = threadIdx.x % tpr;
  const int groups = blockDim.x / tpr;
  A* out = partial + static_cast<int64_t>(blockIdx.x) * d;
  if (groups == 1) {
#pragma unroll
    for (int j = 0; j < kWords; ++j) {
      const int col = (j * tpr + lane) * V;
      if (col < d) store<V>(out + col, d - col, vectorized, acc[j]);
    }
    return;
  }
  const int width = tpr * kWords * V;  // columns a group covers (>= d)
  A* mine = buffer + (threadIdx.x / tpr) * width;
#pragma unroll
  for (int j = 0; j < kWords; ++j) {
#pragma unroll
    for (int k = 0; k < V; ++k) mine[(j * tpr + lane) * V + k] = acc[j][k];
  }
  __syncthreads();
  const int columns = min(width, d);
  for (int c = threadIdx.x; c < columns; c += blockDim.x) {
    A total = 0;
    for (int g = 0; g < groups; ++g) total += buffer[g * width + c];
    out[c] = total;
  }
  __syncthreads();  // buffer is free again
}

template <typename T, typename P, int kWords, bool kVectorized>
__global__ void __launch_bounds__(kRowBlock, kBackwardMinBlocks<kWords>)
    norm_backward_kernel(const BackwardArgs<T, P> args) {
  using A = acc_t<T>;
  constexpr int V = kVecWidth<T>;
  BackwardArgs<T, P> a = args;
  a.vectorized = kVectorized;  // a constant from here on: no runtime branches on it
  FFN_DYNAMIC_SHARED(dynamic_smem);
  FFN_SHARED(scratch, A[2 * kMaxWarps]);
  const int tpr = a.threads_per_row;
  const int lane = threadIdx.x % tpr;
  const int groups = kRowBlock / tpr;
  const int d = static_cast<int>(a.d);  // a row fits a block: small

  A dw[kWords][V], db[kWords][V];
#pragma unroll
  for (int j = 0; j < kWords; ++j) {
#pragma unroll
    for (int k = 0; k < V; ++k) dw[j][k] = db[j][k] = A(0);
  }

  for (int64_t first = static_cast<int64_t>(blockIdx.x) * groups; first < a.rows;
       first += static_cast<int64_t>(gridDim.x) * groups) {
    const int64_t row = first + threadIdx.x / tpr;
    const bool valid = row < a.rows;  // the whole group agrees; shuffles need every lane
    const int64_t offset = (valid ? row : 0) * d;

    Vec<T> xw[kWords], dyw[kWords];
#pragma unroll
    for (int j = 0; j < kWords; ++j) {
      const int col = (j * tpr + lane) * V;
      const bool in_row = valid && col < d;
      xw[j] = in_row ? load_word(a.x + offset + col, d - col, a.vectorized) : zero_word<T>();
      dyw[j] = in_row ? load_word(a.dy + offset + col, d - col, a.vectorized) : zero_word<T>();
    }
    const A mu = valid && a.mean != nullptr ? a.mean[row] : A(0);
    const A rs = valid ? a.rstd[row] : A(0);

    A sums[2] = {0, 0};
#pragma unroll
    for (int j = 0; j < kWords; ++j) {
      const int col = (j * tpr + lane) * V;
      if (col >= d) continue;
      const WordTerms<T> t = word_terms(a, xw[j], dyw[j], col, mu, rs);
      add_row_sums(t, sums);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        dw[j][k] += t.dy[k] * t.xhat[k];
        db[j][k] += t.dy[k];
      }
    }
    row_sum<2>(sums, tpr, scratch);
    const A mean_g = a.mean != nullptr ? sums[0] / static_cast<A>(d) : A(0);
    const A mean_gx = sums[1] / static_cast<A>(d);

    if (!valid) continue;
#pragma unroll
    for (int j = 0; j < kWords; ++j) {
      const int col = (j * tpr + lane) * V;
      if (col < d) store_grad_input(a, xw[j], dyw[j], offset + col, col, mu, rs, mean_g, mean_gx);
    }
  }

  A* buffer = reinterpret_cast<A*>(dynamic_smem);
  if (a.dw_partial != nullptr) write_block_partial(dw, a.dw_partial, d, tpr, a.vectorized, buffer);
  if (a.db_partial != nullptr) write_block_partial(db, a.db_partial, d, tpr, a.vectorized, buffer);
}

// What norm_backward_long_row_kernel keeps in its dynamic shared memory, in this
// order: float32 weight/bias gradient accumulators for the row (dw, then db, for
// those a.dw_partial / a.db_partial ask for), then copies of the x and dy rows.
struct LongRowShared {
  bool accumulate;  // else the parameter gradients are left to the column kernel
  bool cache_rows;  // else the second pass re-reads x and dy (from L2)
};

// One block per row (grid-stride over rows). Each thread owns the words
// i = threadIdx.x + k * blockDim.x of every row, so the shared accumulators and
// row copies are only ever touched by their owner and need no synchronization.
// With `accumulate`, block b writes its sums as row b of the partials.
template <typename T, typename P>
__global__ void __launch_bounds__(kLongRowBlock)
    norm_backward_long_row_kernel(const BackwardArgs<T, P> a, const LongRowShared shared) {
  using A = acc_t<T>;
  constexpr int V = kVecWidth<T>;
  FFN_DYNAMIC_SHARED(dynamic_smem);
  FFN_SHARED(scratch, A[2 * kMaxWarps]);
  const int64_t d = a.d;
  const int64_t words = ceil_div(d, V);
  // Accumulator element k of word i lives at [k * words + i]: a warp's accesses
  // are consecutive, free of bank conflicts.
  A* next = reinterpret_cast<A*>(dynamic_smem);
  A* dw_acc = nullptr;
  A* db_acc = nullptr;
  if (shared.accumulate && a.dw_partial != nullptr) {
    dw_acc = next;
    next += words * V;
  }
  if (shared.accumulate && a.db_partial != nullptr) {
    db_acc = next;
    next += words * V;
  }
  Vec<T>* x_cache = shared.cache_rows ? reinterpret_cast<Vec<T>*>(next) : nullptr;
  Vec<T>* dy_cache = shared.cache_rows ? x_cache + words : nullptr;

  for (int64_t i = threadIdx.x; i < words; i += blockDim.x) {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      if (dw_acc != nullptr) dw_acc[k * words + i] = A(0);
      if (db_acc != nullptr) db_acc[k * words + i] = A(0);
    }
  }

  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const int64_t offset = row * d;
    const A mu = a.mean != nullptr ? a.mean[row] : A(0);
    const A rs = a.rstd[row];
    A sums[2] = {0, 0};
    for (int64_t i = threadIdx.x; i < words; i += blockDim.x) {
      const Vec<T> xw = load_word(a.x + offset + i * V, d - i * V, a.vectorized);
      const Vec<T> dyw = load_word(a.dy + offset + i * V, d - i * V, a.vectorized);
      if (x_cache != nullptr) {
        x_cache[i] = xw;
        dy_cache[i] = dyw;
      }
      const WordTerms<T> t = word_terms(a, xw, dyw, i * V, mu, rs);
      add_row_sums(t, sums);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        if (dw_acc != nullptr) dw_acc[k * words + i] += t.dy[k] * t.xhat[k];
        if (db_acc != nullptr) db_acc[k * words + i] += t.dy[k];
      }
    }
    row_sum<2>(sums, blockDim.x, scratch);
    const A mean_g = a.mean != nullptr ? sums[0] / static_cast<A>(d) : A(0);
    const A mean_gx = sums[1] / static_cast<A>(d);
    for (int64_t i = threadIdx.x; i < words; i += blockDim.x) {
      const bool cached = x_cache != nullptr;
      const Vec<T> xw =
          cached ? x_cache[i] : load_word(a.x + offset + i * V, d - i * V, a.vectorized);
      const Vec<T> dyw =
          cached ? dy_cache[i] : load_word(a.dy + offset + i * V, d - i * V, a.vectorized);
      store_grad_input(a, xw, dyw, offset + i * V, i * V, mu, rs, mean_g, mean_gx);
    }
  }

  const int64_t partial_row = static_cast<int64_t>(blockIdx.x) * d;
  for (int64_t i = threadIdx.x; i < words; i += blockDim.x) {
    A dw[V], db[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      if (dw_acc != nullptr) dw[k] = dw_acc[k * words + i];
      if (db_acc != nullptr) db[k] = db_acc[k * words + i];
    }
    if (dw_acc != nullptr) store<V>(a.dw_partial + partial_row + i * V, d - i * V, a.vectorized, dw);
    if (db_acc != nullptr) store<V>(a.db_partial + partial_row + i * V, d - i * V, a.vectorized, db);
  }
}

// Weight/bias gradient partial sums of rows too long for shared accumulators:
// block column x chunk of rows; row blockIdx.y of the partials holds the sums
// over that chunk. Re-reads x and dy.
constexpr int kColumnBlock = 256;

template <typename T>
__global__ void __launch_bounds__(kColumnBlock)
    norm_param_grad_columns_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                   const acc_t<T>* __restrict__ mean,
                                   const acc_t<T>* __restrict__ rstd, int64_t rows, int64_t d,
                                   int64_t rows_per_chunk, acc_t<T>* __restrict__ dw_partial,
                                   acc_t<T>* __restrict__ db_partial) {
  using A = acc_t<T>;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= d) return;
  const int64_t begin = blockIdx.y * rows_per_chunk;
  const int64_t end = std::min(rows, begin + rows_per_chunk);
  A dw = 0, db = 0;
  for (int64_t r = begin; r < end; ++r) {
    const A g = static_cast<A>(dy[r * d + col]);
    const A xhat = (static_cast<A>(x[r * d + col]) - (mean != nullptr ? mean[r] : A(0))) * rstd[r];
    dw += g * xhat;
    db += g;
  }
  if (dw_partial != nullptr) dw_partial[blockIdx.y * d + col] = dw;
  if (db_partial != nullptr) db_partial[blockIdx.y * d + col] = db;
}

// out[c] = sum over rows s of partial[s, c], rows added in a fixed order.
constexpr int kSumRows = 16;

template <typename A, typename P>
__global__ void __launch_bounds__(kWarpSize * kSumRows)
    sum_partials_kernel(const A* __restrict__ partial, int64_t slots, int64_t d,
                        P* __restrict__ out) {
  FFN_SHARED(part, A[kSumRows][kWarpSize + 1]);
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kWarpSize + threadIdx.x;
  A total = 0;
  if (col < d) {
    for (int64_t s = threadIdx.y; s < slots; s += kSumRows) total += partial[s * d + col];
  }
  part[threadIdx.y][threadIdx.x] = total;
  __syncthreads();
  if (threadIdx.y == 0 && col < d) {
    A sum = 0;
#pragma unroll
    for (int y = 0; y < kSumRows; ++y) sum += part[y][threadIdx.x];
    out[col] = static_cast<P>(sum);
  }
}

template <typename A, typename P>
void sum_partials(const Tensor& partial, const Tensor& out) {
  const int64_t slots = partial.size(0), d = partial.size(1);
  launch(sum_partials_kernel<A, P>,
         {static_cast<unsigned>(ceil_div(d, kWarpSize)), dim3(kWarpSize, kSumRows)},
         partial.const_data_ptr<A>(), slots, d, out.mutable_data_ptr<P>());
}

template <typename T, typename P>
void backward(const Tensor& grad_y, const Tensor& grad_sum, const Tensor& x, const Tensor& mean,
              const Tensor& rstd, const Tensor& weight, double weight_offset, bool center,
              const Tensor& grad_x, const Tensor& grad_weight, const Tensor& grad_bias) {
  using A = acc_t<T>;
  constexpr int V = kVecWidth<T>;
  const int64_t rows = x.size(0), d = x.size(1);
  if (rows == 0) {  // sums over no rows
    if (grad_weight.defined()) torch::stable::fill_(grad_weight, 0.0);
    if (grad_bias.defined()) torch::stable::fill_(grad_bias, 0.0);
    return;
  }
  if (d == 0) return;
  BackwardArgs<T, P> a{grad_y.const_data_ptr<T>(),
                       data_or_null<T>(grad_sum),
                       x.const_data_ptr<T>(),
                       center ? mean.const_data_ptr<A>() : nullptr,
                       rstd.const_data_ptr<A>(),
                       data_or_null<P>(weight),
                       grad_x.mutable_data_ptr<T>(),
                       nullptr,
                       nullptr,
                       rows,
                       d,
                       static_cast<A>(weight_offset),
                       1,
                       false};
  a.vectorized = d % V == 0 && all_aligned16({a.dy, a.dsum, a.x, a.weight, a.dx});
  const bool param_grads = grad_weight.defined() || grad_bias.defined();
  const ScalarType partial_dtype = scalar_type_of<A>();
  const int64_t words = ceil_div(d, V);
  Tensor dw_partial, db_partial;

  const std::optional<ForcedPlan> forced =
      forced_plan(kBackwardPlanVariable, d, words, kMaxBackwardWords<T>, scalar_type_of<T>());
  const RowPlan plan = forced ? forced->rows : row_plan(d, words, kMaxBackwardWords<T>);
  if (plan.words_per_thread > 0) {
    a.threads_per_row = plan.threads_per_row;
    const int rows_per_block = kRowBlock / plan.threads_per_row;
    dispatch_row_kernel<kMaxBackwardWords<T>>(plan, a.vectorized, [&](auto words_per_thread, auto vectorized) {
      constexpr int kWords = decltype(words_per_thread)::value;
      const auto kernel = norm_backward_kernel<T, P, kWords, decltype(vectorized)::value>;
      const size_t smem = param_grads && rows_per_block > 1
                              ? static_cast<size_t>(kRowBlock) * kWords * V * sizeof(A)
                              : 0;
      // One wave of resident blocks: each accumulates over many rows, so there are
      // few partial rows (one per SM for the longest rows), and their number
      // depends only on the device and the shape.
      const int64_t grid = std::min<int64_t>(ceil_div(rows, rows_per_block),
                                             resident_grid(kernel, kRowBlock, smem, forced));
      if (grad_weight.defined()) dw_partial = ffn::empty({grid, d}, partial_dtype, x);
      if (grad_bias.defined()) db_partial = ffn::empty({grid, d}, partial_dtype, x);
      a.dw_partial = mutable_data_or_null<A>(dw_partial);
      a.db_partial = mutable_data_or_null<A>(db_partial);
      launch(kernel, {static_cast<unsigned>(grid), kRowBlock, smem}, a);
    });
  } else {
    const auto kernel = norm_backward_long_row_kernel<T, P>;
    const size_t budget = allow_dynamic_shared_memory(kernel);
    const size_t accumulator_bytes = (int{grad_weight.defined()} + int{grad_bias.defined()}) *
                                     static_cast<size_t>(words) * V * sizeof(A);
    const size_t cache_bytes = 2 * static_cast<size_t>(words) * sizeof(Vec<T>);
    LongRowShared shared{param_grads && accumulator_bytes <= budget, false};
    const size_t used = shared.accumulate ? accumulator_bytes : 0;
    shared.cache_rows = used + cache_bytes <= budget;
    const size_t smem = used + (shared.cache_rows ? cache_bytes : 0);
    // One wave of resident blocks, as above.
    const int64_t grid = std::min<int64_t>(rows, resident_grid(kernel, kLongRowBlock, smem));
    if (shared.accumulate) {
      if (grad_weight.defined()) dw_partial = ffn::empty({grid, d}, partial_dtype, x);
      if (grad_bias.defined()) db_partial = ffn::empty({grid, d}, partial_dtype, x);
      a.dw_partial = mutable_data_or_null<A>(dw_partial);
      a.db_partial = mutable_data_or_null<A>(db_partial);
    }
    // The column kernel re-reads dy, so it runs first: dx may overwrite dy (in-place backward).
    if (param_grads && !shared.accumulate) {
      const int64_t column_blocks = ceil_div(d, kColumnBlock);
      const int64_t chunks = std::clamp<int64_t>(ceil_div(int64_t{sm_count()} * 8, column_blocks),
                                                 1, std::min<int64_t>(rows, 65535));
      const int64_t rows_per_chunk = ceil_div(rows, chunks);
      if (grad_weight.defined()) dw_partial = ffn::empty({chunks, d}, partial_dtype, x);
      if (grad_bias.defined()) db_partial = ffn::empty({chunks, d}, partial_dtype, x);
      const dim3 grid_2d(static_cast<unsigned>(column_blocks), static_cast<unsigned>(chunks));
      launch(norm_param_grad_columns_kernel<T>, {grid_2d, kColumnBlock}, a.dy, a.x, a.mean, a.rstd,
             rows, d, rows_per_chunk, mutable_data_or_null<A>(dw_partial),
             mutable_data_or_null<A>(db_partial));
    }
    launch(kernel, {static_cast<unsigned>(grid), kLongRowBlock, smem}, a, shared);
  }
  if (grad_weight.defined()) sum_partials<A, P>(dw_partial, grad_weight);
  if (grad_bias.defined()) sum_partials<A, P>(db_partial, grad_bias);
}

void norm_forward(const Tensor& x, const Tensor& residual, const Tensor& weight,
                  const Tensor& bias, double eps, double weight_offset, bool center,
                  const Tensor& y, const Tensor& sum, const Tensor& mean, const Tensor& rstd) {
  const DeviceGuard guard(x.get_device_index());
  dispatch_norm_types(x, weight.defined() ? weight : bias, [&](auto t, auto p) {
    forward<decltype(t), decltype(p)>(x, residual, weight, bias, eps, weight_offset, center, y, sum,
                                      mean, rstd);
  });
}

void norm_backward(const Tensor& grad_y, const Tensor& grad_sum, const Tensor& x,
                   const Tensor& mean, const Tensor& rstd, const Tensor& weight,
                   double weight_offset, bool center, const Tensor& grad_x,
                   const Tensor& grad_weight, const Tensor& grad_bias) {
  const DeviceGuard guard(x.get_device_index());
  dispatch_norm_types(x, weight.defined() ? weight : grad_bias, [&](auto t, auto p) {
    backward<decltype(t), decltype(p)>(grad_y, grad_sum, x, mean, rstd, weight, weight_offset,
                                       center, grad_x, grad_weight, grad_bias);
  });
}

}  // namespace

const NormKernels kNormKernels{&norm_forward, &norm_backward};

}  // namespace cuda
}  // namespace ffn
