#include "runtime/plugin.h"

#include <dlfcn.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <system_error>
#include <utility>

#include "common/error.h"
#include "common/file.h"
#include "common/strings.h"
#include "runtime/plugin_api.h"

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

std::mutex& policy_mutex() {
  static std::mutex mutex;
  return mutex;
}

PluginSearchPolicy& policy() {
  static PluginSearchPolicy configured;
  return configured;
}

// A plugin runs as this process: its directory and file must be as trustworthy as the process.
void plugin_check_trusted(const std::string& name, const fs::path& file) {
  for (const auto& [path, what] : {std::pair<std::string, std::string>{file.parent_path().string(), "plugin directory"},
                                   std::pair<std::string, std::string>{file.string(), "plugin"}}) {
    const std::string problem = path_trust_problem(path, "backend '" + name + "': the " + what, PATH_OWNER_SELF_OR_ROOT);
    if (!problem.empty()) throw Error(ERROR_CODE_BACKEND, problem);
  }
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

// Legacy plugin ABI 1: a C++ factory behind an extern "C" name. Recognised only to refuse it.
constexpr const char* LEGACY_OPEN_SYMBOL = "edgesmith_backend_open_v1";
constexpr uint32_t LEGACY_API_VERSION = 1;

[[noreturn]] void abi_refuse(const std::string& plugin, const std::string& speaks) {
  throw Error(ERROR_CODE_BACKEND, plugin + " speaks " + speaks + ", this runtime speaks " +
                                      std::to_string(EDGESMITH_PLUGIN_API_VERSION) +
                                      "; rebuild the plugin against edgesmith's plugin_api.h");
}

std::string versions_text(uint32_t oldest, uint32_t newest) {
  if (oldest == newest || oldest > newest) return "plugin ABI " + std::to_string(newest);
  return "plugin ABI " + std::to_string(oldest) + " to " + std::to_string(newest);
}

// The plugin's table of EDGESMITH_PLUGIN_API_VERSION, or a refusal naming both versions.
const EdgesmithPluginApi* api_get(void* handle, const std::string& plugin) {
  auto base_fn = reinterpret_cast<EdgesmithPluginBaseFn>(dlsym(handle, EDGESMITH_PLUGIN_BASE_SYMBOL));
  if (base_fn == nullptr) {
    if (dlsym(handle, LEGACY_OPEN_SYMBOL) != nullptr) {
      abi_refuse(plugin, versions_text(LEGACY_API_VERSION, LEGACY_API_VERSION));
    }
    throw Error(ERROR_CODE_BACKEND, plugin + " does not export " + EDGESMITH_PLUGIN_BASE_SYMBOL +
                                        ", so it is not an edgesmith backend plugin; rebuild it "
                                        "against edgesmith's plugin_api.h");
  }
  const EdgesmithPluginBase* base = base_fn();
  if (base == nullptr || base->get_api == nullptr) abi_refuse(plugin, "no plugin ABI (its base is empty)");
  const EdgesmithPluginApi* api = base->get_api(EDGESMITH_PLUGIN_API_VERSION);
  if (api == nullptr) abi_refuse(plugin, versions_text(base->api_version_oldest, base->api_version_newest));
  if (api->api_version != EDGESMITH_PLUGIN_API_VERSION) {
    abi_refuse(plugin, versions_text(api->api_version, api->api_version));
  }
  const bool complete = api->struct_size >= sizeof(EdgesmithPluginApi) && api->backend_open &&
                        api->backend_run && api->backend_describe && api->backend_close &&
                        api->status_code && api->status_message && api->status_free;
  if (!complete) {
    throw Error(ERROR_CODE_BACKEND, plugin + " has an incomplete plugin ABI " +
                                        std::to_string(EDGESMITH_PLUGIN_API_VERSION) +
                                        " table; rebuild the plugin against edgesmith's plugin_api.h");
  }
  return api;
}

BackendPlugin plugin_open(const std::string& name) {
  const std::string file = plugin_file_name(name);
  const std::vector<std::string> dirs = plugin_search_dirs();
  for (const std::string& dir : dirs) {
    const fs::path candidate = fs::path(dir) / file;
    std::error_code ec;
    if (!fs::is_regular_file(candidate, ec)) continue;
    return plugin_load_file(name, candidate.string());
  }
  std::string searched;
  for (const std::string& dir : dirs) searched += (searched.empty() ? "" : ", ") + dir;
  bool use_env = true;
  {
    const std::lock_guard<std::mutex> lock(policy_mutex());
    use_env = policy().use_env;
  }
  throw Error(ERROR_CODE_BACKEND,
              "backend '" + name + "' is not built into this runtime (searched: " + searched +
                  "); build edgesmith with that backend or " +
                  (use_env ? "set " + std::string(BACKEND_PATH_ENV) + " to" : std::string("pass --backend-path")) +
                  " the directory holding " + file);
}

// The code and message of `status`, which is freed; a non-null status with an ok code is still
// a failure (`fallback`).
PluginStatus status_take(const EdgesmithPluginApi* api, EdgesmithStatus* status, int32_t fallback) {
  PluginStatus result;
  if (status == nullptr) return result;
  result.code = api->status_code(status);
  const char* message = api->status_message(status);
  result.message = message != nullptr ? message : "";
  api->status_free(status);
  if (result.code == EDGESMITH_STATUS_CODE_OK) result.code = fallback;
  if (result.message.empty()) result.message = "no reason given";
  return result;
}

std::vector<EdgesmithTensorSpec> specs_of(const std::vector<ManifestTensor>& tensors) {
  std::vector<EdgesmithTensorSpec> specs;
  for (const ManifestTensor& t : tensors) {
    EdgesmithTensorSpec spec{};
    spec.name = t.name.c_str();
    spec.dtype = dtype_from_name(t.dtype);
    spec.rank = static_cast<uint32_t>(t.shape.size());
    spec.shape = t.shape.data();
    specs.push_back(spec);
  }
  return specs;
}

}  // namespace

