#include "agent/deployer.h"

#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <iostream>
#include <system_error>
#include <utility>

#include "agent/child_process.h"
#include "artifact/keys.h"
#include "common/digest.h"
#include "common/error.h"
#include "deploy/archive.h"
#include "runtime/plugin.h"

namespace fs = std::filesystem;

namespace edgesmith {

namespace {

nlohmann::json or_null(const std::string& text) { return text.empty() ? nlohmann::json(nullptr) : nlohmann::json(text); }

void remove_tree(const std::string& path) {
  std::error_code ec;
  fs::remove_all(path, ec);
}

const char* check_name(DeployCheck check) { return check == DEPLOY_CHECK_VERIFY ? "verify" : "self-test"; }

class HttpDownloader : public DeployDownloader {
 public:
  void downloader_fetch(const DownloadOptions& options) override { download_file(options); }
};

class BuildKeyOpener : public DeploySessionOpener {
 public:
  explicit BuildKeyOpener(std::vector<std::vector<uint8_t>> keys) : keys_(std::move(keys)) {}
  OpenedArtifact opener_open(const std::string& artifact_dir) override {
    OpenedArtifact opened;
    opened.session = session_open(artifact_dir, keys_);
    opened.manifest_sha256 = sha256_string(opened.session->session_manifest_json());
    opened.name = opened.session->session_manifest().name;
    return opened;
  }

 private:
  std::vector<std::vector<uint8_t>> keys_;
};

std::string self_test_failure(const SelfTestResult& test) {
  for (const GoldenSampleResult& r : test.details) {
    if (!r.passed) return "sample " + std::to_string(r.index) + ": " + r.message;
  }
  return "no sample passed";
}

}  // namespace

const char* deploy_phase_name(DeployPhase phase) {
  switch (phase) {
    case DEPLOY_PHASE_DOWNLOAD: return "download";
    case DEPLOY_PHASE_VERIFY: return "verify";
    case DEPLOY_PHASE_SELF_TEST: return "self-test";
    case DEPLOY_PHASE_SWITCH: return "switch";
    case DEPLOY_PHASE_DONE: return "";
  }
  return "";
}

// --- the check in a child process -----------------------------------------------------------------

ChildProcessVerifier::ChildProcessVerifier(std::string executable, std::vector<std::vector<uint8_t>> build_keys,
                                           double timeout_s, std::function<bool()> cancelled,
                                           std::vector<std::string> backend_path)
    : executable_(std::move(executable)), build_keys_(std::move(build_keys)), timeout_s_(timeout_s),
      cancelled_(std::move(cancelled)), backend_path_(std::move(backend_path)) {}

ArtifactCheck ChildProcessVerifier::verifier_check(DeployCheck check, const std::string& artifact_dir) {
  std::vector<std::string> args = {executable_, "--deploy-check", check_name(check), artifact_dir};
  for (const std::vector<uint8_t>& key : build_keys_) {
    args.push_back("--key-hex");
    args.push_back(child_key_hex(key));
  }
  for (const std::string& dir : backend_path_) {
    args.push_back("--backend-path");
    args.push_back(dir);
  }
  ChildSpawnOptions spawn_options;
  spawn_options.stdout_pipe = true;
  const ChildSpawned child = child_spawn(args, spawn_options, "to check the artifact");
  const pid_t pid = child.pid;
  const int out_fd = child.stdout_fd;
  std::string output;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s_);
  bool killed_for = false;
  std::string kill_reason;
  while (true) {
    struct pollfd p {out_fd, POLLIN, 0};
    const int ready = ::poll(&p, 1, 100);
    if (ready > 0) {
      char buffer[4096];
      const ssize_t n = ::read(out_fd, buffer, sizeof(buffer));
      if (n > 0) {
        if (output.size() < (1 << 20)) output.append(buffer, static_cast<size_t>(n));
        continue;
      }
      if (n == 0) break;  // the child closed its end (exited)
      if (errno != EINTR) break;
    }
    if (!killed_for && (std::chrono::steady_clock::now() > deadline || (cancelled_ && cancelled_()))) {
      killed_for = true;
      kill_reason = std::chrono::steady_clock::now() > deadline ? "timeout" : "cancelled";
      ::kill(pid, SIGKILL);
    }
  }
  ::close(out_fd);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  ArtifactCheck result;
  if (killed_for) {
    if (kill_reason == "cancelled") {
      result.message = "the artifact check was stopped with the agent";
      result.crashed = true;
      return result;
    }
    result.message = std::string("the artifact's ") + check_name(check) + " did not finish within " +
                     nlohmann::json(timeout_s_).dump() + " s";
    return result;
  }
  const nlohmann::json doc = nlohmann::json::parse(output, nullptr, false);
  if (WIFEXITED(status) && WEXITSTATUS(status) == 0 && doc.is_object()) {
    result.passed = doc.value("passed", false);
    result.manifest_sha256 = doc.value("manifest_sha256", "");
    result.message = doc.value("message", "");
    return result;
  }
  result.crashed = true;
  if (WIFSIGNALED(status)) {
    result.message = std::string("the artifact's ") + check_name(check) + " crashed the checking process (" +
                     child_status_describe(status) + ")";
  } else {
    result.message = std::string("the artifact's ") + check_name(check) + " ended the checking process (" +
                     child_status_describe(status) + ") without an answer";
  }
  return result;
}

