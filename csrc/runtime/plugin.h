// Finding and loading backend plugins (libedgesmith_backend_<name>.so) with dlopen.
//
// Search order: each directory of $EDGESMITH_BACKEND_PATH (colon-separated), then `backends/`
// next to the binary or module that contains this loader (found with dladdr: the edgesmith-run
// executable, or the Python extension), then `<executable dir>/../lib/edgesmith/backends`.
// A plugin is loaded once per process and never unloaded (tensors it allocated may outlive any
// session), and the cache is safe to use from many threads.
#pragma once

#include <string>
#include <vector>

#include "runtime/backend.h"

namespace edgesmith {

/// Environment variable holding extra plugin directories, searched first.
extern const char* const BACKEND_PATH_ENV;

/// File name of backend `name`'s plugin: "libedgesmith_backend_<name>.so".
std::string plugin_file_name(const std::string& name);

/// The directories searched for plugins, in order (existing or not).
std::vector<std::string> plugin_search_dirs();

/// A loaded backend plugin.
struct BackendPlugin {
  std::string path;                  ///< the plugin file
  BackendOpenFn open = nullptr;      ///< its factory
  std::vector<std::string> formats;  ///< the payload formats it runs (its own declaration)
};

/// Backend `name`'s plugin, dlopen()ed on first use (the reference stays valid for the process's
/// life). Throws Error(ERROR_CODE_BACKEND) naming the backend: not built ("searched: ..."), not
/// loadable (with dlerror(), e.g. a missing engine library) or not exporting the factory and its
/// formats.
const BackendPlugin& plugin_load(const std::string& name);

}  // namespace edgesmith
