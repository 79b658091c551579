#include "artifact/signature.h"

#include <algorithm>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/error.h"
#include "common/strings.h"

namespace edgesmith {

const char* const SIGNATURE_FILE = "manifest.sig";

namespace {

using json = nlohmann::json;

constexpr const char* SIGNATURE_KEYS[] = {"algorithm", "key_id", "manifest_sha256", "public_key",
                                          "signature"};

[[noreturn]] void signature_fail(const std::string& problem) {
  throw Error(ERROR_CODE_INTEGRITY,
              std::string(SIGNATURE_FILE) + ": " + problem +
                  "; the signature file is damaged — re-sign the artifact or re-download it",
              SIGNATURE_FILE);
}

std::string field_read(const json& root, const char* key) {
  const auto it = root.find(key);
  if (it == root.end()) signature_fail(std::string("the key \"") + key + "\" is missing");
  if (!it->is_string()) {
    signature_fail(std::string("\"") + key + "\" must be a string, got " + it->type_name());
  }
  return it->get<std::string>();
}

std::string hex_field_read(const json& root, const char* key, size_t length) {
  std::string value = field_read(root, key);
  if (!hex_is_lower(value, length)) {
    signature_fail(std::string("\"") + key + "\" must be " + std::to_string(length) +
                   " lower-case hex characters, got " + string_quote(value, 24));
  }
  return value;
}

}  // namespace

std::string key_id_compute(const uint8_t* public_key) {
  return sha256_bytes(public_key, ED25519_PUBLIC_KEY_BYTES).substr(0, 16);
}

Signature signature_parse(const std::string& text) {
  json root;
  try {
    root = json::parse(text);
  } catch (const json::parse_error& e) {
    signature_fail("not valid JSON (syntax error at byte " + std::to_string(e.byte) + ")");
  }
  if (!root.is_object()) signature_fail(std::string("must hold a JSON object, got ") + root.type_name());
  for (const auto& item : root.items()) {
    const auto known = std::find(std::begin(SIGNATURE_KEYS), std::end(SIGNATURE_KEYS), item.key());
    if (known == std::end(SIGNATURE_KEYS)) {
      signature_fail("has an unexpected key " + string_quote(item.key(), 24));
    }
  }

  // Rule 1: the fields are well-formed.
  const std::string algorithm = field_read(root, "algorithm");
  if (algorithm != "ed25519") {
    signature_fail("\"algorithm\" is " + string_quote(algorithm, 24) + ", expected \"ed25519\"");
  }
  Signature sig;
  sig.key_id = hex_field_read(root, "key_id", 16);
  std::vector<uint8_t> bytes;
  hex_decode(hex_field_read(root, "public_key", 2 * ED25519_PUBLIC_KEY_BYTES), &bytes);
  std::copy(bytes.begin(), bytes.end(), sig.public_key.begin());
  sig.manifest_sha256 = hex_field_read(root, "manifest_sha256", 2 * SHA256_BYTES);
  hex_decode(hex_field_read(root, "signature", 2 * ED25519_SIGNATURE_BYTES), &bytes);
  std::copy(bytes.begin(), bytes.end(), sig.signature.begin());

  // Rule 2: key_id belongs to public_key.
  const std::string expected_id = key_id_compute(sig.public_key.data());
  if (sig.key_id != expected_id) {
    signature_fail("key_id is " + sig.key_id + ", but the public key's id is " + expected_id);
  }
  return sig;
}

}  // namespace edgesmith
