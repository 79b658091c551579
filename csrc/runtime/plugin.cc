#include "runtime/plugin.h"

#include <dlfcn.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <mutex>
#include <system_error>

#include "common/error.h"
#include "common/strings.h"

namespace edgesmith {

namespace fs = std::filesystem;

const char* const BACKEND_PATH_ENV = "EDGESMITH_BACKEND_PATH";

namespace {

bool name_is_valid(const std::string& name) {
  if (name.empty() || name.size() > 64) return false;
  for (const char c : name) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '-';
    if (!ok) return false;
  }
  return true;
}

std::string executable_dir() {
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  return ec ? std::string() : exe.parent_path().string();
}

// The directory of the binary or shared module this function was linked into.
std::string loader_dir() {
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&loader_dir), &info) == 0 || info.dli_fname == nullptr ||
      info.dli_fname[0] == '\0') {
    return executable_dir();
  }
  std::error_code ec;
  const fs::path path = fs::canonical(info.dli_fname, ec);
  return ec ? executable_dir() : path.parent_path().string();
}

std::mutex& cache_mutex() {
  static std::mutex mutex;
  return mutex;
}

// Entries are never erased, so references handed out stay valid.
std::map<std::string, BackendPlugin>& cache() {
  static std::map<std::string, BackendPlugin> loaded;
  return loaded;
}

std::vector<std::string> formats_split(const char* text) {
  std::vector<std::string> formats;
  const std::string list = text == nullptr ? "" : text;
  size_t start = 0;
  while (start < list.size()) {
    const size_t end = std::min(list.find(',', start), list.size());
    if (end > start) formats.push_back(list.substr(start, end - start));
    start = end + 1;
  }
  return formats;
}

BackendPlugin plugin_open(const std::string& name) {
  const std::string file = plugin_file_name(name);
  const std::vector<std::string> dirs = plugin_search_dirs();
  for (const std::string& dir : dirs) {
    const fs::path candidate = fs::path(dir) / file;
    std::error_code ec;
    if (!fs::is_regular_file(candidate, ec)) continue;
    dlerror();
    void* handle = dlopen(candidate.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (handle == nullptr) {
      const char* reason = dlerror();
      throw Error(ERROR_CODE_BACKEND,
                  "backend '" + name + "' is not available: " +
                      string_quote(reason ? reason : "dlopen failed", 400) +
                      "; install the libraries it names on the device (the plugin needs its "
                      "engine's runtime), or build the artifact with another backend");
    }
    // Keep the handle even on failure: unloading a library whose constructors ran is not worth
    // the risk.
    dlerror();
    void* open = dlsym(handle, EDGESMITH_BACKEND_OPEN_SYMBOL);
    void* formats = dlsym(handle, EDGESMITH_BACKEND_FORMATS_SYMBOL);
    if (open == nullptr || formats == nullptr) {
      throw Error(ERROR_CODE_BACKEND,
                  "backend '" + name + "' plugin " + string_quote(candidate.string(), 200) +
                      " does not export " + EDGESMITH_BACKEND_OPEN_SYMBOL + " and " +
                      EDGESMITH_BACKEND_FORMATS_SYMBOL +
                      "; it was built for another edgesmith version — reinstall edgesmith");
    }
    BackendPlugin plugin;
    plugin.path = candidate.string();
    plugin.open = reinterpret_cast<BackendOpenFn>(open);
    plugin.formats = formats_split(reinterpret_cast<BackendFormatsFn>(formats)());
    return plugin;
  }
  std::string searched;
  for (const std::string& dir : dirs) searched += (searched.empty() ? "" : ", ") + dir;
  throw Error(ERROR_CODE_BACKEND,
              "backend '" + name + "' is not built into this runtime (searched: " + searched +
                  "); build edgesmith with that backend or set " + BACKEND_PATH_ENV +
                  " to the directory holding " + file);
}

}  // namespace

std::string plugin_file_name(const std::string& name) {
  return "libedgesmith_backend_" + name + ".so";
}

std::vector<std::string> plugin_search_dirs() {
  std::vector<std::string> dirs;
  if (const char* env = std::getenv(BACKEND_PATH_ENV)) {
    std::string list = env;
    size_t start = 0;
    while (start <= list.size()) {
      const size_t end = std::min(list.find(':', start), list.size());
      if (end > start) dirs.push_back(list.substr(start, end - start));
      start = end + 1;
    }
  }
  const std::string here = loader_dir();
  if (!here.empty()) dirs.push_back((fs::path(here) / "backends").string());
  const std::string exe = executable_dir();
  if (!exe.empty()) {
    dirs.push_back((fs::path(exe).parent_path() / "lib" / "edgesmith" / "backends").string());
#ifdef EDGESMITH_PACKAGE_BACKENDS
    // A Python build: commands installed into a virtualenv's bin/ (edgesmith-run, edgesmith-agent)
    // find the plugins in the Python package, relative to bin/.
    dirs.push_back((fs::path(exe) / EDGESMITH_PACKAGE_BACKENDS).lexically_normal().string());
#endif
  }
  return dirs;
}

const BackendPlugin& plugin_load(const std::string& name) {
  if (!name_is_valid(name)) {
    throw Error(ERROR_CODE_BACKEND, "backend name " + string_quote(name) +
                                        " is not a plugin name (lower-case letters, digits, _ -)");
  }
  const std::lock_guard<std::mutex> lock(cache_mutex());
  const auto it = cache().find(name);
  if (it != cache().end()) return it->second;
  return cache().emplace(name, plugin_open(name)).first->second;
}

}  // namespace edgesmith
