// libedgesmith_backend_testecho.so: a test-only backend plugin with no engine behind it.
//
// Output k is input k (same dtype and shape) — doubled for float inputs when the manifest's
// backend.options say {"mode": "double"}. It runs the payload format "testecho"; its payload
// entry must start with the bytes "testecho".
// backend.options {"fail": "open"} / {"fail": "run"} make it fail, {"fail": "throw"} throws from
// its open function, to test error propagation across the C table; {"fail": "abort"} aborts the
// process on its first run (a payload that crashes the agent's self-test);
// {"fail": "abort-on-run-if-negative"} / {"fail": "hang-on-run-if-negative"} abort / sleep forever
// on a run whose first input element is negative (a candidate that passes a self-test of positive
// samples and crashes or hangs on a live input); {"chatter": true} prints a line to stdout and one
// to stderr when it opens (an engine that talks). The environment variable
// EDGESMITH_TESTECHO_OFFSET (a number) is added to float outputs: one device whose engine computes
// wrongly, so its golden self-test fails while other devices pass the same artifact.
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/backend.h"

namespace edgesmith {
namespace {

class TestEchoBackend : public Backend {
 public:
  TestEchoBackend(bool doubling, bool fail_run, bool abort_run, float offset, std::string on_negative)
      : doubling_(doubling), fail_run_(fail_run), abort_run_(abort_run), offset_(offset),
        on_negative_(std::move(on_negative)) {}

  BackendStatus backend_run(const std::vector<TensorView>& inputs,
                            std::vector<Tensor>* outputs) noexcept override {
    if (abort_run_) std::abort();
    if (!on_negative_.empty() && !inputs.empty() && first_value(inputs[0]) < 0.0) {
      if (on_negative_ == "abort") std::abort();
      while (true) std::this_thread::sleep_for(std::chrono::seconds(1));
    }
    if (fail_run_) return {BACKEND_STATUS_RUN_FAILED, "testecho was told to fail"};
    try {
      for (const TensorView& input : inputs) {
        Tensor out(input.dtype, input.shape);
        std::memcpy(out.data(), input.data, out.byte_size());
        const auto numel = static_cast<size_t>(shape_numel(input.shape));
        if (doubling_ && input.dtype == DTYPE_FLOAT32) {
          auto* values = static_cast<float*>(out.data());
          for (size_t i = 0; i < numel; ++i) values[i] *= 2.0f;
        }
        if (offset_ != 0.0f && input.dtype == DTYPE_FLOAT32) {
          auto* values = static_cast<float*>(out.data());
          for (size_t i = 0; i < numel; ++i) values[i] += offset_;
        } else if (doubling_ && input.dtype == DTYPE_FLOAT64) {
          auto* values = static_cast<double*>(out.data());
          for (size_t i = 0; i < numel; ++i) values[i] *= 2.0;
        }
        outputs->push_back(std::move(out));
      }
    } catch (const std::exception& e) {
      return {BACKEND_STATUS_RUN_FAILED, e.what()};
    }
    return {};
  }

  std::string backend_describe() const override { return "testecho 1.0"; }

 private:
  static double first_value(const TensorView& view) {
    if (shape_numel(view.shape) == 0) return 0.0;
    switch (view.dtype) {
      case DTYPE_FLOAT32: return *static_cast<const float*>(view.data);
      case DTYPE_FLOAT64: return *static_cast<const double*>(view.data);
      case DTYPE_INT64: return static_cast<double>(*static_cast<const int64_t*>(view.data));
      case DTYPE_INT32: return *static_cast<const int32_t*>(view.data);
      default: return 0.0;
    }
  }

  bool doubling_;
  bool fail_run_;
  bool abort_run_;
  float offset_;
  std::string on_negative_;  ///< "abort", "hang" or "" (see the file comment)
};

Backend* testecho_open(const BackendOpenArgs& args, BackendStatus* status) {
  const Manifest& manifest = args.manifest;
  const auto options = nlohmann::json::parse(manifest.backend_options_json, nullptr, false);
  const std::string fail = options.is_object() ? options.value("fail", "") : "";
  if (fail == "throw") throw std::runtime_error("testecho threw as it was told");
  if (fail == "open") {
    *status = {BACKEND_STATUS_LOAD_FAILED, "testecho was told to fail"};
    return nullptr;
  }
  std::ifstream entry(args.artifact_dir + "/" + manifest.payload.entry, std::ios::binary);
  char magic[8] = {};
  entry.read(magic, sizeof(magic));
  if (std::string(magic, sizeof(magic)) != "testecho") {
    *status = {BACKEND_STATUS_LOAD_FAILED, manifest.payload.entry + " is not a testecho payload"};
    return nullptr;
  }
  if (manifest.inputs.size() != manifest.outputs.size()) {
    *status = {BACKEND_STATUS_INVALID, "testecho needs one output per input"};
    return nullptr;
  }
  const bool doubling = options.is_object() && options.value("mode", "") == "double";
  if (options.is_object() && options.value("chatter", false)) {
    std::fputs("testecho chatter on stdout\n", stdout);
    std::fflush(stdout);
    std::fputs("testecho chatter on stderr\n", stderr);
  }
  const char* offset = std::getenv("EDGESMITH_TESTECHO_OFFSET");
  const std::string on_negative = fail == "abort-on-run-if-negative" ? "abort"
                                  : fail == "hang-on-run-if-negative" ? "hang"
                                                                      : "";
  return new TestEchoBackend(doubling, fail == "run", fail == "abort", offset != nullptr ? std::strtof(offset, nullptr) : 0.0f,
                             on_negative);
}

}  // namespace
}  // namespace edgesmith

EDGESMITH_BACKEND_DEFINE(edgesmith::testecho_open, "testecho")
