#include "common/backend.h"

#include <cstring>
#include <exception>
#include <memory>
#include <new>
#include <utility>

// The plugin's definitions of the C API's opaque types (the runtime never sees their layout).
struct EdgesmithStatus {
  int32_t code;
  std::string message;
};

struct EdgesmithBackend {
  std::unique_ptr<edgesmith::Backend> backend;
  std::string description;  // backend_describe(), kept for the C string's lifetime
};

namespace edgesmith {

namespace {

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string text = "(";
  for (size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + (shape.size() == 1 ? ",)" : ")");
}

}  // namespace

BackendStatus Backend::backend_run_into(const std::vector<TensorView>& inputs,
                                        const std::vector<TensorSpan>& outputs) noexcept {
  try {
    std::vector<Tensor> results;
    results.reserve(outputs.size());
    BackendStatus status = backend_run(inputs, &results);
    if (!status.ok()) return status;
    if (results.size() != outputs.size()) {
      return {BACKEND_STATUS_RUN_FAILED, "the backend returned " + std::to_string(results.size()) +
                                             " output(s), the manifest lists " +
                                             std::to_string(outputs.size())};
    }
    for (size_t o = 0; o < outputs.size(); ++o) {
      const Tensor& result = results[o];
      const TensorSpan& out = outputs[o];
      if (result.dtype() != out.dtype || result.shape() != out.shape || result.byte_size() != out.byte_size) {
        return {BACKEND_STATUS_RUN_FAILED,
                "output " + std::to_string(o) + " came back as " + dtype_name(result.dtype()) + " " +
                    shape_text(result.shape()) + ", the manifest says " + dtype_name(out.dtype) + " " +
                    shape_text(out.shape)};
      }
      if (out.byte_size > 0) std::memcpy(out.data, result.data(), out.byte_size);
    }
    return {};
  } catch (const std::exception& e) {
    return {BACKEND_STATUS_RUN_FAILED, e.what()};
  } catch (...) {
    return {BACKEND_STATUS_RUN_FAILED, "the backend failed without a reason"};
  }
}

namespace backends {
namespace {

// Returned when a status cannot be allocated; status_free leaves it alone.
EdgesmithStatus out_of_memory_status{EDGESMITH_STATUS_CODE_RUN_FAILED, "the plugin ran out of memory"};

EdgesmithStatus* status_make(BackendStatus status) noexcept {
  auto* made = new (std::nothrow) EdgesmithStatus{status.code, {}};
  if (made == nullptr) return &out_of_memory_status;
  // A failure reported with an ok code is still a failure.
  if (made->code == EDGESMITH_STATUS_CODE_OK) made->code = EDGESMITH_STATUS_CODE_LOAD_FAILED;
  made->message = std::move(status.message);  // a move: no allocation
  if (made->message.empty()) {
    try {
      made->message = "the plugin failed without giving a reason";
    } catch (...) {
      // Left empty: the runtime says "no reason given".
    }
  }
  return made;
}

EdgesmithStatus* status_make(BackendStatusCode code, const char* message) noexcept {
  try {
    return status_make(BackendStatus{code, message});
  } catch (...) {
    return &out_of_memory_status;
  }
}

// DType and EdgesmithDType agree value by value (checked in runtime/plugin.cc).
bool dtype_from_c(int32_t value, DType* dtype) {
  if (value < EDGESMITH_DTYPE_BOOL || value > EDGESMITH_DTYPE_FLOAT64) return false;
  *dtype = static_cast<DType>(value);
  return true;
}

std::string text_or(const char* text, const char* fallback) { return text != nullptr ? text : fallback; }

// The manifest's tensors from C specs; false (and `problem`) on a spec the plugin cannot read.
bool specs_convert(const EdgesmithTensorSpec* specs, uint32_t count, const char* what,
                   std::vector<ManifestTensor>* tensors, std::string* problem) {
  if (count > 0 && specs == nullptr) {
    *problem = std::string("the runtime passed ") + std::to_string(count) + " " + what + "s without their specs";
    return false;
  }
  for (uint32_t i = 0; i < count; ++i) {
    const EdgesmithTensorSpec& spec = specs[i];
    DType dtype;
    if (spec.name == nullptr || !dtype_from_c(spec.dtype, &dtype) || (spec.rank > 0 && spec.shape == nullptr)) {
      *problem = std::string(what) + " " + std::to_string(i) + " has no name, an unknown dtype (" +
                 std::to_string(spec.dtype) + ") or no shape";
      return false;
    }
    ManifestTensor tensor;
    tensor.name = spec.name;
    tensor.dtype = dtype_name(dtype);
    tensor.shape.assign(spec.shape, spec.shape + spec.rank);
    tensors->push_back(std::move(tensor));
  }
  return true;
}

// BackendOpenArgs (with its Manifest) rebuilt from the C arguments.
BackendStatus open_args_make(const EdgesmithOpenArgs& c, BackendOpenArgs* args) {
  if (c.artifact_dir == nullptr || c.payload_format == nullptr || c.payload_entry == nullptr) {
    return {BACKEND_STATUS_INVALID, "the runtime opened the plugin without an artifact directory or payload"};
  }
  args->artifact_dir = c.artifact_dir;
  args->manifest_json = text_or(c.manifest_json, "");
  args->threads = c.threads;
  args->max_concurrency = c.max_concurrency;
  Manifest& manifest = args->manifest;
  manifest.name = text_or(c.model_name, "");
  manifest.payload.format = c.payload_format;
  manifest.payload.entry = c.payload_entry;
  manifest.backend_options_json = text_or(c.backend_options_json, "{}");
  manifest.target_threads = c.threads;
  std::string problem;
  if (!specs_convert(c.inputs, c.input_count, "input", &manifest.inputs, &problem) ||
      !specs_convert(c.outputs, c.output_count, "output", &manifest.outputs, &problem)) {
    return {BACKEND_STATUS_INVALID, problem};
  }
  return {};
}

struct PluginAdapter {
  BackendOpenFn open = nullptr;
  EdgesmithPluginApi api{};
  EdgesmithPluginBase base{};
};

PluginAdapter& adapter() {
  static PluginAdapter state;
  return state;
}

EdgesmithStatus* adapter_open(const EdgesmithOpenArgs* c_args, EdgesmithBackend** out) noexcept {
  if (out == nullptr || c_args == nullptr) {
    return status_make(BACKEND_STATUS_INVALID, "backend_open was called without its arguments");
  }
  *out = nullptr;
  try {
    BackendOpenArgs args;
    BackendStatus status = open_args_make(*c_args, &args);
    if (!status.ok()) return status_make(std::move(status));
    std::unique_ptr<Backend> backend(adapter().open(args, &status));
    if (backend == nullptr || !status.ok()) return status_make(std::move(status));
    auto handle = std::make_unique<EdgesmithBackend>();
    handle->description = backend->backend_describe();
    handle->backend = std::move(backend);
    *out = handle.release();
    return nullptr;
  } catch (const std::exception& e) {
    return status_make(BACKEND_STATUS_LOAD_FAILED, e.what());
  } catch (...) {
    return status_make(BACKEND_STATUS_LOAD_FAILED, "the plugin failed to open the payload without a reason");
  }
}

EdgesmithStatus* adapter_run(EdgesmithBackend* handle, const EdgesmithTensorView* inputs,
                             uint32_t input_count, const EdgesmithTensorBuffer* outputs,
                             uint32_t output_count) noexcept {
  if (handle == nullptr || (input_count > 0 && inputs == nullptr) || (output_count > 0 && outputs == nullptr)) {
    return status_make(BACKEND_STATUS_INVALID, "backend_run was called without a backend or its tensors");
  }
  try {
    std::vector<TensorView> views(input_count);
    for (uint32_t i = 0; i < input_count; ++i) {
      const EdgesmithTensorView& in = inputs[i];
      if (!dtype_from_c(in.dtype, &views[i].dtype) || (in.rank > 0 && in.shape == nullptr)) {
        return status_make(BACKEND_STATUS_INVALID, "an input has an unknown dtype or no shape");
      }
      views[i].data = in.data;
      views[i].shape.assign(in.shape, in.shape + in.rank);
    }
    std::vector<TensorSpan> spans(output_count);
    for (uint32_t o = 0; o < output_count; ++o) {
      const EdgesmithTensorBuffer& out = outputs[o];
      if (!dtype_from_c(out.dtype, &spans[o].dtype) || (out.rank > 0 && out.shape == nullptr)) {
        return status_make(BACKEND_STATUS_INVALID, "an output has an unknown dtype or no shape");
      }
      spans[o].data = out.data;
      spans[o].byte_size = static_cast<size_t>(out.byte_size);
      spans[o].shape.assign(out.shape, out.shape + out.rank);
    }
    BackendStatus status = handle->backend->backend_run_into(views, spans);
    return status.ok() ? nullptr : status_make(std::move(status));
  } catch (const std::exception& e) {
    return status_make(BACKEND_STATUS_RUN_FAILED, e.what());
  } catch (...) {
    return status_make(BACKEND_STATUS_RUN_FAILED, "the plugin failed to run without a reason");
  }
}

const char* adapter_describe(const EdgesmithBackend* handle) noexcept {
  return handle != nullptr ? handle->description.c_str() : "";
}

void adapter_close(EdgesmithBackend* handle) noexcept { delete handle; }

int32_t adapter_status_code(const EdgesmithStatus* status) noexcept {
  return status != nullptr ? status->code : EDGESMITH_STATUS_CODE_OK;
}

const char* adapter_status_message(const EdgesmithStatus* status) noexcept {
  return status != nullptr ? status->message.c_str() : "";
}

void adapter_status_free(EdgesmithStatus* status) noexcept {
  if (status != &out_of_memory_status) delete status;
}

const EdgesmithPluginApi* adapter_get_api(uint32_t version) noexcept {
  const PluginAdapter& state = adapter();
  return version == EDGESMITH_PLUGIN_API_VERSION && state.open != nullptr ? &state.api : nullptr;
}

const PluginAdapter* adapter_init(BackendOpenFn open, const char* formats) noexcept {
  PluginAdapter& state = adapter();
  state.open = open;
  state.api.struct_size = sizeof(EdgesmithPluginApi);
  state.api.api_version = EDGESMITH_PLUGIN_API_VERSION;
  state.api.formats = formats != nullptr ? formats : "";
  state.api.backend_open = adapter_open;
  state.api.backend_run = adapter_run;
  state.api.backend_describe = adapter_describe;
  state.api.backend_close = adapter_close;
  state.api.status_code = adapter_status_code;
  state.api.status_message = adapter_status_message;
  state.api.status_free = adapter_status_free;
  state.base.api_version_oldest = EDGESMITH_PLUGIN_API_VERSION;
  state.base.api_version_newest = EDGESMITH_PLUGIN_API_VERSION;
  state.base.get_api = adapter_get_api;
  return &state;
}

}  // namespace

const EdgesmithPluginBase* plugin_base_make(BackendOpenFn open, const char* formats) noexcept {
  static const PluginAdapter* const state = adapter_init(open, formats);
  return &state->base;
}

}  // namespace backends
}  // namespace edgesmith
