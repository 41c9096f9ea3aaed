// The LibTorch stable ABI as ffn's C++ uses it: tensors, dtypes, allocation,
// views, the GEMMs and dtype dispatch, each a thin layer over
// torch/csrc/stable (the stable C shim) and torch/headeronly. Nothing here, and
// nothing that includes it, links a libtorch C++ symbol, so one binary loads
// into every torch from TORCH_TARGET_VERSION (2.11) on.
//
// Aten ops without a stable wrapper (mm, addmm, ...) are called by name through
// the dispatcher (call_op).
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Exception.h>
#include <torch/headeronly/util/Half.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace ffn {

namespace detail {
template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream out;
  ((out << args), ...);
  return out.str();
}
}  // namespace detail

// STD_TORCH_CHECK with the message alone, as TORCH_CHECK shows it in Python
// (STD_TORCH_CHECK puts the C++ function and source path in front): a
// std::runtime_error, which Python sees as RuntimeError.
#define FFN_CHECK(cond, ...)                                         \
  if (!(cond)) [[unlikely]] {                                        \
    throw std::runtime_error(::ffn::detail::concat(__VA_ARGS__));    \
  }

using Tensor = torch::stable::Tensor;
using OptTensor = std::optional<Tensor>;
using ScalarType = torch::headeronly::ScalarType;
using Sizes = std::vector<int64_t>;
using Half = torch::headeronly::Half;
using BFloat16 = torch::headeronly::BFloat16;

inline constexpr ScalarType kDouble = ScalarType::Double;
inline constexpr ScalarType kFloat = ScalarType::Float;
inline constexpr ScalarType kHalf = ScalarType::Half;
inline constexpr ScalarType kBFloat16 = ScalarType::BFloat16;

// The ScalarType of element type T (double, float, Half, BFloat16).
template <typename T>
constexpr ScalarType scalar_type_of() {
  if constexpr (std::is_same_v<T, double>) return kDouble;
  else if constexpr (std::is_same_v<T, float>) return kFloat;
  else if constexpr (std::is_same_v<T, Half>) return kHalf;
  else {
    static_assert(std::is_same_v<T, BFloat16>, "ffn has kernels for float64/32/16 and bfloat16");
    return kBFloat16;
  }
}

// Bytes per element of the floating types above.
constexpr int64_t float_element_size(ScalarType t) {
  return t == kDouble ? 8 : t == kFloat ? 4 : 2;
}

// The accumulation type of T: float for the 16-bit types, else T.
template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, double>, double, float>;

inline bool is_supported_float(ScalarType t) {
  return t == kDouble || t == kFloat || t == kHalf || t == kBFloat16;
}

// Calls fn(T{}) with T the element type of `dtype` (one of the four above).
template <typename Fn>
void dispatch_float_types(ScalarType dtype, const char* what, const Fn& fn) {
  switch (dtype) {
    case kDouble: return fn(double{});
    case kFloat: return fn(float{});
    case kHalf: return fn(Half{});
    case kBFloat16: return fn(BFloat16{});
    default: FFN_CHECK(false, what, ": no kernel for dtype ", dtype);
  }
}

// --- formatting for messages (as c10 prints them) ------------------------------
template <typename Ints>
std::string shape_str(const Ints& sizes) {
  std::ostringstream out;
  out << '[';
  bool first = true;
  for (int64_t s : sizes) {
    out << (first ? "" : ", ") << s;
    first = false;
  }
  out << ']';
  return out.str();
}

std::string device_str(const Tensor& t);

inline Sizes sizes_of(const Tensor& t) {
  const auto s = t.sizes();
  return Sizes(s.begin(), s.end());
}

// Product of the leading dimensions: the rows of t as a [rows, t.size(-1)] matrix.
inline int64_t leading_rows(const Tensor& t) {
  int64_t rows = 1;
  for (int64_t i = 0; i + 1 < t.dim(); ++i) rows *= t.size(i);
  return rows;
}

inline bool same_device(const Tensor& a, const Tensor& b) {
  const auto da = a.device(), db = b.device();
  return da.type() == db.type() && da.index() == db.index();
}

// --- allocation and views ----------------------------------------------------------
// Straight through the C shim (aoti_torch_empty_strided, aoti_torch__reinterpret_tensor)
// rather than aten::new_empty / aten::view through the dispatcher: an op body makes a
// handful of these per call, and the boxed dispatcher call costs a microsecond or more
// each, which small rows notice.

// Row-major strides of `sizes` (a 0-sized dimension counts as 1, as in torch).
inline Sizes contiguous_strides(const Sizes& sizes) {
  Sizes strides(sizes.size());
  int64_t stride = 1;
  for (size_t i = sizes.size(); i-- > 0;) {
    strides[i] = stride;
    stride *= std::max<int64_t>(sizes[i], 1);
  }
  return strides;
}

