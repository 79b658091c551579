// `edgesmith verify` on the device: the eight integrity rules of docs/artifact.md, in order.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "artifact/manifest.h"

namespace edgesmith {

/// What a successful verification established.
struct VerifyResult {
  std::string key_id;         ///< id of the trusted key that signed the artifact
  Manifest manifest;          ///< the parsed, signature-covered manifest
  std::string manifest_json;  ///< the exact signed bytes of manifest.json
  uint32_t file_count = 0;    ///< number of `files` entries checked (manifest.* not counted)
};

/// Check that `path` names a safe artifact-relative file: not empty, not absolute, no `..`, `.`
/// or empty components, no backslash or NUL. Throws Error(ERROR_CODE_INTEGRITY, ..., path).
void artifact_path_check(const std::string& path);

/// Verify the artifact directory `dir` against `trusted_public_keys` (32-byte Ed25519 keys),
/// applying rules 1-8 in order. The directory is resolved once and every file is opened below it
/// without following symlinks (openat with O_NOFOLLOW; a symlink is refused) and hashed from that
/// descriptor. With `copy_to` (an existing private directory), every verified file is also written
/// there from the very bytes that were hashed: what a loader opens from `copy_to` is what was
/// verified, whatever happens to `dir` afterwards. Throws Error(ERROR_CODE_INTEGRITY) naming the offending file,
/// Error(ERROR_CODE_MANIFEST) for a signed but malformed manifest, ERROR_CODE_IO when the
/// directory cannot be read and ERROR_CODE_INVALID_ARGUMENT for a malformed trusted key.
VerifyResult artifact_verify(const std::string& dir,
                             const std::vector<std::vector<uint8_t>>& trusted_public_keys,
                             const std::string& copy_to = "");

}  // namespace edgesmith
