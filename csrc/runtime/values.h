// Reading one element of a typed buffer as a double (for NaN counts, drift summaries and the
// golden comparison), including IEEE half precision.
#pragma once

#include <cstddef>
#include <cstdint>

#include "runtime/tensor.h"

namespace edgesmith {

/// An IEEE 754 half-precision value (its bits) as a float.
float half_to_float(uint16_t bits);

/// Element `index` of a C-contiguous buffer of `dtype`, converted to double (bool -> 0/1).
double value_load(const void* data, DType dtype, size_t index);

/// True for the floating-point dtypes (the ones that can hold NaN).
bool dtype_is_float(DType dtype);

/// Number of NaN elements in a view (0 for non-float dtypes).
uint64_t view_nan_count(const TensorView& view);

}  // namespace edgesmith
