// SHA-256 and Ed25519 through libsodium (the primitives PyNaCl uses on the central side).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace edgesmith {

/// Size in bytes of a SHA-256 digest, an Ed25519 public key and an Ed25519 signature.
constexpr size_t SHA256_BYTES = 32;
constexpr size_t ED25519_PUBLIC_KEY_BYTES = 32;
constexpr size_t ED25519_SIGNATURE_BYTES = 64;

/// Initialise libsodium once (thread-safe); throws Error(ERROR_CODE_IO) if it cannot start.
void sodium_ensure_init();

/// Lower-case hex SHA-256 of `size` bytes at `data`.
std::string sha256_bytes(const uint8_t* data, size_t size);

/// Lower-case hex SHA-256 of a string's bytes.
std::string sha256_string(const std::string& bytes);

/// Lower-case hex SHA-256 of a file, read in fixed-size chunks (files may be hundreds of MB).
/// `size_out`, when not null, receives the number of bytes hashed. Throws Error(ERROR_CODE_IO).
std::string sha256_file(const std::string& path, uint64_t* size_out = nullptr);

/// Lower-case hex SHA-256 of what remains to be read from the open file `fd` (read to its end).
/// When `copy_fd` >= 0, every byte hashed is also written to it, so the copy holds exactly the
/// bytes the digest covers. `name` is used in messages. Throws Error(ERROR_CODE_IO).
std::string sha256_fd(int fd, uint64_t* size_out, int copy_fd, const std::string& name);

/// True when the secrets `a` and `b` are equal, in time that depends on neither's content nor on
/// where they differ (both are hashed, and the digests compared with sodium_memcmp).
bool secret_equal(const std::string& a, const std::string& b);

/// True when `signature` (64 bytes) is a valid Ed25519 signature of `message` by `public_key`
/// (32 bytes).
bool ed25519_verify(const std::string& message, const uint8_t* signature,
                    const uint8_t* public_key);

}  // namespace edgesmith