int deploy_check_main(int argc, char** argv) {
  // argv: verify|self-test DIR [--key-hex HEX]... [--backend-path DIR]...
  if (argc < 2) {
    std::cerr << "usage: edgesmith-agent --deploy-check verify|self-test DIR --key-hex HEX... [--backend-path DIR]...\n";
    return 2;
  }
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);  // a SIGKILLed agent takes its check with it
  const std::string mode = argv[0];
  const std::string dir = argv[1];
  std::vector<std::vector<uint8_t>> keys;
  nlohmann::json answer = {{"passed", false}, {"manifest_sha256", ""}, {"message", ""}};
  try {
    std::vector<std::string> backend_path;
    for (int i = 2; i + 1 < argc; i += 2) {
      const std::string flag = argv[i];
      if (flag == "--key-hex") {
        keys.push_back(child_key_from_hex(argv[i + 1]));
      } else if (flag == "--backend-path") {
        backend_path.push_back(argv[i + 1]);
      } else {
        throw Error(ERROR_CODE_INVALID_ARGUMENT, "unknown argument " + flag);
      }
    }
    // The agent's own plugin search: built-in directories and --backend-path, never the environment.
    plugin_search_configure(PluginSearchPolicy{false, backend_path});
    if (mode != "verify" && mode != "self-test") throw Error(ERROR_CODE_INVALID_ARGUMENT, "unknown check " + mode);
    std::shared_ptr<Session> session = session_open(dir, keys);
    answer["manifest_sha256"] = sha256_string(session->session_manifest_json());
    if (mode == "self-test") {
      const SelfTestResult test = session->session_self_test();
      if (!test.passed) {
        answer["message"] = "the artifact failed its golden self-test (" + self_test_failure(test) + ")";
        std::cout << answer.dump() << std::endl;
        return 0;
      }
    }
    answer["passed"] = true;
  } catch (const std::exception& e) {
    answer["message"] = e.what();
  }
  std::cout << answer.dump() << std::endl;
  return 0;
}

// --- the worker -----------------------------------------------------------------------------------

