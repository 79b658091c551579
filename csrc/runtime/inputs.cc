#include "runtime/inputs.h"

#include <cstring>
#include <limits>

#include "common/error.h"
#include "runtime/npy.h"
#include "runtime/session.h"

namespace edgesmith {

namespace {

// Magic, version and a version 2/3 header length: the most a .npy file has before its header text.
constexpr uint64_t NPY_PRELUDE_MAX_BYTES = 12;

uint64_t add_saturating(uint64_t a, uint64_t b) {
  return a > std::numeric_limits<uint64_t>::max() - b ? std::numeric_limits<uint64_t>::max() : a + b;
}

std::string names_of(const std::vector<ManifestTensor>& specs) {
  std::string out;
  for (const ManifestTensor& t : specs) out += (out.empty() ? "" : ", ") + t.name;
  return out;
}

[[noreturn]] void count_fail(const std::vector<ManifestTensor>& specs, const std::string& given) {
  throw Error(ERROR_CODE_INPUT, "the model takes " + std::to_string(specs.size()) + " input" +
                                    (specs.size() == 1 ? "" : "s") + " (" + names_of(specs) +
                                    ") as concatenated .npy files, the request holds " + given);
}

}  // namespace

uint64_t inputs_max_request_bytes(const std::vector<ManifestTensor>& specs) {
  uint64_t total = 0;
  for (const ManifestTensor& spec : specs) {
    uint64_t bytes = dtype_size(dtype_from_name(spec.dtype));
    for (const int64_t dim : spec.shape) {
      const auto d = static_cast<uint64_t>(dim < 0 ? 0 : dim);
      bytes = d != 0 && bytes > std::numeric_limits<uint64_t>::max() / d ? std::numeric_limits<uint64_t>::max()
                                                                         : bytes * d;
    }
    total = add_saturating(total, add_saturating(bytes, NPY_PRELUDE_MAX_BYTES + INPUTS_MAX_HEADER_BYTES));
  }
  return total;
}

std::vector<Tensor> inputs_parse_npy(const char* body, size_t size, const std::vector<ManifestTensor>& specs) {
  std::vector<Tensor> inputs;
  inputs.reserve(specs.size());
  size_t offset = 0;
  while (offset < size) {
    if (inputs.size() == specs.size()) count_fail(specs, "more");
    const ManifestTensor& spec = specs[inputs.size()];
    const std::string name = "input " + std::to_string(inputs.size()) + " ('" + spec.name + "') of the request";
    const NpyHeader header = npy_header_parse(body + offset, size - offset, name, INPUTS_MAX_HEADER_BYTES);
    // The manifest decides before any data is read.
    if (header.dtype != dtype_from_name(spec.dtype)) {
      throw Error(ERROR_CODE_INPUT, "input '" + spec.name + "' has dtype " + dtype_name(header.dtype) +
                                        ", the model takes " + spec.dtype);
    }
    if (header.shape != spec.shape) {
      throw Error(ERROR_CODE_INPUT, "input '" + spec.name + "' has shape " + shape_format(header.shape) +
                                        ", the model takes " + shape_format(spec.shape));
    }
    const uint64_t available = size - offset - header.data_offset;
    if (available < header.data_bytes) {
      throw Error(ERROR_CODE_INVALID_ARGUMENT,
                  name + " is truncated (" + std::to_string(available) + " bytes of data, its header promises " +
                      std::to_string(header.data_bytes) + ")");
    }
    Tensor& tensor = inputs.emplace_back(header.dtype, header.shape);
    if (header.data_bytes > 0) std::memcpy(tensor.data(), body + offset + header.data_offset, header.data_bytes);
    offset += header.data_offset + static_cast<size_t>(header.data_bytes);
  }
  if (inputs.size() != specs.size()) count_fail(specs, std::to_string(inputs.size()));
  return inputs;
}

}  // namespace edgesmith
