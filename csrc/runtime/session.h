// A Session: one verified artifact loaded into its backend, ready to run from many threads.
//
// session_open() is the device's whole load path, in this order, so nothing untrusted or foreign
// reaches dlopen(): verify the artifact (integrity rules 1-8) -> check the format is runnable
// here -> check the ISA (the manifest's target, and the ELF header of a tvm-relax-so payload)
// -> load the backend plugin named by `backend.name` -> open the payload.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "artifact/manifest.h"
#include "runtime/plugin.h"
#include "runtime/stats.h"
#include "runtime/tensor.h"

namespace edgesmith {

/// How a session is opened.
struct SessionOptions {
  int32_t threads = 0;          ///< engine worker threads; 0 = the manifest target's `threads`
  int32_t max_concurrency = 0;  ///< concurrent session_run() callers to prepare for; 0 = as needed
  /// Test seam: called after verification, before anything is loaded (to change the artifact there).
  std::function<void()> on_verified;
};

/// The outcome of one golden sample in session_self_test().
struct GoldenSampleResult {
  uint32_t index = 0;        ///< position in golden.samples
  bool passed = false;       ///< every output element within atol + rtol * |expected|
  double max_abs_err = 0.0;  ///< largest |y - expected| over the sample's outputs
  std::string message;       ///< why it failed (empty when it passed)
};

/// The outcome of session_self_test().
struct SelfTestResult {
  bool passed = false;       ///< every sample passed
  uint32_t samples = 0;      ///< number of golden samples run
  double max_abs_err = 0.0;  ///< over all samples and outputs
  double atol = 0.0;         ///< tolerance applied (from the manifest)
  double rtol = 0.0;
  std::vector<GoldenSampleResult> details;  ///< one per sample
};

/// A loaded artifact. All methods are safe to call from many threads at once.
class Session {
 public:
  /// Use session_open().
  Session(std::string artifact_dir, std::string key_id, Manifest manifest,
          std::string manifest_json, std::unique_ptr<PluginBackend> backend, std::string load_dir = "");
  /// Close the backend, then remove the private copy it was loaded from.
  ~Session();
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  /// The verified manifest.
  const Manifest& session_manifest() const noexcept { return manifest_; }

  /// The exact signed bytes of manifest.json (every key, not only the ones the core reads).
  const std::string& session_manifest_json() const noexcept { return manifest_json_; }

  /// Absolute path of the artifact directory.
  const std::string& session_artifact_dir() const noexcept { return artifact_dir_; }

  /// The private directory holding the verified copy the backend loaded; read the artifact's files
  /// (golden samples) from here, never from session_artifact_dir().
  const std::string& session_load_dir() const noexcept { return load_dir_; }

  /// Id of the trusted key that signed the artifact.
  const std::string& session_key_id() const noexcept { return key_id_; }

  /// Engine name and version, e.g. "openvino 2026.4.1".
  std::string session_describe() const;

  /// Run one inference. `inputs` are in manifest order and must match the manifest's dtypes and
  /// shapes exactly (Error(ERROR_CODE_INPUT) naming the input otherwise). NaNs in float inputs
  /// are counted, not refused. Backend failures are Error(ERROR_CODE_BACKEND). Outputs are in
  /// manifest order. Every call, failed or not, is recorded in the statistics.
  std::vector<Tensor> session_run(const std::vector<TensorView>& inputs);

  /// A snapshot of the statistics of session_run() calls so far.
  StatsSnapshot session_stats() const { return stats_.stats_snapshot(); }

  /// Run every golden sample and compare with its expected outputs using the manifest's
  /// tolerance. Not recorded in the statistics. Throws if a golden file cannot be read.
  SelfTestResult session_self_test();

 private:
  std::vector<Tensor> run_checked(const std::vector<TensorView>& inputs, double* latency_us,
                                  uint64_t* nan_values);

  std::string artifact_dir_;
  std::string load_dir_;  // removed in ~Session, after backend_ is closed
  std::string key_id_;
  Manifest manifest_;
  std::string manifest_json_;
  std::vector<DType> input_dtypes_;
  std::unique_ptr<PluginBackend> backend_;
  Stats stats_;
};

/// Verify the artifact directory `artifact_dir` against `trusted_public_keys` (32-byte Ed25519
/// keys), check it can run on this machine, load its backend plugin and open the payload.
/// Throws Error: ERROR_CODE_INTEGRITY / MANIFEST / IO from verification, ERROR_CODE_UNSUPPORTED
/// for another ISA or a format this runtime does not run, ERROR_CODE_BACKEND when the plugin or
/// the engine fails to load the payload.
std::unique_ptr<Session> session_open(const std::string& artifact_dir,
                                      const std::vector<std::vector<uint8_t>>& trusted_public_keys,
                                      const SessionOptions& options = {});

/// "(1, 4)", the way NumPy prints a shape.
std::string shape_format(const std::vector<int64_t>& shape);

}  // namespace edgesmith