Deployer::Deployer(DeployerOptions options) : options_(std::move(options)), layout_(options_.data_dir) {
  if (!options_.downloader) options_.downloader = std::make_shared<HttpDownloader>();
  if (!options_.opener) options_.opener = std::make_shared<BuildKeyOpener>(options_.build_keys);
  if (!options_.verifier) {
    options_.verifier = std::make_shared<ChildProcessVerifier>(options_.check_executable, options_.build_keys,
                                                               options_.timeout_s, [this] { return cancelled(); },
                                                               options_.backend_path);
  }
  if (!options_.clock_s) options_.clock_s = [] { return static_cast<int64_t>(std::time(nullptr)); };
  if (options_.max_attempts == 0) options_.max_attempts = 1;
}

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
  // The replay floor lives in two files; either alone keeps older desired states out.
  const uint64_t floor = deploy_floor_read(layout_.floor_path());
  if (floor > state_.highest_version) {
    log("state.json shows versions up to " + std::to_string(state_.highest_version) + " but the floor file " +
        std::to_string(floor) + "; versions up to " + std::to_string(floor) + " stay refused");
    state_.highest_version = floor;
    state_save();
  } else if (floor < state_.highest_version) {
    deploy_floor_write(layout_.floor_path(), state_.highest_version);
  }
  const std::string current = layout_.current_slot();
  OpenedArtifact chosen;
  bool changed = false;
  const std::string slot = boot_choice(state_, current, [&](const std::string& candidate) {
    SlotRecord& record = state_.slots[candidate];
    if (record.boot_attempts >= options_.max_attempts) {
      // Started this many times and never reached the broker: a crash loop. Fall back.
      const std::string why = "slot " + candidate + " (" + record.artifact + ") was started " +
                              std::to_string(record.boot_attempts) + " times without getting as far as reporting";
      log(why + "; it is marked bad");
      record.status = "bad";
      changed = true;
      if (state_.deployment && state_.deployment->slot == candidate && state_.deployment->result == "applied") {
        state_.deployment->result = "failed";
        state_.deployment->error = why + " (the agent crashed with it), so the device went back to the previous one";
        state_.deployment->reported = false;
      }
      return false;
    }
    // Counted before the open: a crash while loading or serving it is an attempt.
    ++record.boot_attempts;
    state_save();
    try {
      OpenedArtifact opened = options_.opener->opener_open(layout_.slot_dir(candidate));
      if (opened.manifest_sha256 != record.manifest_sha256) {
        throw Error(ERROR_CODE_INTEGRITY, "slot " + candidate + " does not hold the artifact state.json records");
      }
      chosen = std::move(opened);
      return true;
    } catch (const std::exception& e) {
      log("slot " + candidate + " is not used: " + e.what());
      record.status = "bad";
      changed = true;
      return false;
    }
  });
  if (slot.empty()) {
    chosen = options_.opener->opener_open(options_.factory_artifact);
    if (!current.empty()) {
      std::error_code ec;
      fs::remove(layout_.current_path(), ec);
      directory_sync(layout_.root());
    }
  } else if (slot != current) {
    layout_.current_flip(slot);
  }
  serving_slot_ = slot;
  serving_sha256_ = chosen.manifest_sha256;
  serving_name_ = chosen.name;
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
  return chosen.session;
}

void Deployer::boot_settle() {
  // The serving slot started, opened and ran (it reached the broker, or ran boot_settle_s): its
  // boot attempt succeeded.
  boot_settled_ = true;
  if (!serving_slot_.empty() && state_.slots[serving_slot_].boot_attempts != 0) {
    state_.slots[serving_slot_].boot_attempts = 0;
    state_save();
  }
}

void Deployer::deployer_start(DeployReporter* reporter, std::function<void(std::shared_ptr<Session>)> swap) {
  reporter_ = reporter;
  started_at_ = std::chrono::steady_clock::now();
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

bool Deployer::cancelled() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return stopping_;
}

