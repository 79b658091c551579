// The device's two artifact slots and their record (docs/deployment.md §4):
//
//   <data_dir>/deploy/slots/{a,b}/   current -> slots/X   staging/   state.json
//
// state.json and the `current` link are only ever replaced atomically (temp file or link, fsync,
// rename, fsync of the directory), so a power cut leaves the old or the new version, never half.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

namespace edgesmith {

/// What a slot holds.
struct SlotRecord {
  std::string status = "empty";  ///< "empty", "good" (verified, self-tested), "bad" or "retired" (left by a rollback); only good boots
  std::string manifest_sha256;
  std::string artifact;          ///< the artifact's name
  std::string archive_sha256;
  uint64_t desired_version = 0;
  uint32_t boot_attempts = 0;    ///< starts that opened this slot and did not get as far as reporting (boot counter)
};

/// The deployment being applied or last finished.
struct DeploymentRecord {
  std::string deployment_id;
  uint64_t version = 0;
  std::string action;
  std::string signed_sha256;         ///< which desired state this is
  std::string result;                ///< "in-progress", "applied", "failed", "refused"
  std::string phase;                 ///< "download", "verify", "self-test", "switch" or "" when done
  std::string error;                 ///< one sentence when failed/refused
  std::string slot;                  ///< the slot it went into ("" until switched)
  std::string previous_slot;         ///< what served before ("" for the factory artifact)
  std::string previous_sha256;       ///< its manifest SHA-256
  nlohmann::json desired = nullptr;  ///< desired_to_json() of the state, to resume it
  bool reported = true;              ///< its final event is in the telemetry spool (false: report it at boot)
  std::map<std::string, uint32_t> attempts;  ///< phase -> times it was entered (crash-loop counter)
};

/// The contents of state.json.
struct DeployState {
  uint64_t highest_version = 0;  ///< the highest desired-state version accepted
  std::map<std::string, SlotRecord> slots{{"a", {}}, {"b", {}}};
  std::optional<DeploymentRecord> deployment;
};

nlohmann::json deploy_state_to_json(const DeployState& state);
/// Throws Error(ERROR_CODE_IO) naming the file for a document that is not a state.json.
DeployState deploy_state_from_json(const nlohmann::json& doc);

/// Read state.json; a missing file is a fresh state. Throws Error(ERROR_CODE_IO) when unreadable.
DeployState deploy_state_read(const std::string& path);

/// The highest desired-state version a broken state.json still shows (its "highest_version" and the
/// slots' "desired_version" numbers, read as text); 0 when none can be read. Keeps the replay
/// protection when the state is started afresh.
uint64_t deploy_state_version_floor(const std::string& path);
/// The replay floor kept beside state.json in its own file (deploy/floor), written before state.json
/// each time a higher version is accepted: losing either file keeps the other's floor. A missing
/// file reads 0; a damaged one reads what deploy_state_version_floor() finds in it.
uint64_t deploy_floor_read(const std::string& path);
/// Write the floor file atomically and durably. Throws Error(ERROR_CODE_IO).
void deploy_floor_write(const std::string& path, uint64_t highest_version);

/// Write state.json atomically and durably (temp file, fsync, rename, fsync of the directory).
void deploy_state_write(const std::string& path, const DeployState& state);

/// The other slot ("a" <-> "b"; "" -> "a": with the factory artifact serving, "a" is inactive).
std::string slot_other(const std::string& slot);

/// Which slot to serve at boot: `current` when it is `good` and `usable` says it verifies, else the
/// other `good` one that does, else "" (the factory artifact). `usable` is only asked about good slots.
std::string boot_choice(const DeployState& state, const std::string& current,
                        const std::function<bool(const std::string& slot)>& usable);

/// The directory layout under <data_dir>/deploy.
class SlotLayout {
 public:
  explicit SlotLayout(std::string data_dir);
  /// Create deploy/, slots/{a,b}/ and staging/ (0700) when missing. Throws Error(ERROR_CODE_IO).
  void layout_ensure() const;
  std::string root() const { return root_; }
  std::string slot_dir(const std::string& slot) const { return root_ + "/slots/" + slot; }
  std::string slots_dir() const { return root_ + "/slots"; }
  std::string staging_dir() const { return root_ + "/staging"; }
  std::string state_path() const { return root_ + "/state.json"; }
  std::string floor_path() const { return root_ + "/floor"; }
  std::string current_path() const { return root_ + "/current"; }
  /// The slot `current` points at ("a" / "b"), or "" when there is no such link.
  std::string current_slot() const;
  /// Point `current` at `slot`: a new link current.tmp, rename(2) over current, fsync(deploy/).
  void current_flip(const std::string& slot) const;

 private:
  std::string root_;
};

/// fsync a directory (after a rename into it). Throws Error(ERROR_CODE_IO).
void directory_sync(const std::string& dir);

/// Replace `path` by `text` atomically and durably (`path`.tmp, fsync, rename, fsync of the
/// directory): a reader sees the old file or the new one. Throws Error(ERROR_CODE_IO).
void file_replace(const std::string& path, const std::string& text);

}  // namespace edgesmith
