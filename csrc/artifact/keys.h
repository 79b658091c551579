// Which signing keys a device trusts, the rules edgesmith.runtime.keys binds from here:
// <home>/keys/*.pub then <home>/trusted/*.pub, where <home> is $EDGESMITH_HOME, else the nearest
// `.edgesmith` directory in the working directory or its parents when the user owns it and nobody
// else can write it (git's safe.directory rule), else ~/.edgesmith. The key directories must be
// owned by the user or root and not writable by group or others.
// A .pub file holds one line: the 32-byte Ed25519 public key in hex.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace edgesmith {

/// Where edgesmith's home was found, and a project home that was passed over.
struct HomeResolution {
  std::string path;     ///< the home directory (existing or not)
  std::string skipped;  ///< one sentence when a `.edgesmith` above the working directory was not
                        ///< trusted (owned by another user, or writable by others); else empty
};

/// $EDGESMITH_HOME; else the nearest `.edgesmith` directory in the working directory or one of its
/// parents, if the effective user owns it and neither group nor others can write it; else
/// ~/.edgesmith. The one rule of edgesmith.runtime.keys.edgesmith_home().
HomeResolution home_resolve();

/// home_resolve().path.
std::string keys_home();

/// Read a .pub file; a missing or malformed file throws Error(ERROR_CODE_INVALID_ARGUMENT).
std::vector<uint8_t> public_key_read(const std::string& path);

/// Throw Error(ERROR_CODE_INVALID_ARGUMENT) naming the fix when the directory `dir` of trusted keys
/// (`what`, e.g. "the trust directory") is owned by another user than the effective user or root,
/// or writable by group or others. A missing directory passes.
void trust_dir_check(const std::string& dir, const std::string& what);

/// The keys trusted without being named (sorted by file name within each directory), after
/// trust_dir_check() of <home>/keys and <home>/trusted.
std::vector<std::vector<uint8_t>> trusted_keys_default();

}  // namespace edgesmith
