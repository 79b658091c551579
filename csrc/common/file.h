// Reading small files whole (manifest.json, manifest.sig), and whether a directory can be trusted.
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

/// Who may own a trusted path.
enum PathOwner : int32_t {
  PATH_OWNER_SELF = 0,          ///< only the effective user (a project's .edgesmith, as git's safe.directory)
  PATH_OWNER_SELF_OR_ROOT = 1,  ///< the effective user or root (provisioned trust and plugin directories)
};

/// Why `path` (symlinks followed) cannot be trusted to hold code or keys: one sentence naming
/// `what` and `path` with the chmod/chown that fixes it, when it is writable by group or others or
/// owned by someone `owner` does not allow; empty when it can be trusted or does not exist.
std::string path_trust_problem(const std::string& path, const std::string& what, PathOwner owner);

}  // namespace edgesmith
