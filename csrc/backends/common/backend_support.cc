#include "common/backend_support.h"

#include <exception>
#include <stdexcept>
#include <utility>

namespace edgesmith {
namespace backends {

BackendSettings backend_settings_resolve(const BackendOpenArgs& args) {
  BackendSettings settings;
  settings.threads = args.threads > 0 ? args.threads : args.manifest.target_threads;
  settings.options = nlohmann::json::parse(args.manifest.backend_options_json, nullptr,
                                           /*allow_exceptions=*/false);
  if (!settings.options.is_object()) {
    throw std::runtime_error("manifest.json: backend.options is not a JSON object; rebuild the artifact");
  }
  return settings;
}

std::string message_first_line(const std::string& text) {
  std::string line = text.substr(0, text.find('\n'));
  while (!line.empty() && (line.back() == ' ' || line.back() == '\r' || line.back() == '.')) {
    line.pop_back();
  }
  return line.empty() ? std::string("unknown error") : line;
}

BackendStatus backend_status_make(BackendStatusCode code, std::string message) {
  BackendStatus status;
  status.code = code;
  status.message = std::move(message);
  return status;
}

BackendStatus backend_inputs_check(const Manifest& manifest, const std::vector<TensorView>& inputs) {
  if (inputs.size() != manifest.inputs.size()) {
    return backend_status_make(BACKEND_STATUS_INVALID,
                               "the model takes " + std::to_string(manifest.inputs.size()) +
                                   " input(s), got " + std::to_string(inputs.size()));
  }
  return {};
}

BackendStatus backend_outputs_check(const Manifest& manifest, const std::vector<TensorSpan>& outputs) {
  if (outputs.size() != manifest.outputs.size()) {
    return backend_status_make(BACKEND_STATUS_INVALID,
                               "the model has " + std::to_string(manifest.outputs.size()) +
                                   " output(s), the runtime passed " + std::to_string(outputs.size()));
  }
  for (size_t i = 0; i < outputs.size(); ++i) {
    const ManifestTensor& expected = manifest.outputs[i];
    if (dtype_name(outputs[i].dtype) != expected.dtype || outputs[i].shape != expected.shape) {
      return backend_status_make(BACKEND_STATUS_INVALID, "output " + expected.name +
                                                             " was passed with another dtype or shape than the manifest's");
    }
  }
  return {};
}

BackendStatus backend_run_allocated(Backend& backend, const Manifest& manifest,
                                    const std::vector<TensorView>& inputs,
                                    std::vector<Tensor>* outputs) noexcept {
  try {
    std::vector<Tensor> results;
    std::vector<TensorSpan> spans;
    results.reserve(manifest.outputs.size());
    for (const ManifestTensor& output : manifest.outputs) {
      Tensor& tensor = results.emplace_back(dtype_from_name(output.dtype), output.shape);
      spans.push_back(TensorSpan{tensor.data(), tensor.byte_size(), tensor.dtype(), tensor.shape()});
    }
    BackendStatus status = backend.backend_run_into(inputs, spans);
    if (!status.ok()) return status;
    for (Tensor& tensor : results) outputs->push_back(std::move(tensor));
    return {};
  } catch (const std::exception& e) {
    return backend_status_make(BACKEND_STATUS_RUN_FAILED, message_first_line(e.what()));
  } catch (...) {
    return backend_status_make(BACKEND_STATUS_RUN_FAILED, "the outputs could not be allocated");
  }
}

}  // namespace backends
}  // namespace edgesmith
