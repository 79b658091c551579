// One captured sample as the contract's record (docs/capture.md §2), and the classes output's
// top-1 and confidence the capture policy and the record use: pure functions, apart from the
// capture runner so they are tested alone (tests/cpp/test_capture.cc).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "artifact/manifest.h"
#include "runtime/tensor.h"

namespace edgesmith {

/// Whether a classes output's first row says: its arg-max and max softmax. False when the manifest
/// has no classes output or it is not float32.
bool capture_confidence(const Manifest& manifest, const std::vector<Tensor>& outputs, int64_t* top1, double* confidence);

/// Why no capture record can hold these tensors whatever their values (a dtype the contract does
/// not allow, a rank over 8): every sample of the same model fails alike. "" when they fit.
std::string capture_record_unfit(const std::vector<Tensor>& tensors);

/// One capture record (docs/capture.md §2): CAPTURE_MAGIC, the header's length as 8 lower-case hex
/// digits and a newline, the header JSON, then every input's and output's bytes. Throws
/// Error(ERROR_CODE_INVALID_ARGUMENT) when a tensor's dtype is not one the contract allows or the
/// record is over MAX_CAPTURE_RECORD.
std::string capture_record_build(const nlohmann::json& header_fields, const std::vector<std::string>& input_names,
                                 const std::vector<Tensor>& inputs, const std::vector<std::string>& output_names,
                                 const std::vector<Tensor>& outputs);

}  // namespace edgesmith
