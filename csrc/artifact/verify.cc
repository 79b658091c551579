#include "artifact/verify.h"

#include <algorithm>
#include <filesystem>
#include <set>
#include <system_error>

#include "artifact/signature.h"
#include "common/digest.h"
#include "common/error.h"
#include "common/file.h"
#include "common/strings.h"

namespace edgesmith {

namespace fs = std::filesystem;

namespace {

const char* const REDO = "rebuild or re-download the artifact";

[[noreturn]] void integrity_fail(const std::string& path, const std::string& problem) {
  throw Error(ERROR_CODE_INTEGRITY, path + ": " + problem, path);
}

fs::path root_open(const std::string& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    throw Error(ERROR_CODE_IO, "artifact directory " + string_quote(dir) +
                                   " does not exist or is not a directory; check the path");
  }
  fs::path root = fs::canonical(dir, ec);
  if (ec) {
    throw Error(ERROR_CODE_IO, "artifact directory " + string_quote(dir) + " cannot be opened (" +
                                   ec.message() + "); check its permissions");
  }
  return root;
}

// Rule 3.
void key_check_trusted(const Signature& sig,
                       const std::vector<std::vector<uint8_t>>& trusted_public_keys) {
  for (const auto& key : trusted_public_keys) {
    if (key.size() != ED25519_PUBLIC_KEY_BYTES) {
      throw Error(ERROR_CODE_INVALID_ARGUMENT,
                  "a trusted public key has " + std::to_string(key.size()) +
                      " bytes, an Ed25519 public key has 32; pass the raw key bytes");
    }
  }
  for (const auto& key : trusted_public_keys) {
    if (std::equal(key.begin(), key.end(), sig.public_key.begin())) return;
  }
  const std::string where = trusted_public_keys.empty()
                                ? "but no trusted keys were given"
                                : "which is not one of the " +
                                      std::to_string(trusted_public_keys.size()) + " trusted keys";
  integrity_fail(SIGNATURE_FILE,
                 "signed with key " + sig.key_id + ", " + where +
                     "; pass the signer's .pub with --key or copy it to "
                     "$EDGESMITH_HOME/trusted/ if you trust it");
}

// Rules 4 and 5.
void manifest_check_signed(const std::string& manifest_json, const Signature& sig) {
  const std::string digest = sha256_string(manifest_json);
  if (digest != sig.manifest_sha256) {
    integrity_fail(MANIFEST_FILE, "SHA-256 is " + hex_abbrev(digest) + ", manifest.sig expects " +
                                      hex_abbrev(sig.manifest_sha256) +
                                      "; the manifest was changed after signing — " + REDO);
  }
  if (!ed25519_verify(manifest_json, sig.signature.data(), sig.public_key.data())) {
    integrity_fail(SIGNATURE_FILE,
                   "the Ed25519 signature does not verify over manifest.json; the signature was "
                   "changed or made for other bytes — re-sign or re-download the artifact");
  }
}

// Rule 7 for one entry.
void file_check(const fs::path& root, const ManifestFile& file) {
  artifact_path_check(file.path);
  const fs::path full = root / file.path;
  std::error_code ec;
  const fs::file_status link_status = fs::symlink_status(full, ec);
  if (link_status.type() == fs::file_type::not_found) {
    integrity_fail(file.path, "the file is missing, the manifest expects " +
                                  std::to_string(file.size) + " bytes — " + REDO);
  }
  if (ec) {
    throw Error(ERROR_CODE_IO, file.path + ": cannot be read (" + ec.message() +
                                   "); check its permissions", file.path);
  }
  const fs::path resolved = fs::canonical(full, ec);
  if (ec) {
    integrity_fail(file.path, "the file is a symlink whose target does not exist; " + std::string(REDO));
  }
  const std::string root_prefix = root.string() + "/";
  if (resolved.string().compare(0, root_prefix.size(), root_prefix) != 0) {
    integrity_fail(file.path, "the file resolves to " + string_quote(resolved.string()) +
                                  ", outside the artifact directory; a symlink must not leave "
                                  "the artifact — " + REDO);
  }
  if (!fs::is_regular_file(resolved, ec)) {
    integrity_fail(file.path, "the file is not a regular file (a directory or device); " +
                                  std::string(REDO));
  }
  const uintmax_t size = fs::file_size(resolved, ec);
  if (ec) {
    throw Error(ERROR_CODE_IO, file.path + ": cannot be read (" + ec.message() +
                                   "); check its permissions", file.path);
  }
  if (size != file.size) {
    integrity_fail(file.path, "size is " + std::to_string(size) + " bytes, the manifest expects " +
                                  std::to_string(file.size) +
                                  "; the file was truncated or changed after signing — " + REDO);
  }
  uint64_t hashed = 0;
  const std::string digest = sha256_file(resolved.string(), &hashed);
  if (digest != file.sha256 || hashed != file.size) {
    integrity_fail(file.path, "SHA-256 is " + hex_abbrev(digest) + ", the manifest expects " +
                                  hex_abbrev(file.sha256) +
                                  "; the file was changed after signing — " + REDO);
  }
}

// Rule 8: nothing but manifest.json, manifest.sig and the listed files. Every non-directory
// entry counts (symlinks, sockets, ...), and directory symlinks are not followed.
void root_check_no_extra(const fs::path& root, const Manifest& manifest) {
  std::set<std::string> allowed = {MANIFEST_FILE, SIGNATURE_FILE};
  for (const ManifestFile& file : manifest.files) allowed.insert(file.path);

  std::error_code ec;
  fs::recursive_directory_iterator it(root, fs::directory_options::none, ec);
  std::vector<std::string> extra;
  for (; !ec && it != fs::recursive_directory_iterator(); it.increment(ec)) {
    const fs::file_status status = it->symlink_status(ec);
    if (ec) break;
    if (status.type() == fs::file_type::directory) continue;
    const std::string rel = it->path().lexically_relative(root).generic_string();
    if (allowed.count(rel) == 0) extra.push_back(rel);
  }
  if (ec) {
    throw Error(ERROR_CODE_IO, "listing the artifact directory failed (" + ec.message() +
                                   "); check its permissions");
  }
  if (!extra.empty()) {
    const std::string& first = *std::min_element(extra.begin(), extra.end());
    const std::string more =
        extra.size() > 1 ? " (and " + std::to_string(extra.size() - 1) + " more)" : "";
    integrity_fail(first, "the file is not listed in the manifest" + more +
                              ", so the signature does not cover it — delete it, or " + REDO);
  }
}

}  // namespace

