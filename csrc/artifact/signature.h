// Reader of manifest.sig: integrity rules 1 and 2 of docs/artifact.md.
#pragma once

#include <array>
#include <cstdint>
#include <string>

#include "common/digest.h"

namespace edgesmith {

/// File name of the signature inside an artifact directory.
extern const char* const SIGNATURE_FILE;

/// Largest manifest.sig accepted (a real one is about 400 bytes).
constexpr uint64_t SIGNATURE_MAX_BYTES = 64u << 10;

/// A parsed manifest.sig whose fields are well-formed and whose key_id matches its key.
struct Signature {
  std::string key_id;                                         ///< 16 lower-case hex chars
  std::array<uint8_t, ED25519_PUBLIC_KEY_BYTES> public_key{};
  std::string manifest_sha256;                                ///< 64 lower-case hex chars
  std::array<uint8_t, ED25519_SIGNATURE_BYTES> signature{};
};

/// The key id of an Ed25519 public key: the first 16 hex chars of its SHA-256.
std::string key_id_compute(const uint8_t* public_key);

/// Parse manifest.sig text and check rules 1 (fields) and 2 (key_id); throws
/// Error(ERROR_CODE_INTEGRITY, ..., "manifest.sig").
Signature signature_parse(const std::string& text);

}  // namespace edgesmith
