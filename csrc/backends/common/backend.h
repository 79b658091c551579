// The C++ side of a backend plugin: the small class a plugin author writes, and the adapter that
// turns it into the C table of runtime/plugin_api.h (the only thing the runtime sees).
//
// A plugin implements Backend and an open function, and ends with
//   EDGESMITH_BACKEND_DEFINE(open_fn, "format-a,format-b")
// which defines edgesmith_plugin_base(). Inside the plugin the adapter rebuilds a Manifest from the
// C open arguments (the fields the C table carries: name, payload, inputs, outputs, backend options,
// threads), so a plugin reads `args.manifest` as before; the Manifest, the Tensors and every other
// C++ object live on the plugin's side only (it links its own static copy of the core), and no
// exception leaves the plugin.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "artifact/manifest.h"
#include "runtime/plugin_api.h"
#include "runtime/tensor.h"

namespace edgesmith {

/// Outcome of a backend call (the values of EdgesmithStatusCode).
enum BackendStatusCode : int32_t {
  BACKEND_STATUS_OK = EDGESMITH_STATUS_CODE_OK,
  BACKEND_STATUS_LOAD_FAILED = EDGESMITH_STATUS_CODE_LOAD_FAILED,  ///< the payload could not be loaded
  BACKEND_STATUS_RUN_FAILED = EDGESMITH_STATUS_CODE_RUN_FAILED,    ///< inference failed
  BACKEND_STATUS_INVALID = EDGESMITH_STATUS_CODE_INVALID,          ///< handed something it cannot run
};

/// A status plus a one-sentence message (empty when ok).
struct BackendStatus {
  BackendStatusCode code = BACKEND_STATUS_OK;
  std::string message;

  /// True when the call succeeded.
  bool ok() const noexcept { return code == BACKEND_STATUS_OK; }
};

/// What a backend is opened with (rebuilt inside the plugin from EdgesmithOpenArgs).
struct BackendOpenArgs {
  std::string artifact_dir;   ///< verified artifact directory (absolute)
  Manifest manifest;          ///< name, payload, inputs, outputs, backend options; target_threads = threads
  std::string manifest_json;  ///< the whole verified manifest.json, for fields `manifest` lacks
  int32_t threads = 0;        ///< worker threads for the engine; 0 = the engine's default
  int32_t max_concurrency = 0;  ///< concurrent run callers to prepare for; 0 = as needed
};

/// A preallocated output: the runtime's buffer, with the manifest's dtype and static shape.
struct TensorSpan {
  void* data = nullptr;
  size_t byte_size = 0;
  DType dtype = DTYPE_FLOAT32;
  std::vector<int64_t> shape;
};

/// One loaded model. The run methods must be safe to call from many threads at once.
class Backend {
 public:
  virtual ~Backend() = default;

  /// Run one inference: inputs in manifest order (already checked against the manifest),
  /// outputs appended to `outputs` in manifest order.
  virtual BackendStatus backend_run(const std::vector<TensorView>& inputs,
                                    std::vector<Tensor>* outputs) noexcept = 0;

  /// Run one inference writing into `outputs`, the runtime's preallocated buffers (what the C
  /// table calls). The default runs backend_run() and copies its outputs in, after checking their
  /// dtypes and shapes; a backend whose engine can write into caller memory overrides it (no copy).
  virtual BackendStatus backend_run_into(const std::vector<TensorView>& inputs,
                                         const std::vector<TensorSpan>& outputs) noexcept;

  /// Engine name and version, e.g. "openvino 2026.4.1".
  virtual std::string backend_describe() const = 0;
};

/// A plugin's open function: on success returns a Backend (the adapter owns it) and leaves
/// `status` ok; on failure returns nullptr and fills `status`. May throw (the adapter catches).
using BackendOpenFn = Backend* (*)(const BackendOpenArgs& args, BackendStatus* status);

namespace backends {

/// The base of a plugin whose backends `open` makes and which runs `formats` (comma-separated,
/// static): what EDGESMITH_BACKEND_DEFINE's edgesmith_plugin_base() returns. One per plugin.
const EdgesmithPluginBase* plugin_base_make(BackendOpenFn open, const char* formats) noexcept;

}  // namespace backends
}  // namespace edgesmith

/// Defines edgesmith_plugin_base(), the plugin's one exported symbol, over
/// `open_fn(const BackendOpenArgs&, BackendStatus*)`; `formats` lists the payload formats it runs,
/// comma-separated (e.g. "onnxruntime-ort,onnx"). Use it once per plugin.
#define EDGESMITH_BACKEND_DEFINE(open_fn, formats)                                       \
  extern "C" EDGESMITH_PLUGIN_EXPORT const EdgesmithPluginBase* edgesmith_plugin_base(void) { \
    return edgesmith::backends::plugin_base_make(open_fn, formats);                    \
  }
