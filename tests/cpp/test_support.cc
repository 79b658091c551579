#include "test_support.h"

#include <sodium.h>

#include <fstream>
#include <random>

#include "common/digest.h"
#include "common/strings.h"

namespace edgesmith::test {

namespace fs = std::filesystem;

TempDir::TempDir() {
  std::random_device entropy;
  std::mt19937_64 rng(entropy());
  path_ = fs::temp_directory_path() / ("edgesmith-test-" + std::to_string(rng()));
  fs::create_directories(path_);
}

TempDir::~TempDir() {
  std::error_code ec;
  fs::remove_all(path_, ec);
}

void file_write(const fs::path& path, const std::string& bytes) {
  fs::create_directories(path.parent_path());
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

TestKey test_key_make(uint8_t seed_byte) {
  sodium_ensure_init();
  std::array<uint8_t, 32> seed;
  seed.fill(seed_byte);
  TestKey key;
  crypto_sign_seed_keypair(key.public_key.data(), key.secret_key.data(), seed.data());
  return key;
}

nlohmann::json manifest_make(const std::vector<std::pair<std::string, std::string>>& payload) {
  nlohmann::json files = nlohmann::json::array();
  for (const auto& [path, bytes] : payload) {
    files.push_back({{"path", path}, {"size", bytes.size()}, {"sha256", sha256_string(bytes)}});
  }
  return {
      {"schema_version", 1},
      {"name", "tiny-x86_64-avx2-openvino"},
      {"model", {{"name", "tiny"}, {"version", "1"}}},
      {"target", {{"name", "x86_64-avx2"}, {"isa", "x86_64"}}},
      {"backend", {{"name", "openvino"}, {"version", "2026.4.1"}}},
      {"payload", {{"format", "openvino-ir"}, {"entry", "model.xml"}}},
      {"files", files},
      {"inputs", {{{"name", "x"}, {"dtype", "float32"}, {"shape", {1, 4}}}}},
      {"outputs", {{{"name", "y"}, {"dtype", "float32"}, {"shape", {1, 2}}}}},
      {"golden",
       {{"inputs", {"golden/input_0.npy"}},
        {"outputs", {"golden/output_0.npy"}},
        {"atol", 1e-4},
        {"rtol", 1e-3}}},
  };
}

void artifact_sign(const fs::path& dir, const std::string& manifest_text, const TestKey& key) {
  file_write(dir / "manifest.json", manifest_text);
  std::array<uint8_t, 64> signature{};
  crypto_sign_detached(signature.data(), nullptr,
                       reinterpret_cast<const unsigned char*>(manifest_text.data()),
                       manifest_text.size(), key.secret_key.data());
  const std::string public_hex = hex_encode(key.public_key.data(), key.public_key.size());
  const nlohmann::json sig = {
      {"algorithm", "ed25519"},
      {"key_id", sha256_bytes(key.public_key.data(), key.public_key.size()).substr(0, 16)},
      {"public_key", public_hex},
      {"manifest_sha256", sha256_string(manifest_text)},
      {"signature", hex_encode(signature.data(), signature.size())},
  };
  file_write(dir / "manifest.sig", sig.dump(2) + "\n");
}

void artifact_write(const fs::path& dir, const TestKey& key) {
  const std::vector<std::pair<std::string, std::string>> payload = {
      {"golden/input_0.npy", "input-bytes"},
      {"golden/output_0.npy", "output-bytes"},
      {"model.bin", std::string(3000, '\x42')},
      {"model.xml", "<net/>"},
  };
  for (const auto& [path, bytes] : payload) file_write(dir / path, bytes);
  artifact_sign(dir, manifest_make(payload).dump(2) + "\n", key);
}

std::vector<uint8_t> key_bytes(const TestKey& key) {
  return {key.public_key.begin(), key.public_key.end()};
}

}  // namespace edgesmith::test
