// edgesmith-run: run an artifact with the C++ runtime alone (no Python), on the device or under
// qemu. `edgesmith prove` calls `edgesmith-run ARTIFACT --golden --json` and reads the report's
// top-level keys: {artifact, key_id, backend, isa, runner, passed, samples, max_abs_err, atol,
// rtol, details: [{index, passed, max_abs_err, message}]}; --bench adds `bench`, --input `outputs`,
// --batch `batch` ({samples}). `edgesmith build` runs a reduced-precision candidate's accuracy gate
// under qemu with --batch: one process for every gate input (loading an engine under emulation
// takes seconds).
//
//   edgesmith-run ARTIFACT [--input FILE.npy | --input NAME=FILE.npy ...]
//                 [--output FILE.npy ... | --output-dir DIR] [--batch DIR] [--golden] [--bench N]
//                 [--warmup N] [--threads N] [--key FILE.pub ...] [--json]
//
// Exit status: 0 success, 1 failure (including a golden sample out of tolerance), 2 usage error.
#include <sys/resource.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <map>
#include <string>
#include <system_error>
#include <vector>

#include <nlohmann/json.hpp>

#include "artifact/keys.h"
#include "common/error.h"
#include "common/version.h"
#include "runtime/isa.h"
#include "runtime/npy.h"
#include "runtime/plugin.h"
#include "runtime/session.h"
#include "runtime/values.h"

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace edgesmith {
namespace {

const char* const USAGE =
    "usage: edgesmith-run ARTIFACT [--input FILE.npy | --input NAME=FILE.npy ...]\n"
    "                     [--output FILE.npy ... | --output-dir DIR] [--batch DIR] [--golden]\n"
    "                     [--bench N] [--warmup N] [--threads N] [--key FILE.pub ...] [--json]\n"
    "\n"
    "Verify ARTIFACT, load it into its backend and run it.\n"
    "  --input       an input .npy, in the model's input order, or NAME=FILE.npy\n"
    "  --output      where to write each output (.npy, in output order)\n"
    "  --output-dir  write every output to DIR/<output name>.npy\n"
    "  --batch DIR   run every DIR/sample_K/input_I.npy (K = 0, 1, ... while the folder exists; I in\n"
    "                the model's input order) and write DIR/sample_K/output_J.npy\n"
    "  --golden      run the artifact's golden samples and compare with the expected outputs\n"
    "                (exit 1 unless all pass)\n"
    "  --bench N     time N runs (with --input, or the first golden sample's inputs)\n"
    "  --warmup N    untimed runs before --bench (default 3)\n"
    "  --threads N   engine threads (default: the target's)\n"
    "  --key FILE    trusted public key (default: $EDGESMITH_HOME/{keys,trusted}/*.pub)\n"
    "  --json        print one JSON object on stdout\n";

struct UsageError {
  std::string message;
};

struct Options {
  std::string artifact;
  std::vector<std::string> inputs;
  std::vector<std::string> outputs;
  std::string output_dir;
  std::string batch_dir;
  std::vector<std::string> keys;
  bool golden = false;
  int64_t bench = 0;
  int64_t warmup = 3;
  int32_t threads = 0;
  bool as_json = false;
};

int64_t count_parse(const std::string& flag, const std::string& text, int64_t max) {
  char* end = nullptr;
  errno = 0;
  const long long value = std::strtoll(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || errno != 0 || value < 0 || value > max) {
    throw UsageError{flag + " takes an integer between 0 and " + std::to_string(max) + ", got '" +
                     text + "'"};
  }
  return value;
}

Options options_parse(int argc, char** argv) {
  Options options;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw UsageError{arg + " needs a value"};
      return argv[++i];
    };
    if (arg == "--input") {
      options.inputs.push_back(value());
    } else if (arg == "--output") {
      options.outputs.push_back(value());
    } else if (arg == "--output-dir") {
      options.output_dir = value();
    } else if (arg == "--batch") {
      options.batch_dir = value();
    } else if (arg == "--key") {
      options.keys.push_back(value());
    } else if (arg == "--golden") {
      options.golden = true;
    } else if (arg == "--bench") {
      options.bench = count_parse(arg, value(), 100000000);
    } else if (arg == "--warmup") {
      options.warmup = count_parse(arg, value(), 1000000);
    } else if (arg == "--threads") {
      options.threads = static_cast<int32_t>(count_parse(arg, value(), 1024));
    } else if (arg == "--json") {
      options.as_json = true;
    } else if (!arg.empty() && arg[0] == '-') {
      throw UsageError{"unknown option " + arg};
    } else if (options.artifact.empty()) {
      options.artifact = arg;
    } else {
      throw UsageError{"one ARTIFACT is expected, got '" + options.artifact + "' and '" + arg + "'"};
    }
  }
  if (options.artifact.empty()) throw UsageError{"ARTIFACT is missing"};
  if (!options.outputs.empty() && !options.output_dir.empty()) {
    throw UsageError{"give --output or --output-dir, not both"};
  }
  if (options.inputs.empty() && !options.golden && options.bench == 0 && options.batch_dir.empty()) {
    throw UsageError{"nothing to do: give --input, --batch, --golden or --bench"};
  }
  if ((!options.outputs.empty() || !options.output_dir.empty()) && options.inputs.empty()) {
    throw UsageError{"--output and --output-dir need --input"};
  }
  return options;
}

