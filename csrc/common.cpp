#include "common.h"

#include <array>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <string>

namespace ffn {

std::string device_str(const Tensor& t) {
  const auto device = t.device();
  std::string name;
  switch (device.type()) {
    case torch::headeronly::DeviceType::CPU: name = "cpu"; break;
    case torch::headeronly::DeviceType::CUDA: name = "cuda"; break;
    case torch::headeronly::DeviceType::Meta: name = "meta"; break;
    default: name = "device type " + std::to_string(static_cast<int>(device.type()));
  }
  return device.index() >= 0 ? name + ":" + std::to_string(device.index()) : name;
}

// The out overloads also return `out` on the stack: call_op takes that reference
// back and drops it.
void mm_into(const Tensor& out, const Tensor& a, const Tensor& b) {
  call_op("aten::mm", "out", a, b, out);
}

void linear_into(const Tensor& out, const Tensor& x, const Tensor& weight, const OptTensor& bias) {
  call_op("aten::linear", "out", x, weight, bias, out);
}

int64_t scratch_limit_bytes() {
  static const int64_t limit = [] {
    constexpr const char* kVariable = "FFN_CPU_SCRATCH_LIMIT_MB";
    const char* value = std::getenv(kVariable);
    if (value == nullptr || *value == '\0') return int64_t{128} << 20;
    char* end = nullptr;
    errno = 0;
    const long long mib = std::strtoll(value, &end, 10);
    FFN_CHECK(*end == '\0' && errno == 0 && mib >= 0 && mib <= (int64_t{1} << 40), "ffn: ",
              kVariable, " must be a whole number of MiB, 0 or more (0: no scratch buffer is kept), got '",
              value, "'");
    return static_cast<int64_t>(mib) << 20;
  }();
  return limit;
}

namespace {
thread_local std::array<Tensor, static_cast<size_t>(Scratch::kCount)> scratch_buffers;
}  // namespace

Tensor scratch(Scratch slot, const Sizes& sizes, ScalarType dtype, const Tensor& like) {
  int64_t numel = 1;
  for (const int64_t size : sizes) numel *= size;
  const int64_t bytes = numel * float_element_size(dtype);
  if (!like.is_cpu() || bytes > scratch_limit_bytes()) return empty(sizes, dtype, like);
  Tensor& buffer = scratch_buffers[static_cast<size_t>(slot)];
  if (!buffer.defined() || buffer.scalar_type() != dtype || buffer.numel() < numel) {
    buffer = Tensor();  // freed first: the old and the new buffer are never held together
    buffer = empty({numel}, dtype, like);
  }
  return as_view(buffer, sizes);
}

void release_scratch() {
  for (Tensor& buffer : scratch_buffers) buffer = Tensor();
}

Tensor contiguous_or_undefined(const OptTensor& t) {
  return t.has_value() && t->defined() ? as_contiguous(*t) : Tensor();
}

void check_input(std::string_view op, std::string_view name, const Tensor& x) {
  FFN_CHECK(x.defined(), "ffn.", op, ": ", name, " is undefined");
  FFN_CHECK(x.dim() >= 1, "ffn.", op, ": ", name,
            " must have at least 1 dimension (features last), got a 0-dim tensor");
  FFN_CHECK(is_supported_float(x.scalar_type()), "ffn.", op, ": ", name,
            " must be float64, float32, float16 or bfloat16, got ", x.scalar_type());
}

void check_same_device(std::string_view op, std::string_view name, const Tensor& t,
                       const Tensor& x) {
  FFN_CHECK(same_device(t, x), "ffn.", op, ": ", name, " is on ", device_str(t),
            " but x is on ", device_str(x), "; all tensors must be on the same device");
}

void check_vector_param(std::string_view op, std::string_view name, const Tensor& param,
                        const Tensor& x, int64_t size, bool allow_float32) {
  check_same_device(op, name, param, x);
  FFN_CHECK(param.dim() == 1 && param.size(0) == size, "ffn.", op, ": ", name,
            " must have shape [", size, "], got ", shape_str(param.sizes()));
  const bool half_x = x.scalar_type() == kHalf || x.scalar_type() == kBFloat16;
  const bool ok = param.scalar_type() == x.scalar_type() ||
                  (allow_float32 && half_x && param.scalar_type() == kFloat);
  FFN_CHECK(ok, "ffn.", op, ": ", name, " must have x's dtype (", x.scalar_type(), ")",
            (allow_float32 && half_x) ? " or float32" : "", ", got ", param.scalar_type());
}

void check_linear_weight(std::string_view op, std::string_view name, const Tensor& weight,
                         const Tensor& x, int64_t rows, int64_t cols) {
  check_same_device(op, name, weight, x);
  FFN_CHECK(weight.dim() == 2, "ffn.", op, ": ", name,
            " must be a 2-D [out_features, in_features] weight, got shape ",
            shape_str(weight.sizes()));
  FFN_CHECK(weight.size(1) == cols && (rows < 0 || weight.size(0) == rows), "ffn.", op, ": ",
            name, " must have shape [", rows < 0 ? std::string("*") : std::to_string(rows),
            ", ", cols, "], got ", shape_str(weight.sizes()));
  FFN_CHECK(weight.scalar_type() == x.scalar_type(), "ffn.", op, ": ", name,
            " must have x's dtype (", x.scalar_type(), "), got ", weight.scalar_type(),
            " (cast the weights, or run under torch.autocast)");
}

void check_same_dtype(std::string_view op, std::string_view name, const Tensor& t,
                      std::string_view other_name, const Tensor& other) {
  FFN_CHECK(t.scalar_type() == other.scalar_type(), "ffn.", op, ": ", name, " must have ",
            other_name, "'s dtype (", other.scalar_type(), "), got ", t.scalar_type());
}

void check_eps(std::string_view op, double eps) {
  FFN_CHECK(std::isfinite(eps) && eps >= 0, "ffn.", op,
            ": eps must be a finite number >= 0, got ", eps);
}

void check_grad(std::string_view op, const Tensor& grad, const Sizes& sizes, const Tensor& like) {
  FFN_CHECK(sizes_of(grad) == sizes && grad.scalar_type() == like.scalar_type(), "ffn.", op,
            ": the output gradient must have shape ", shape_str(sizes), " and dtype ",
            like.scalar_type(), ", got ", shape_str(grad.sizes()), " and ",
            grad.scalar_type());
  check_same_device(op, "the output gradient", grad, like);
}

}  // namespace ffn
