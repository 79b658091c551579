// The one exception type the edgesmith core throws.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace edgesmith {

/// What went wrong, coarse enough for a binding to pick an exception class from.
enum ErrorCode : int32_t {
  ERROR_CODE_IO = 1,                ///< a file could not be read (missing directory, permissions, ...)
  ERROR_CODE_INVALID_ARGUMENT = 2,  ///< the caller passed something invalid (e.g. a 31-byte key)
  ERROR_CODE_MANIFEST = 3,          ///< manifest.json does not follow the artifact schema
  ERROR_CODE_INTEGRITY = 4,         ///< the artifact is not exactly what its signed manifest says
  ERROR_CODE_INPUT = 5,             ///< inputs handed to a session do not match the model's inputs
  ERROR_CODE_BACKEND = 6,           ///< a backend plugin or its engine failed to load or to run
  ERROR_CODE_UNSUPPORTED = 7,       ///< the artifact cannot run here (other ISA, unsupported format)
};

/// Stable lower-case name of an error code ("integrity", "manifest", ...), for logs.
const char* error_code_name(ErrorCode code);

/// An edgesmith failure: a one-sentence message that says what to do, a code, and the
/// artifact-relative file to blame (empty when no single file is).
class Error : public std::runtime_error {
 public:
  /// Make an error; `path` is the artifact-relative file the message is about, or empty.
  Error(ErrorCode code, const std::string& message, std::string path = {});

  /// The error's code.
  ErrorCode code() const noexcept { return code_; }

  /// The artifact-relative file to blame, or an empty string.
  const std::string& path() const noexcept { return path_; }

 private:
  ErrorCode code_;
  std::string path_;
};

}  // namespace edgesmith
