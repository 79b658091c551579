#include "artifact/keys.h"

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <system_error>

#include "common/digest.h"
#include "common/error.h"
#include "common/file.h"
#include "common/strings.h"

namespace edgesmith {

namespace fs = std::filesystem;

namespace {
const char* const HOME_DIR_NAME = ".edgesmith";
}  // namespace

HomeResolution home_resolve() {
  HomeResolution found;
  const char* home = std::getenv("EDGESMITH_HOME");
  if (home != nullptr && home[0] != '\0') {
    found.path = home;
    return found;
  }
  std::error_code ec;
  const fs::path cwd = fs::current_path(ec);
  if (!ec) {
    for (fs::path dir = cwd;; dir = dir.parent_path()) {
      const fs::path candidate = dir / HOME_DIR_NAME;
      if (fs::is_directory(candidate, ec)) {
        // Anyone can create a directory above someone else's working directory (/tmp/.edgesmith):
        // it counts only when it is the user's own and nobody else can write it.
        const std::string problem = path_trust_problem(candidate.string(), "the project home", PATH_OWNER_SELF);
        if (problem.empty()) {
          found.path = candidate.string();
          return found;
        }
        found.skipped = problem + " (it is ignored; set EDGESMITH_HOME to choose a home explicitly)";
        break;
      }
      if (dir == dir.parent_path()) break;
    }
  }
  const char* user = std::getenv("HOME");
  found.path = (fs::path(user != nullptr ? user : "/") / HOME_DIR_NAME).string();
  return found;
}

std::string keys_home() { return home_resolve().path; }

void trust_dir_check(const std::string& dir, const std::string& what) {
  const std::string problem = path_trust_problem(dir, what, PATH_OWNER_SELF_OR_ROOT);
  if (!problem.empty()) throw Error(ERROR_CODE_INVALID_ARGUMENT, problem);
}

std::vector<uint8_t> public_key_read(const std::string& path) {
  std::string text = file_read(path, 4096, ERROR_CODE_INVALID_ARGUMENT, "");
  while (!text.empty() && (text.back() == '\n' || text.back() == '\r' || text.back() == ' ')) {
    text.pop_back();
  }
  std::vector<uint8_t> key;
  if (!hex_decode(text, &key)) {
    throw Error(ERROR_CODE_INVALID_ARGUMENT,
                "public key " + string_quote(path) + " is not a hex Ed25519 public key");
  }
  if (key.size() != ED25519_PUBLIC_KEY_BYTES) {
    throw Error(ERROR_CODE_INVALID_ARGUMENT,
                "public key " + string_quote(path) + " holds " + std::to_string(key.size()) +
                    " bytes, an Ed25519 public key has 32");
  }
  return key;
}

std::vector<std::vector<uint8_t>> trusted_keys_default() {
  std::vector<std::vector<uint8_t>> keys;
  const std::string home = keys_home();
  trust_dir_check(home, "the edgesmith home");  // whoever can write it can swap keys/ and trusted/
  for (const char* sub : {"keys", "trusted"}) {
    const fs::path dir = fs::path(home) / sub;
    trust_dir_check(dir.string(), std::string("the key directory"));
    std::error_code ec;
    std::vector<std::string> files;
    for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
      if (it->path().extension() == ".pub") files.push_back(it->path().string());
    }
    std::sort(files.begin(), files.end());
    for (const std::string& file : files) keys.push_back(public_key_read(file));
  }
  return keys;
}

}  // namespace edgesmith
