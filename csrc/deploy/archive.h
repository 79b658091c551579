// Strict extraction of an artifact archive (docs/deployment.md §1): POSIX ustar, regular files and
// directories only; links, devices, FIFOs, absolute names, `..` or `.` components, duplicates and
// names over 255 bytes are refused. Nothing is followed or created but plain files and directories.
#pragma once

#include <cstdint>
#include <string>

namespace edgesmith {

/// Largest member name accepted (ustar's prefix + name).
constexpr size_t ARCHIVE_MAX_NAME_BYTES = 255;

/// Most members (files and directories) accepted in one archive: an artifact holds a manifest, a
/// payload and golden samples, never thousands of files.
constexpr uint64_t ARCHIVE_MAX_MEMBERS = 4096;

/// Free space kept on the slot file system beyond what an extraction writes.
constexpr uint64_t ARCHIVE_FREE_SPACE_MARGIN_BYTES = 16ull << 20;

/// Check one member name (a trailing '/' allowed for directories); throws
/// Error(ERROR_CODE_INTEGRITY) naming the member and the rule it breaks.
void archive_member_name_check(const std::string& name);

/// What the headers of an archive announce (read without extracting anything).
struct ArchiveSummary {
  uint64_t members = 0;       ///< files and directories
  uint64_t content_bytes = 0; ///< sum of the files' sizes
};

/// Walk the headers of `tar_path` (seeking over contents): the member count and content size.
/// Throws Error(ERROR_CODE_INTEGRITY) past ARCHIVE_MAX_MEMBERS members or `max_bytes` of contents.
ArchiveSummary archive_summarize(const std::string& tar_path, uint64_t max_bytes);

/// Throw Error(ERROR_CODE_IO) unless the file system holding `dir` has `need_bytes` free for
/// this process (statvfs f_bavail).
void archive_space_check(const std::string& dir, uint64_t need_bytes);

/// Extract the ustar archive `tar_path` into `dest_dir`, which must not exist yet (it is created
/// 0700). At most `max_bytes` of file contents and ARCHIVE_MAX_MEMBERS members are accepted, and the
/// headers are summed first: the file system under `dest_dir` must have the contents' size plus
/// ARCHIVE_FREE_SPACE_MARGIN_BYTES free (statvfs) before anything is written. A directory entry
/// may come after files inside it (`dir/file` then `dir/`). Throws Error(ERROR_CODE_INTEGRITY) for
/// an archive that breaks a rule (the partly extracted directory is left for the caller to
/// delete), ERROR_CODE_IO when there is no room or writing fails.
void archive_extract(const std::string& tar_path, const std::string& dest_dir, uint64_t max_bytes);

}  // namespace edgesmith
