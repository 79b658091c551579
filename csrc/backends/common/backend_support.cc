#include "common/backend_support.h"

#include <stdexcept>

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

}  // namespace backends
}  // namespace edgesmith
