// The ONNX Runtime backend: runs an `onnxruntime-ort` payload (model.ort, ORT format) or an
// `onnx` payload (model.onnx) made by the toolchain's offline graph optimization, on ORT's CPU
// execution provider through the C/C++ API of the libonnxruntime.so that PyPI's wheel ships.
//
// One Ort::Session serves every caller: OrtApi::Run is thread-safe, and its intra-op thread pool
// belongs to the session, so N callers share one pool of `threads` workers. No copies at the
// boundary: inputs are wrapped in place (ORT never writes to them) and ORT writes outputs straight
// into the runtime's buffers, preallocated with the manifest's static shapes (backend_run_into).
//
// The session options come from backend.options as the toolchain wrote them: the graph
// optimization level applied at load time (the payload already has the target-independent levels
// baked in; "all" adds the layout transformations for the CPU the device really has) and whether
// idle intra-op workers spin.
#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include <onnxruntime_cxx_api.h>

#include "common/backend_support.h"

namespace edgesmith {
namespace backends {
namespace {

bool dtype_to_ort(DType dtype, ONNXTensorElementDataType* out) {
  switch (dtype) {
    case DTYPE_BOOL: *out = ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL; return true;
    case DTYPE_INT8: *out = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8; return true;
    case DTYPE_INT16: *out = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT16; return true;
    case DTYPE_INT32: *out = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32; return true;
    case DTYPE_INT64: *out = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64; return true;
    case DTYPE_UINT8: *out = ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8; return true;
    case DTYPE_UINT16: *out = ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16; return true;
    case DTYPE_UINT32: *out = ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT32; return true;
    case DTYPE_UINT64: *out = ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT64; return true;
    case DTYPE_FLOAT16: *out = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16; return true;
    case DTYPE_FLOAT32: *out = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; return true;
    case DTYPE_FLOAT64: *out = ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE; return true;
  }
  return false;
}

/// The process's one ORT environment (ORT allows one); never destroyed, so sessions of plugins
/// unloaded late never outlive it.
Ort::Env& ort_env() {
  static Ort::Env* env = new Ort::Env(ORT_LOGGING_LEVEL_ERROR, "edgesmith");
  return *env;
}

GraphOptimizationLevel optimization_level_parse(const std::string& name) {
  if (name == "disable") return ORT_DISABLE_ALL;
  if (name == "basic") return ORT_ENABLE_BASIC;
  if (name == "extended") return ORT_ENABLE_EXTENDED;
  if (name == "all") return ORT_ENABLE_ALL;
  throw std::runtime_error("manifest.json: backend.options.runtime_optimization_level is '" + name +
                           "', not disable, basic, extended or all; rebuild the artifact");
}

std::string option_string(const nlohmann::json& options, const char* key, const std::string& fallback) {
  const auto found = options.find(key);
  return found != options.end() && found->is_string() ? found->get<std::string>() : fallback;
}

/// Session options from the artifact's settings.
Ort::SessionOptions session_options_make(const BackendSettings& settings) {
  Ort::SessionOptions options;
  if (settings.threads > 0) options.SetIntraOpNumThreads(settings.threads);
  options.SetInterOpNumThreads(1);
  options.SetExecutionMode(ORT_SEQUENTIAL);
  options.SetGraphOptimizationLevel(
      optimization_level_parse(option_string(settings.options, "runtime_optimization_level", "all")));
  const auto spinning = settings.options.find("intra_op_spinning");
  if (spinning != settings.options.end() && spinning->is_boolean()) {
    options.AddConfigEntry("session.intra_op.allow_spinning", spinning->get<bool>() ? "1" : "0");
  }
  return options;
}

/// Names of the session's inputs or outputs, in the model's order.
std::vector<std::string> session_names(const Ort::Session& session, bool inputs) {
  Ort::AllocatorWithDefaultOptions allocator;
  std::vector<std::string> names;
  const size_t count = inputs ? session.GetInputCount() : session.GetOutputCount();
  for (size_t i = 0; i < count; ++i) {
    names.emplace_back(inputs ? session.GetInputNameAllocated(i, allocator).get()
                              : session.GetOutputNameAllocated(i, allocator).get());
  }
  return names;
}

/// The model's names in the manifest's order: the manifest name when the model has it, else the
/// model's name at the same position.
std::vector<std::string> names_in_manifest_order(const std::vector<ManifestTensor>& manifest,
                                                 const std::vector<std::string>& model,
                                                 const char* what, const std::string& entry) {
  if (manifest.size() != model.size()) {
    throw std::runtime_error(entry + " has " + std::to_string(model.size()) + " " + what +
                             "(s), the manifest lists " + std::to_string(manifest.size()));
  }
  std::vector<std::string> names;
  for (size_t i = 0; i < manifest.size(); ++i) {
    bool found = false;
    for (const std::string& name : model) found = found || name == manifest[i].name;
    names.push_back(found ? manifest[i].name : model[i]);
  }
  return names;
}

class OrtBackend final : public Backend {
 public:
  OrtBackend(const BackendOpenArgs& args, std::unique_ptr<Ort::Session> session)
      : manifest_(args.manifest), session_(std::move(session)),
        memory_(Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault)) {
    const std::string& entry = manifest_.payload.entry;
    input_names_ = names_in_manifest_order(manifest_.inputs, session_names(*session_, true), "input", entry);
    output_names_ = names_in_manifest_order(manifest_.outputs, session_names(*session_, false), "output", entry);
    for (const std::string& name : input_names_) input_cnames_.push_back(name.c_str());
    for (const std::string& name : output_names_) output_cnames_.push_back(name.c_str());
    for (const ManifestTensor& output : manifest_.outputs) {
      output_dtypes_.push_back(dtype_from_name(output.dtype));
      output_types_.push_back(ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED);
      dtype_to_ort(output_dtypes_.back(), &output_types_.back());
    }
  }

