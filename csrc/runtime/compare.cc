#include "runtime/compare.h"

#include <cmath>
#include <string>

#include "common/error.h"
#include "runtime/values.h"

namespace edgesmith {

namespace {

void tolerance_check(double value, const char* name) {
  // `!(value >= 0)` also catches NaN, which would make every comparison fail silently.
  if (!(value >= 0.0)) {
    throw Error(ERROR_CODE_INVALID_ARGUMENT,
                std::string(name) + " is " + std::to_string(value) +
                    ", a tolerance must be a number >= 0; pass a non-negative " + name);
  }
}

}  // namespace

bool value_matches(double got, double expected, double atol, double rtol) {
  if (std::isnan(got) || std::isnan(expected)) return std::isnan(got) && std::isnan(expected);
  // An infinity is an exact value, not a very large number: no tolerance makes it match a
  // finite one (with atol = inf the formula below would say it does).
  if (std::isinf(got) || std::isinf(expected)) return got == expected;
  return std::fabs(got - expected) <= atol + rtol * std::fabs(expected);
}

CompareResult tensor_compare(const TensorView& got, const TensorView& expected, double atol,
                             double rtol) {
  tolerance_check(atol, "atol");
  tolerance_check(rtol, "rtol");
  CompareResult result;
  if (got.shape != expected.shape) return result;
  result.shapes_match = true;
  const auto numel = static_cast<uint64_t>(shape_numel(got.shape));
  for (uint64_t i = 0; i < numel; ++i) {
    const double y = value_load(got.data, got.dtype, static_cast<size_t>(i));
    const double e = value_load(expected.data, expected.dtype, static_cast<size_t>(i));
    if (!value_matches(y, e, atol, rtol)) ++result.bad_elements;
    if (std::isfinite(y) && std::isfinite(e)) {
      const double err = std::fabs(y - e);
      if (err > result.max_abs_err) result.max_abs_err = err;
      if (e != 0.0 && err / std::fabs(e) > result.max_rel_err) result.max_rel_err = err / std::fabs(e);
    }
  }
  result.elements = numel;
  result.passed = result.bad_elements == 0;
  return result;
}

}  // namespace edgesmith
