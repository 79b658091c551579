// edgesmith_backend_check: loads one backend plugin the way the runtime does (dlopen, the plugin
// ABI check and its C table, through runtime/plugin.h), runs an artifact's golden samples through it, then hammers it from several
// threads at once, and prints one JSON line with the results. Used by
// tests/test_backends_native.py; independent of Session so plugin bugs show up on their own.
//
//   edgesmith_backend_check PLUGIN.so ARTIFACT_DIR [--threads N] [--concurrency K] [--iterations M]
//
// Exit status: 0 all samples within tolerance, 1 a mismatch or a run failure, 2 a load failure
// (the JSON line carries the plugin's status code and message).
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "artifact/manifest.h"
#include "common/error.h"
#include "common/file.h"
#include "runtime/npy.h"
#include "runtime/plugin.h"
#include "runtime/tensor.h"

namespace {

using edgesmith::PluginBackend;
using edgesmith::PluginOpenArgs;
using edgesmith::PluginStatus;
using edgesmith::Tensor;
using edgesmith::TensorView;

struct Sample {
  std::vector<Tensor> inputs;
  std::vector<Tensor> outputs;
};

/// Largest |y - expected| of float32 outputs, or -1 when a value is outside atol + rtol*|expected|.
double outputs_compare(const std::vector<Tensor>& got, const std::vector<Tensor>& expected,
                       double atol, double rtol, bool* within) {
  double worst = 0.0;
  *within = got.size() == expected.size();
  for (size_t i = 0; *within && i < got.size(); ++i) {
    if (got[i].dtype() != edgesmith::DTYPE_FLOAT32 || got[i].shape() != expected[i].shape()) {
      *within = false;
      break;
    }
    const auto* y = static_cast<const float*>(got[i].data());
    const auto* e = static_cast<const float*>(expected[i].data());
    const size_t n = got[i].byte_size() / sizeof(float);
    for (size_t k = 0; k < n; ++k) {
      const double diff = std::fabs(static_cast<double>(y[k]) - e[k]);
      worst = std::max(worst, diff);
      if (!(diff <= atol + rtol * std::fabs(static_cast<double>(e[k])))) *within = false;
    }
  }
  return worst;
}

std::vector<TensorView> views_of(const std::vector<Tensor>& tensors) {
  std::vector<TensorView> views;
  for (const Tensor& tensor : tensors) views.push_back(tensor.view());
  return views;
}

int fail(nlohmann::json report, const std::string& stage, const PluginStatus& status, int code) {
  report["ok"] = false;
  report["stage"] = stage;
  report["status"] = status.code;
  report["message"] = status.message;
  std::printf("%s\n", report.dump().c_str());
  return code;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s PLUGIN.so ARTIFACT_DIR [--threads N] [--concurrency K] [--iterations M]\n",
                 argv[0]);
    return 64;
  }
  const std::string plugin_path = argv[1];
  PluginOpenArgs args;
  args.artifact_dir = std::filesystem::absolute(argv[2]).string();
  int concurrency = 4;
  int iterations = 25;
  for (int i = 3; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    const int value = std::atoi(argv[i + 1]);
    if (flag == "--threads") args.threads = value;
    if (flag == "--concurrency") concurrency = value;
    if (flag == "--iterations") iterations = value;
  }
  nlohmann::json report = {{"plugin", plugin_path}, {"artifact", args.artifact_dir}};

  // The backend's name from the file name, for messages: libedgesmith_backend_<name>.so.
  std::string name = std::filesystem::path(plugin_path).stem().string();
  const std::string prefix = "libedgesmith_backend_";
  if (name.rfind(prefix, 0) == 0) name = name.substr(prefix.size());
  edgesmith::BackendPlugin plugin;
  try {
    plugin = edgesmith::plugin_load_file(name, plugin_path);
  } catch (const std::exception& e) {
    return fail(report, "load", PluginStatus{EDGESMITH_STATUS_CODE_LOAD_FAILED, e.what()}, 2);
  }

  std::vector<Sample> samples;
  try {
    args.manifest_json = edgesmith::file_read(args.artifact_dir + "/" + edgesmith::MANIFEST_FILE,
                                              edgesmith::MANIFEST_MAX_BYTES, edgesmith::ERROR_CODE_IO,
                                              edgesmith::MANIFEST_FILE);
    args.manifest = edgesmith::manifest_parse(args.manifest_json);
    if (args.threads <= 0) args.threads = args.manifest.target_threads;  // as Session does
    for (const auto& entry : args.manifest.golden.samples) {
      Sample sample;
      for (const auto& path : entry.inputs) sample.inputs.push_back(edgesmith::npy_read(args.artifact_dir + "/" + path));
      for (const auto& path : entry.outputs) sample.outputs.push_back(edgesmith::npy_read(args.artifact_dir + "/" + path));
      samples.push_back(std::move(sample));
    }
  } catch (const std::exception& e) {
    return fail(report, "artifact", PluginStatus{EDGESMITH_STATUS_CODE_INVALID, e.what()}, 2);
  }

  const auto t_open = std::chrono::steady_clock::now();
  std::unique_ptr<PluginBackend> backend;
  PluginStatus status = edgesmith::plugin_backend_open(plugin, args, &backend);
  report["open_ms"] = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t_open).count();
  if (!status.ok()) return fail(report, "open", status, 2);
  report["describe"] = backend->backend_describe();

  // Golden samples, one caller.
  double worst = 0.0;
  bool all_within = true;
  for (const Sample& sample : samples) {
    std::vector<Tensor> outputs;
    status = backend->backend_run(views_of(sample.inputs), &outputs);
    if (!status.ok()) return fail(report, "run", status, 1);
    bool within = false;
    worst = std::max(worst, outputs_compare(outputs, sample.outputs, args.manifest.golden.atol,
                                            args.manifest.golden.rtol, &within));
    all_within = all_within && within;
  }
  report["samples"] = samples.size();
  report["max_abs_err"] = worst;

  // Latency of one caller (the calling thread's engine pools are warm by now).
  const auto t_single = std::chrono::steady_clock::now();
  for (int it = 0; it < iterations; ++it) {
    std::vector<Tensor> outputs;
    status = backend->backend_run(views_of(samples[0].inputs), &outputs);
    if (!status.ok()) return fail(report, "run", status, 1);
  }
  report["single_ms_per_run"] =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t_single).count() /
      std::max(1, iterations);

  // Many callers at once: every result must still match its own sample's golden output.
  std::atomic<int> mismatches{0};
  std::atomic<int> failures{0};
  std::string first_failure;
  std::vector<std::thread> callers;
  const auto t_conc = std::chrono::steady_clock::now();
  for (int c = 0; c < concurrency; ++c) {
    callers.emplace_back([&, c] {
      for (int it = 0; it < iterations; ++it) {
        const Sample& sample = samples[static_cast<size_t>(c + it) % samples.size()];
        std::vector<Tensor> outputs;
        const PluginStatus s = backend->backend_run(views_of(sample.inputs), &outputs);
        if (!s.ok()) {
          if (failures.fetch_add(1) == 0) first_failure = s.message;
          continue;
        }
        bool within = false;
        outputs_compare(outputs, sample.outputs, args.manifest.golden.atol, args.manifest.golden.rtol, &within);
        if (!within) mismatches.fetch_add(1);
      }
    });
  }
  for (std::thread& caller : callers) caller.join();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_conc).count();
  report["concurrency"] = concurrency;
  report["concurrent_runs"] = concurrency * iterations;
  report["concurrent_ms_per_run"] = 1000.0 * seconds / std::max(1, concurrency * iterations);
  report["concurrent_mismatches"] = mismatches.load();
  report["concurrent_failures"] = failures.load();
  if (!first_failure.empty()) report["first_failure"] = first_failure;

  // Threads of the process now (engine pools included), for the thread-count checks.
  int tasks = 0;
  std::error_code ec;
  for (auto it = std::filesystem::directory_iterator("/proc/self/task", ec);
       !ec && it != std::filesystem::directory_iterator(); ++it) {
    ++tasks;
  }
  report["process_threads"] = tasks;

  backend.reset();
  const bool ok = all_within && mismatches.load() == 0 && failures.load() == 0;
  report["ok"] = ok;
  std::printf("%s\n", report.dump().c_str());
  return ok ? 0 : 1;
}
