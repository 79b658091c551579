#include "deploy/slots.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <regex>
#include <sstream>

#include "common/error.h"

namespace edgesmith {

namespace {

nlohmann::json slot_to_json(const SlotRecord& s) {
  return {{"status", s.status}, {"manifest_sha256", s.manifest_sha256}, {"artifact", s.artifact},
          {"archive_sha256", s.archive_sha256}, {"desired_version", s.desired_version},
          {"boot_attempts", s.boot_attempts}};
}

SlotRecord slot_from_json(const nlohmann::json& d) {
  SlotRecord s;
  s.status = d.at("status");
  if (s.status != "empty" && s.status != "good" && s.status != "bad" && s.status != "retired") s.status = "bad";
  s.manifest_sha256 = d.value("manifest_sha256", "");
  s.artifact = d.value("artifact", "");
  s.archive_sha256 = d.value("archive_sha256", "");
  s.desired_version = d.value("desired_version", uint64_t{0});
  s.boot_attempts = d.value("boot_attempts", uint32_t{0});
  return s;
}

}  // namespace

nlohmann::json deploy_state_to_json(const DeployState& state) {
  nlohmann::json slots = nlohmann::json::object();
  for (const auto& [name, record] : state.slots) slots[name] = slot_to_json(record);
  nlohmann::json doc = {{"v", 1}, {"highest_version", state.highest_version}, {"slots", slots}, {"deployment", nullptr}};
  if (state.deployment) {
    const DeploymentRecord& d = *state.deployment;
    doc["deployment"] = {{"deployment_id", d.deployment_id}, {"version", d.version}, {"action", d.action},
                         {"signed_sha256", d.signed_sha256}, {"result", d.result}, {"phase", d.phase},
                         {"error", d.error}, {"slot", d.slot}, {"previous_slot", d.previous_slot},
                         {"previous_sha256", d.previous_sha256}, {"desired", d.desired},
                         {"reported", d.reported}, {"attempts", d.attempts}};
  }
  return doc;
}

DeployState deploy_state_from_json(const nlohmann::json& doc) {
  try {
    DeployState state;
    state.highest_version = doc.at("highest_version").get<uint64_t>();
    for (const char* name : {"a", "b"}) {
      if (doc.at("slots").contains(name)) state.slots[name] = slot_from_json(doc["slots"][name]);
    }
    const nlohmann::json& d = doc.at("deployment");
    if (!d.is_null()) {
      DeploymentRecord r;
      r.deployment_id = d.at("deployment_id");
      r.version = d.at("version");
      r.action = d.at("action");
      r.signed_sha256 = d.at("signed_sha256");
      r.result = d.at("result");
      r.phase = d.at("phase");
      r.error = d.at("error");
      r.slot = d.at("slot");
      r.previous_slot = d.at("previous_slot");
      r.previous_sha256 = d.at("previous_sha256");
      r.desired = d.at("desired");
      r.reported = d.value("reported", true);
      if (d.contains("attempts") && d["attempts"].is_object()) {
        for (const auto& [phase, count] : d["attempts"].items()) r.attempts[phase] = count.get<uint32_t>();
      }
      state.deployment = r;
    }
    return state;
  } catch (const nlohmann::json::exception& e) {
    throw Error(ERROR_CODE_IO, std::string("the deployment state is malformed (") + e.what() + ")");
  }
}

DeployState deploy_state_read(const std::string& path) {
  std::ifstream in(path);
  if (!in) {
    if (errno == ENOENT || !std::filesystem::exists(path)) return DeployState{};
    throw Error(ERROR_CODE_IO, "cannot read " + path + " (" + std::strerror(errno) + ")");
  }
  std::stringstream text;
  text << in.rdbuf();
  const nlohmann::json doc = nlohmann::json::parse(text.str(), nullptr, false);
  if (doc.is_discarded() || !doc.is_object()) throw Error(ERROR_CODE_IO, path + " is not JSON");
  try {
    return deploy_state_from_json(doc);
  } catch (const Error& e) {
    throw Error(ERROR_CODE_IO, path + ": " + e.what());
  }
}

uint64_t deploy_state_version_floor(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  const std::string s = text.str();
  static const std::regex number("\"(highest_version|desired_version)\"\\s*:\\s*([0-9]{1,19})");
  uint64_t floor = 0;
  for (auto it = std::sregex_iterator(s.begin(), s.end(), number); it != std::sregex_iterator(); ++it) {
    floor = std::max<uint64_t>(floor, std::strtoull((*it)[2].str().c_str(), nullptr, 10));
  }
  return floor;
}

void directory_sync(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) throw Error(ERROR_CODE_IO, "cannot open " + dir + " (" + std::strerror(errno) + ")");
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  if (rc != 0) throw Error(ERROR_CODE_IO, "cannot sync " + dir + " (" + std::strerror(err) + ")");
}

