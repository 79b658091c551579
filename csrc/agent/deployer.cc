#include "agent/deployer.h"

#include <cstdio>
#include <filesystem>
#include <system_error>
#include <utility>

#include "common/digest.h"
#include "common/error.h"
#include "deploy/archive.h"
#include "deploy/download.h"

namespace fs = std::filesystem;

namespace edgesmith {

namespace {

nlohmann::json or_null(const std::string& text) { return text.empty() ? nlohmann::json(nullptr) : nlohmann::json(text); }

void remove_tree(const std::string& path) {
  std::error_code ec;
  fs::remove_all(path, ec);
}

}  // namespace

Deployer::Deployer(DeployerOptions options) : options_(std::move(options)), layout_(options_.data_dir) {}

Deployer::~Deployer() { deployer_stop(); }

void Deployer::log(const std::string& line) const {
  if (options_.log) options_.log(line);
}

void Deployer::state_save() { deploy_state_write(layout_.state_path(), state_); }

void Deployer::staging_clean(const std::string& keep) {
  std::error_code ec;
  for (const fs::directory_entry& entry : fs::directory_iterator(layout_.staging_dir(), ec)) {
    if (!keep.empty() && entry.path().filename() == keep) continue;
    remove_tree(entry.path().string());
  }
}

std::shared_ptr<Session> Deployer::deployer_boot() {
  layout_.layout_ensure();
  try {
    state_ = deploy_state_read(layout_.state_path());
  } catch (const Error& e) {
    // Written atomically, so only outside hands break it: keep it aside and start afresh, but
    // above every version it still shows (replayed desired states stay refused).
    const uint64_t floor = deploy_state_version_floor(layout_.state_path());
    log(std::string(e.what()) + "; it is kept as state.json.bad and the slots are not used (versions up to " +
        std::to_string(floor) + " stay refused)");
    std::error_code ec;
    fs::rename(layout_.state_path(), layout_.state_path() + ".bad", ec);
    state_ = DeployState{};
    state_.highest_version = floor;
    state_save();
  }
  const std::string current = layout_.current_slot();
  std::shared_ptr<Session> chosen;
  bool changed = false;
  const std::string slot = boot_choice(state_, current, [&](const std::string& candidate) {
    try {
      std::shared_ptr<Session> session = session_open(layout_.slot_dir(candidate), options_.build_keys);
      if (sha256_string(session->session_manifest_json()) != state_.slots[candidate].manifest_sha256) {
        throw Error(ERROR_CODE_INTEGRITY, "slot " + candidate + " does not hold the artifact state.json records");
      }
      chosen = std::move(session);
      return true;
    } catch (const std::exception& e) {
      log("slot " + candidate + " is not used: " + e.what());
      state_.slots[candidate].status = "bad";
      changed = true;
      return false;
    }
  });
  if (slot.empty()) {
    chosen = session_open(options_.factory_artifact, options_.build_keys);
    if (!current.empty()) {
      std::error_code ec;
      fs::remove(layout_.current_path(), ec);
      directory_sync(layout_.root());
    }
  } else if (slot != current) {
    layout_.current_flip(slot);
  }
  serving_slot_ = slot;
  serving_sha256_ = sha256_string(chosen->session_manifest_json());
  serving_name_ = chosen->session_manifest().name;
  std::string keep;
  if (state_.deployment && state_.deployment->result == "in-progress") {
    resume_pending_ = true;
    try {
      keep = desired_from_json(state_.deployment->desired).artifact.sha256 + ".tar.part";
    } catch (const std::exception&) {
    }
  }
  staging_clean(keep);
  if (changed) state_save();
  log("serving " + (slot.empty() ? std::string("the factory artifact") : "slot " + slot) + " (" + serving_name_ + ")");
  return chosen;
}

void Deployer::deployer_start(SessionReporter* reporter, std::function<void(std::shared_ptr<Session>)> swap) {
  reporter_ = reporter;
  swap_ = std::move(swap);
  thread_ = std::thread([this] { loop(); });
}

void Deployer::deployer_desired(const std::string& payload) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    queue_.clear();  // only the newest desired state counts: it replaces one still waiting
    queue_.push_back(payload);
  }
  cv_.notify_all();
}

void Deployer::deployer_subscribed() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!subscribed_at_) subscribed_at_ = std::chrono::steady_clock::now();
    state_due_ = true;
  }
  cv_.notify_all();
}

