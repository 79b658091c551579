#include "artifact/manifest.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <set>
#include <utility>

#include <nlohmann/json.hpp>

#include "common/contract_words.h"
#include "common/error.h"
#include "common/file.h"
#include "common/strings.h"

namespace edgesmith {

const char* const MANIFEST_FILE = "manifest.json";

namespace {

using json = nlohmann::json;

// A payload format name: ^[a-z0-9][a-z0-9.+-]*$ (the schema's pattern). Which formats exist is
// the backend registry's business, and whether this device runs one is its plugin's.
bool format_name_valid(const std::string& format) {
  const auto allowed = [](char c, bool first) {
    return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
           (!first && (c == '.' || c == '+' || c == '-'));
  };
  if (format.empty()) return false;
  for (size_t i = 0; i < format.size(); ++i) {
    if (!allowed(format[i], i == 0)) return false;
  }
  return true;
}

const std::set<std::string>& tensor_dtypes() {
  static const std::set<std::string> dtypes = {
      "bool",   "int8",   "int16",  "int32",   "int64",   "uint8",
      "uint16", "uint32", "uint64", "float16", "float32", "float64"};
  return dtypes;
}

[[noreturn]] void manifest_fail(const std::string& key, const std::string& problem) {
  throw Error(ERROR_CODE_MANIFEST,
              std::string(MANIFEST_FILE) + ": " + key + " " + problem +
                  "; the manifest does not follow the artifact schema — rebuild the artifact "
                  "with `edgesmith build`",
              MANIFEST_FILE);
}

std::string type_got(const json& value) { return std::string(", got ") + value.type_name(); }

const json& object_get(const json& object, const std::string& where, const char* key) {
  const std::string name = where.empty() ? key : where + "." + key;
  const auto it = object.find(key);
  if (it == object.end()) manifest_fail(name, "is missing");
  return *it;
}

std::string key_join(const std::string& where, const char* key) {
  return where.empty() ? std::string(key) : where + "." + key;
}

std::string key_index(const std::string& where, size_t index) {
  return where + "[" + std::to_string(index) + "]";
}

const json& object_read(const json& object, const std::string& where, const char* key) {
  const json& value = object_get(object, where, key);
  if (!value.is_object()) manifest_fail(key_join(where, key), "must be an object" + type_got(value));
  return value;
}

const json& array_read(const json& object, const std::string& where, const char* key) {
  const json& value = object_get(object, where, key);
  if (!value.is_array()) manifest_fail(key_join(where, key), "must be a list" + type_got(value));
  return value;
}

std::string string_read(const json& object, const std::string& where, const char* key) {
  const json& value = object_get(object, where, key);
  if (!value.is_string()) manifest_fail(key_join(where, key), "must be a string" + type_got(value));
  std::string text = value.get<std::string>();
  if (text.empty()) manifest_fail(key_join(where, key), "must not be empty");
  return text;
}

double tolerance_read(const json& object, const std::string& where, const char* key) {
  const json& value = object_get(object, where, key);
  if (!value.is_number()) manifest_fail(key_join(where, key), "must be a number" + type_got(value));
  const double number = value.get<double>();
  if (!std::isfinite(number) || number < 0.0) {
    manifest_fail(key_join(where, key), "must be a finite number >= 0");
  }
  return number;
}

std::vector<std::string> string_list_read(const json& object, const std::string& where,
                                        const char* key) {
  const json& list = array_read(object, where, key);
  std::vector<std::string> paths;
  for (size_t i = 0; i < list.size(); ++i) {
    const json& item = list[i];
    const std::string name = key_index(key_join(where, key), i);
    if (!item.is_string()) manifest_fail(name, "must be a string" + type_got(item));
    paths.push_back(item.get<std::string>());
  }
  return paths;
}

ManifestFile file_read_entry(const json& item, const std::string& where) {
  if (!item.is_object()) manifest_fail(where, "must be an object" + type_got(item));
  ManifestFile file;
  file.path = string_read(item, where, "path");
  const json& size = object_get(item, where, "size");
  // nlohmann stores non-negative integers as unsigned; negatives and floats are rejected here.
  if (!size.is_number_unsigned()) {
    manifest_fail(where + ".size", "must be an integer >= 0");
  }
  file.size = size.get<uint64_t>();
  file.sha256 = string_read(item, where, "sha256");
  if (!hex_is_lower(file.sha256, 64)) {
    manifest_fail(where + ".sha256",
                  "must be 64 lower-case hex characters, got " + string_quote(file.sha256));
  }
  return file;
}

ManifestTensor tensor_read(const json& item, const std::string& where) {
  if (!item.is_object()) manifest_fail(where, "must be an object" + type_got(item));
  ManifestTensor tensor;
  tensor.name = string_read(item, where, "name");
  tensor.dtype = string_read(item, where, "dtype");
  if (tensor_dtypes().count(tensor.dtype) == 0) {
    manifest_fail(where + ".dtype", "is " + string_quote(tensor.dtype) +
                                        ", not a NumPy dtype name edgesmith knows (float32, int64, ...)");
  }
  const json& shape = array_read(item, where, "shape");
  for (size_t i = 0; i < shape.size(); ++i) {
    const json& dim = shape[i];
    // is_number_unsigned excludes negatives and floats; the int64 bound keeps the value exact.
    if (!dim.is_number_unsigned() || dim.get<uint64_t>() == 0 ||
        dim.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX)) {
      manifest_fail(key_index(where + ".shape", i),
                    "must be a positive integer (edgesmith artifacts have static shapes)");
    }
    tensor.shape.push_back(static_cast<int64_t>(dim.get<uint64_t>()));
  }
  return tensor;
}

std::vector<ManifestTensor> tensors_read(const json& root, const char* key) {
  const json& list = array_read(root, "", key);
  std::vector<ManifestTensor> tensors;
  for (size_t i = 0; i < list.size(); ++i) tensors.push_back(tensor_read(list[i], key_index(key, i)));
  return tensors;
}

int64_t schema_version_read(const json& root) {
  const json& value = object_get(root, "", "schema_version");
  if (!value.is_number_integer()) {
    manifest_fail("schema_version", "must be an integer" + type_got(value));
  }
  if (value.is_number_unsigned() ? value.get<uint64_t>() != MANIFEST_SCHEMA_VERSION
                                 : value.get<int64_t>() != MANIFEST_SCHEMA_VERSION) {
    throw Error(ERROR_CODE_MANIFEST,
                std::string(MANIFEST_FILE) + ": schema_version is " + value.dump() +
                    ", this edgesmith reads version " + std::to_string(MANIFEST_SCHEMA_VERSION) +
                    "; install the edgesmith version that built the artifact, or rebuild it",
                MANIFEST_FILE);
  }
  return MANIFEST_SCHEMA_VERSION;
}

// Cross-field rules: every file the runtime will open must be covered by `files`.
void manifest_check_consistency(const Manifest& manifest) {
  std::set<std::string> listed;
  for (size_t i = 0; i < manifest.files.size(); ++i) {
    const std::string& path = manifest.files[i].path;
    if (path == MANIFEST_FILE || path == "manifest.sig") {
      manifest_fail(key_index("files", i) + ".path", "must not list " + path + " itself");
    }
    if (!listed.insert(path).second) {
      manifest_fail(key_index("files", i) + ".path", "repeats " + string_quote(path));
    }
  }
  if (listed.count(manifest.payload.entry) == 0) {
    manifest_fail("payload.entry", "is " + string_quote(manifest.payload.entry) +
                                       ", which is not listed in files");
  }
  for (size_t s = 0; s < manifest.golden.samples.size(); ++s) {
    const ManifestGoldenSample& sample = manifest.golden.samples[s];
    const std::string where = key_index("golden.samples", s);
    const std::pair<std::string, const std::vector<std::string>*> lists[] = {
        {where + ".inputs", &sample.inputs}, {where + ".outputs", &sample.outputs}};
    for (const auto& [key, paths] : lists) {
      for (size_t i = 0; i < paths->size(); ++i) {
        if (listed.count((*paths)[i]) == 0) {
          manifest_fail(key_index(key, i), "is " + string_quote((*paths)[i]) +
                                               ", which is not listed in files");
        }
      }
    }
    if (sample.inputs.size() != manifest.inputs.size()) {
      manifest_fail(where + ".inputs", "has " + std::to_string(sample.inputs.size()) +
                                           " files for " + std::to_string(manifest.inputs.size()) +
                                           " inputs");
    }
    if (sample.outputs.size() != manifest.outputs.size()) {
      manifest_fail(where + ".outputs", "has " + std::to_string(sample.outputs.size()) +
                                            " files for " +
                                            std::to_string(manifest.outputs.size()) + " outputs");
    }
  }
  for (size_t i = 0; i < manifest.monitoring.outputs.size(); ++i) {
    const std::string& name = manifest.monitoring.outputs[i].name;
    const bool known = std::any_of(manifest.outputs.begin(), manifest.outputs.end(),
                                   [&](const ManifestTensor& t) { return t.name == name; });
    if (!known) {
      manifest_fail(key_index("monitoring.outputs", i) + ".name",
                    "is " + string_quote(name) + ", which is not one of the model's outputs");
    }
  }
}

ManifestGolden golden_read(const json& root) {
  const json& golden = object_read(root, "", "golden");
  ManifestGolden out;
  const json& samples = array_read(golden, "golden", "samples");
  if (samples.empty()) manifest_fail("golden.samples", "must hold at least one sample");
  for (size_t i = 0; i < samples.size(); ++i) {
    const std::string where = key_index("golden.samples", i);
    if (!samples[i].is_object()) manifest_fail(where, "must be an object" + type_got(samples[i]));
    ManifestGoldenSample sample;
    sample.inputs = string_list_read(samples[i], where, "inputs");
    sample.outputs = string_list_read(samples[i], where, "outputs");
    out.samples.push_back(std::move(sample));
  }
  out.atol = tolerance_read(golden, "golden", "atol");
  out.rtol = tolerance_read(golden, "golden", "rtol");
  return out;
}

// An optional positive number; `fallback` when the key is absent (the Python schema's default).
double positive_read(const json& object, const std::string& where, const char* key,
                     double fallback) {
  const auto it = object.find(key);
  if (it == object.end()) return fallback;
  if (!it->is_number() || !std::isfinite(it->get<double>()) || it->get<double>() <= 0.0) {
    manifest_fail(key_join(where, key), "must be a finite number > 0");
  }
  return it->get<double>();
}

ManifestOutputMonitor output_monitor_read(const json& item, const std::string& where) {
  if (!item.is_object()) manifest_fail(where, "must be an object" + type_got(item));
  ManifestOutputMonitor monitor;
  monitor.name = string_read(item, where, "name");
  const std::string kind = string_read(item, where, "kind");
  if (kind == "classes") {
    monitor.kind = MONITOR_KIND_CLASSES;
    const json& classes = object_get(item, where, "classes");
    if (!classes.is_number_unsigned() || classes.get<uint64_t>() == 0 ||
        classes.get<uint64_t>() > contract::MAX_CLASSES) {
      manifest_fail(where + ".classes", "must be an integer between 1 and " + std::to_string(contract::MAX_CLASSES));
    }
    monitor.classes = static_cast<int64_t>(classes.get<uint64_t>());
  } else if (kind == "histogram") {
    monitor.kind = MONITOR_KIND_HISTOGRAM;
    const json& edges = array_read(item, where, "edges");
    if (edges.size() < 2 || edges.size() > contract::MAX_EDGES) {
      manifest_fail(where + ".edges", "must hold between 2 and " + std::to_string(contract::MAX_EDGES) + " bin edges");
    }
    for (size_t i = 0; i < edges.size(); ++i) {
      if (!edges[i].is_number() || !std::isfinite(edges[i].get<double>())) {
        manifest_fail(key_index(where + ".edges", i), "must be a finite number");
      }
      const double edge = edges[i].get<double>();
      if (i > 0 && !(edge > monitor.edges.back())) {
        manifest_fail(key_index(where + ".edges", i), "must be larger than the edge before it");
      }
      monitor.edges.push_back(edge);
    }
  } else {
    manifest_fail(where + ".kind", "is " + string_quote(kind) + ", expected classes or histogram");
  }
  return monitor;
}

ManifestMonitoring monitoring_read(const json& root) {
  const json& monitoring = object_read(root, "", "monitoring");
  ManifestMonitoring out;
  const json& outputs = array_read(monitoring, "monitoring", "outputs");
  for (size_t i = 0; i < outputs.size(); ++i) {
    out.outputs.push_back(output_monitor_read(outputs[i], key_index("monitoring.outputs", i)));
  }
  const auto latency = monitoring.find("latency");
  if (latency == monitoring.end()) return out;
  if (!latency->is_object()) {
    manifest_fail("monitoring.latency", "must be an object" + type_got(*latency));
  }
  out.latency.start_us = positive_read(*latency, "monitoring.latency", "start_us", out.latency.start_us);
  out.latency.factor = positive_read(*latency, "monitoring.latency", "factor", out.latency.factor);
  if (out.latency.factor <= 1.0) manifest_fail("monitoring.latency.factor", "must be > 1");
  const auto count = latency->find("count");
  if (count != latency->end()) {
    if (!count->is_number_unsigned() || count->get<uint64_t>() == 0 ||
        count->get<uint64_t>() > 4096) {
      manifest_fail("monitoring.latency.count", "must be an integer between 1 and 4096");
    }
    out.latency.count = static_cast<int64_t>(count->get<uint64_t>());
  }
  return out;
}

Manifest manifest_from_json(const json& root) {
  Manifest manifest;
  manifest.schema_version = schema_version_read(root);
  manifest.name = string_read(root, "", "name");

  const json& payload = object_read(root, "", "payload");
  manifest.payload.format = string_read(payload, "payload", "format");
  if (!format_name_valid(manifest.payload.format)) {
    manifest_fail("payload.format", "is " + string_quote(manifest.payload.format) +
                                        ", expected a format name of lower-case letters, digits "
                                        "and . + - (e.g. openvino-ir)");
  }
  manifest.payload.entry = string_read(payload, "payload", "entry");

  const json& files = array_read(root, "", "files");
  for (size_t i = 0; i < files.size(); ++i) {
    manifest.files.push_back(file_read_entry(files[i], key_index("files", i)));
  }

  manifest.inputs = tensors_read(root, "inputs");
  manifest.outputs = tensors_read(root, "outputs");

  manifest.golden = golden_read(root);
  manifest.monitoring = monitoring_read(root);

  const json& target = object_read(root, "", "target");
  manifest.target_name = string_read(target, "target", "name");
  manifest.target_isa = string_read(target, "target", "isa");
  // Absent or null: the target leaves the thread count to the device.
  const auto threads = target.find("threads");
  if (threads != target.end() && !threads->is_null()) {
    if (!threads->is_number_unsigned() || threads->get<uint64_t>() == 0 ||
        threads->get<uint64_t>() > 1024) {
      manifest_fail("target.threads", "must be an integer between 1 and 1024");
    }
    manifest.target_threads = static_cast<int32_t>(threads->get<uint64_t>());
  }
  if (target.find("cpu_features") != target.end()) {
    manifest.target_cpu_features = string_list_read(target, "target", "cpu_features");
    for (size_t i = 0; i < manifest.target_cpu_features.size(); ++i) {
      if (manifest.target_cpu_features[i].empty()) {
        manifest_fail(key_index("target.cpu_features", i), "must not be empty");
      }
    }
  }

  const json& backend = object_read(root, "", "backend");
  manifest.backend_name = string_read(backend, "backend", "name");
  const auto options = backend.find("options");
  if (options != backend.end()) {
    if (!options->is_object()) {
      manifest_fail("backend.options", "must be an object" + type_got(*options));
    }
    manifest.backend_options_json = options->dump();
  }

  manifest_check_consistency(manifest);
  return manifest;
}

}  // namespace