void Deployer::check_cancelled() const {
  if (cancelled()) throw Cancelled{};
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
      } else if (boot_settled_) {
        continue;
      }
    }
    try {
      if (!boot_settled_ && (state_due || std::chrono::steady_clock::now() - started_at_ >
                                               std::chrono::duration<double>(options_.boot_settle_s))) {
        boot_settle();
      }
      if (state_due) {  // on connect: what the device runs
        if (reporter_ != nullptr) {
          try {
            reporter_->deploy_report_state({{"artifact_sha256", serving_sha256_},
                                            {"details", details(state_.deployment ? &*state_.deployment : nullptr)}});
          } catch (const std::exception& e) {
            log(std::string("the state report was not stored: ") + e.what());
          }
        }
        if (state_.deployment && !state_.deployment->reported && state_.deployment->result != "in-progress") {
          // Finished just before the last stop (or its report failed): report it now.
          if (report_final()) {
            state_.deployment->reported = true;
            state_save();
          }
        }
      } else if (payload.empty() && !resume_expired) {
        // Woken only to check the boot counter.
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

bool Deployer::report(const std::string& event, const std::string& message, const DeploymentRecord& record) {
  const nlohmann::json d = details(&record);
  log(event + ": " + message);
  if (reporter_ == nullptr) return false;
  // Best-effort: a report that cannot be stored (a full disk, a SQLite error) is logged and, for a
  // final result, sent again at the next connection; it never changes what was recorded.
  try {
    reporter_->deploy_report_state({{"artifact_sha256", serving_sha256_}, {"details", d}});
    reporter_->deploy_report_event(event, message, d);
    return true;
  } catch (const std::exception& e) {
    log("the " + event + " report was not stored (" + e.what() + "); it is sent again at the next connection");
    return false;
  }
}

void Deployer::phase_enter(DeployPhase phase, const std::string& last_failure) {
  DeploymentRecord& record = *state_.deployment;
  const std::string name = deploy_phase_name(phase);
  const uint32_t attempts = ++record.attempts[name];
  if (attempts > options_.max_attempts) {
    record.phase = name;
    throw Error(ERROR_CODE_INTEGRITY,
                "the " + name + " phase was tried " + std::to_string(options_.max_attempts) + " times without finishing (" +
                    (last_failure.empty() ? std::string("the agent stopped or crashed during it each time") : last_failure) +
                    ")");
  }
  record.phase = name;
  state_save();  // written before the work starts: a crash in it is counted at the next start
}

void Deployer::finish(const std::string& result, const std::string& error) {
  DeploymentRecord& record = *state_.deployment;
  record.result = result;
  record.error = error;
  if (result == "applied") record.phase.clear();
  // Recorded first, reported second, then marked reported: a crash in between (or a report that
  // could not be stored) is reported at the next connection; the result itself never changes.
  record.reported = false;
  state_save();
  if (report_final()) {
    record.reported = true;
    state_save();
  }
}

bool Deployer::report_final() {
  const DeploymentRecord& record = *state_.deployment;
  if (record.result == "applied") {
    const bool back = record.action == "rollback";
    return report(back ? "deploy.rolled-back" : "deploy.applied",
                  (back ? "rolled back to " : "now serving ") + serving_name_ +
                      (serving_slot_.empty() ? std::string(" (the factory artifact)") : " from slot " + serving_slot_),
                  record);
  }
  return report("deploy.failed", record.error, record);
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
  const int64_t now = options_.clock_s();
  if (desired_expired(desired, now)) {
    refuse("the desired state is refused: it expired at " + std::to_string(desired.not_after) +
               " (not_after, Unix seconds) and this device's clock reads " + std::to_string(now) + ", more than the " +
               std::to_string(DESIRED_CLOCK_SKEW_S) + " s allowed for clock skew later; deploy it again to sign a fresh one",
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
  record.phase = deploy_phase_name(DEPLOY_PHASE_DOWNLOAD);
  record.previous_slot = serving_slot_;
  record.previous_sha256 = serving_sha256_;
  record.desired = desired_to_json(desired);
  // The floor file first, then state.json: a crash between them leaves the higher floor.
  deploy_floor_write(layout_.floor_path(), desired.version);
  state_.highest_version = desired.version;
  state_.deployment = record;
  state_save();
  report("deploy.started", desired.action + " of " + desired.artifact.name + " (version " +
                               std::to_string(desired.version) + ") started",
         record);
  apply(desired, false);
}

void Deployer::switch_to(const std::string& slot, const DesiredState& desired, OpenedArtifact opened) {
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
  serving_sha256_ = opened.manifest_sha256;
  serving_name_ = opened.name;
  record.slot = slot;
  // This start of the slot counts as a boot attempt until the next connection clears it.
  state_.slots[slot].boot_attempts = 0;
  boot_settled_ = true;
  if (swap_) swap_(std::move(opened.session));  // the old Session serves until this instant
}

void Deployer::checked(DeployCheck check, DeployPhase phase, const std::string& dir, const std::string& manifest_sha256) {
  while (true) {
    const ArtifactCheck result = options_.verifier->verifier_check(check, dir);
    check_cancelled();
    if (result.passed) {
      if (result.manifest_sha256 != manifest_sha256) {
        throw Error(ERROR_CODE_INTEGRITY, "the archive's manifest.json has SHA-256 " + result.manifest_sha256 +
                                              ", not the " + manifest_sha256 + " the desired state names");
      }
      return;
    }
    if (!result.crashed) throw Error(ERROR_CODE_INTEGRITY, result.message);
    log(result.message + " (attempt " + std::to_string(state_.deployment->attempts[deploy_phase_name(phase)]) + " of " +
        std::to_string(options_.max_attempts) + ")");
    phase_enter(phase, result.message);  // throws once the attempts are used up
  }
}

void Deployer::apply(const DesiredState& desired, bool resumed) {
  try {
    run_phases(desired, resumed);
  } catch (const Cancelled&) {
    // Shutting down: state.json keeps it in progress, resumed at the next start; a clean stop is
    // not a failed attempt of the phase it was in.
    DeploymentRecord& record = *state_.deployment;
    if (!record.phase.empty() && record.attempts[record.phase] > 0) {
      --record.attempts[record.phase];
      state_save();
    }
    throw;
  } catch (const std::exception& e) {
    staging_clean("");
    finish("failed", e.what());
    return;
  }
  // Outside the try: once switched, nothing (a report, a full disk) turns "applied" into "failed".
  staging_clean("");
  finish("applied", "");
}

void Deployer::run_phases(const DesiredState& desired, bool resumed) {
  const std::string part_name = desired.artifact.sha256 + ".tar.part";
  const std::string part = layout_.staging_dir() + "/" + part_name;
  const std::string staged = layout_.staging_dir() + "/slot";
  if (desired.artifact.manifest_sha256 == serving_sha256_) {  // already serving it (or the switch was done)
    state_.deployment->slot = serving_slot_;
    return;
  }
  const std::string target = slot_other(serving_slot_);
  SlotRecord& slot = state_.slots[target];
  if ((desired.action == "rollback" || resumed) && slot.status == "good" &&
      slot.manifest_sha256 == desired.artifact.manifest_sha256) {
    // The inactive slot holds it already: verify, self-test, switch; nothing to download.
    phase_enter(DEPLOY_PHASE_VERIFY, "");
    checked(DEPLOY_CHECK_VERIFY, DEPLOY_PHASE_VERIFY, layout_.slot_dir(target), desired.artifact.manifest_sha256);
    phase_enter(DEPLOY_PHASE_SELF_TEST, "");
    try {
      checked(DEPLOY_CHECK_SELF_TEST, DEPLOY_PHASE_SELF_TEST, layout_.slot_dir(target), desired.artifact.manifest_sha256);
    } catch (const Error&) {
      slot.status = "bad";  // never picked at boot again
      state_save();
      throw;
    }
    check_cancelled();
    phase_enter(DEPLOY_PHASE_SWITCH, "");
    OpenedArtifact opened = options_.opener->opener_open(layout_.slot_dir(target));
    switch_to(target, desired, std::move(opened));
    return;
  }
  // (2) download, resuming what an earlier attempt left. A resume after a later phase finds the
  // archive whole: that pass through `download` is not a download attempt.
  std::error_code size_ec;
  const bool whole = resumed && fs::file_size(part, size_ec) == desired.artifact.size && !size_ec;
  if (whole) {
    state_.deployment->phase = deploy_phase_name(DEPLOY_PHASE_DOWNLOAD);
    state_save();
  } else {
    phase_enter(DEPLOY_PHASE_DOWNLOAD, "");
  }
  staging_clean(part_name);
  for (int attempt = 0;; ++attempt) {
    const bool had_part = fs::exists(part);
    DownloadOptions download;
    download.url = desired.artifact.url;
    download.part_path = part;
    download.expected_size = desired.artifact.size;
    download.max_bytes = options_.max_bytes;
    download.timeout_s = options_.timeout_s;
    download.cancelled = [this] { return cancelled(); };
    download.log = [this](const std::string& line) { log("download: " + line); };
    download.tls_cafile = options_.tls_cafile;
    download.tls_certfile = options_.tls_certfile;
    download.tls_keyfile = options_.tls_keyfile;
    try {
      options_.downloader->downloader_fetch(download);
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
  // (4) extract, (5) verify against the build keys (signature, ISA, CPU features, the backend
  // loads) in a child process, and check it is the artifact the desired state names.
  phase_enter(DEPLOY_PHASE_VERIFY, "");
  remove_tree(staged);
  archive_extract(part, staged, options_.max_bytes);
  checked(DEPLOY_CHECK_VERIFY, DEPLOY_PHASE_VERIFY, staged, desired.artifact.manifest_sha256);
  // (6) the golden self-test, in a child process too.
  check_cancelled();
  phase_enter(DEPLOY_PHASE_SELF_TEST, "");
  checked(DEPLOY_CHECK_SELF_TEST, DEPLOY_PHASE_SELF_TEST, staged, desired.artifact.manifest_sha256);
  check_cancelled();
  // (7) replace the inactive slot, (8) flip `current` and swap the Session.
  phase_enter(DEPLOY_PHASE_SWITCH, "");
  slot = SlotRecord{};
  state_save();
  remove_tree(layout_.slot_dir(target));
  std::error_code ec;
  fs::rename(staged, layout_.slot_dir(target), ec);
  if (ec) throw Error(ERROR_CODE_IO, "cannot move the new artifact into slot " + target + " (" + ec.message() + ")");
  directory_sync(layout_.slots_dir());
  OpenedArtifact opened = options_.opener->opener_open(layout_.slot_dir(target));
  slot.status = "good";
  slot.manifest_sha256 = desired.artifact.manifest_sha256;
  slot.artifact = opened.name;
  slot.archive_sha256 = desired.artifact.sha256;
  slot.desired_version = desired.version;
  state_save();
  switch_to(target, desired, std::move(opened));
}

}  // namespace edgesmith