void Deployer::deployer_stop() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void Deployer::check_cancelled() const {
  std::lock_guard<std::mutex> lock(const_cast<std::mutex&>(mutex_));
  if (stopping_) throw Cancelled{};
}

void Deployer::loop() {
  while (true) {
    std::string payload;
    bool resume_expired = false;
    bool state_due = false;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      const auto grace = std::chrono::duration_cast<std::chrono::steady_clock::duration>(
          std::chrono::duration<double>(options_.resume_grace_s));
      cv_.wait_for(lock, std::chrono::milliseconds(200), [&] { return stopping_ || state_due_ || !queue_.empty(); });
      if (stopping_) return;
      if (state_due_) {
        state_due = true;
        state_due_ = false;
      } else if (!queue_.empty()) {
        payload = std::move(queue_.front());
        queue_.pop_front();
      } else if (resume_pending_ && subscribed_at_ && std::chrono::steady_clock::now() > *subscribed_at_ + grace) {
        resume_expired = true;
      } else {
        continue;
      }
    }
    try {
      if (state_due) {  // on connect: what the device runs
        reporter_->reporter_state({{"artifact_sha256", serving_sha256_},
                                   {"details", details(state_.deployment ? &*state_.deployment : nullptr)}});
        if (state_.deployment && !state_.deployment->reported && state_.deployment->result != "in-progress") {
          report_final();  // finished just before the last stop, never reported
          state_.deployment->reported = true;
          state_save();
        }
      } else if (resume_expired) {
        resume_pending_ = false;
        if (state_.deployment && state_.deployment->result == "in-progress") {
          staging_clean("");
          finish("failed", "the deployment was interrupted and its desired state is no longer the retained one");
        }
      } else {
        handle(payload);
      }
    } catch (const Cancelled&) {
      return;
    } catch (const std::exception& e) {
      log(std::string("deployment error: ") + e.what());
    }
  }
}

nlohmann::json Deployer::details(const DeploymentRecord* record) const {
  nlohmann::json d = {{"slot", or_null(serving_slot_)}, {"artifact", serving_name_}, {"desired_version", nullptr},
                      {"deployment_id", nullptr}, {"result", nullptr}, {"phase", nullptr}, {"error", nullptr},
                      {"previous_slot", nullptr}};
  if (record != nullptr) {
    d["desired_version"] = record->version;
    d["deployment_id"] = or_null(record->deployment_id);
    d["result"] = or_null(record->result);
    d["phase"] = or_null(record->phase);
    d["error"] = or_null(record->error);
    if (!record->previous_sha256.empty()) {
      d["previous_slot"] = {{"slot", or_null(record->previous_slot)}, {"artifact_sha256", record->previous_sha256}};
    }
  }
  return d;
}

void Deployer::report(const std::string& event, const std::string& message, const DeploymentRecord& record) {
  const nlohmann::json d = details(&record);
  log(event + ": " + message);
  if (reporter_ == nullptr) return;
  reporter_->reporter_state({{"artifact_sha256", serving_sha256_}, {"details", d}});
  reporter_->reporter_event(event, message, d);
}

void Deployer::phase_set(const std::string& phase) {
  state_.deployment->phase = phase;
  state_save();
}

void Deployer::finish(const std::string& result, const std::string& error) {
  DeploymentRecord& record = *state_.deployment;
  record.result = result;
  record.error = error;
  if (result == "applied") record.phase.clear();
  // Recorded first, reported second, then marked reported: a crash in between is reported at the
  // next start (the final event is never lost; at worst it is sent twice).
  record.reported = false;
  state_save();
  report_final();
  record.reported = true;
  state_save();
}

void Deployer::report_final() {
  const DeploymentRecord& record = *state_.deployment;
  if (record.result == "applied") {
    const bool back = record.action == "rollback";
    report(back ? "deploy.rolled-back" : "deploy.applied",
           (back ? "rolled back to " : "now serving ") + serving_name_ +
               (serving_slot_.empty() ? std::string(" (the factory artifact)") : " from slot " + serving_slot_),
           record);
  } else {
    report("deploy.failed", record.error, record);
  }
}

