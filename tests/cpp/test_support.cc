#include "test_support.h"

#include <sodium.h>

#include <algorithm>
#include <fstream>
#include <random>

#include "artifact/signature.h"
#include "common/digest.h"
#include "common/strings.h"
#include "runtime/isa.h"
#include "runtime/npy.h"

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
       {{"samples",
         {{{"inputs", {"golden/input_0.npy"}}, {"outputs", {"golden/output_0.npy"}}}}},
        {"atol", 1e-4},
        {"rtol", 1e-3}}},
      {"monitoring",
       {{"outputs", {{{"name", "y"}, {"kind", "classes"}, {"classes", 2}}}},
        {"latency", {{"start_us", 1.0}, {"factor", 1.189207115002721}, {"count", 96}}}}},
      {"proof", {{"status", "not-run"}, {"isa", "x86_64"}}},
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

void echo_artifact_write(const fs::path& dir, const TestKey& key,
                         const std::function<void(nlohmann::json&)>& mutate,
                         const std::vector<std::pair<std::string, std::string>>& extra) {
  std::vector<std::pair<std::string, std::string>> payload = {{"model.bin", "testecho payload"}};
  nlohmann::json samples = nlohmann::json::array();
  for (int s = 0; s < 2; ++s) {
    Tensor x(DTYPE_FLOAT32, {2, 3});
    Tensor y(DTYPE_FLOAT32, {2, 3});
    for (int i = 0; i < 6; ++i) {
      static_cast<float*>(x.data())[i] = static_cast<float>(i * (s + 1)) - 2.5f;
      static_cast<float*>(y.data())[i] = 2.0f * static_cast<float*>(x.data())[i];
    }
    Tensor n(DTYPE_INT64, {4});
    for (int i = 0; i < 4; ++i) static_cast<int64_t*>(n.data())[i] = i + s;
    const std::string prefix = "golden/sample_" + std::to_string(s) + "/";
    payload.emplace_back(prefix + "input_0.npy", npy_serialize(x.view()));
    payload.emplace_back(prefix + "input_1.npy", npy_serialize(n.view()));
    payload.emplace_back(prefix + "output_0.npy", npy_serialize(y.view()));
    payload.emplace_back(prefix + "output_1.npy", npy_serialize(n.view()));
    samples.push_back({{"inputs", {prefix + "input_0.npy", prefix + "input_1.npy"}},
                       {"outputs", {prefix + "output_0.npy", prefix + "output_1.npy"}}});
  }
  for (const auto& file : extra) payload.push_back(file);
  std::sort(payload.begin(), payload.end());
  for (const auto& [path, bytes] : payload) file_write(dir / path, bytes);

  nlohmann::json manifest = manifest_make(payload);
  manifest["name"] = "echo-host-testecho";
  manifest["target"] = {{"name", "host"}, {"isa", host_isa()}, {"threads", 2}};
  manifest["backend"] = {{"name", "testecho"}, {"version", "1.0"}, {"options", {{"mode", "double"}}}};
  manifest["payload"] = {{"format", "testecho"}, {"entry", "model.bin"}};
  manifest["inputs"] = {{{"name", "x"}, {"dtype", "float32"}, {"shape", {2, 3}}},
                        {{"name", "n"}, {"dtype", "int64"}, {"shape", {4}}}};
  manifest["outputs"] = {{{"name", "y"}, {"dtype", "float32"}, {"shape", {2, 3}}},
                         {{"name", "m"}, {"dtype", "int64"}, {"shape", {4}}}};
  manifest["golden"] = {{"samples", samples}, {"atol", 1e-5}, {"rtol", 1e-4}};
  manifest["monitoring"] = {
      {"outputs",
       {{{"name", "y"}, {"kind", "classes"}, {"classes", 3}},
        {{"name", "m"}, {"kind", "histogram"}, {"edges", {0.0, 1.0, 2.0, 3.0}}}}},
      {"latency", {{"start_us", 1.0}, {"factor", 2.0}, {"count", 40}}}};
  if (mutate) mutate(manifest);
  artifact_sign(dir, manifest.dump(2) + "\n", key);
}

std::string test_backend_dir() { return EDGESMITH_TEST_BACKEND_DIR; }

std::vector<uint8_t> key_bytes(const TestKey& key) {
  return {key.public_key.begin(), key.public_key.end()};
}

DeployKey::DeployKey() : pk(crypto_sign_PUBLICKEYBYTES), sk(crypto_sign_SECRETKEYBYTES) {
  sodium_ensure_init();
  crypto_sign_keypair(pk.data(), sk.data());
}

std::string DeployKey::id() const { return key_id_compute(pk.data()); }

std::string DeployKey::sign(const std::string& message) const {
  uint8_t sig[crypto_sign_BYTES];
  crypto_sign_detached(sig, nullptr, reinterpret_cast<const uint8_t*>(message.data()), message.size(), sk.data());
  return hex_encode(sig, sizeof(sig));
}

}  // namespace edgesmith::test
