// Host emulation of the parts of the CUDA execution model that csrc/cuda/ uses,
// so that the same kernel and launcher source compiles with nvcc for the GPU
// and with the host compiler (FFN_CUDA_EMU defined) for the CPU tests in
// tests/cuda_emu/.
//
// A launch runs every block of the grid, one after the other in a shuffled
// order, each block as one fiber (ucontext) per CUDA thread. A fiber runs until
// its next synchronization point: __syncthreads, a warp collective (shuffle,
// __syncwarp) or the end of the kernel. The scheduler then lets every other
// runnable thread of the block reach its own next point, in forward, reversed
// or shuffled thread order (varied over blocks and rounds, or fixed with
// FFN_EMU_ORDER=forward|reverse|shuffle), and only then releases a barrier or a
// warp collective. Whatever a kernel reads from another thread without a
// barrier in between is therefore read before or after that thread wrote it,
// depending on the order, and shows up as a wrong result.
//
// What is checked, loudly (ffn::emu::Error, or an AddressSanitizer report):
// - launch configuration as on sm_90: block <= 1024 threads (x, y <= 1024,
//   z <= 64), grid y, z <= 65535, static shared memory <= 48 KiB, dynamic above
//   the default 48 KiB only after allow_dynamic_shared_memory, static + dynamic
//   <= 227 KiB;
// - a __syncthreads that not every thread of the block reaches (some exited, or
//   wait in a warp collective), a warp collective whose mask names a lane that
//   exited, waits at a barrier or calls with another mask, a shuffle reading a
//   lane outside its mask, and a block that can make no progress;
// - every access: shared memory is allocated per block and per variable with
//   malloc and filled with 0xff bytes (NaN as a float) at block start, and the
//   tests are built with -fsanitize=address, so out-of-bounds global (torch's
//   CPU tensors are malloc'ed) and shared accesses are ASan errors.
//
// Kernels declare shared memory with FFN_SHARED / FFN_DYNAMIC_SHARED
// (cuda/runtime.cuh), which expand to __shared__ declarations under nvcc.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <source_location>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

// ---------------------------------------------------------------------------
// CUDA's built-in types and qualifiers on the host.
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = struct ffn_emu_stream*;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

namespace ffn::emu {

// The sm_90 (H100 / H200) limits the launches are checked against and the
// occupancy is computed from.
struct DeviceSpec {
  int sm_count = 132;
  int max_threads_per_block = 1024;
  int max_threads_per_sm = 2048;
  int max_blocks_per_sm = 32;
  size_t default_shared_per_block = 48 * 1024;
  size_t max_shared_per_block_optin = 227 * 1024;
  size_t shared_per_sm = 228 * 1024;
  size_t reserved_shared_per_block = 1024;
};
const DeviceSpec& device_spec();
// Tests set a smaller SM count, so that the launchers' grids (one wave of
// resident blocks) are small and each block strides over many rows.
void set_sm_count(int sm_count);

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Coordinates of the CUDA thread running now (only valid inside a kernel).
struct ThreadCoords {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
};
const ThreadCoords& current();

void syncthreads();
void syncwarp(unsigned mask);
// The warp collective behind every shuffle: each lane of `mask` offers `bits`
// and receives the bits offered by lane `src_lane` (which must be in `mask`).
uint64_t warp_exchange(unsigned mask, uint64_t bits, int src_lane);
int lane_id();

// Shared memory of the running block: one allocation per FFN_SHARED variable
// (keyed by its declaration), and the launch's dynamic shared memory.
void* static_shared(const void* key, size_t bytes);
unsigned char* dynamic_shared();

template <typename T>
T& static_shared_as(const void* key) {
  static_assert(std::is_trivially_default_constructible_v<T>,
                "__shared__ variables cannot have constructors");
  return *static_cast<T*>(static_shared(key, sizeof(T)));
}

// Kernel attributes and occupancy, as the CUDA runtime reports them on sm_90.
// Registers are not known here: occupancy is bounded by threads, blocks and
// shared memory (plus the 1 KiB the emulation assumes for static shared memory).
void set_max_dynamic_shared_memory(const void* kernel, size_t bytes);
int max_active_blocks_per_sm(const void* kernel, int block_threads, size_t dynamic_smem);

// Runs body(), the kernel applied to its arguments, over the grid.
void run_grid(const void* kernel, dim3 grid, dim3 block, size_t dynamic_smem,
              const std::function<void()>& body, const std::source_location& where);

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t dynamic_smem,
            const std::source_location& where, Args&&... args) {
  // Arguments are copied once, as a launch copies them to the device.
  std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  run_grid(reinterpret_cast<const void*>(kernel), grid, block, dynamic_smem,
           [&] { std::apply(kernel, params); }, where);
}

