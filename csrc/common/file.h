// Reading small files whole (manifest.json, manifest.sig).
#pragma once

#include <cstdint>
#include <string>

#include "common/error.h"

namespace edgesmith {

/// Read a whole file of at most `max_bytes`. A missing file, a non-regular file or one larger
/// than `max_bytes` throws Error(`code`, ..., `blame`) whose message names `blame`
/// (or the path when `blame` is empty); other read failures throw ERROR_CODE_IO.
std::string file_read(const std::string& path, uint64_t max_bytes, ErrorCode code,
                      const std::string& blame);

}  // namespace edgesmith
