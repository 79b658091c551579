// The output comparison rule (runtime/compare.h) on the cases of tests/data/compare_cases.json,
// the same file tests/test_compare.py runs through the toolchain's validation.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/error.h"
#include "runtime/compare.h"
#include "runtime/tensor.h"
#include "runtime/values.h"

namespace edgesmith {
namespace {

using json = nlohmann::json;

json cases_load() {
  std::ifstream in(EDGESMITH_COMPARE_CASES);
  EXPECT_TRUE(in) << "cannot open " << EDGESMITH_COMPARE_CASES;
  return json::parse(in);
}

double number_of(const json& value) {
  if (value.is_number()) return value.get<double>();
  const std::string text = value.get<std::string>();
  if (text == "nan") return std::numeric_limits<double>::quiet_NaN();
  if (text == "inf") return INFINITY;
  if (text == "-inf") return -INFINITY;
  ADD_FAILURE() << "not a number: " << value.dump();
  return 0.0;
}

// The half-precision bits of `value`, which the cases file promises is exactly representable;
// searching all 65536 patterns keeps the test free of its own rounding code.
uint16_t half_bits_of(double value) {
  for (uint32_t bits = 0; bits <= 0xffffu; ++bits) {
    const double half = half_to_float(static_cast<uint16_t>(bits));
    const bool same = std::isnan(value) ? std::isnan(half)
                                        : half == value && std::signbit(half) == std::signbit(value);
    if (same) return static_cast<uint16_t>(bits);
  }
  ADD_FAILURE() << value << " is not exactly representable in float16";
  return 0;
}

template <typename T>
void element_store(Tensor* tensor, size_t index, T value) {
  std::memcpy(static_cast<uint8_t*>(tensor->data()) + index * sizeof(T), &value, sizeof(T));
}

Tensor tensor_of(const json& spec) {
  const json& values = spec.at("values");
  std::vector<int64_t> shape = {static_cast<int64_t>(values.size())};
  if (spec.contains("shape")) shape = spec.at("shape").get<std::vector<int64_t>>();
  Tensor tensor(dtype_from_name(spec.at("dtype").get<std::string>()), shape);
  for (size_t i = 0; i < values.size(); ++i) {
    const json& v = values[i];
    switch (tensor.dtype()) {
      case DTYPE_FLOAT16: element_store(&tensor, i, half_bits_of(number_of(v))); break;
      case DTYPE_FLOAT32: element_store(&tensor, i, static_cast<float>(number_of(v))); break;
      case DTYPE_FLOAT64: element_store(&tensor, i, number_of(v)); break;
      case DTYPE_INT32: element_store(&tensor, i, v.get<int32_t>()); break;
      case DTYPE_INT64: element_store(&tensor, i, v.get<int64_t>()); break;
      case DTYPE_UINT8: element_store(&tensor, i, v.get<uint8_t>()); break;
      default: ADD_FAILURE() << "the test has no loader for " << spec.dump();
    }
  }
  return tensor;
}

TEST(Compare, SharedCases) {
  const json cases = cases_load().at("cases");
  ASSERT_GE(cases.size(), 20u);
  for (const json& c : cases) {
    SCOPED_TRACE(c.at("name").get<std::string>());
    const Tensor got = tensor_of(c.at("got"));
    const Tensor expected = tensor_of(c.at("expected"));
    const CompareResult result =
        tensor_compare(got.view(), expected.view(), number_of(c.at("atol")), number_of(c.at("rtol")));
    EXPECT_EQ(result.passed, c.at("passed").get<bool>());
    EXPECT_EQ(result.shapes_match, c.value("shapes_match", true));
    if (!result.shapes_match) continue;
    EXPECT_EQ(result.elements, static_cast<uint64_t>(shape_numel(got.shape())));
    EXPECT_EQ(result.bad_elements, c.at("bad_elements").get<uint64_t>());
    const double max_abs = c.at("max_abs_err").get<double>();
    EXPECT_NEAR(result.max_abs_err, max_abs, 1e-12 * std::fabs(max_abs));
  }
}

TEST(Compare, RelativeErrorIsOverFiniteNonZeroExpected) {
  Tensor got(DTYPE_FLOAT64, {4});
  Tensor expected(DTYPE_FLOAT64, {4});
  const double y[] = {3.0, 1.0, INFINITY, 5.0};
  const double e[] = {2.0, 0.0, 1.0, 4.0};
  std::memcpy(got.data(), y, sizeof(y));
  std::memcpy(expected.data(), e, sizeof(e));
  const CompareResult result = tensor_compare(got.view(), expected.view(), 0.0, 0.0);
  EXPECT_DOUBLE_EQ(result.max_rel_err, 0.5);  // 1/2; 1 vs 0 has no relative error, inf is skipped
  EXPECT_DOUBLE_EQ(result.max_abs_err, 1.0);
  EXPECT_EQ(result.bad_elements, 4u);
}

TEST(Compare, RejectsNegativeOrNanTolerance) {
  const Tensor t(DTYPE_FLOAT32, {0});
  for (const double bad : {-1e-9, std::numeric_limits<double>::quiet_NaN()}) {
    for (const bool on_atol : {true, false}) {
      try {
        tensor_compare(t.view(), t.view(), on_atol ? bad : 0.0, on_atol ? 0.0 : bad);
        ADD_FAILURE() << "tolerance " << bad << " was accepted";
      } catch (const Error& e) {
        EXPECT_EQ(e.code(), ERROR_CODE_INVALID_ARGUMENT);
        EXPECT_NE(std::string(e.what()).find(on_atol ? "atol" : "rtol"), std::string::npos) << e.what();
      }
    }
  }
}

}  // namespace
}  // namespace edgesmith
