// Finding and loading backend plugins (libedgesmith_backend_<name>.so) with dlopen, and the C++
// face of their C table (runtime/plugin_api.h) that Session uses.
//
// Search order: the configured directories (plugin_search_configure: the agent's --backend-path),
// then each directory of $EDGESMITH_BACKEND_PATH (colon-separated, absolute; unless configured
// off, as the agent does), then `backends/` next to the binary or module that contains this loader
// (found with dladdr: the edgesmith-run executable, or the Python extension), then
// `<executable dir>/../lib/edgesmith/backends`. A plugin is only loaded from a directory that is
// owned by the user or root and that neither group nor others can write (nor the file itself).
// A plugin is loaded once per process and never unloaded (a backend may outlive any session),
// and the cache is safe to use from many threads. A plugin built for another plugin ABI version
// than EDGESMITH_PLUGIN_API_VERSION is refused with one sentence naming both versions.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "artifact/manifest.h"
#include "runtime/plugin_api.h"
#include "runtime/tensor.h"

namespace edgesmith {

/// Environment variable holding extra plugin directories, searched first.
extern const char* const BACKEND_PATH_ENV;

/// File name of backend `name`'s plugin: "libedgesmith_backend_<name>.so".
std::string plugin_file_name(const std::string& name);

/// Where plugin_load() looks besides the built-in directories.
struct PluginSearchPolicy {
  bool use_env = true;            ///< honour $EDGESMITH_BACKEND_PATH (the agent: only when asked)
  std::vector<std::string> dirs;  ///< absolute directories searched first
};

/// Replace the process's search policy (call before the first plugin_load()). Throws
/// Error(ERROR_CODE_INVALID_ARGUMENT) for a relative directory.
void plugin_search_configure(const PluginSearchPolicy& policy);

/// The directories searched for plugins, in order (existing or not). Throws
/// Error(ERROR_CODE_BACKEND) for a relative $EDGESMITH_BACKEND_PATH entry.
std::vector<std::string> plugin_search_dirs();

/// A loaded backend plugin.
struct BackendPlugin {
  std::string name;                       ///< the backend's name
  std::string path;                       ///< the plugin file
  const EdgesmithPluginApi* api = nullptr;  ///< its table of EDGESMITH_PLUGIN_API_VERSION
  std::vector<std::string> formats;       ///< the payload formats it runs (its own declaration)
};

/// Backend `name`'s plugin, dlopen()ed on first use (the reference stays valid for the process's
/// life). Throws Error(ERROR_CODE_BACKEND) naming the backend: not built ("searched: ..."), in a
/// directory others can write (path_trust_problem), not loadable (with dlerror(), e.g. a missing
/// engine library), or speaking another plugin ABI.
const BackendPlugin& plugin_load(const std::string& name);

/// The plugin file `path` as backend `name`, dlopen()ed now and never unloaded (not cached: for
/// tools that name a plugin file). Throws like plugin_load().
BackendPlugin plugin_load_file(const std::string& name, const std::string& path);

/// The outcome of a plugin call: an EdgesmithStatusCode and the plugin's one-sentence message.
struct PluginStatus {
  int32_t code = EDGESMITH_STATUS_CODE_OK;
  std::string message;

  /// True when the call succeeded.
  bool ok() const noexcept { return code == EDGESMITH_STATUS_CODE_OK; }
};

/// What a plugin opens: a verified artifact.
struct PluginOpenArgs {
  std::string artifact_dir;     ///< absolute path of the artifact directory
  Manifest manifest;            ///< its verified manifest
  std::string manifest_json;    ///< the exact bytes of its manifest.json
  int32_t threads = 0;          ///< engine worker threads; 0 = the engine's default
  int32_t max_concurrency = 0;  ///< concurrent backend_run() callers to prepare for; 0 = as needed
};

/// One payload opened by a plugin, closed on destruction. backend_run() is safe to call from
/// many threads at once.
class PluginBackend {
 public:
  /// Use plugin_backend_open().
  PluginBackend(const EdgesmithPluginApi* api, EdgesmithBackend* handle,
                std::vector<ManifestTensor> outputs, std::vector<DType> output_dtypes);
  /// Close the backend with the plugin's backend_close.
  ~PluginBackend();
  PluginBackend(const PluginBackend&) = delete;
  PluginBackend& operator=(const PluginBackend&) = delete;

  /// Run one inference: `inputs` in manifest order (checked by the caller); `outputs` gets one
  /// tensor per manifest output, allocated here with its dtype and static shape and filled by the
  /// plugin in place.
  PluginStatus backend_run(const std::vector<TensorView>& inputs, std::vector<Tensor>* outputs) const;

  /// Engine name and version, e.g. "openvino 2026.4.1".
  std::string backend_describe() const;

 private:
  const EdgesmithPluginApi* api_;
  EdgesmithBackend* handle_;
  std::vector<ManifestTensor> outputs_;
  std::vector<DType> output_dtypes_;
};

/// Open `args`' payload with `plugin`: on success stores the backend in `backend` and returns an
/// ok status, otherwise returns the plugin's status (its code and message). Never throws for the
/// plugin's failures (only std::bad_alloc).
PluginStatus plugin_backend_open(const BackendPlugin& plugin, const PluginOpenArgs& args,
                                 std::unique_ptr<PluginBackend>* backend);

}  // namespace edgesmith
