// Tests of the CUDA emulation itself (csrc/cuda/emu/): that it runs kernels as
// CUDA does, and that it catches what it promises to catch.
#include "runtime.cuh"

#include <gtest/gtest.h>

#include <cstdlib>
#include <numeric>
#include <string>
#include <vector>

// libtorch is not instrumented: its own allocations are not checked for leaks or
// mismatched deallocation, only the bounds of what the kernels touch.
extern "C" const char* __asan_default_options() {
  return "detect_leaks=0:alloc_dealloc_mismatch=0:detect_odr_violation=0";
}

namespace ffn::cuda {
namespace {

constexpr int kBlock = 128;

// Rotates each block's values by one through shared memory: out[i] = in[i + 1]
// (within the block). With `barrier` false the kernel reads a neighbour's slot
// before that thread has written it: a planted missing __syncthreads.
__global__ void rotate_kernel(const float* in, float* out, bool barrier) {
  FFN_SHARED(slots, float[kBlock]);
  const int t = threadIdx.x;
  slots[t] = in[blockIdx.x * kBlock + t];
  if (barrier) __syncthreads();
  out[blockIdx.x * kBlock + t] = slots[(t + 1) % kBlock];
}

std::vector<float> run_rotate(bool barrier, int blocks) {
  std::vector<float> in(static_cast<size_t>(blocks) * kBlock), out(in.size(), 0.f);
  std::iota(in.begin(), in.end(), 0.f);
  launch(rotate_kernel, {static_cast<unsigned>(blocks), kBlock}, in.data(), out.data(), barrier);
  return out;
}

bool rotated(const std::vector<float>& out) {
  for (size_t i = 0; i < out.size(); ++i) {
    const size_t block = i / kBlock, t = i % kBlock;
    if (out[i] != static_cast<float>(block * kBlock + (t + 1) % kBlock)) return false;
  }
  return true;
}

class OrderEnv {
 public:
  explicit OrderEnv(const char* order) { setenv("FFN_EMU_ORDER", order, 1); }
  ~OrderEnv() { unsetenv("FFN_EMU_ORDER"); }
};

TEST(CudaEmu, BarrierOrdersSharedMemory) {
  for (const char* order : {"forward", "reverse", "shuffle", "mixed"}) {
    const OrderEnv env(order);
    EXPECT_TRUE(rotated(run_rotate(true, 3))) << order;
  }
}

TEST(CudaEmu, MissingBarrierIsExposedByEveryThreadOrder) {
  // Each thread runs to its next synchronization point (here: the end) before
  // the next one starts. Forward order: every thread reads its neighbour's slot
  // before the neighbour wrote it (0xff bytes, a NaN); reverse order: the last
  // thread reads slot 0 before thread 0 wrote it.
  for (const char* order : {"forward", "reverse", "shuffle", "mixed"}) {
    const OrderEnv env(order);
    EXPECT_FALSE(rotated(run_rotate(false, 3))) << order;
  }
}

__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x < 40) return;  // these threads never reach the barrier
  __syncthreads();
  out[threadIdx.x] = 1;
}

TEST(CudaEmu, BarrierNotReachedByEveryThreadFails) {
  std::vector<int> out(64);
  try {
    launch(divergent_barrier_kernel, {1, 64}, out.data());
    FAIL() << "expected an error";
  } catch (const emu::Error& e) {
    EXPECT_NE(std::string(e.what()).find("__syncthreads not reached by every thread"),
              std::string::npos)
        << e.what();
  }
}

__global__ void shuffle_kernel(int* out, int mode, int arg, int width) {
  const int lane = threadIdx.x % 32;
  const int v = 100 * static_cast<int>(threadIdx.x / 32) + lane;
  int r = 0;
  switch (mode) {
    case 0: r = __shfl_xor_sync(0xffffffffu, v, arg, width); break;
    case 1: r = __shfl_down_sync(0xffffffffu, v, static_cast<unsigned>(arg), width); break;
    case 2: r = __shfl_up_sync(0xffffffffu, v, static_cast<unsigned>(arg), width); break;
    default: r = __shfl_sync(0xffffffffu, v, arg, width); break;
  }
  out[threadIdx.x] = r;
}

// CUDA's documented results for each shuffle, lane by lane.
int expected_shuffle(int mode, int lane, int arg, int width) {
  const int segment = lane / width * width;
  int src = lane;
  switch (mode) {
    case 0: src = (lane ^ arg) < segment + width ? lane ^ arg : lane; break;
    case 1: src = lane - segment + arg < width ? lane + arg : lane; break;
    case 2: src = lane - segment >= arg ? lane - arg : lane; break;
    default: src = segment + arg % width; break;
  }
  return src;
}

TEST(CudaEmu, ShufflesFollowCudaSemantics) {
  std::vector<int> out(64);
  for (int mode = 0; mode < 4; ++mode) {
    for (int width : {32, 16, 8, 4, 2}) {
      for (int arg : {1, 2, 3, 5, 16}) {
        launch(shuffle_kernel, {1, 64}, out.data(), mode, arg, width);
        for (int t = 0; t < 64; ++t) {
          const int lane = t % 32;
          ASSERT_EQ(out[t], 100 * (t / 32) + expected_shuffle(mode, lane, arg, width))
              << "mode " << mode << " width " << width << " arg " << arg << " thread " << t;
        }
      }
    }
  }
}

