#include "common/digest.h"

#include <sodium.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>
#include <vector>

#include "common/error.h"
#include "common/strings.h"

namespace edgesmith {

namespace {

constexpr size_t HASH_CHUNK_BYTES = 1 << 20;

struct FileCloser {
  void operator()(std::FILE* f) const { std::fclose(f); }
};

}  // namespace

void sodium_ensure_init() {
  static const int status = sodium_init();  // 0: initialised now, 1: already, -1: failure
  if (status < 0) {
    throw Error(ERROR_CODE_IO, "libsodium could not be initialised; check that the system's "
                               "random number source (/dev/urandom) is available");
  }
}

std::string sha256_bytes(const uint8_t* data, size_t size) {
  sodium_ensure_init();
  uint8_t digest[SHA256_BYTES];
  crypto_hash_sha256(digest, data, size);
  return hex_encode(digest, sizeof digest);
}

std::string sha256_string(const std::string& bytes) {
  return sha256_bytes(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
}

std::string sha256_file(const std::string& path, uint64_t* size_out) {
  sodium_ensure_init();
  std::unique_ptr<std::FILE, FileCloser> file(std::fopen(path.c_str(), "rb"));
  if (!file) {
    throw Error(ERROR_CODE_IO, "cannot open " + string_quote(path) + " for hashing (" +
                                   std::strerror(errno) + "); check that it exists and is readable");
  }
  crypto_hash_sha256_state state;
  crypto_hash_sha256_init(&state);
  std::vector<uint8_t> chunk(HASH_CHUNK_BYTES);
  uint64_t total = 0;
  for (;;) {
    const size_t n = std::fread(chunk.data(), 1, chunk.size(), file.get());
    if (n > 0) {
      crypto_hash_sha256_update(&state, chunk.data(), n);
      total += n;
    }
    if (n < chunk.size()) {
      if (std::ferror(file.get())) {
        throw Error(ERROR_CODE_IO, "reading " + string_quote(path) +
                                       " failed part-way; check the storage it lives on");
      }
      break;
    }
  }
  uint8_t digest[SHA256_BYTES];
  crypto_hash_sha256_final(&state, digest);
  if (size_out != nullptr) *size_out = total;
  return hex_encode(digest, sizeof digest);
}

std::string sha256_fd(int fd, uint64_t* size_out, int copy_fd, const std::string& name) {
  sodium_ensure_init();
  crypto_hash_sha256_state state;
  crypto_hash_sha256_init(&state);
  std::vector<uint8_t> chunk(HASH_CHUNK_BYTES);
  uint64_t total = 0;
  for (;;) {
    const ssize_t n = ::read(fd, chunk.data(), chunk.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      throw Error(ERROR_CODE_IO, "reading " + name + " failed part-way (" + std::strerror(errno) +
                                     "); check the storage it lives on");
    }
    if (n == 0) break;
    crypto_hash_sha256_update(&state, chunk.data(), static_cast<size_t>(n));
    total += static_cast<uint64_t>(n);
    for (ssize_t written = 0; copy_fd >= 0 && written < n;) {
      const ssize_t w = ::write(copy_fd, chunk.data() + written, static_cast<size_t>(n - written));
      if (w < 0 && errno == EINTR) continue;
      if (w < 0) {
        throw Error(ERROR_CODE_IO, "copying " + name + " for loading failed (" + std::strerror(errno) +
                                       "); check the free space of $TMPDIR (or /tmp)");
      }
      written += w;
    }
  }
  uint8_t digest[SHA256_BYTES];
  crypto_hash_sha256_final(&state, digest);
  if (size_out != nullptr) *size_out = total;
  return hex_encode(digest, sizeof digest);
}

bool secret_equal(const std::string& a, const std::string& b) {
  sodium_ensure_init();
  unsigned char da[crypto_hash_sha256_BYTES];
  unsigned char db[crypto_hash_sha256_BYTES];
  crypto_hash_sha256(da, reinterpret_cast<const unsigned char*>(a.data()), a.size());
  crypto_hash_sha256(db, reinterpret_cast<const unsigned char*>(b.data()), b.size());
  return sodium_memcmp(da, db, sizeof da) == 0;
}

bool ed25519_verify(const std::string& message, const uint8_t* signature,
                    const uint8_t* public_key) {
  sodium_ensure_init();
  return crypto_sign_verify_detached(signature,
                                     reinterpret_cast<const unsigned char*>(message.data()),
                                     message.size(), public_key) == 0;
}

}  // namespace edgesmith