void file_replace(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0) throw Error(ERROR_CODE_IO, "cannot write " + tmp + " (" + std::strerror(errno) + ")");
  size_t done = 0;
  while (done < text.size()) {
    const ssize_t w = ::write(fd, text.data() + done, text.size() - done);
    if (w < 0 && errno == EINTR) continue;
    if (w < 0) {
      const int err = errno;
      ::close(fd);
      throw Error(ERROR_CODE_IO, "cannot write " + tmp + " (" + std::strerror(err) + ")");
    }
    done += static_cast<size_t>(w);
  }
  if (::fsync(fd) != 0) {
    const int err = errno;
    ::close(fd);
    throw Error(ERROR_CODE_IO, "cannot sync " + tmp + " (" + std::strerror(err) + ")");
  }
  ::close(fd);
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    throw Error(ERROR_CODE_IO, "cannot replace " + path + " (" + std::strerror(errno) + ")");
  }
  directory_sync(std::filesystem::path(path).parent_path().string());
}

void deploy_state_write(const std::string& path, const DeployState& state) {
  file_replace(path, deploy_state_to_json(state).dump(2) + "\n");
}

uint64_t deploy_floor_read(const std::string& path) {
  std::ifstream in(path);
  if (!in) return 0;
  std::stringstream text;
  text << in.rdbuf();
  const nlohmann::json doc = nlohmann::json::parse(text.str(), nullptr, false);
  if (doc.is_object() && doc.contains("highest_version") && doc["highest_version"].is_number_unsigned()) {
    return doc["highest_version"].get<uint64_t>();
  }
  return deploy_state_version_floor(path);
}

void deploy_floor_write(const std::string& path, uint64_t highest_version) {
  file_replace(path, nlohmann::json{{"v", 1}, {"highest_version", highest_version}}.dump() + "\n");
}

std::string slot_other(const std::string& slot) { return slot == "a" ? "b" : "a"; }

std::string boot_choice(const DeployState& state, const std::string& current,
                        const std::function<bool(const std::string& slot)>& usable) {
  const auto good = [&](const std::string& slot) {
    const auto it = state.slots.find(slot);
    return it != state.slots.end() && it->second.status == "good";
  };
  std::vector<std::string> order;
  if (current == "a" || current == "b") order = {current, slot_other(current)};
  else order = {"a", "b"};
  for (const std::string& slot : order) {
    if (good(slot) && usable(slot)) return slot;
  }
  return "";
}

SlotLayout::SlotLayout(std::string data_dir) : root_(std::move(data_dir) + "/deploy") {}

void SlotLayout::layout_ensure() const {
  for (const std::string& dir : {root_, slots_dir(), slot_dir("a"), slot_dir("b"), staging_dir()}) {
    if (::mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST) {
      throw Error(ERROR_CODE_IO, "cannot create " + dir + " (" + std::strerror(errno) + ")");
    }
  }
}

std::string SlotLayout::current_slot() const {
  char target[PATH_MAX];
  const ssize_t n = ::readlink(current_path().c_str(), target, sizeof(target) - 1);
  if (n <= 0) return "";
  const std::string text(target, static_cast<size_t>(n));
  if (text == "slots/a") return "a";
  if (text == "slots/b") return "b";
  return "";
}

void SlotLayout::current_flip(const std::string& slot) const {
  const std::string tmp = root_ + "/current.tmp";
  ::unlink(tmp.c_str());
  if (::symlink(("slots/" + slot).c_str(), tmp.c_str()) != 0) {
    throw Error(ERROR_CODE_IO, "cannot create " + tmp + " (" + std::strerror(errno) + ")");
  }
  if (::rename(tmp.c_str(), current_path().c_str()) != 0) {
    throw Error(ERROR_CODE_IO, "cannot switch " + current_path() + " (" + std::strerror(errno) + ")");
  }
  directory_sync(root_);
}

}  // namespace edgesmith
