// NumPy .npy files (format versions 1, 2 and 3), the format of an artifact's golden samples.
//
// Only what edgesmith tensors can hold: C order, little-endian (or byte-sized) dtypes of DType.
// The reader is meant for untrusted bytes: every malformed header, overflowing shape or truncated
// payload is an Error(ERROR_CODE_INVALID_ARGUMENT) naming the file, never a crash.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "runtime/tensor.h"

namespace edgesmith {

/// Largest .npy header accepted (NumPy itself refuses headers above 10000 bytes by default).
constexpr uint32_t NPY_MAX_HEADER_BYTES = 65536;

/// Largest .npy file npy_read() loads (golden samples are small).
constexpr uint64_t NPY_MAX_FILE_BYTES = uint64_t{1} << 32;

/// What a .npy header says: the tensor's dtype and shape, and where its data lies.
struct NpyHeader {
  DType dtype = DTYPE_FLOAT32;
  std::vector<int64_t> shape;
  size_t data_offset = 0;   ///< bytes from the file's start to its data (magic + header)
  uint64_t data_bytes = 0;  ///< element count times the dtype's size (checked not to overflow)
};

/// Parse only the header of the .npy file at `bytes` (`size` bytes available; the data may be
/// missing or followed by more). Reads at most the prelude and `max_header_bytes` of header text.
/// Throws Error(ERROR_CODE_INVALID_ARGUMENT) naming `name` on a malformed or unsupported header.
NpyHeader npy_header_parse(const char* bytes, size_t size, const std::string& name,
                           uint32_t max_header_bytes = NPY_MAX_HEADER_BYTES);

/// Parse the bytes of a .npy file; `name` is used in error messages (e.g. the file's path).
/// Throws Error(ERROR_CODE_INVALID_ARGUMENT) on any malformed or unsupported content.
Tensor npy_parse(const std::string& bytes, const std::string& name = "npy data");

/// Parse the .npy file starting at `*offset` in `bytes` (several may be concatenated, as the
/// agent's HTTP API sends them) and move `*offset` past it. The checks of npy_parse(), except that
/// bytes may follow the data.
Tensor npy_parse_next(const std::string& bytes, size_t* offset, const std::string& name = "npy data");

/// Read and parse a .npy file. A missing or unreadable file is Error(ERROR_CODE_IO).
Tensor npy_read(const std::string& path);

/// Serialise a C-contiguous tensor as .npy bytes (version 1, or 2 if the header needs it).
std::string npy_serialize(const TensorView& view);

/// Write a tensor to a .npy file; throws Error(ERROR_CODE_IO) if it cannot be written.
void npy_write(const std::string& path, const TensorView& view);

}  // namespace edgesmith
