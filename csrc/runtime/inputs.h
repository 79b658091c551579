// A model's inputs from untrusted bytes: the agent's `POST /v1/infer` body, .npy files
// concatenated in manifest order (docs/telemetry.md, "The agent").
//
// Each input's header is read and checked against the manifest (count, dtype, shape) before its
// data is touched; parsing walks the body by offset and copies each input's data once, so a
// request costs time linear in its size however many inputs it claims.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "artifact/manifest.h"
#include "runtime/tensor.h"

namespace edgesmith {

/// Largest .npy header accepted per input of a request (NumPy writes about 128 bytes).
constexpr uint32_t INPUTS_MAX_HEADER_BYTES = 4096;

/// The largest request body the inputs `specs` can take: their data plus, per input, the .npy
/// prelude and INPUTS_MAX_HEADER_BYTES of header. Saturates at UINT64_MAX.
uint64_t inputs_max_request_bytes(const std::vector<ManifestTensor>& specs);

/// The tensors of `body` (`size` bytes: .npy files concatenated in the order of `specs`).
/// Throws Error(ERROR_CODE_INPUT) naming the input when the count, a dtype or a shape differs from
/// the manifest, and Error(ERROR_CODE_INVALID_ARGUMENT) for bytes that are not .npy data.
std::vector<Tensor> inputs_parse_npy(const char* body, size_t size,
                                     const std::vector<ManifestTensor>& specs);

}  // namespace edgesmith
