#include <gtest/gtest.h>

#include <functional>
#include <string>

#include <nlohmann/json.hpp>

#include "artifact/manifest.h"
#include "common/error.h"
#include "test_support.h"

namespace edgesmith {
namespace {

using json = nlohmann::json;

json valid_manifest() {
  return test::manifest_make({{"golden/input_0.npy", "i"},
                              {"golden/output_0.npy", "o"},
                              {"model.bin", "weights"},
                              {"model.xml", "<net/>"}});
}

// Parse `text` and return the ERROR_CODE_MANIFEST error's message (fails the test otherwise).
std::string manifest_error(const std::string& text) {
  try {
    manifest_parse(text);
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ERROR_CODE_MANIFEST) << e.what();
    EXPECT_EQ(e.path(), "manifest.json");
    return e.what();
  }
  ADD_FAILURE() << "manifest parsed but should not have: " << text;
  return {};
}

std::string mutated_error(const std::function<void(json&)>& mutate) {
  json manifest = valid_manifest();
  mutate(manifest);
  return manifest_error(manifest.dump(2));
}

TEST(Manifest, ParsesEveryField) {
  const Manifest m = manifest_parse(valid_manifest().dump(2) + "\n");
  EXPECT_EQ(m.schema_version, 1);
  EXPECT_EQ(m.name, "tiny-x86_64-avx2-openvino");
  EXPECT_EQ(m.payload.format, "openvino-ir");
  EXPECT_EQ(m.payload.entry, "model.xml");
  ASSERT_EQ(m.files.size(), 4u);
  EXPECT_EQ(m.files[2].path, "model.bin");
  EXPECT_EQ(m.files[2].size, 7u);
  EXPECT_EQ(m.files[2].sha256.size(), 64u);
  ASSERT_EQ(m.inputs.size(), 1u);
  EXPECT_EQ(m.inputs[0].name, "x");
  EXPECT_EQ(m.inputs[0].dtype, "float32");
  EXPECT_EQ(m.inputs[0].shape, (std::vector<int64_t>{1, 4}));
  EXPECT_EQ(m.outputs[0].shape, (std::vector<int64_t>{1, 2}));
  ASSERT_EQ(m.golden.samples.size(), 1u);
  EXPECT_EQ(m.golden.samples[0].inputs, std::vector<std::string>{"golden/input_0.npy"});
  EXPECT_EQ(m.golden.samples[0].outputs, std::vector<std::string>{"golden/output_0.npy"});
  EXPECT_DOUBLE_EQ(m.golden.atol, 1e-4);
  EXPECT_DOUBLE_EQ(m.golden.rtol, 1e-3);
  EXPECT_EQ(m.target_name, "x86_64-avx2");
  EXPECT_EQ(m.target_isa, "x86_64");
  EXPECT_EQ(m.backend_name, "openvino");
  EXPECT_EQ(m.target_threads, 0);
  EXPECT_EQ(m.backend_options_json, "{}");
  ASSERT_EQ(m.monitoring.outputs.size(), 1u);
  EXPECT_EQ(m.monitoring.outputs[0].name, "y");
  EXPECT_EQ(m.monitoring.outputs[0].kind, MONITOR_KIND_CLASSES);
  EXPECT_EQ(m.monitoring.outputs[0].classes, 2);
  EXPECT_EQ(m.monitoring.latency.count, 96);
  EXPECT_DOUBLE_EQ(m.monitoring.latency.start_us, 1.0);
}

TEST(Manifest, ReadsThreadsOptionsAndHistograms) {
  json manifest = valid_manifest();
  manifest["target"]["threads"] = 4;
  manifest["backend"]["options"] = {{"config", {{"INFERENCE_NUM_THREADS", 4}}}};
  manifest["monitoring"]["outputs"][0] = {{"name", "y"}, {"kind", "histogram"}, {"edges", {-1.0, 0, 2.5}}};
  manifest["monitoring"].erase("latency");
  manifest["proof"] = {{"anything", "the C++ reader ignores it"}};
  const Manifest m = manifest_parse(manifest.dump());
  EXPECT_EQ(m.target_threads, 4);
  EXPECT_EQ(json::parse(m.backend_options_json), manifest["backend"]["options"]);
  EXPECT_EQ(m.monitoring.outputs[0].kind, MONITOR_KIND_HISTOGRAM);
  EXPECT_EQ(m.monitoring.outputs[0].edges, (std::vector<double>{-1.0, 0.0, 2.5}));
  EXPECT_EQ(m.monitoring.latency.count, 96);  // the schema's default
}

// Which formats exist is the backend registry's business: the reader checks only the name's form.
TEST(Manifest, AcceptsAnyWellFormedPayloadFormat) {
  for (const std::string format : {"onnx", "executorch-pte", "tensorrt.plan", "c++-so", "8bit"}) {
    json manifest = valid_manifest();
    manifest["payload"]["format"] = format;
    EXPECT_EQ(manifest_parse(manifest.dump()).payload.format, format);
  }
}

TEST(Manifest, NullThreadsAndCpuFeatures) {
  json manifest = valid_manifest();
  manifest["target"]["threads"] = nullptr;  // the target leaves it to the device
  manifest["target"]["cpu_features"] = {"avx2", "fma"};
  const Manifest m = manifest_parse(manifest.dump());
  EXPECT_EQ(m.target_threads, 0);
  EXPECT_EQ(m.target_cpu_features, (std::vector<std::string>{"avx2", "fma"}));
  EXPECT_TRUE(manifest_parse(valid_manifest().dump()).target_cpu_features.empty());
}

TEST(Manifest, RejectsNonJson) {
  EXPECT_NE(manifest_error("{\"schema_version\": 1,").find("not valid JSON"), std::string::npos);
  EXPECT_NE(manifest_error("\xff\xfe garbage").find("not valid JSON"), std::string::npos);
  EXPECT_NE(manifest_error("").find("not valid JSON"), std::string::npos);
  EXPECT_NE(manifest_error("[1, 2]").find("JSON object"), std::string::npos);
}

TEST(Manifest, UnknownSchemaVersion) {
  const std::string message = mutated_error([](json& m) { m["schema_version"] = 2; });
  EXPECT_NE(message.find("schema_version is 2"), std::string::npos) << message;
  EXPECT_NE(mutated_error([](json& m) { m["schema_version"] = "1"; }).find("schema_version"),
            std::string::npos);
  EXPECT_NE(mutated_error([](json& m) { m["schema_version"] = 1.0; }).find("schema_version"),
            std::string::npos);
}

TEST(Manifest, ErrorsNameTheKey) {
  const std::vector<std::pair<std::string, std::function<void(json&)>>> cases = {
      {"name is missing", [](json& m) { m.erase("name"); }},
      {"name must be a string", [](json& m) { m["name"] = 3; }},
      {"payload must be an object", [](json& m) { m["payload"] = "x"; }},
      {"payload.format", [](json& m) { m["payload"]["format"] = "OpenVINO-IR"; }},
      {"payload.format", [](json& m) { m["payload"]["format"] = "-ir"; }},
      {"payload.format", [](json& m) { m["payload"]["format"] = "tvm relax"; }},
      {"payload.format must be a string", [](json& m) { m["payload"]["format"] = 1; }},
      {"payload.entry", [](json& m) { m["payload"]["entry"] = "model.so"; }},
      {"files must be a list", [](json& m) { m["files"] = json::object(); }},
      {"files[1] must be an object", [](json& m) { m["files"][1] = 5; }},
      {"files[0].path is missing", [](json& m) { m["files"][0].erase("path"); }},
      {"files[2].size", [](json& m) { m["files"][2]["size"] = -1; }},
      {"files[2].size", [](json& m) { m["files"][2]["size"] = 1.5; }},
      {"files[3].sha256", [](json& m) { m["files"][3]["sha256"] = "abc"; }},
      {"files[1].path repeats", [](json& m) { m["files"][1]["path"] = "golden/input_0.npy"; }},
      {"files[0].path must not list", [](json& m) { m["files"][0]["path"] = "manifest.sig"; }},
      {"inputs[0].dtype", [](json& m) { m["inputs"][0]["dtype"] = "float31"; }},
      {"inputs[0].shape[1]", [](json& m) { m["inputs"][0]["shape"][1] = 0; }},
      {"outputs[0].shape[0]", [](json& m) { m["outputs"][0]["shape"][0] = -2; }},
      {"outputs[0].shape must be a list", [](json& m) { m["outputs"][0]["shape"] = 3; }},
      {"golden.atol", [](json& m) { m["golden"]["atol"] = -1.0; }},
      {"golden.rtol must be a number", [](json& m) { m["golden"]["rtol"] = "0.1"; }},
      {"golden.samples[0].inputs[0]",
       [](json& m) { m["golden"]["samples"][0]["inputs"][0] = "golden/nope.npy"; }},
      {"golden.samples[0].outputs has 0 files",
       [](json& m) { m["golden"]["samples"][0]["outputs"] = json::array(); }},
      {"golden.samples must hold at least one", [](json& m) { m["golden"]["samples"] = json::array(); }},
      {"golden.samples is missing", [](json& m) { m["golden"].erase("samples"); }},
      {"monitoring is missing", [](json& m) { m.erase("monitoring"); }},
      {"monitoring.outputs[0].name", [](json& m) { m["monitoring"]["outputs"][0]["name"] = "z"; }},
      {"monitoring.outputs[0].kind", [](json& m) { m["monitoring"]["outputs"][0]["kind"] = "mean"; }},
      {"monitoring.outputs[0].classes", [](json& m) { m["monitoring"]["outputs"][0]["classes"] = 0; }},
      {"monitoring.outputs[0].edges[1] must be larger",
       [](json& m) {
         m["monitoring"]["outputs"][0] = {{"name", "y"}, {"kind", "histogram"}, {"edges", {1, 1}}};
       }},
      {"monitoring.latency.factor", [](json& m) { m["monitoring"]["latency"]["factor"] = 1.0; }},
      {"monitoring.latency.count", [](json& m) { m["monitoring"]["latency"]["count"] = 0; }},
      {"target.threads", [](json& m) { m["target"]["threads"] = 0; }},
      {"target.threads", [](json& m) { m["target"]["threads"] = 2.5; }},
      {"target.cpu_features must be a list", [](json& m) { m["target"]["cpu_features"] = "avx2"; }},
      {"target.cpu_features[1] must not be empty",
       [](json& m) { m["target"]["cpu_features"] = {"avx2", ""}; }},
      {"backend.options must be an object", [](json& m) { m["backend"]["options"] = "x"; }},
      {"target.isa is missing", [](json& m) { m["target"].erase("isa"); }},
      {"backend.name must be a string", [](json& m) { m["backend"]["name"] = nullptr; }},
  };
  for (const auto& [expected, mutate] : cases) {
    const std::string message = mutated_error(mutate);
    EXPECT_NE(message.find(expected), std::string::npos)
        << "expected '" << expected << "' in: " << message;
  }
}

TEST(Manifest, ReadFromDirectoryOrFile) {
  test::TempDir dir;
  test::file_write(dir.path() / "manifest.json", valid_manifest().dump(2));
  EXPECT_EQ(manifest_read(dir.path().string()).name, "tiny-x86_64-avx2-openvino");
  EXPECT_EQ(manifest_read((dir.path() / "manifest.json").string()).backend_name, "openvino");
  try {
    manifest_read((dir.path() / "missing").string());
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ERROR_CODE_IO);
  }
}

}  // namespace
}  // namespace edgesmith
