// Which signing keys a device trusts, the same rules as edgesmith.runtime.keys:
// $EDGESMITH_HOME/keys/*.pub then $EDGESMITH_HOME/trusted/*.pub, EDGESMITH_HOME defaulting to
// ~/.edgesmith. A .pub file holds one line: the 32-byte Ed25519 public key in hex.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace edgesmith {

/// $EDGESMITH_HOME, or ~/.edgesmith.
std::string keys_home();

/// Read a .pub file; a missing or malformed file throws Error(ERROR_CODE_INVALID_ARGUMENT).
std::vector<uint8_t> public_key_read(const std::string& path);

/// The keys trusted without being named (sorted by file name within each directory).
std::vector<std::vector<uint8_t>> trusted_keys_default();

}  // namespace edgesmith