Manifest manifest_parse(const std::string& text) {
  json root;
  try {
    root = json::parse(text);
  } catch (const json::parse_error& e) {
    // e.what() quotes the offending raw bytes, which need not be UTF-8: report the offset only.
    throw Error(ERROR_CODE_MANIFEST,
                std::string(MANIFEST_FILE) + " is not valid JSON (syntax error at byte " +
                    std::to_string(e.byte) + "); rebuild or re-download the artifact",
                MANIFEST_FILE);
  }
  if (!root.is_object()) {
    throw Error(ERROR_CODE_MANIFEST,
                std::string(MANIFEST_FILE) + " must hold a JSON object" + type_got(root) +
                    "; rebuild or re-download the artifact",
                MANIFEST_FILE);
  }

  try {
    return manifest_from_json(root);
  } catch (const json::exception& e) {
    // The readers above check every type before converting, so this is a reader bug; still
    // report it as a bad manifest rather than crash the device.
    throw Error(ERROR_CODE_MANIFEST,
                std::string(MANIFEST_FILE) + " could not be read (" + string_quote(e.what()) +
                    "); rebuild the artifact with `edgesmith build`",
                MANIFEST_FILE);
  }
}

Manifest manifest_read(const std::string& path) {
  std::error_code ec;
  const bool is_dir = std::filesystem::is_directory(path, ec);
  const std::string file = is_dir ? (std::filesystem::path(path) / MANIFEST_FILE).string() : path;
  return manifest_parse(file_read(file, MANIFEST_MAX_BYTES, ERROR_CODE_IO, ""));
}

}  // namespace edgesmith
