// The CUDA runtime as the kernels' host launchers use it, in one place: device
// limits and occupancy (cached per device), the dynamic shared-memory opt-in
// (once per kernel and device, thread-safe), launches on the current stream with
// their error check, and shared-memory declarations.
//
// Under FFN_CUDA_EMU the same names run the kernels on the CPU through the
// emulation in emu/cuda_emu.h (tests/cuda_emu/); everything else in csrc/cuda/
// is the same source either way.
#pragma once

#include <c10/core/Device.h>

#include <cstddef>
#include <utility>

#ifdef FFN_CUDA_EMU
#include "emu/cuda_emu.h"

#include <source_location>
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <array>
#include <map>
#include <mutex>
#include <tuple>
#endif

// Declares a block's shared variable `name` of type Type (an array type is
// fine: FFN_SHARED(scratch, float[32])); FFN_DYNAMIC_SHARED the launch's
// dynamic shared memory as unsigned char name[], 16-byte aligned.
#ifdef FFN_CUDA_EMU
#define FFN_SHARED(name, ...)     \
  static const char name##_key{}; \
  ::ffn::cuda::Identity<__VA_ARGS__>& name =                    \
      ::ffn::emu::static_shared_as<::ffn::cuda::Identity<__VA_ARGS__>>(&name##_key)
#define FFN_DYNAMIC_SHARED(name) unsigned char* const name = ::ffn::emu::dynamic_shared()
#else
#define FFN_SHARED(name, ...) __shared__ ::ffn::cuda::Identity<__VA_ARGS__> name
#define FFN_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace ffn::cuda {

template <typename T>
using Identity = T;

// What the launchers need to know about the current device.
struct DeviceLimits {
  int sm_count;
  int max_threads_per_sm;
  size_t max_shared_per_block_optin;  // static plus dynamic, with the opt-in
};

#ifdef FFN_CUDA_EMU

struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};

inline DeviceLimits device_limits() {
  const emu::DeviceSpec& spec = emu::device_spec();
  return {spec.sm_count, spec.max_threads_per_sm, spec.max_shared_per_block_optin};
}

// The dynamic shared memory `kernel` may use (its static shared memory is not
// known before it runs: 1 KiB is set aside for it), with the opt-in made.
template <typename... Params>
size_t allow_dynamic_shared_memory(void (*kernel)(Params...)) {
  const size_t bytes = device_limits().max_shared_per_block_optin - 1024;
  emu::set_max_dynamic_shared_memory(reinterpret_cast<const void*>(kernel), bytes);
  return bytes;
}

template <typename... Params>
int resident_blocks_per_sm(void (*kernel)(Params...), int block_threads, size_t dynamic_smem) {
  return emu::max_active_blocks_per_sm(reinterpret_cast<const void*>(kernel), block_threads,
                                       dynamic_smem);
}

// kernel<<<grid, block, dynamic_smem, current stream>>>(args...), checked.
struct LaunchConfig {
  dim3 grid, block;
  size_t dynamic_smem = 0;
  std::source_location where = std::source_location::current();
};

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), const LaunchConfig& config, Args&&... args) {
  emu::launch(kernel, config.grid, config.block, config.dynamic_smem, config.where,
              std::forward<Args>(args)...);
}

#else  // nvcc

using DeviceGuard = c10::cuda::CUDAGuard;

constexpr int kMaxDevices = 64;

inline const DeviceLimits& device_limits() {
  static std::array<DeviceLimits, kMaxDevices> limits;
  static std::array<std::once_flag, kMaxDevices> once;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  TORCH_CHECK(device < kMaxDevices, "ffn: CUDA device index ", device, " over ", kMaxDevices);
  std::call_once(once[device], [device] {
    int sms = 0, threads = 0, optin = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&threads, cudaDevAttrMaxThreadsPerMultiProcessor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    limits[device] = {sms, threads, static_cast<size_t>(optin)};
  });
  return limits[device];
}

// The dynamic shared memory `kernel` may use: the opt-in maximum less its static
// shared memory. The attribute is set once per kernel and device, to that
// maximum (a launch asking for less is unaffected), under a lock: two host
// threads launching the same kernel never race on it.
template <typename... Params>
size_t allow_dynamic_shared_memory(void (*kernel)(Params...)) {
  static std::mutex mutex;
  static std::map<std::pair<int, const void*>, size_t> allowed;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const auto key = std::make_pair(device, reinterpret_cast<const void*>(kernel));
  const std::lock_guard<std::mutex> lock(mutex);
  const auto it = allowed.find(key);
  if (it != allowed.end()) return it->second;
  cudaFuncAttributes attributes{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  const size_t bytes = device_limits().max_shared_per_block_optin - attributes.sharedSizeBytes;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
  allowed.emplace(key, bytes);
  return bytes;
}

// Resident blocks per SM of `kernel` at this block size and dynamic shared
// memory, as the occupancy calculator gives it; cached.
template <typename... Params>
int resident_blocks_per_sm(void (*kernel)(Params...), int block_threads, size_t dynamic_smem) {
  static std::mutex mutex;
  static std::map<std::tuple<int, const void*, int, size_t>, int> cache;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const auto key =
      std::make_tuple(device, reinterpret_cast<const void*>(kernel), block_threads, dynamic_smem);
  const std::lock_guard<std::mutex> lock(mutex);
  const auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  int blocks = 0;
  C10_CUDA_CHECK(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, block_threads, dynamic_smem));
  cache.emplace(key, blocks);
  return blocks;
}

struct LaunchConfig {
  dim3 grid, block;
  size_t dynamic_smem = 0;
};

// kernel<<<grid, block, dynamic_smem, current stream>>>(args...), checked. The
// current stream (never the default one) keeps the ops correct under CUDA
// graphs and user streams.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), const LaunchConfig& config, Args&&... args) {
  kernel<<<config.grid, config.block, config.dynamic_smem, c10::cuda::getCurrentCUDAStream()>>>(
      std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#endif

}  // namespace ffn::cuda
