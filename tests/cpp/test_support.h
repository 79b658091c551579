// Helpers for the core tests: a temporary directory and a signed artifact built inside it.
#pragma once

#include <array>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace edgesmith::test {

/// A fresh directory under the system temp dir, removed on destruction.
class TempDir {
 public:
  /// Create the directory.
  TempDir();
  /// Remove the directory and everything in it.
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  /// The directory.
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

/// Write `bytes` to `path`, creating parent directories.
void file_write(const std::filesystem::path& path, const std::string& bytes);

/// A fixed Ed25519 keypair derived from a constant seed.
struct TestKey {
  std::array<uint8_t, 32> public_key{};
  std::array<uint8_t, 64> secret_key{};
};

/// The keypair of seed `seed_byte` repeated 32 times.
TestKey test_key_make(uint8_t seed_byte);

/// A schema-valid manifest (as JSON) whose `files` describe `payload` (path -> bytes).
nlohmann::json manifest_make(const std::vector<std::pair<std::string, std::string>>& payload);

/// Write manifest.json (the exact bytes `manifest_text`) and manifest.sig signed by `key`.
void artifact_sign(const std::filesystem::path& dir, const std::string& manifest_text,
                   const TestKey& key);

/// Write a complete valid artifact (payload files, manifest.json, manifest.sig) into `dir`.
void artifact_write(const std::filesystem::path& dir, const TestKey& key);

/// Write a signed artifact for the test-only `testecho` backend (tests/cpp/testecho_backend.cc):
/// inputs x float32 (2, 3) and n int64 (4,), outputs y = 2x and m = n, two golden samples,
/// monitoring {y: classes 3, m: histogram [0, 1, 2, 3]}, target ISA = this host's. `extra`
/// files are added to the payload, and `mutate` edits the manifest before it is signed.
void echo_artifact_write(const std::filesystem::path& dir, const TestKey& key,
                         const std::function<void(nlohmann::json&)>& mutate = {},
                         const std::vector<std::pair<std::string, std::string>>& extra = {});

/// Directory holding the test plugins (libedgesmith_backend_testecho.so).
std::string test_backend_dir();

/// `key` as the byte vector artifact_verify takes.
std::vector<uint8_t> key_bytes(const TestKey& key);

/// A random Ed25519 deploy key, signing desired states as `edgesmith deploy` does.
struct DeployKey {
  std::vector<uint8_t> pk;  ///< public key (32 bytes)
  std::vector<uint8_t> sk;  ///< secret key (64 bytes)
  /// Make a fresh keypair.
  DeployKey();
  /// The key id (key_id_compute of the public key).
  std::string id() const;
  /// The detached signature of `message`, hex.
  std::string sign(const std::string& message) const;
};

}  // namespace edgesmith::test