void Deployer::handle(const std::string& payload) {
  if (payload.empty()) return;  // a cleared retained topic
  DesiredState desired;
  const auto refuse = [&](const std::string& why, const DesiredState* d) {
    DeploymentRecord record;
    record.deployment_id = d != nullptr ? d->deployment_id : desired_unverified_id(payload);
    record.version = d != nullptr ? d->version : 0;
    record.result = "refused";
    record.error = why;
    report("deploy.refused", why, record);
  };
  try {
    desired = desired_parse(payload, options_.deploy_keys);
  } catch (const Error& e) {
    refuse(e.what(), nullptr);
    return;
  }
  if (state_.deployment && state_.deployment->signed_sha256 == desired.signed_sha256) {
    // This exact desired state again (the retained message after a reconnect or a restart).
    if (state_.deployment->result == "in-progress") {
      resume_pending_ = false;
      log("resuming deployment " + desired.deployment_id + " (phase " + state_.deployment->phase + ")");
      apply(desired, true);
    }
    return;
  }
  if (desired.fleet != options_.fleet || desired.device != options_.device) {
    refuse("the desired state is refused: it is for device " + desired.fleet + "/" + desired.device + ", not " +
               options_.fleet + "/" + options_.device,
           &desired);
    return;
  }
  if (desired.version <= state_.highest_version) {
    refuse("the desired state is refused: its version " + std::to_string(desired.version) +
               " is not above " + std::to_string(state_.highest_version) +
               ", the highest this device accepted (a replayed or older desired state)",
           &desired);
    return;
  }
  const std::string previous = serving_slot_.empty() ? "" : slot_other(serving_slot_);
  if (desired.action == "deploy" && !previous.empty() && state_.slots[previous].status != "empty" &&
      state_.slots[previous].status != "retired" &&
      state_.slots[previous].manifest_sha256 == desired.artifact.manifest_sha256 &&
      desired.artifact.manifest_sha256 != serving_sha256_) {
    refuse("the desired state is refused: its artifact is the one in the previous slot " + previous +
               "; going back takes an explicit rollback",
           &desired);
    return;
  }
  if (state_.deployment && state_.deployment->result == "in-progress") {
    staging_clean("");
    resume_pending_ = false;
    finish("failed", "the deployment was superseded by desired version " + std::to_string(desired.version));
  }
  DeploymentRecord record;
  record.deployment_id = desired.deployment_id;
  record.version = desired.version;
  record.action = desired.action;
  record.signed_sha256 = desired.signed_sha256;
  record.result = "in-progress";
  record.phase = "download";
  record.previous_slot = serving_slot_;
  record.previous_sha256 = serving_sha256_;
  record.desired = desired_to_json(desired);
  state_.highest_version = desired.version;
  state_.deployment = record;
  state_save();
  report("deploy.started", desired.action + " of " + desired.artifact.name + " (version " +
                               std::to_string(desired.version) + ") started",
         record);
  apply(desired, false);
}

void Deployer::switch_to(const std::string& slot, const DesiredState& desired, std::shared_ptr<Session> session) {
  if (desired.action == "rollback" && !serving_slot_.empty() && serving_slot_ != slot) {
    // The slot a rollback leaves is never booted again; its artifact may be deployed afresh.
    state_.slots[serving_slot_].status = "retired";
    state_save();
  }
  layout_.current_flip(slot);
  DeploymentRecord& record = *state_.deployment;
  if (serving_slot_ != slot) {
    record.previous_slot = serving_slot_;
    record.previous_sha256 = serving_sha256_;
  }
  serving_slot_ = slot;
  serving_sha256_ = sha256_string(session->session_manifest_json());
  serving_name_ = session->session_manifest().name;
  record.slot = slot;
  swap_(std::move(session));  // the old Session serves until this instant
}