// Inputs in manifest order, from positional (`FILE`) or named (`NAME=FILE`) --input values.
std::vector<Tensor> inputs_load(const Manifest& manifest, const std::vector<std::string>& args) {
  std::map<std::string, std::string> named;
  std::vector<std::string> positional;
  for (const std::string& arg : args) {
    const size_t eq = arg.find('=');
    const std::string name = eq == std::string::npos ? "" : arg.substr(0, eq);
    const bool is_named = std::any_of(manifest.inputs.begin(), manifest.inputs.end(),
                                      [&](const ManifestTensor& t) { return t.name == name; });
    if (is_named) {
      if (!named.emplace(name, arg.substr(eq + 1)).second) {
        throw UsageError{"input '" + name + "' is given twice"};
      }
    } else {
      positional.push_back(arg);
    }
  }
  if (!named.empty() && !positional.empty()) {
    throw UsageError{"give every --input as NAME=FILE.npy or every one as FILE.npy, not a mix"};
  }
  std::vector<Tensor> tensors;
  if (named.empty()) {
    if (positional.size() != manifest.inputs.size()) {
      throw UsageError{"the model takes " + std::to_string(manifest.inputs.size()) +
                       " inputs, " + std::to_string(positional.size()) + " --input were given"};
    }
    for (const std::string& path : positional) tensors.push_back(npy_read(path));
    return tensors;
  }
  for (const ManifestTensor& input : manifest.inputs) {
    const auto it = named.find(input.name);
    if (it == named.end()) throw UsageError{"input '" + input.name + "' is missing (--input " + input.name + "=FILE.npy)"};
    tensors.push_back(npy_read(it->second));
  }
  return tensors;
}

std::vector<Tensor> golden_inputs(const Session& session) {
  std::vector<Tensor> tensors;
  for (const std::string& path : session.session_manifest().golden.samples.at(0).inputs) {
    tensors.push_back(npy_read((fs::path(session.session_load_dir()) / path).string()));
  }
  return tensors;
}

std::vector<TensorView> views_of(const std::vector<Tensor>& tensors) {
  std::vector<TensorView> views;
  for (const Tensor& t : tensors) views.push_back(t.view());
  return views;
}

json number_or_null(double value) { return std::isfinite(value) ? json(value) : json(nullptr); }

std::string output_file_name(const std::string& name) {
  std::string out;
  for (const char c : name) {
    const bool ok = std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.';
    out += ok ? c : '_';
  }
  return (out.empty() || out == "." || out == "..") ? "output" : out;
}

