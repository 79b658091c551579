#include "common/error.h"

#include <utility>

namespace edgesmith {

const char* error_code_name(ErrorCode code) {
  switch (code) {
    case ERROR_CODE_IO:
      return "io";
    case ERROR_CODE_INVALID_ARGUMENT:
      return "invalid-argument";
    case ERROR_CODE_MANIFEST:
      return "manifest";
    case ERROR_CODE_INTEGRITY:
      return "integrity";
    case ERROR_CODE_INPUT:
      return "input";
    case ERROR_CODE_BACKEND:
      return "backend";
    case ERROR_CODE_UNSUPPORTED:
      return "unsupported";
  }
  return "unknown";
}

Error::Error(ErrorCode code, const std::string& message, std::string path)
    : std::runtime_error(message), code_(code), path_(std::move(path)) {}

}  // namespace edgesmith