// A new contiguous tensor of `sizes` and `dtype` on like's device.
inline Tensor empty(const Sizes& sizes, ScalarType dtype, const Tensor& like) {
  int32_t device_type = 0, device_index = 0;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_device_type(like.get(), &device_type));
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_device_index(like.get(), &device_index));
  const int32_t shim_dtype =
      torch::stable::detail::to<int32_t>(torch::stable::detail::from(dtype));
  const Sizes strides = contiguous_strides(sizes);
  AtenTensorHandle out = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_empty_strided(
      static_cast<int64_t>(sizes.size()), sizes.data(), strides.data(), shim_dtype, device_type,
      device_index, &out));
  return Tensor(out);
}
inline Tensor empty(const Sizes& sizes, const Tensor& like) {
  return empty(sizes, like.scalar_type(), like);
}

// Memory for an op's temporaries: tensors that never leave the op call that asks for them, and
// that it writes whole before reading. On CPU each thread keeps one buffer per Scratch slot
// between calls, up to scratch_limit_bytes() each (larger ones are allocated per call): a large
// fresh allocation comes from the OS each call (glibc maps every block of 32 MiB or more, and
// trims the heap that smaller ones came from), and faulting its pages in costs more than a pass
// over them (measured on the 2-core VM: 2.4 us per 4 KiB page, 0.1 us to write one already
// mapped). Elsewhere a plain empty(): CUDA's caching allocator already reuses memory. Two
// temporaries alive at once need different slots; kPreact holds the pre-activation of a forward
// without backward, or the pre-activation's gradient in backward (never both in one call).
enum class Scratch { kHidden, kHiddenGrad, kPreact, kBiasGradPartials, kCount };
// The largest buffer a thread keeps per slot: FFN_CPU_SCRATCH_LIMIT_MB MiB if set (0: none
// kept), else 128 MiB, which covers a [4096, 8192] float32 hidden layer.
int64_t scratch_limit_bytes();
Tensor scratch(Scratch slot, const Sizes& sizes, ScalarType dtype, const Tensor& like);
inline Tensor scratch(Scratch slot, const Sizes& sizes, const Tensor& like) {
  return scratch(slot, sizes, like.scalar_type(), like);
}
// Frees the calling thread's buffers (a view still in use keeps its memory until it goes);
// ffn.release_cpu_scratch() in Python.
void release_scratch();

inline Tensor as_contiguous(const Tensor& t) {
  return t.is_contiguous() ? t : torch::stable::contiguous(t);
}
// A contiguous tensor seen with other sizes: all its elements, or a leading part of them.
inline Tensor as_view(const Tensor& t, const Sizes& sizes) {
  FFN_CHECK(t.is_contiguous(), "ffn: as_view needs a contiguous tensor");
  const Sizes strides = contiguous_strides(sizes);
  AtenTensorHandle out = nullptr;
  // The last argument is an offset *increment* over t's own storage offset.
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch__reinterpret_tensor(
      t.get(), static_cast<int64_t>(sizes.size()), sizes.data(), strides.data(),
      /*storage_offset_increment=*/0, &out));
  return Tensor(out);
}

// t as a contiguous [rows, t.size(-1)] matrix (also right for an empty last dim).
inline Tensor as_rows(const Tensor& t) {
  return as_view(as_contiguous(t), {leading_rows(t), t.size(-1)});
}

// --- aten ops through the dispatcher ---------------------------------------------
// Calls aten::name.overload with `args` and returns its `num_outputs` outputs
// (the stack after the call). Arguments: tensors, optional tensors, scalars as
// double/int64_t/bool, int lists as std::vector<int64_t>.
template <size_t kNumOutputs = 1, typename... Args>
std::array<Tensor, kNumOutputs> call_op(const char* name, const char* overload,
                                        const Args&... args) {
  constexpr size_t kSlots = std::max(sizeof...(Args), kNumOutputs);
  std::array<StableIValue, kSlots> stack{torch::stable::detail::from(args)...};
  STABLE_TORCH_ERROR_CODE_CHECK(
      torch_call_dispatcher(name, overload, stack.data(), TORCH_ABI_VERSION));
  std::array<Tensor, kNumOutputs> out;
  for (size_t i = 0; i < kNumOutputs; ++i) {
    out[i] = torch::stable::detail::to<Tensor>(stack[i]);
  }
  return out;
}

// Transposed view of a 2-D tensor.
inline Tensor t(const Tensor& m) { return torch::stable::transpose(m, 0, 1); }

// a @ b, and the same written into `out`.
inline Tensor mm(const Tensor& a, const Tensor& b) { return call_op("aten::mm", "", a, b)[0]; }
void mm_into(const Tensor& out, const Tensor& a, const Tensor& b);
// F.linear: x @ weight^T (+ bias), the bias added inside the GEMM's accumulation
// (addmm), and the same written into `out`. (aten::addmm itself cannot be called
// through the stable dispatcher: its Scalar arguments have no stable conversion.)
inline Tensor linear(const Tensor& x, const Tensor& weight, const OptTensor& bias) {
  return call_op("aten::linear", "", x, weight, bias)[0];
}
void linear_into(const Tensor& out, const Tensor& x, const Tensor& weight, const OptTensor& bias);
// The sum over rows of a 2-D tensor.
inline Tensor sum_rows(const Tensor& m) { return torch::stable::sum(m, Sizes{0}); }

}  // namespace ffn