std::string plugin_file_name(const std::string& name) {
  return "libedgesmith_backend_" + name + ".so";
}

void plugin_search_configure(const PluginSearchPolicy& next) {
  for (const std::string& dir : next.dirs) {
    if (!fs::path(dir).is_absolute()) {
      throw Error(ERROR_CODE_INVALID_ARGUMENT, "the plugin directory " + string_quote(dir) +
                                                   " is relative; give an absolute directory");
    }
  }
  const std::lock_guard<std::mutex> lock(policy_mutex());
  policy() = next;
}

std::vector<std::string> plugin_search_dirs() {
  PluginSearchPolicy current;
  {
    const std::lock_guard<std::mutex> lock(policy_mutex());
    current = policy();
  }
  std::vector<std::string> dirs = current.dirs;
  const char* env = current.use_env ? std::getenv(BACKEND_PATH_ENV) : nullptr;
  if (env != nullptr) {
    std::string list = env;
    size_t start = 0;
    while (start <= list.size()) {
      const size_t end = std::min(list.find(':', start), list.size());
      const std::string entry = list.substr(start, end - start);
      // A relative entry would load whatever the working directory holds.
      if (!entry.empty() && !fs::path(entry).is_absolute()) {
        throw Error(ERROR_CODE_BACKEND, std::string(BACKEND_PATH_ENV) + " holds the relative directory " +
                                            string_quote(entry) + "; give absolute directories only");
      }
      if (!entry.empty()) dirs.push_back(entry);
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

BackendPlugin plugin_load_file(const std::string& name, const std::string& path) {
  plugin_check_trusted(name, fs::absolute(path));
  dlerror();
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) {
    const char* reason = dlerror();
    throw Error(ERROR_CODE_BACKEND,
                "backend '" + name + "' is not available: " +
                    string_quote(reason ? reason : "dlopen failed", 400) +
                    "; install the libraries it names on the device (the plugin needs its "
                    "engine's runtime), or build the artifact with another backend");
  }
  // Keep the handle even on failure: unloading a library whose constructors ran is not worth the
  // risk.
  BackendPlugin plugin;
  plugin.name = name;
  plugin.path = path;
  plugin.api = api_get(handle, "backend '" + name + "' plugin " + path);
  plugin.formats = formats_split(plugin.api->formats);
  return plugin;
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

namespace edgesmith {

constexpr bool dtypes_agree() {
  constexpr std::pair<DType, int32_t> pairs[] = {
      {DTYPE_BOOL, EDGESMITH_DTYPE_BOOL},       {DTYPE_INT8, EDGESMITH_DTYPE_INT8},
      {DTYPE_INT16, EDGESMITH_DTYPE_INT16},     {DTYPE_INT32, EDGESMITH_DTYPE_INT32},
      {DTYPE_INT64, EDGESMITH_DTYPE_INT64},     {DTYPE_UINT8, EDGESMITH_DTYPE_UINT8},
      {DTYPE_UINT16, EDGESMITH_DTYPE_UINT16},   {DTYPE_UINT32, EDGESMITH_DTYPE_UINT32},
      {DTYPE_UINT64, EDGESMITH_DTYPE_UINT64},   {DTYPE_FLOAT16, EDGESMITH_DTYPE_FLOAT16},
      {DTYPE_FLOAT32, EDGESMITH_DTYPE_FLOAT32}, {DTYPE_FLOAT64, EDGESMITH_DTYPE_FLOAT64},
  };
  for (const auto& [dtype, c_dtype] : pairs) {
    if (static_cast<int32_t>(dtype) != c_dtype) return false;
  }
  return true;
}
// Tensors cross the plugin boundary with their DType value as the EdgesmithDType.
static_assert(dtypes_agree(), "DType and EdgesmithDType must agree value by value");

PluginBackend::PluginBackend(const EdgesmithPluginApi* api, EdgesmithBackend* handle,
                             std::vector<ManifestTensor> outputs, std::vector<DType> output_dtypes)
    : api_(api), handle_(handle), outputs_(std::move(outputs)), output_dtypes_(std::move(output_dtypes)) {}

PluginBackend::~PluginBackend() { api_->backend_close(handle_); }

PluginStatus PluginBackend::backend_run(const std::vector<TensorView>& inputs,
                                        std::vector<Tensor>* outputs) const {
  std::vector<EdgesmithTensorView> c_inputs(inputs.size());
  for (size_t i = 0; i < inputs.size(); ++i) {
    const TensorView& in = inputs[i];
    c_inputs[i].data = in.data;
    c_inputs[i].byte_size = static_cast<uint64_t>(shape_numel(in.shape)) * dtype_size(in.dtype);
    c_inputs[i].dtype = in.dtype;
    c_inputs[i].rank = static_cast<uint32_t>(in.shape.size());
    c_inputs[i].shape = in.shape.data();
  }
  // The outputs are allocated here, with the manifest's shapes, and written by the plugin in place.
  std::vector<Tensor> results;
  results.reserve(outputs_.size());  // no reallocation: c_outputs points into the tensors' shapes
  std::vector<EdgesmithTensorBuffer> c_outputs(outputs_.size());
  for (size_t o = 0; o < outputs_.size(); ++o) {
    Tensor& out = results.emplace_back(output_dtypes_[o], outputs_[o].shape);
    c_outputs[o].data = out.data();
    c_outputs[o].byte_size = out.byte_size();
    c_outputs[o].dtype = out.dtype();
    c_outputs[o].rank = static_cast<uint32_t>(out.shape().size());
    c_outputs[o].shape = out.shape().data();
  }
  EdgesmithStatus* status =
      api_->backend_run(handle_, c_inputs.data(), static_cast<uint32_t>(c_inputs.size()),
                        c_outputs.data(), static_cast<uint32_t>(c_outputs.size()));
  PluginStatus result = status_take(api_, status, EDGESMITH_STATUS_CODE_RUN_FAILED);
  if (result.ok()) {
    for (Tensor& tensor : results) outputs->push_back(std::move(tensor));
  }
  return result;
}

std::string PluginBackend::backend_describe() const {
  const char* text = api_->backend_describe(handle_);
  return text != nullptr ? text : "";
}

PluginStatus plugin_backend_open(const BackendPlugin& plugin, const PluginOpenArgs& args,
                                 std::unique_ptr<PluginBackend>* backend) {
  const Manifest& manifest = args.manifest;
  const std::vector<EdgesmithTensorSpec> inputs = specs_of(manifest.inputs);
  const std::vector<EdgesmithTensorSpec> outputs = specs_of(manifest.outputs);
  std::vector<DType> output_dtypes;
  for (const EdgesmithTensorSpec& spec : outputs) output_dtypes.push_back(static_cast<DType>(spec.dtype));

  EdgesmithOpenArgs c_args{};
  c_args.artifact_dir = args.artifact_dir.c_str();
  c_args.model_name = manifest.name.c_str();
  c_args.payload_format = manifest.payload.format.c_str();
  c_args.payload_entry = manifest.payload.entry.c_str();
  c_args.backend_options_json = manifest.backend_options_json.c_str();
  c_args.manifest_json = args.manifest_json.c_str();
  c_args.threads = args.threads;
  c_args.max_concurrency = args.max_concurrency;
  c_args.input_count = static_cast<uint32_t>(inputs.size());
  c_args.inputs = inputs.data();
  c_args.output_count = static_cast<uint32_t>(outputs.size());
  c_args.outputs = outputs.data();

  const EdgesmithPluginApi* api = plugin.api;
  EdgesmithBackend* handle = nullptr;
  PluginStatus status = status_take(api, api->backend_open(&c_args, &handle), EDGESMITH_STATUS_CODE_LOAD_FAILED);
  if (!status.ok() || handle == nullptr) {
    api->backend_close(handle);
    if (status.ok()) status = {EDGESMITH_STATUS_CODE_LOAD_FAILED, "the plugin opened nothing and gave no reason"};
    return status;
  }
  try {
    *backend = std::make_unique<PluginBackend>(api, handle, manifest.outputs, std::move(output_dtypes));
  } catch (...) {
    api->backend_close(handle);
    throw;
  }
  return status;
}

}  // namespace edgesmith
