// The backend interface of the device runtime, and the ABI of backend plugins.
//
// Each backend (TVM, OpenVINO) is a shared library `libedgesmith_backend_<name>.so` that the
// runtime dlopen()s when an artifact needs it, so a device without OpenVINO can still run TVM
// artifacts, and a missing backend or backend library is reported by name instead of failing the
// whole runtime at load time. No exception crosses the plugin boundary: every entry point returns
// a BackendStatus (the plugin links its own static copy of the core).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "artifact/manifest.h"
#include "runtime/tensor.h"

namespace edgesmith {

/// Outcome of a backend call.
enum BackendStatusCode : int32_t {
  BACKEND_STATUS_OK = 0,
  BACKEND_STATUS_LOAD_FAILED,   ///< the payload could not be loaded (truncated, foreign, wrong version)
  BACKEND_STATUS_RUN_FAILED,    ///< inference failed
  BACKEND_STATUS_INVALID,       ///< the backend was handed something it cannot run
};

/// A status plus a one-sentence message (empty when ok).
struct BackendStatus {
  BackendStatusCode code = BACKEND_STATUS_OK;
  std::string message;

  /// True when the call succeeded.
  bool ok() const noexcept { return code == BACKEND_STATUS_OK; }
};

/// What a backend is opened with.
struct BackendOpenArgs {
  std::string artifact_dir;  ///< verified artifact directory (absolute)
  Manifest manifest;         ///< its manifest (already verified)
  int32_t threads = 0;       ///< worker threads for the engine; 0 = the manifest target's
  int32_t max_concurrency = 0;  ///< concurrent run() callers to prepare for; 0 = as needed
};

/// One loaded model. run() must be safe to call from many threads at once.
class Backend {
 public:
  virtual ~Backend() = default;

  /// Run one inference: inputs in manifest order (already checked against the manifest),
  /// outputs appended to `outputs` in manifest order.
  virtual BackendStatus backend_run(const std::vector<TensorView>& inputs,
                                    std::vector<Tensor>* outputs) noexcept = 0;

  /// Engine name and version, e.g. "openvino 2026.4.1".
  virtual std::string backend_describe() const = 0;
};

/// Name of the factory every plugin exports with C linkage.
#define EDGESMITH_BACKEND_OPEN_SYMBOL "edgesmith_backend_open_v1"

/// Name of the function every plugin exports with C linkage that lists the payload formats it
/// runs, comma-separated (e.g. "tvm-relax-so"); the runtime opens only artifacts whose
/// payload.format is listed by the plugin their backend.name names.
#define EDGESMITH_BACKEND_FORMATS_SYMBOL "edgesmith_backend_formats_v1"

/// Signature of the formats function: a static, NUL-terminated string.
using BackendFormatsFn = const char* (*)();

/// Signature of the factory: on success returns a Backend the caller deletes and leaves
/// `status` ok; on failure returns nullptr and fills `status`.
using BackendOpenFn = Backend* (*)(const BackendOpenArgs* args, BackendStatus* status);

}  // namespace edgesmith
