// The one rule for comparing outputs with expected values. The golden self-test, the on-ISA
// proof (edgesmith-run --golden) and the toolchain's validation (through _core.compare_arrays)
// all call tensor_compare(), so an artifact passes or fails by the same rule everywhere;
// tests/data/compare_cases.json holds the cases both test suites check.
#pragma once

#include <cstdint>

#include "runtime/tensor.h"

namespace edgesmith {

/// The outcome of tensor_compare().
struct CompareResult {
  bool shapes_match = false;  ///< false: nothing was compared and the comparison failed
  bool passed = false;        ///< the shapes match and no element breaks the rule
  uint64_t elements = 0;      ///< number of element pairs compared
  uint64_t bad_elements = 0;  ///< pairs that break the rule
  double max_abs_err = 0.0;   ///< largest |y - e| over pairs where both values are finite
  double max_rel_err = 0.0;   ///< largest |y - e| / |e| over finite pairs with e != 0
};

/// Whether one value matches its expected value: NaN matches only NaN, +inf only +inf and -inf
/// only -inf; finite values match when |got - expected| <= atol + rtol * |expected|.
bool value_matches(double got, double expected, double atol, double rtol);

/// Compare two C-contiguous tensors element by element with value_matches(). Their dtypes may
/// differ (e.g. a float16 output against a float32 reference); values are compared as doubles.
/// Different shapes fail with shapes_match = false. A negative or NaN atol or rtol throws
/// Error(ERROR_CODE_INVALID_ARGUMENT).
CompareResult tensor_compare(const TensorView& got, const TensorView& expected, double atol,
                             double rtol);

}  // namespace edgesmith
