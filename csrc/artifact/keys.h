// Which signing keys a device trusts, the same rules as edgesmith.runtime.keys:
// <home>/keys/*.pub then <home>/trusted/*.pub, where <home> is $EDGESMITH_HOME, else the nearest
// `.edgesmith` directory in the working directory or its parents, else ~/.edgesmith.
// A .pub file holds one line: the 32-byte Ed25519 public key in hex.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace edgesmith {

/// $EDGESMITH_HOME; else the nearest `.edgesmith` directory in the working directory or one of
/// its parents; else ~/.edgesmith (the rule of edgesmith.runtime.keys.edgesmith_home()).
std::string keys_home();

/// Read a .pub file; a missing or malformed file throws Error(ERROR_CODE_INVALID_ARGUMENT).
std::vector<uint8_t> public_key_read(const std::string& path);

/// The keys trusted without being named (sorted by file name within each directory).
std::vector<std::vector<uint8_t>> trusted_keys_default();

}  // namespace edgesmith
