// The OpenVINO backend: compiles an `openvino-ir` payload (model.xml + model.bin) for the CPU
// plugin with the properties the toolchain recorded in backend.options.config (the same ones it
// validated with), and runs it.
//
// An ov::InferRequest serves one caller at a time; concurrent callers each take one from a pool
// bounded by max_concurrency, or else by the compiled model's optimal number of requests (what its
// streams can really run in parallel: 1 under the LATENCY hint); further callers wait.
#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include <openvino/openvino.hpp>

#include "common/backend_support.h"

namespace edgesmith {
namespace backends {
namespace {

bool dtype_to_ov(DType dtype, ov::element::Type* out) {
  switch (dtype) {
    case DTYPE_BOOL: *out = ov::element::boolean; return true;
    case DTYPE_INT8: *out = ov::element::i8; return true;
    case DTYPE_INT16: *out = ov::element::i16; return true;
    case DTYPE_INT32: *out = ov::element::i32; return true;
    case DTYPE_INT64: *out = ov::element::i64; return true;
    case DTYPE_UINT8: *out = ov::element::u8; return true;
    case DTYPE_UINT16: *out = ov::element::u16; return true;
    case DTYPE_UINT32: *out = ov::element::u32; return true;
    case DTYPE_UINT64: *out = ov::element::u64; return true;
    case DTYPE_FLOAT16: *out = ov::element::f16; return true;
    case DTYPE_FLOAT32: *out = ov::element::f32; return true;
    case DTYPE_FLOAT64: *out = ov::element::f64; return true;
  }
  return false;
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string text = "(";
  for (size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + (shape.size() == 1 ? ",)" : ")");
}

/// The compile_model properties: backend.options.config, with the thread count overridden.
ov::AnyMap compile_config(const BackendSettings& settings) {
  ov::AnyMap config;
  const auto found = settings.options.find("config");
  if (found != settings.options.end() && found->is_object()) {
    for (const auto& [key, value] : found->items()) {
      if (value.is_string()) {
        config[key] = value.get<std::string>();
      } else if (value.is_number_integer()) {
        config[key] = value.get<int64_t>();
      } else if (value.is_boolean()) {
        config[key] = value.get<bool>();
      } else if (value.is_number()) {
        config[key] = value.get<double>();
      }
      // null (no value recorded) and nested values are left to OpenVINO's defaults.
    }
  }
  if (settings.threads > 0) config[ov::inference_num_threads.name()] = static_cast<int32_t>(settings.threads);
  // INFERENCE_NUM_THREADS is an int32 property; JSON gives int64.
  const auto threads = config.find(ov::inference_num_threads.name());
  if (threads != config.end() && threads->second.is<int64_t>()) {
    threads->second = static_cast<int32_t>(threads->second.as<int64_t>());
  }
  return config;
}

/// The sentence of an OpenVINO exception: its text minus the "Exception from <file>:<line>:" and
/// "Check '...' failed at <file>:<line>:" location lines it starts with.
std::string ov_message(const std::exception& e) {
  const std::string text = e.what();
  size_t start = 0;
  while (start < text.size()) {
    size_t end = text.find('\n', start);
    if (end == std::string::npos) end = text.size();
    const std::string line = text.substr(start, end - start);
    const bool location = line.rfind("Exception from ", 0) == 0 || line.rfind("Check '", 0) == 0 ||
                          line.find_first_not_of(" \t\r") == std::string::npos;
    if (!location) return message_first_line(line);
    start = end + 1;
  }
  return message_first_line(text);
}

/// Index of the port named `name`, else `fallback` (ports keep the ONNX tensor names).
size_t port_find(const std::vector<ov::Output<const ov::Node>>& ports, const std::string& name,
                 size_t fallback) {
  for (size_t i = 0; i < ports.size(); ++i) {
    if (ports[i].get_names().count(name) != 0) return i;
  }
  return fallback;
}

/// At most this many infer requests: max_concurrency, else the compiled model's optimum.
size_t request_limit(const BackendOpenArgs& args, const ov::CompiledModel& compiled) {
  if (args.max_concurrency > 0) return static_cast<size_t>(args.max_concurrency);
  uint32_t optimal = 1;
  try {
    optimal = compiled.get_property(ov::optimal_number_of_infer_requests);
  } catch (const std::exception&) {
    // Not every plugin reports it: one request at a time.
  }
  return optimal > 0 ? optimal : 1;
}

class OpenVinoBackend final : public Backend {
 public:
  OpenVinoBackend(const BackendOpenArgs& args, ov::CompiledModel compiled)
      : manifest_(args.manifest), compiled_(std::move(compiled)),
        requests_([this] { return std::make_unique<ov::InferRequest>(compiled_.create_infer_request()); },
                  request_limit(args, compiled_)) {
    const auto inputs = compiled_.inputs();
    const auto outputs = compiled_.outputs();
    if (inputs.size() != manifest_.inputs.size() || outputs.size() != manifest_.outputs.size()) {
      throw std::runtime_error("model.xml has " + std::to_string(inputs.size()) + " input(s) and " +
                               std::to_string(outputs.size()) + " output(s), the manifest lists " +
                               std::to_string(manifest_.inputs.size()) + " and " +
                               std::to_string(manifest_.outputs.size()));
    }
    for (size_t i = 0; i < manifest_.inputs.size(); ++i) {
      input_ports_.push_back(port_find(inputs, manifest_.inputs[i].name, i));
    }
    for (size_t i = 0; i < manifest_.outputs.size(); ++i) {
      output_ports_.push_back(port_find(outputs, manifest_.outputs[i].name, i));
      output_dtypes_.push_back(dtype_from_name(manifest_.outputs[i].dtype));
    }
    requests_.pool_reserve(requests_.pool_limit());
  }

  BackendStatus backend_run(const std::vector<TensorView>& inputs,
                            std::vector<Tensor>* outputs) noexcept override {
    return backend_run_allocated(*this, manifest_, inputs, outputs);
  }

  BackendStatus backend_run_into(const std::vector<TensorView>& inputs,
                                 const std::vector<TensorSpan>& outputs) noexcept override {
    try {
      BackendStatus status = backend_inputs_check(manifest_, inputs);
      if (status.ok()) status = backend_outputs_check(manifest_, outputs);
      if (!status.ok()) return status;
      InstanceLease<ov::InferRequest> request(requests_);
      try {
        status = request_run(*request, inputs, outputs);
      } catch (...) {
        request.lease_discard();
        throw;
      }
      return status;
    } catch (const std::exception& e) {
      return backend_status_make(BACKEND_STATUS_RUN_FAILED,
                                 "OpenVINO failed to run the model: " + ov_message(e));
    } catch (...) {
      return backend_status_make(BACKEND_STATUS_RUN_FAILED, "OpenVINO failed to run the model");
    }
  }

  std::string backend_describe() const override {
    const std::string build = ov::get_openvino_version().buildNumber;
    return "openvino " + build.substr(0, build.find('-'));
  }

 private:
  BackendStatus request_run(ov::InferRequest& request, const std::vector<TensorView>& inputs,
                            const std::vector<TensorSpan>& outputs) const {
    // Inputs are copied into the request's own tensors: the caller's memory is const and must not
    // stay referenced by a pooled request after the call.
    for (size_t i = 0; i < inputs.size(); ++i) {
      ov::Tensor tensor = request.get_input_tensor(input_ports_[i]);
      const size_t bytes = static_cast<size_t>(shape_numel(inputs[i].shape)) * dtype_size(inputs[i].dtype);
      if (tensor.get_byte_size() != bytes) {
        return backend_status_make(BACKEND_STATUS_INVALID,
                                   "input " + manifest_.inputs[i].name + " has " +
                                       std::to_string(bytes) + " bytes, the model takes " +
                                       std::to_string(tensor.get_byte_size()));
      }
      std::memcpy(tensor.data(), inputs[i].data, bytes);
    }
    request.infer();
    // Outputs are copied out of the request's tensors into the runtime's buffers: the request is
    // reused by the next caller.
    for (size_t i = 0; i < output_ports_.size(); ++i) {
      const ov::Tensor result = request.get_output_tensor(output_ports_[i]);
      const ManifestTensor& expected = manifest_.outputs[i];
      const ov::Shape& dims = result.get_shape();
      const std::vector<int64_t> shape(dims.begin(), dims.end());
      ov::element::Type want;
      dtype_to_ov(output_dtypes_[i], &want);
      if (shape != expected.shape || result.get_element_type() != want ||
          result.get_byte_size() != outputs[i].byte_size) {
        return backend_status_make(BACKEND_STATUS_RUN_FAILED,
                                   "output " + expected.name + " came back as " +
                                       result.get_element_type().get_type_name() + " " +
                                       shape_text(shape) + ", the manifest says " + expected.dtype +
                                       " " + shape_text(expected.shape));
      }
      std::memcpy(outputs[i].data, result.data(), outputs[i].byte_size);
    }
    return {};
  }

  Manifest manifest_;
  ov::CompiledModel compiled_;
  std::vector<size_t> input_ports_;
  std::vector<size_t> output_ports_;
  std::vector<DType> output_dtypes_;
  InstancePool<ov::InferRequest> requests_;
};

Backend* openvino_backend_open(const BackendOpenArgs& args, BackendStatus* status) {
  if (args.manifest.payload.format != "openvino-ir") {
    *status = backend_status_make(BACKEND_STATUS_INVALID,
                                  "the openvino backend runs openvino-ir payloads, this artifact's is " +
                                      args.manifest.payload.format);
    return nullptr;
  }
  try {
    const BackendSettings settings = backend_settings_resolve(args);
    std::string device = "CPU";
    const auto found = settings.options.find("device");
    if (found != settings.options.end() && found->is_string()) device = found->get<std::string>();
    ov::Core core;
    std::shared_ptr<ov::Model> model = core.read_model(args.artifact_dir + "/" + args.manifest.payload.entry);
    ov::CompiledModel compiled = core.compile_model(model, device, compile_config(settings));
    return new OpenVinoBackend(args, std::move(compiled));
  } catch (const std::exception& e) {
    *status = backend_status_make(BACKEND_STATUS_LOAD_FAILED,
                                  "OpenVINO could not load " + args.manifest.payload.entry + ": " +
                                      ov_message(e));
  } catch (...) {
    *status = backend_status_make(BACKEND_STATUS_LOAD_FAILED,
                                  "OpenVINO could not load " + args.manifest.payload.entry);
  }
  return nullptr;
}

}  // namespace
}  // namespace backends
}  // namespace edgesmith

EDGESMITH_BACKEND_DEFINE(edgesmith::backends::openvino_backend_open, "openvino-ir")
