// The CUDA runtime as the kernels' host launchers use it, in one place: device
// limits and occupancy (cached per device), the dynamic shared-memory opt-in
// (once per kernel and device, thread-safe), launches on the current stream with
// their error check, and shared-memory declarations. Only the LibTorch stable
// ABI (torch/csrc/stable, its C shim, torch/headeronly) and the CUDA runtime:
// nothing here links a libtorch C++ symbol.
//
// Under FFN_CUDA_EMU the same names run the kernels on the CPU through the
// emulation in emu/cuda_emu.h (tests/cuda_emu/); everything else in csrc/cuda/
// is the same source either way.
#pragma once

#include "tensor.h"

#include <cstddef>
#include <cstdint>
#include <source_location>
#include <utility>

#ifdef FFN_CUDA_EMU
#include "emu/cuda_emu.h"
#else
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/macros.h>
#include <cuda_runtime.h>
#include <dlfcn.h>

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

// Takes the device index (Tensor::get_device_index()), as the stable guard does.
struct DeviceGuard {
  explicit DeviceGuard(int32_t /*device_index*/) {}
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

// Makes a device index (Tensor::get_device_index()) current for its scope; the
// launches below then go to that device's current stream.
using DeviceGuard = torch::stable::accelerator::DeviceGuard;

// Checks a CUDA runtime call: a failure throws (FFN_CHECK, a std::runtime_error
// that Python sees as RuntimeError) with the error's name and string and the call.
#define FFN_CUDA_CHECK(...)                                                           \
  do {                                                                                \
    const cudaError_t ffn_cuda_error = (__VA_ARGS__);                                 \
    FFN_CHECK(ffn_cuda_error == cudaSuccess, "ffn: expected cudaSuccess from ",       \
              #__VA_ARGS__, ", got ", cudaGetErrorName(ffn_cuda_error), " (",         \
              cudaGetErrorString(ffn_cuda_error), ")");                               \
  } while (false)

constexpr int kMaxDevices = 64;

inline const DeviceLimits& device_limits() {
  static std::array<DeviceLimits, kMaxDevices> limits;
  static std::array<std::once_flag, kMaxDevices> once;
  int device = 0;
  FFN_CUDA_CHECK(cudaGetDevice(&device));
  FFN_CHECK(device >= 0 && device < kMaxDevices, "ffn: expected a CUDA device index below ",
            kMaxDevices, ", got ", device);
  std::call_once(once[device], [device] {
    int sms = 0, threads = 0, optin = 0;
    FFN_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    FFN_CUDA_CHECK(cudaDeviceGetAttribute(&threads, cudaDevAttrMaxThreadsPerMultiProcessor, device));
    FFN_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
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
  FFN_CUDA_CHECK(cudaGetDevice(&device));
  const auto key = std::make_pair(device, reinterpret_cast<const void*>(kernel));
  const std::lock_guard<std::mutex> lock(mutex);
  const auto it = allowed.find(key);
  if (it != allowed.end()) return it->second;
  cudaFuncAttributes attributes{};
  FFN_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  const size_t bytes = device_limits().max_shared_per_block_optin - attributes.sharedSizeBytes;
  FFN_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
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
  FFN_CUDA_CHECK(cudaGetDevice(&device));
  const auto key =
      std::make_tuple(device, reinterpret_cast<const void*>(kernel), block_threads, dynamic_smem);
  const std::lock_guard<std::mutex> lock(mutex);
  const auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  int blocks = 0;
  FFN_CUDA_CHECK(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, block_threads, dynamic_smem));
  cache.emplace(key, blocks);
  return blocks;
}

// PyTorch's current stream on the current device (the one the DeviceGuard set),
// from the stable C shim's aoti_torch_get_current_cuda_stream
// (torch::stable::accelerator::Stream has no nativeHandle() before 2.13). The
// shim function lives in libtorch_cuda, which a CPU-only torch does not have:
// it is looked up in the already loaded library when first needed instead of
// linked, so the one binary also loads there.
inline cudaStream_t current_stream() {
  using GetStream = AOTITorchError (*)(int32_t device_index, void** ret_stream);
  static const auto get_stream = [] {
    void* torch_cuda = dlopen("libtorch_cuda.so", RTLD_NOLOAD | RTLD_LAZY);
    return torch_cuda == nullptr
               ? nullptr
               : reinterpret_cast<GetStream>(dlsym(torch_cuda, "aoti_torch_get_current_cuda_stream"));
  }();
  FFN_CHECK(get_stream != nullptr,
            "ffn: expected torch's CUDA library (aoti_torch_get_current_cuda_stream) to be "
            "loaded when running CUDA kernels; is this a CUDA build of torch?");
  int device = 0;
  FFN_CUDA_CHECK(cudaGetDevice(&device));
  void* stream = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(get_stream(device, &stream));
  return static_cast<cudaStream_t>(stream);
}

struct LaunchConfig {
  dim3 grid, block;
  size_t dynamic_smem = 0;
  std::source_location where = std::source_location::current();
};

// kernel<<<grid, block, dynamic_smem, current stream>>>(args...), checked. The
// current stream (never the default one) keeps the ops correct under CUDA
// graphs and user streams.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), const LaunchConfig& config, Args&&... args) {
  kernel<<<config.grid, config.block, config.dynamic_smem, current_stream()>>>(
      std::forward<Args>(args)...);
  const cudaError_t error = cudaGetLastError();
  FFN_CHECK(error == cudaSuccess, "ffn: expected the kernel launch at ",
            config.where.file_name(), ":", config.where.line(), " (grid ", config.grid.x,
            "x", config.grid.y, "x", config.grid.z, ", block ", config.block.x, "x",
            config.block.y, "x", config.block.z, ", ", config.dynamic_smem,
            " bytes of dynamic shared memory) to succeed, got ", cudaGetErrorName(error),
            " (", cudaGetErrorString(error), ")");
}

#endif

}  // namespace ffn::cuda