void Deployer::apply(const DesiredState& desired, bool resumed) {
  const std::string part_name = desired.artifact.sha256 + ".tar.part";
  const std::string part = layout_.staging_dir() + "/" + part_name;
  const std::string staged = layout_.staging_dir() + "/slot";
  try {
    if (desired.artifact.manifest_sha256 == serving_sha256_) {  // already serving it (or the switch was done)
      state_.deployment->slot = serving_slot_;
      staging_clean("");
      finish("applied", "");
      return;
    }
    const std::string target = slot_other(serving_slot_);
    SlotRecord& slot = state_.slots[target];
    if ((desired.action == "rollback" || resumed) && slot.status == "good" &&
        slot.manifest_sha256 == desired.artifact.manifest_sha256) {
      // The inactive slot holds it already: verify, self-test, switch; nothing to download.
      phase_set("verify");
      std::shared_ptr<Session> session = session_open(layout_.slot_dir(target), options_.build_keys);
      if (sha256_string(session->session_manifest_json()) != desired.artifact.manifest_sha256) {
        throw Error(ERROR_CODE_INTEGRITY, "slot " + target + " does not hold the artifact the desired state names");
      }
      phase_set("self-test");
      const SelfTestResult test = session->session_self_test();
      if (!test.passed) {
        slot.status = "bad";  // never picked at boot again
        state_save();
        throw Error(ERROR_CODE_INTEGRITY, "slot " + target + "'s artifact failed its golden self-test");
      }
      check_cancelled();
      phase_set("switch");
      switch_to(target, desired, std::move(session));
      staging_clean("");
      finish("applied", "");
      return;
    }
    // (2) download, resuming what an earlier attempt left.
    phase_set("download");
    staging_clean(part_name);
    for (int attempt = 0;; ++attempt) {
      const bool had_part = fs::exists(part);
      DownloadOptions download;
      download.url = desired.artifact.url;
      download.part_path = part;
      download.expected_size = desired.artifact.size;
      download.max_bytes = options_.max_bytes;
      download.timeout_s = options_.timeout_s;
      download.cancelled = [this] {
        std::lock_guard<std::mutex> lock(mutex_);
        return stopping_;
      };
      download.log = [this](const std::string& line) { log("download: " + line); };
      download.tls_cafile = options_.tls_cafile;
      download.tls_certfile = options_.tls_certfile;
      download.tls_keyfile = options_.tls_keyfile;
      try {
        download_file(download);
      } catch (const Error&) {
        check_cancelled();
        throw;
      }
      // (3) the archive's SHA-256.
      const std::string sha = sha256_file(part);
      if (sha == desired.artifact.sha256) break;
      remove_tree(part);
      if (!had_part || attempt > 0) {
        throw Error(ERROR_CODE_INTEGRITY, "the downloaded archive's SHA-256 is " + sha + ", not the " +
                                              desired.artifact.sha256 + " the desired state names");
      }
      log("the resumed archive does not match its SHA-256; downloading it again from the start");
    }
    check_cancelled();
    // (4) extract, (5) verify against the build keys (session_open verifies, checks ISA and CPU
    // features, loads the backend), and check it is the artifact the desired state names.
    phase_set("verify");
    remove_tree(staged);
    archive_extract(part, staged, options_.max_bytes);
    std::shared_ptr<Session> candidate = session_open(staged, options_.build_keys);
    const std::string manifest_sha = sha256_string(candidate->session_manifest_json());
    if (manifest_sha != desired.artifact.manifest_sha256) {
      throw Error(ERROR_CODE_INTEGRITY, "the archive's manifest.json has SHA-256 " + manifest_sha + ", not the " +
                                            desired.artifact.manifest_sha256 + " the desired state names");
    }
    // (6) the golden self-test.
    check_cancelled();
    phase_set("self-test");
    const SelfTestResult test = candidate->session_self_test();
    if (!test.passed) {
      std::string why;
      for (const GoldenSampleResult& r : test.details) {
        if (!r.passed) {
          why = "sample " + std::to_string(r.index) + ": " + r.message;
          break;
        }
      }
      throw Error(ERROR_CODE_INTEGRITY, "the artifact failed its golden self-test (" + why + ")");
    }
    candidate.reset();
    check_cancelled();
    // (7) replace the inactive slot, (8) flip `current` and swap the Session.
    phase_set("switch");
    slot = SlotRecord{};
    state_save();
    remove_tree(layout_.slot_dir(target));
    std::error_code ec;
    fs::rename(staged, layout_.slot_dir(target), ec);
    if (ec) throw Error(ERROR_CODE_IO, "cannot move the new artifact into slot " + target + " (" + ec.message() + ")");
    directory_sync(layout_.slots_dir());
    std::shared_ptr<Session> serving = session_open(layout_.slot_dir(target), options_.build_keys);
    slot.status = "good";
    slot.manifest_sha256 = desired.artifact.manifest_sha256;
    slot.artifact = serving->session_manifest().name;
    slot.archive_sha256 = desired.artifact.sha256;
    slot.desired_version = desired.version;
    state_save();
    switch_to(target, desired, std::move(serving));
    staging_clean("");
    // (9) record and report.
    finish("applied", "");
  } catch (const Cancelled&) {
    throw;  // shutting down: state.json keeps it in progress, resumed at the next start
  } catch (const std::exception& e) {
    staging_clean("");
    finish("failed", e.what());
  }
}

}  // namespace edgesmith
