#include "runtime/values.h"

#include <cmath>
#include <cstring>

namespace edgesmith {

namespace {

template <typename T>
double load_as(const void* data, size_t index) {
  T value;
  std::memcpy(&value, static_cast<const uint8_t*>(data) + index * sizeof(T), sizeof(T));
  return static_cast<double>(value);
}

}  // namespace

float half_to_float(uint16_t bits) {
  const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
  const uint32_t exponent = (bits >> 10) & 0x1fu;
  const uint32_t mantissa = bits & 0x3ffu;
  float magnitude;
  if (exponent == 0) {
    magnitude = std::ldexp(static_cast<float>(mantissa), -24);  // subnormal (or zero)
  } else if (exponent == 0x1f) {
    magnitude = mantissa == 0 ? INFINITY : NAN;
  } else {
    magnitude = std::ldexp(static_cast<float>(mantissa | 0x400u), static_cast<int>(exponent) - 25);
  }
  return sign ? -magnitude : magnitude;
}

double value_load(const void* data, DType dtype, size_t index) {
  switch (dtype) {
    case DTYPE_BOOL: return static_cast<const uint8_t*>(data)[index] != 0 ? 1.0 : 0.0;
    case DTYPE_INT8: return load_as<int8_t>(data, index);
    case DTYPE_INT16: return load_as<int16_t>(data, index);
    case DTYPE_INT32: return load_as<int32_t>(data, index);
    case DTYPE_INT64: return load_as<int64_t>(data, index);
    case DTYPE_UINT8: return load_as<uint8_t>(data, index);
    case DTYPE_UINT16: return load_as<uint16_t>(data, index);
    case DTYPE_UINT32: return load_as<uint32_t>(data, index);
    case DTYPE_UINT64: return load_as<uint64_t>(data, index);
    case DTYPE_FLOAT16: {
      uint16_t bits;
      std::memcpy(&bits, static_cast<const uint8_t*>(data) + index * 2, 2);
      return half_to_float(bits);
    }
    case DTYPE_FLOAT32: return load_as<float>(data, index);
    case DTYPE_FLOAT64: return load_as<double>(data, index);
  }
  return NAN;
}

bool dtype_is_float(DType dtype) {
  return dtype == DTYPE_FLOAT16 || dtype == DTYPE_FLOAT32 || dtype == DTYPE_FLOAT64;
}

uint64_t view_nan_count(const TensorView& view) {
  if (!dtype_is_float(view.dtype)) return 0;
  const auto numel = static_cast<size_t>(shape_numel(view.shape));
  uint64_t nans = 0;
  if (view.dtype == DTYPE_FLOAT32) {
    const auto* values = static_cast<const float*>(view.data);
    for (size_t i = 0; i < numel; ++i) nans += std::isnan(values[i]) ? 1 : 0;
  } else {
    for (size_t i = 0; i < numel; ++i) nans += std::isnan(value_load(view.data, view.dtype, i)) ? 1 : 0;
  }
  return nans;
}

}  // namespace edgesmith