  BackendStatus backend_run(const std::vector<TensorView>& inputs,
                            std::vector<Tensor>* outputs) noexcept override {
    return backend_run_allocated(*this, manifest_, inputs, outputs);
  }

  // ORT writes straight into the runtime's buffers: no copy.
  BackendStatus backend_run_into(const std::vector<TensorView>& inputs,
                                 const std::vector<TensorSpan>& outputs) noexcept override {
    try {
      BackendStatus status = backend_inputs_check(manifest_, inputs);
      if (!status.ok()) return status;
      status = backend_outputs_check(manifest_, outputs);
      if (!status.ok()) return status;
      std::vector<Ort::Value> input_values;
      input_values.reserve(inputs.size());
      for (const TensorView& input : inputs) {
        ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
        if (!dtype_to_ort(input.dtype, &type)) {
          return backend_status_make(BACKEND_STATUS_INVALID, "an input has a dtype ONNX Runtime does not take");
        }
        const size_t bytes = static_cast<size_t>(shape_numel(input.shape)) * dtype_size(input.dtype);
        // ORT reads inputs only: wrapping the caller's const buffer is safe.
        input_values.push_back(Ort::Value::CreateTensor(memory_, const_cast<void*>(input.data), bytes,
                                                        input.shape.data(), input.shape.size(), type));
      }
      std::vector<Ort::Value> output_values;
      output_values.reserve(outputs.size());
      for (size_t i = 0; i < outputs.size(); ++i) {
        const TensorSpan& out = outputs[i];
        output_values.push_back(Ort::Value::CreateTensor(memory_, out.data, out.byte_size, out.shape.data(),
                                                         out.shape.size(), output_types_[i]));
      }
      session_->Run(Ort::RunOptions{nullptr}, input_cnames_.data(), input_values.data(), input_values.size(),
                    output_cnames_.data(), output_values.data(), output_values.size());
      return {};
    } catch (const std::exception& e) {
      return backend_status_make(BACKEND_STATUS_RUN_FAILED,
                                 "ONNX Runtime failed to run the model: " + message_first_line(e.what()));
    } catch (...) {
      return backend_status_make(BACKEND_STATUS_RUN_FAILED, "ONNX Runtime failed to run the model");
    }
  }

  std::string backend_describe() const override {
    return std::string("onnxruntime ") + OrtGetApiBase()->GetVersionString();
  }

 private:
  Manifest manifest_;
  std::unique_ptr<Ort::Session> session_;
  Ort::MemoryInfo memory_;
  std::vector<std::string> input_names_;
  std::vector<std::string> output_names_;
  std::vector<const char*> input_cnames_;
  std::vector<const char*> output_cnames_;
  std::vector<DType> output_dtypes_;
  std::vector<ONNXTensorElementDataType> output_types_;
};

Backend* ort_backend_open(const BackendOpenArgs& args, BackendStatus* status) {
  const std::string& format = args.manifest.payload.format;
  if (format != "onnxruntime-ort" && format != "onnx") {
    *status = backend_status_make(BACKEND_STATUS_INVALID,
                                  "the ort backend runs onnxruntime-ort and onnx payloads, this artifact's is " + format);
    return nullptr;
  }
  const std::string& entry = args.manifest.payload.entry;
  try {
    const BackendSettings settings = backend_settings_resolve(args);
    Ort::SessionOptions options = session_options_make(settings);
    // The format is named, not guessed from the file name.
    options.AddConfigEntry("session.load_model_format", format == "onnxruntime-ort" ? "ORT" : "ONNX");
    const std::string path = args.artifact_dir + "/" + entry;
    auto session = std::make_unique<Ort::Session>(ort_env(), path.c_str(), options);
    return new OrtBackend(args, std::move(session));
  } catch (const std::exception& e) {
    *status = backend_status_make(BACKEND_STATUS_LOAD_FAILED,
                                  "ONNX Runtime could not load " + entry + ": " + message_first_line(e.what()));
  } catch (...) {
    *status = backend_status_make(BACKEND_STATUS_LOAD_FAILED, "ONNX Runtime could not load " + entry);
  }
  return nullptr;
}

}  // namespace
}  // namespace backends
}  // namespace edgesmith

EDGESMITH_BACKEND_DEFINE(edgesmith::backends::ort_backend_open, "onnxruntime-ort,onnx")
