#include "common/file.h"

#include <sys/stat.h>
#include <unistd.h>

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

std::string path_trust_problem(const std::string& path, const std::string& what, PathOwner owner) {
  struct stat st {};
  if (stat(path.c_str(), &st) != 0) return "";
  const uid_t me = geteuid();
  const bool owner_ok = st.st_uid == me || (owner == PATH_OWNER_SELF_OR_ROOT && st.st_uid == 0);
  const std::string quoted = string_quote(path, 300);
  if (!owner_ok) {
    const std::string allowed = owner == PATH_OWNER_SELF_OR_ROOT && me != 0 ? "you (uid " + std::to_string(me) + ") or root"
                                                                            : "you (uid " + std::to_string(me) + ")";
    return what + " " + quoted + " is owned by uid " + std::to_string(st.st_uid) + ", not " + allowed +
           ", so another user could change what is loaded from it; run `chown " + std::to_string(me) + " " + path +
           "` or use a directory of your own";
  }
  if ((st.st_mode & (S_IWGRP | S_IWOTH)) != 0) {
    return what + " " + quoted + " can be written by " + ((st.st_mode & S_IWOTH) != 0 ? "every user" : "its group") +
           ", so another user could change what is loaded from it; run `chmod go-w " + path + "`";
  }
  return "";
}

}  // namespace edgesmith
