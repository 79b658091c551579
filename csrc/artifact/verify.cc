#include "artifact/verify.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <set>
#include <system_error>
#include <utility>

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

// An open file descriptor, closed on scope exit.
class Fd {
 public:
  explicit Fd(int fd = -1) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  Fd(Fd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  Fd& operator=(Fd&& other) noexcept {
    std::swap(fd_, other.fd_);
    return *this;
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }

 private:
  int fd_;
};

// The artifact directory, resolved once: every file is opened relative to this descriptor, so a
// directory renamed or replaced after this point changes nothing.
fs::path root_open(const std::string& dir, Fd* fd) {
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
  *fd = Fd(::open(root.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (fd->get() < 0) {
    throw Error(ERROR_CODE_IO, "artifact directory " + string_quote(dir) + " cannot be opened (" +
                                   std::strerror(errno) + "); check its permissions");
  }
  return root;
}

// `rel` (checked by artifact_path_check) below the directory `root`, opened without following a
// symlink at any step, as a regular file. `expected` describes the file for a missing one.
Fd file_open_below(int root, const std::string& rel, ErrorCode code, const std::string& expected) {
  std::vector<std::string> parts;
  for (size_t start = 0; start <= rel.size();) {
    const size_t end = std::min(rel.find('/', start), rel.size());
    parts.push_back(rel.substr(start, end - start));
    start = end + 1;
  }
  const auto fail_open = [&](int error) {
    if (error == ENOENT) throw Error(code, rel + ": the file is missing" + expected + " — " + REDO, rel);
    if (error == ELOOP || error == ENOTDIR) {
      throw Error(code, rel + ": the file or a folder on its path is a symlink; an artifact holds regular files " +
                            "only (a symlink could point outside the artifact or be swapped after verification) — " +
                            REDO, rel);
    }
    throw Error(ERROR_CODE_IO, rel + ": cannot be opened (" + std::strerror(error) + "); check its permissions", rel);
  };
  Fd dir;
  int at = root;
  for (size_t i = 0; i + 1 < parts.size(); ++i) {
    Fd next(::openat(at, parts[i].c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
    if (next.get() < 0) fail_open(errno);
    dir = std::move(next);
    at = dir.get();
  }
  // O_NONBLOCK: opening a FIFO planted in the artifact must not hang; it is refused below.
  Fd file(::openat(at, parts.back().c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK));
  if (file.get() < 0) fail_open(errno);
  struct stat st {};
  if (::fstat(file.get(), &st) != 0) fail_open(errno);
  if (!S_ISREG(st.st_mode)) {
    throw Error(code, rel + ": the file is not a regular file (a directory or device); " + std::string(REDO), rel);
  }
  return file;
}

uint64_t fd_size(int fd, const std::string& rel) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    throw Error(ERROR_CODE_IO, rel + ": cannot be read (" + std::string(std::strerror(errno)) + ")", rel);
  }
  return static_cast<uint64_t>(st.st_size);
}

// A small file (manifest.json, manifest.sig) read whole from its descriptor.
std::string small_file_read(int root, const std::string& rel, uint64_t max_bytes) {
  const Fd fd = file_open_below(root, rel, ERROR_CODE_INTEGRITY, "");
  const uint64_t size = fd_size(fd.get(), rel);
  if (size > max_bytes) {
    integrity_fail(rel, "is " + std::to_string(size) + " bytes, at most " + std::to_string(max_bytes) +
                            " are expected; it is not an edgesmith file — " + REDO);
  }
  std::string text;
  char chunk[65536];
  for (;;) {
    const ssize_t n = ::read(fd.get(), chunk, sizeof chunk);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw Error(ERROR_CODE_IO, rel + ": reading failed part-way; check the storage it lives on", rel);
    if (n == 0) break;
    if (text.size() + static_cast<size_t>(n) > max_bytes) integrity_fail(rel, "grew while it was read — " + std::string(REDO));
    text.append(chunk, static_cast<size_t>(n));
  }
  return text;
}

// Where verified bytes are copied for loading: `copy_to`/`rel`, its folders made private.
Fd copy_open(const std::string& copy_to, const std::string& rel) {
  const fs::path target = fs::path(copy_to) / rel;
  std::vector<fs::path> missing;  // the folders between copy_to and the file, innermost first
  for (fs::path d = target.parent_path(); d != fs::path(copy_to) && !fs::exists(d); d = d.parent_path()) {
    missing.push_back(d);
  }
  for (auto it = missing.rbegin(); it != missing.rend(); ++it) {
    if (::mkdir(it->c_str(), 0700) != 0 && errno != EEXIST) {
      throw Error(ERROR_CODE_IO, "cannot make " + it->string() + " to load the artifact from (" +
                                     std::strerror(errno) + ")");
    }
  }
  Fd fd(::open(target.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600));
  if (fd.get() < 0) {
    throw Error(ERROR_CODE_IO, "cannot write " + target.string() + " to load the artifact from (" +
                                   std::strerror(errno) + "); check the free space of $TMPDIR (or /tmp)");
  }
  return fd;
}

void copy_write(const std::string& copy_to, const std::string& rel, const std::string& bytes) {
  const Fd fd = copy_open(copy_to, rel);
  size_t written = 0;
  while (written < bytes.size()) {
    const ssize_t w = ::write(fd.get(), bytes.data() + written, bytes.size() - written);
    if (w < 0 && errno == EINTR) continue;
    if (w < 0) throw Error(ERROR_CODE_IO, "cannot write " + rel + " to load the artifact from (" + std::strerror(errno) + ")");
    written += static_cast<size_t>(w);
  }
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

// Rule 7 for one entry: opened below the root without following symlinks, and hashed from that
// descriptor (and, with `copy_to`, copied from the very bytes hashed).
void file_check(int root, const ManifestFile& file, const std::string& copy_to) {
  artifact_path_check(file.path);
  const Fd fd = file_open_below(root, file.path, ERROR_CODE_INTEGRITY,
                                ", the manifest expects " + std::to_string(file.size) + " bytes");
  const uint64_t size = fd_size(fd.get(), file.path);
  if (size != file.size) {
    integrity_fail(file.path, "size is " + std::to_string(size) + " bytes, the manifest expects " +
                                  std::to_string(file.size) +
                                  "; the file was truncated or changed after signing — " + REDO);
  }
  const Fd copy = copy_to.empty() ? Fd() : copy_open(copy_to, file.path);
  uint64_t hashed = 0;
  const std::string digest = sha256_fd(fd.get(), &hashed, copy.get(), string_quote(file.path));
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
                             const std::vector<std::vector<uint8_t>>& trusted_public_keys,
                             const std::string& copy_to) {
  try {
    Fd root_fd;
    const fs::path root = root_open(dir, &root_fd);

    // Rules 1 and 2.
    const std::string sig_bytes = small_file_read(root_fd.get(), SIGNATURE_FILE, SIGNATURE_MAX_BYTES);
    const Signature sig = signature_parse(sig_bytes);
    // Rule 3.
    key_check_trusted(sig, trusted_public_keys);
    // Rules 4 and 5.
    VerifyResult result;
    result.manifest_json = small_file_read(root_fd.get(), MANIFEST_FILE, MANIFEST_MAX_BYTES);
    manifest_check_signed(result.manifest_json, sig);
    // Rule 6.
    result.manifest = manifest_parse(result.manifest_json);
    if (!copy_to.empty()) {
      copy_write(copy_to, SIGNATURE_FILE, sig_bytes);
      copy_write(copy_to, MANIFEST_FILE, result.manifest_json);
    }
    // Rule 7.
    for (const ManifestFile& file : result.manifest.files) file_check(root_fd.get(), file, copy_to);
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