json outputs_emit(const Session& session, const Options& options, const std::vector<Tensor>& outputs) {
  const Manifest& manifest = session.session_manifest();
  if (!options.outputs.empty() && options.outputs.size() != outputs.size()) {
    throw UsageError{"the model has " + std::to_string(outputs.size()) + " outputs, " +
                     std::to_string(options.outputs.size()) + " --output were given"};
  }
  if (!options.output_dir.empty()) fs::create_directories(options.output_dir);
  json list = json::array();
  for (size_t o = 0; o < outputs.size(); ++o) {
    std::string path;
    if (!options.outputs.empty()) path = options.outputs[o];
    if (!options.output_dir.empty()) {
      path = (fs::path(options.output_dir) / (output_file_name(manifest.outputs[o].name) + ".npy")).string();
    }
    if (!path.empty()) npy_write(path, outputs[o].view());
    json item = {{"name", manifest.outputs[o].name},
                 {"dtype", dtype_name(outputs[o].dtype())},
                 {"shape", outputs[o].shape()},
                 {"file", path.empty() ? json(nullptr) : json(path)}};
    if (path.empty()) {
      json values = json::array();
      const auto numel = static_cast<size_t>(shape_numel(outputs[o].shape()));
      for (size_t i = 0; i < std::min<size_t>(numel, 16); ++i) {
        values.push_back(number_or_null(value_load(outputs[o].data(), outputs[o].dtype(), i)));
      }
      item["first_values"] = values;
    }
    list.push_back(item);
    if (!options.as_json) {
      std::cout << "output '" << manifest.outputs[o].name << "' " << dtype_name(outputs[o].dtype())
                << " " << shape_format(outputs[o].shape());
      if (path.empty()) {
        std::cout << ": " << item["first_values"].dump()
                  << (shape_numel(outputs[o].shape()) > 16 ? " ..." : "");
      } else {
        std::cout << " -> " << path;
      }
      std::cout << "\n";
    }
  }
  return list;
}

json golden_emit(Session& session, const Options& options, bool* passed) {
  const SelfTestResult result = session.session_self_test();
  *passed = result.passed;
  json details = json::array();
  for (const GoldenSampleResult& sample : result.details) {
    details.push_back({{"index", sample.index},
                       {"passed", sample.passed},
                       {"max_abs_err", number_or_null(sample.max_abs_err)},
                       {"message", sample.message}});
    if (!options.as_json) {
      std::printf("sample %u: max abs err %.3g  %s%s%s\n", sample.index, sample.max_abs_err,
                  sample.passed ? "pass" : "FAIL", sample.message.empty() ? "" : " — ",
                  sample.message.c_str());
    }
  }
  size_t passed_count = 0;
  for (const GoldenSampleResult& sample : result.details) passed_count += sample.passed ? 1 : 0;
  if (!options.as_json) {
    std::printf("golden: %zu/%u samples pass (atol %g, rtol %g, max abs err %.3g)\n", passed_count,
                result.samples, result.atol, result.rtol, result.max_abs_err);
  }
  return {{"passed", result.passed},          {"samples", result.samples},
          {"max_abs_err", number_or_null(result.max_abs_err)},
          {"atol", result.atol},              {"rtol", result.rtol},
          {"details", details}};
}

double percentile_ms(std::vector<double> sorted_us, double q) {
  if (sorted_us.empty()) return 0.0;
  const double rank = q * static_cast<double>(sorted_us.size() - 1);
  const auto low = static_cast<size_t>(std::floor(rank));
  const size_t high = std::min(low + 1, sorted_us.size() - 1);
  const double frac = rank - static_cast<double>(low);
  return (sorted_us[low] * (1.0 - frac) + sorted_us[high] * frac) / 1000.0;
}

json bench_emit(Session& session, const Options& options, const std::vector<TensorView>& inputs) {
  for (int64_t i = 0; i < options.warmup; ++i) session.session_run(inputs);
  std::vector<double> latencies_us;
  latencies_us.reserve(static_cast<size_t>(options.bench));
  const auto begin = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < options.bench; ++i) {
    const auto start = std::chrono::steady_clock::now();
    session.session_run(inputs);
    latencies_us.push_back(
        std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count());
  }
  const double wall_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - begin).count();
  std::sort(latencies_us.begin(), latencies_us.end());
  struct rusage usage {};
  getrusage(RUSAGE_SELF, &usage);
  const double peak_rss_mb = static_cast<double>(usage.ru_maxrss) / 1024.0;  // ru_maxrss is in KiB
  const json out = {{"runs", options.bench},
                    {"warmup", options.warmup},
                    {"p50_ms", percentile_ms(latencies_us, 0.50)},
                    {"p95_ms", percentile_ms(latencies_us, 0.95)},
                    {"p99_ms", percentile_ms(latencies_us, 0.99)},
                    {"throughput_per_s", wall_s > 0 ? static_cast<double>(options.bench) / wall_s : 0.0},
                    {"peak_rss_mb", peak_rss_mb}};
  if (!options.as_json) {
    std::printf("bench: %lld runs, p50 %.3f ms, p95 %.3f ms, p99 %.3f ms, %.1f runs/s, peak RSS %.1f MB\n",
                static_cast<long long>(options.bench), out["p50_ms"].get<double>(),
                out["p95_ms"].get<double>(), out["p99_ms"].get<double>(),
                out["throughput_per_s"].get<double>(), peak_rss_mb);
  }
  return out;
}