void artifact_path_check(const std::string& path) {
  const auto fail = [&path](const std::string& problem) {
    throw Error(ERROR_CODE_INTEGRITY,
                string_quote(path) + ": " + problem + "; the manifest lists a file outside the "
                                                      "artifact directory — " + REDO,
                path);
  };
  if (path.empty()) fail("an empty path is not an artifact file");
  if (path.front() == '/') fail("is an absolute path, artifact paths are relative");
  if (path.find('\0') != std::string::npos) fail("contains a NUL character");
  if (path.find('\\') != std::string::npos) fail("contains a backslash, use '/' between folders");
  size_t start = 0;
  while (start <= path.size()) {
    const size_t end = std::min(path.find('/', start), path.size());
    const std::string part = path.substr(start, end - start);
    if (part == "..") fail("contains a '..' component");
    if (part.empty() || part == ".") fail("is not a normalised relative path");
    start = end + 1;
  }
}

VerifyResult artifact_verify(const std::string& dir,
                             const std::vector<std::vector<uint8_t>>& trusted_public_keys) {
  try {
    const fs::path root = root_open(dir);

    // Rules 1 and 2.
    const Signature sig = signature_parse(file_read((root / SIGNATURE_FILE).string(),
                                                    SIGNATURE_MAX_BYTES, ERROR_CODE_INTEGRITY,
                                                    SIGNATURE_FILE));
    // Rule 3.
    key_check_trusted(sig, trusted_public_keys);
    // Rules 4 and 5.
    VerifyResult result;
    result.manifest_json = file_read((root / MANIFEST_FILE).string(), MANIFEST_MAX_BYTES,
                                     ERROR_CODE_INTEGRITY, MANIFEST_FILE);
    manifest_check_signed(result.manifest_json, sig);
    // Rule 6.
    result.manifest = manifest_parse(result.manifest_json);
    // Rule 7.
    for (const ManifestFile& file : result.manifest.files) file_check(root, file);
    // Rule 8.
    root_check_no_extra(root, result.manifest);

    result.key_id = sig.key_id;
    result.file_count = static_cast<uint32_t>(result.manifest.files.size());
    return result;
  } catch (const fs::filesystem_error& e) {
    throw Error(ERROR_CODE_IO, std::string("reading the artifact failed (") + e.code().message() +
                                   "); check the directory and its permissions");
  }
}

}  // namespace edgesmith