// Shuffles with CUDA's semantics for a width-lane segment: a source lane past
// the caller's segment (later segments for xor, the segment's end for down)
// returns the caller's own value.
template <typename T>
uint64_t to_bits(const T& v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a type over 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}
template <typename T>
T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}
template <typename T>
T shfl_xor(unsigned mask, T v, int lane_mask, int width) {
  const int lane = lane_id();
  int src = lane ^ lane_mask;
  if (src >= (lane / width + 1) * width) src = lane;
  return from_bits<T>(warp_exchange(mask, to_bits(v), src));
}
template <typename T>
T shfl_down(unsigned mask, T v, unsigned delta, int width) {
  const int lane = lane_id();
  const int src = lane % width + static_cast<int>(delta) < width ? lane + static_cast<int>(delta) : lane;
  return from_bits<T>(warp_exchange(mask, to_bits(v), src));
}
template <typename T>
T shfl_up(unsigned mask, T v, unsigned delta, int width) {
  const int lane = lane_id();
  const int src = lane % width >= static_cast<int>(delta) ? lane - static_cast<int>(delta) : lane;
  return from_bits<T>(warp_exchange(mask, to_bits(v), src));
}
template <typename T>
T shfl(unsigned mask, T v, int src_lane, int width) {
  const int lane = lane_id();
  return from_bits<T>(warp_exchange(mask, to_bits(v), lane / width * width + src_lane % width));
}

}  // namespace ffn::emu

#define threadIdx (::ffn::emu::current().thread_idx)
#define blockIdx (::ffn::emu::current().block_idx)
#define blockDim (::ffn::emu::current().block_dim)
#define gridDim (::ffn::emu::current().grid_dim)
constexpr int warpSize = 32;

inline void __syncthreads() { ::ffn::emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::ffn::emu::syncwarp(mask); }
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = warpSize) {
  return ::ffn::emu::shfl_xor(mask, v, lane_mask, width);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
  return ::ffn::emu::shfl_down(mask, v, delta, width);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
  return ::ffn::emu::shfl_up(mask, v, delta, width);
}
template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = warpSize) {
  return ::ffn::emu::shfl(mask, v, src_lane, width);
}

// Rounding intrinsics: one IEEE operation rounded to nearest even, never fused
// with a neighbour (the emulation is compiled without FMA contraction).
__attribute__((noinline)) inline float __fmul_rn(float a, float b) { return a * b; }
__attribute__((noinline)) inline double __dmul_rn(double a, double b) { return a * b; }
__attribute__((noinline)) inline float __fadd_rn(float a, float b) { return a + b; }
__attribute__((noinline)) inline double __dadd_rn(double a, double b) { return a + b; }

// Device-side min/max of CUDA's math API, for the types the kernels use.
template <typename T, typename = std::enable_if_t<std::is_arithmetic_v<T>>>
constexpr T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T, typename = std::enable_if_t<std::is_arithmetic_v<T>>>
constexpr T max(T a, T b) {
  return a < b ? b : a;
}
