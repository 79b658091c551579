// Reader of an artifact's manifest.json (schema_version 1, docs/artifact.md).
//
// Only the fields the device needs are read into the struct; the rest (model, validation, build)
// is left to the Python schema (edgesmith.runtime.manifest, exported as docs/manifest.schema.json).
// For every field read here, this reader rejects whatever that schema rejects
// (tests/test_manifest_schema.py); unknown keys are ignored, for forward compatibility. Validation errors are Error(ERROR_CODE_MANIFEST, ...,
// "manifest.json") whose message names the offending key, e.g. `files[2].sha256`.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace edgesmith {

/// The manifest schema version this reader understands.
constexpr int64_t MANIFEST_SCHEMA_VERSION = 1;

/// Largest manifest.json accepted (a real one is a few kB).
constexpr uint64_t MANIFEST_MAX_BYTES = 16u << 20;

/// File name of the manifest inside an artifact directory.
extern const char* const MANIFEST_FILE;

/// One entry of `files`: an artifact-relative path, its size and its SHA-256 (lower-case hex).
struct ManifestFile {
  std::string path;
  uint64_t size = 0;
  std::string sha256;
};

/// One entry of `inputs` / `outputs`: a tensor name, its NumPy dtype name and static shape.
struct ManifestTensor {
  std::string name;
  std::string dtype;
  std::vector<int64_t> shape;
};

/// `payload`: the payload's format and the file a runtime opens.
struct ManifestPayload {
  std::string format;  ///< a format name matching ^[a-z0-9][a-z0-9.+-]*$; the plugin decides if it runs it
  std::string entry;   ///< a path listed in `files`
};

/// One golden sample: .npy files in the order of the manifest's inputs / outputs.
struct ManifestGoldenSample {
  std::vector<std::string> inputs;
  std::vector<std::string> outputs;
};

/// `golden`: samples for the on-device self-test and proof, and the tolerance to apply
/// (|y - expected| <= atol + rtol * |expected|).
struct ManifestGolden {
  std::vector<ManifestGoldenSample> samples;
  double atol = 0.0;
  double rtol = 0.0;
};

/// How one output is summarised for drift monitoring (`monitoring.outputs[i]`).
enum MonitorKind : int32_t {
  MONITOR_KIND_CLASSES = 0,    ///< arg-max over the last axis, one counter per class
  MONITOR_KIND_HISTOGRAM = 1,  ///< counts per bin between `edges`, plus under/overflow
};

/// One entry of `monitoring.outputs`.
struct ManifestOutputMonitor {
  std::string name;                     ///< an output's name
  MonitorKind kind = MONITOR_KIND_CLASSES;
  int64_t classes = 0;                  ///< MONITOR_KIND_CLASSES: number of classes
  std::vector<double> edges;            ///< MONITOR_KIND_HISTOGRAM: strictly ascending bin edges
};

/// `monitoring.latency`: bucket k counts runs in [start_us * factor^k, start_us * factor^(k+1)).
struct ManifestLatencyBuckets {
  double start_us = 1.0;
  double factor = 1.189207115002721;  // 2 ** 0.25, the Python schema's default
  int64_t count = 96;
};

/// `monitoring`: how the runtime summarises traffic so a monitor can compute drift.
struct ManifestMonitoring {
  std::vector<ManifestOutputMonitor> outputs;
  ManifestLatencyBuckets latency;
};

/// The device's view of manifest.json.
struct Manifest {
  int64_t schema_version = 0;
  std::string name;
  ManifestPayload payload;
  std::vector<ManifestFile> files;
  std::vector<ManifestTensor> inputs;
  std::vector<ManifestTensor> outputs;
  ManifestGolden golden;
  ManifestMonitoring monitoring;
  std::string target_name;   ///< manifest["target"]["name"]
  std::string target_isa;    ///< manifest["target"]["isa"]
  int32_t target_threads = 0;  ///< manifest["target"]["threads"], 0 when absent or null (left open)
  std::vector<std::string> target_cpu_features;  ///< manifest["target"]["cpu_features"] (may be empty)
  std::string backend_name;  ///< manifest["backend"]["name"]
  std::string backend_options_json = "{}";  ///< manifest["backend"]["options"] as JSON text (plugins parse it)
};

/// Parse and validate manifest.json text; throws Error(ERROR_CODE_MANIFEST) naming the bad key.
Manifest manifest_parse(const std::string& text);

/// Read and parse `path`: an artifact directory or a manifest.json file. A missing or unreadable
/// file throws Error(ERROR_CODE_IO); a bad manifest Error(ERROR_CODE_MANIFEST).
Manifest manifest_read(const std::string& path);

}  // namespace edgesmith
