// The capture record the agent writes (csrc/agent/capture_record.h, docs/capture.md §2) and the
// classes output's confidence its low-confidence switch reads. The records' acceptance by the central
// parser is tests/test_capture_agent.py's; here the layout byte by byte.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "agent/capture_record.h"
#include "common/contract_words.h"
#include "common/error.h"

using namespace edgesmith;

namespace {

Tensor floats(std::vector<int64_t> shape, const std::vector<float>& values) {
  Tensor t(DTYPE_FLOAT32, std::move(shape));
  std::memcpy(t.data(), values.data(), values.size() * sizeof(float));
  return t;
}

Manifest classes_manifest(int64_t classes) {
  Manifest m;
  m.inputs = {{"x", "float32", {1, classes}}};
  m.outputs = {{"aux", "float32", {1, 1}}, {"logits", "float32", {1, classes}}};
  ManifestOutputMonitor monitor;
  monitor.name = "logits";
  monitor.kind = MONITOR_KIND_CLASSES;
  monitor.classes = classes;
  m.monitoring.outputs = {monitor};
  return m;
}

}  // namespace

TEST(CaptureRecord, MagicLengthHeaderThenTensorsBackToBack) {
  const std::vector<Tensor> inputs = {floats({1, 3}, {1, 2, 3})};
  std::vector<Tensor> outputs = {floats({1, 2}, {4, 5})};
  Tensor flags(DTYPE_UINT8, {2});
  static_cast<uint8_t*>(flags.data())[0] = 7;
  static_cast<uint8_t*>(flags.data())[1] = 9;
  outputs.push_back(std::move(flags));
  const std::string record = capture_record_build({{"v", 1}, {"reason", "uniform"}}, {"x"}, inputs, {"y", "z"}, outputs);
  const std::string magic = contract::CAPTURE_MAGIC;
  ASSERT_EQ(record.compare(0, magic.size(), magic), 0);
  const std::string length = record.substr(magic.size(), 9);
  ASSERT_EQ(length.back(), '\n');
  for (size_t i = 0; i < 8; ++i) EXPECT_TRUE(std::isxdigit(static_cast<unsigned char>(length[i])) && !std::isupper(length[i]));
  const size_t header_size = std::stoul(length.substr(0, 8), nullptr, 16);
  const nlohmann::json header = nlohmann::json::parse(record.substr(magic.size() + 9, header_size));
  EXPECT_EQ(header["reason"], "uniform");
  ASSERT_EQ(header["inputs"].size(), 1u);
  ASSERT_EQ(header["outputs"].size(), 2u);
  EXPECT_EQ(header["inputs"][0], nlohmann::json({{"name", "x"}, {"dtype", "float32"}, {"shape", {1, 3}}, {"offset", 0}, {"nbytes", 12}}));
  EXPECT_EQ(header["outputs"][0]["offset"], 12);
  EXPECT_EQ(header["outputs"][1], nlohmann::json({{"name", "z"}, {"dtype", "uint8"}, {"shape", {2}}, {"offset", 20}, {"nbytes", 2}}));
  // The data section: exactly the tensors, in header order, nothing after them.
  const std::string data = record.substr(magic.size() + 9 + header_size);
  ASSERT_EQ(data.size(), 22u);
  float x[3];
  std::memcpy(x, data.data(), sizeof(x));
  EXPECT_EQ(x[2], 3.0f);
  EXPECT_EQ(static_cast<uint8_t>(data[20]), 7);
  EXPECT_EQ(static_cast<uint8_t>(data[21]), 9);
}

TEST(CaptureRecord, RefusesWhatTheContractCannotHold) {
  Tensor wide(DTYPE_FLOAT64, {1});
  try {
    capture_record_build({{"v", 1}}, {"x"}, {floats({1}, {1})}, {"y"}, {wide});
    FAIL() << "a float64 tensor was written";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ERROR_CODE_INVALID_ARGUMENT);
    EXPECT_NE(std::string(e.what()).find("float64"), std::string::npos);
  }
  Tensor deep(DTYPE_FLOAT32, {1, 1, 1, 1, 1, 1, 1, 1, 1});
  EXPECT_THROW(capture_record_build({{"v", 1}}, {"x"}, {deep}, {}, {}), Error);
  // What fails for every sample of a model (the runner then ends the capture), and what fits.
  EXPECT_NE(capture_record_unfit({floats({1}, {1}), wide}).find("float64"), std::string::npos);
  EXPECT_NE(capture_record_unfit({deep}).find("rank 8"), std::string::npos);
  EXPECT_EQ(capture_record_unfit({floats({1, 2}, {1, 2})}), "");
}

TEST(CaptureConfidence, MaxSoftmaxOfTheClassesOutputsFirstRow) {
  const Manifest m = classes_manifest(3);
  // softmax([0, ln 3, 0]) = [0.2, 0.6, 0.2]; the second row is ignored.
  const std::vector<Tensor> outputs = {floats({1, 1}, {100}), floats({2, 3}, {0, std::log(3.0f), 0, 50, 0, 0})};
  int64_t top1 = -1;
  double confidence = 0;
  ASSERT_TRUE(capture_confidence(m, outputs, &top1, &confidence));
  EXPECT_EQ(top1, 1);
  EXPECT_NEAR(confidence, 0.6, 1e-6);
  // Large logits stay finite (shifted by the max).
  ASSERT_TRUE(capture_confidence(m, {floats({1, 1}, {0}), floats({1, 3}, {1000, 1000, -1000})}, &top1, &confidence));
  EXPECT_EQ(top1, 0);
  EXPECT_NEAR(confidence, 0.5, 1e-6);
  // No classes output, or not float32, or not finite: no confidence.
  Manifest none = m;
  none.monitoring.outputs.clear();
  EXPECT_FALSE(capture_confidence(none, outputs, &top1, &confidence));
  Tensor ints(DTYPE_INT32, {1, 3});
  EXPECT_FALSE(capture_confidence(m, {floats({1, 1}, {0}), ints}, &top1, &confidence));
  EXPECT_FALSE(capture_confidence(m, {floats({1, 1}, {0}), floats({1, 3}, {NAN, NAN, NAN})}, &top1, &confidence));
}