/// Run every DIR/sample_K/input_I.npy and write DIR/sample_K/output_J.npy; returns the count.
uint32_t batch_run(Session& session, const std::string& dir) {
  const Manifest& manifest = session.session_manifest();
  uint32_t count = 0;
  for (;; ++count) {
    const fs::path sample = fs::path(dir) / ("sample_" + std::to_string(count));
    std::error_code ec;
    if (!fs::is_directory(sample, ec)) break;
    std::vector<Tensor> inputs;
    for (size_t i = 0; i < manifest.inputs.size(); ++i) {
      inputs.push_back(npy_read((sample / ("input_" + std::to_string(i) + ".npy")).string()));
    }
    const std::vector<Tensor> outputs = session.session_run(views_of(inputs));
    for (size_t o = 0; o < outputs.size(); ++o) {
      npy_write((sample / ("output_" + std::to_string(o) + ".npy")).string(), outputs[o].view());
    }
  }
  if (count == 0) throw UsageError{"--batch " + dir + " holds no sample_0 folder"};
  return count;
}

int run_main(const Options& options) {
  std::vector<std::vector<uint8_t>> keys;
  for (const std::string& path : options.keys) keys.push_back(public_key_read(path));
  if (options.keys.empty()) keys = trusted_keys_default();
  if (keys.empty()) {
    throw Error(ERROR_CODE_INVALID_ARGUMENT,
                "no trusted public keys: pass --key FILE.pub or copy the signer's .pub to " +
                    keys_home() + "/trusted/");
  }
  SessionOptions session_options;
  session_options.threads = options.threads;
  const std::unique_ptr<Session> session = session_open(options.artifact, keys, session_options);
  const Manifest& manifest = session->session_manifest();
  if (!options.as_json) {
    std::cout << manifest.name << ": verified (key " << session->session_key_id() << "), "
              << session->session_describe() << " on " << host_isa() << "\n";
  }
  json report = {{"artifact", manifest.name},
                 {"key_id", session->session_key_id()},
                 {"backend", session->session_describe()},
                 {"isa", host_isa()},
                 {"runner", std::string("edgesmith-run ") + version_string()}};
  int status = 0;
  std::vector<Tensor> inputs;
  if (!options.inputs.empty()) {
    inputs = inputs_load(manifest, options.inputs);
    report["outputs"] = outputs_emit(*session, options, session->session_run(views_of(inputs)));
  }
  if (!options.batch_dir.empty()) {
    const uint32_t count = batch_run(*session, options.batch_dir);
    report["batch"] = {{"samples", count}};
    if (!options.as_json) std::cout << "batch: " << count << " samples -> " << options.batch_dir << "\n";
  }
  if (options.golden) {
    // Top-level keys, as `edgesmith prove` reads them: passed, samples, max_abs_err, ...
    bool passed = false;
    report.update(golden_emit(*session, options, &passed));
    if (!passed) status = 1;
  }
  if (options.bench > 0) {
    if (inputs.empty()) inputs = golden_inputs(*session);
    report["bench"] = bench_emit(*session, options, views_of(inputs));
  }
  if (options.as_json) std::cout << report.dump() << "\n";
  return status;
}

}  // namespace
}  // namespace edgesmith

int main(int argc, char** argv) {
  using namespace edgesmith;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "-h" || arg == "--help") {
      std::cout << USAGE;
      return 0;
    }
    if (arg == "--version") {
      std::cout << "edgesmith-run " << version_string() << "\n";
      return 0;
    }
  }
  try {
    return run_main(options_parse(argc, argv));
  } catch (const UsageError& e) {
    std::cerr << "error: " << e.message << "\n" << USAGE;
    return 2;
  } catch (const Error& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
}
