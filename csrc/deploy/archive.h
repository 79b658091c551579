// Strict extraction of an artifact archive (docs/deployment.md §1): POSIX ustar, regular files and
// directories only; links, devices, FIFOs, absolute names, `..` or `.` components, duplicates and
// names over 255 bytes are refused. Nothing is followed or created but plain files and directories.
#pragma once

#include <cstdint>
#include <string>

namespace edgesmith {

/// Largest member name accepted (ustar's prefix + name).
constexpr size_t ARCHIVE_MAX_NAME_BYTES = 255;

/// Check one member name (a trailing '/' allowed for directories); throws
/// Error(ERROR_CODE_INTEGRITY) naming the member and the rule it breaks.
void archive_member_name_check(const std::string& name);

/// Extract the ustar archive `tar_path` into `dest_dir`, which must not exist yet (it is created
/// 0700). At most `max_bytes` of file contents are written. Throws Error(ERROR_CODE_INTEGRITY) for
/// an archive that breaks a rule (the partly extracted directory is left for the caller to
/// delete), ERROR_CODE_IO when writing fails.
void archive_extract(const std::string& tar_path, const std::string& dest_dir, uint64_t max_bytes);

}  // namespace edgesmith