__global__ void shuffle_after_exit_kernel(float* out) {
  if (threadIdx.x == 7) return;  // lane 7 is gone, but the mask names it
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
}

TEST(CudaEmu, ShuffleWithAnExitedLaneFails) {
  std::vector<float> out(32);
  EXPECT_THROW(launch(shuffle_after_exit_kernel, {1, 32}, out.data()), emu::Error);
}

__global__ void shuffle_partial_warp_kernel(float* out) {
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
}

TEST(CudaEmu, FullMaskShuffleInAPartialWarpFails) {
  std::vector<float> out(48);
  EXPECT_THROW(launch(shuffle_partial_warp_kernel, {1, 48}, out.data()), emu::Error);
}

__global__ void barrier_in_warp_divergence_kernel(float* out) {
  if (threadIdx.x % 32 < 16) {
    __syncthreads();
  } else {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
  }
}

TEST(CudaEmu, DeadlockBetweenBarrierAndShuffleFails) {
  std::vector<float> out(32);
  EXPECT_THROW(launch(barrier_in_warp_divergence_kernel, {1, 32}, out.data()), emu::Error);
}

__global__ void noop_kernel(int) {}

TEST(CudaEmu, LaunchConfigurationIsChecked) {
  EXPECT_THROW(launch(noop_kernel, {1, 1025}, 0), emu::Error);
  EXPECT_THROW(launch(noop_kernel, {1, dim3(32, 1, 65)}, 0), emu::Error);
  EXPECT_THROW(launch(noop_kernel, {dim3(1, 65536), 32}, 0), emu::Error);
  EXPECT_THROW(launch(noop_kernel, {0, 32}, 0), emu::Error);
  // Above 48 KiB of dynamic shared memory only after the opt-in, and never over 227 KiB.
  EXPECT_THROW(launch(noop_kernel, {1, 32, 48 * 1024 + 1}, 0), emu::Error);
  EXPECT_NO_THROW(launch(noop_kernel, {1, 32, 48 * 1024}, 0));
}

__global__ void dynamic_shared_kernel(size_t bytes, int* out) {
  FFN_DYNAMIC_SHARED(smem);
  if (threadIdx.x == 0) {
    for (size_t i = 0; i < bytes; ++i) smem[i] = 1;
    *out = smem[bytes - 1];
  }
}

TEST(CudaEmu, DynamicSharedMemoryOptIn) {
  int out = 0;
  const size_t allowed = allow_dynamic_shared_memory(dynamic_shared_kernel);
  EXPECT_GT(allowed, size_t{200 * 1024});
  EXPECT_NO_THROW(launch(dynamic_shared_kernel, {1, 32, allowed}, allowed, &out));
  EXPECT_EQ(out, 1);
  EXPECT_THROW(launch(dynamic_shared_kernel, {1, 32, allowed + 1}, allowed, &out), emu::Error);
}

__global__ void too_much_static_shared_kernel(int* out) {
  FFN_SHARED(big, int[13 * 1024]);  // 52 KiB: over the 48 KiB of static shared memory
  big[threadIdx.x] = 1;
  *out = big[0];
}

TEST(CudaEmu, StaticSharedMemoryLimit) {
  int out = 0;
  EXPECT_THROW(launch(too_much_static_shared_kernel, {1, 32}, &out), emu::Error);
}

// Out-of-bounds accesses are AddressSanitizer reports (the process dies).
__global__ void shared_overflow_kernel(int* out) {
  FFN_SHARED(slots, int[32]);
  slots[threadIdx.x] = 1;  // thread 32 writes past the array
  *out = 0;
}

__global__ void dynamic_shared_overflow_kernel(int* out) {
  FFN_DYNAMIC_SHARED(smem);
  smem[100] = 1;  // the launch asked for 100 bytes
  *out = 0;
}

__global__ void global_overflow_kernel(const float* in, float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  out[i % n] = in[i];  // a missing tail check: reads past the end of `in`
}

#if defined(__SANITIZE_ADDRESS__)
TEST(CudaEmuDeathTest, OutOfBoundsAccessesAreCaught) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  const auto shared_overflow = [] {
    int out = 0;
    launch(shared_overflow_kernel, {1, 33}, &out);
  };
  const auto dynamic_overflow = [] {
    int out = 0;
    launch(dynamic_shared_overflow_kernel, {1, 1, 100}, &out);
  };
  const auto global_overflow = [] {
    std::vector<float> in(100), out(100);
    launch(global_overflow_kernel, {1, 128}, in.data(), out.data(), 100);
  };
  EXPECT_DEATH(shared_overflow(), "AddressSanitizer");
  EXPECT_DEATH(dynamic_overflow(), "AddressSanitizer");
  EXPECT_DEATH(global_overflow(), "AddressSanitizer");
}
#endif

}  // namespace
}  // namespace ffn::cuda
