#include "common/file.h"

#include <filesystem>
#include <fstream>
#include <iterator>
#include <system_error>

#include "common/strings.h"

namespace edgesmith {

namespace fs = std::filesystem;

std::string file_read(const std::string& path, uint64_t max_bytes, ErrorCode code,
                      const std::string& blame) {
  const std::string name = blame.empty() ? string_quote(path) : blame;
  std::error_code ec;
  const fs::file_status status = fs::symlink_status(path, ec);
  if (status.type() == fs::file_type::not_found) {
    throw Error(code, name + ": the file is missing; rebuild or re-download the artifact", blame);
  }
  if (ec) {
    throw Error(ERROR_CODE_IO, name + ": cannot be read (" + ec.message() +
                                   "); check its permissions", blame);
  }
  if (status.type() != fs::file_type::regular) {
    throw Error(code, name + ": is not a regular file (a symlink, directory or device); "
                             "rebuild or re-download the artifact", blame);
  }
  const uintmax_t size = fs::file_size(path, ec);
  if (ec) {
    throw Error(ERROR_CODE_IO, name + ": cannot be read (" + ec.message() +
                                   "); check its permissions", blame);
  }
  if (size > max_bytes) {
    throw Error(code, name + ": is " + std::to_string(size) + " bytes, at most " +
                          std::to_string(max_bytes) + " are expected; it is not an edgesmith " +
                          "file — rebuild or re-download the artifact", blame);
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    throw Error(ERROR_CODE_IO, name + ": cannot be opened; check its permissions", blame);
  }
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) {
    throw Error(ERROR_CODE_IO, name + ": reading failed part-way; check the storage it lives on",
                blame);
  }
  return text;
}

}  // namespace edgesmith
