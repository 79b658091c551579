// The agent's deployment worker (docs/deployment.md): picks the slot to serve at boot, takes the
// signed desired states that arrive on the device's `desired` topic, applies them in its own
// thread into the inactive slot while the old Session keeps serving, swaps the serving Session,
// and reports `state` messages and `deploy.*` events.
//
// A deployment is an explicit state machine (DeployPhase): each phase is written to state.json
// with its attempt count before its work starts, so a restart resumes the phase or, after
// DeployerOptions::max_attempts entries that never finished (the agent died in it each time),
// fails the deployment instead of crash-looping. Its seams (downloader, verifier, session opener,
// reporter) are interfaces, so tests/cpp/test_deployer.cc drives it without a broker or engine.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "deploy/desired.h"
#include "deploy/download.h"
#include "deploy/slots.h"
#include "runtime/session.h"

namespace edgesmith {

/// The phases of one deployment, in order (state.json keeps their names).
enum DeployPhase : uint8_t {
  DEPLOY_PHASE_DOWNLOAD,   ///< the archive into staging/<sha256>.tar.part (resumable)
  DEPLOY_PHASE_VERIFY,     ///< extract, check the signature, ISA and features, load the backend
  DEPLOY_PHASE_SELF_TEST,  ///< the golden samples
  DEPLOY_PHASE_SWITCH,     ///< into the inactive slot, flip `current`, swap the Session
  DEPLOY_PHASE_DONE,       ///< finished (applied, failed or refused)
};

/// "download", "verify", "self-test", "switch", "" (done): the name state.json and reports use.
const char* deploy_phase_name(DeployPhase phase);

/// Downloads an archive (the agent's: download_file over HTTP with resume and back-off).
class DeployDownloader {
 public:
  virtual ~DeployDownloader() = default;
  /// Fetch until options.part_path holds options.expected_size bytes; throws Error as download_file.
  virtual void downloader_fetch(const DownloadOptions& options) = 0;
};

/// Which check a verifier runs on a candidate artifact directory.
enum DeployCheck : uint8_t {
  DEPLOY_CHECK_VERIFY,     ///< verify signature and files, check ISA and features, load the backend
  DEPLOY_CHECK_SELF_TEST,  ///< all of that, then run the golden samples
};

/// The outcome of one check.
struct ArtifactCheck {
  bool passed = false;
  bool crashed = false;         ///< the checking process died without an answer (a signal, an abort)
  std::string manifest_sha256;  ///< SHA-256 of the checked manifest.json (when passed)
  std::string message;          ///< one sentence: why it did not pass
};

/// Checks a candidate artifact. The agent's runs each check in a child process (the agent binary
/// again, `--deploy-check`), so a payload that crashes while loading or self-testing kills the
/// child, not the agent.
class DeployVerifier {
 public:
  virtual ~DeployVerifier() = default;
  /// Run `check` on the artifact in `artifact_dir`; never throws for the artifact's faults.
  virtual ArtifactCheck verifier_check(DeployCheck check, const std::string& artifact_dir) = 0;
};

/// An artifact opened to serve.
struct OpenedArtifact {
  std::shared_ptr<Session> session;  ///< null only from test openers
  std::string manifest_sha256;
  std::string name;
};

/// Opens an artifact in this process to serve it (the agent's: session_open with the build keys).
class DeploySessionOpener {
 public:
  virtual ~DeploySessionOpener() = default;
  /// Verify and open `artifact_dir`; throws Error when it cannot be served.
  virtual OpenedArtifact opener_open(const std::string& artifact_dir) = 0;
};

/// Carries the deployer's reports (the agent's: the telemetry spool). May throw; the deployer
/// treats reporting as best-effort and never lets it change a recorded result.
class DeployReporter {
 public:
  virtual ~DeployReporter() = default;
  /// A `state` message body.
  virtual void deploy_report_state(const nlohmann::json& body) = 0;
  /// A `deploy.*` event.
  virtual void deploy_report_event(const std::string& event, const std::string& message,
                                   const nlohmann::json& details) = 0;
};

/// The agent's verifier: `executable --deploy-check verify|self-test DIR --key-hex HEX...` in a
/// child process, killed after `timeout_s` or when `cancelled` says so.
class ChildProcessVerifier : public DeployVerifier {
 public:
  /// `backend_path`: the agent's --backend-path directories, handed to the child (which, like the
  /// agent, ignores $EDGESMITH_BACKEND_PATH).
  ChildProcessVerifier(std::string executable, std::vector<std::vector<uint8_t>> build_keys, double timeout_s,
                       std::function<bool()> cancelled, std::vector<std::string> backend_path = {});
  ArtifactCheck verifier_check(DeployCheck check, const std::string& artifact_dir) override;

 private:
  std::string executable_;
  std::vector<std::vector<uint8_t>> build_keys_;
  double timeout_s_;
  std::function<bool()> cancelled_;
  std::vector<std::string> backend_path_;
};

/// The child side of ChildProcessVerifier: argv after `--deploy-check`. Prints one JSON line
/// ({"passed", "manifest_sha256", "message"}) and returns the exit status (0 with an answer).
int deploy_check_main(int argc, char** argv);

/// What the deployment worker needs.
struct DeployerOptions {
  std::string data_dir;          ///< <data_dir>/deploy holds the slots
  std::string fleet;             ///< this device's ids (a desired state must name them)
  std::string device;
  std::string factory_artifact;  ///< served when no slot is good
  std::vector<std::vector<uint8_t>> build_keys;   ///< artifact signatures
  std::vector<std::vector<uint8_t>> deploy_keys;  ///< desired-state signatures
  uint64_t max_bytes = 512ull << 20;
  double timeout_s = 600.0;
  /// How long after the SUBACK an interrupted deployment waits for its desired state to arrive
  /// again (the retained message) before it is reported failed.
  double resume_grace_s = 5.0;
  /// Entries of one deployment phase, and starts of one slot, that may end without finishing
  /// (a crash, a kill, a crashed check) before the deployment fails / the slot is marked bad.
  uint32_t max_attempts = 3;
  /// A start of a slot counts as good (its boot counter is cleared) at its first SUBACK, or after
  /// it has run this long without reaching the broker (an offline device is not crash-looping).
  double boot_settle_s = 60.0;
  /// The wall clock in Unix seconds (for not_after); the system clock when unset.
  std::function<int64_t()> clock_s;
  /// The seams; defaults: HTTP download, a child-process verifier of `check_executable`,
  /// session_open with build_keys.
  std::shared_ptr<DeployDownloader> downloader;
  std::shared_ptr<DeployVerifier> verifier;
  std::shared_ptr<DeploySessionOpener> opener;
  std::string check_executable = "/proc/self/exe";
  std::vector<std::string> backend_path;  ///< the agent's --backend-path directories (for the check child)
  std::function<void(const std::string&)> log;
  std::string tls_cafile;    ///< https downloads: the broker credentials' CA file (empty: the system's CAs)
  std::string tls_certfile;  ///< and their client certificate and key (mutual TLS; empty: none)
  std::string tls_keyfile;
};

/// The deployment worker. deployer_boot() first, then deployer_start().
class Deployer {
 public:
  explicit Deployer(DeployerOptions options);
  ~Deployer();
  Deployer(const Deployer&) = delete;
  Deployer& operator=(const Deployer&) = delete;

  /// Choose what to serve (§4: `current` if it verifies, is good and has not failed to start
  /// max_attempts times, else the other good slot, else the factory artifact) and open it.
  /// Throws Error only when the factory artifact fails.
  std::shared_ptr<Session> deployer_boot();

  /// Start the worker: `swap` makes a Session the serving one, `reporter` carries the reports.
  void deployer_start(DeployReporter* reporter, std::function<void(std::shared_ptr<Session>)> swap);

  /// A message on the desired topic (Paho's thread: only queued).
  void deployer_desired(const std::string& payload);

  /// The desired topic's SUBACK after each connect (Paho's thread): the state is reported again,
  /// and the first one ends the serving slot's boot attempt (it started well; so does running
  /// boot_settle_s without one).
  void deployer_subscribed();

  /// Stop the worker; a deployment in progress stays in-progress in state.json (resumed at boot).
  void deployer_stop();

 private:
  struct Cancelled {};
  void loop();
  void handle(const std::string& payload);
  void apply(const DesiredState& desired, bool resumed);
  void run_phases(const DesiredState& desired, bool resumed);
  void checked(DeployCheck check, DeployPhase phase, const std::string& dir, const std::string& manifest_sha256);
  void switch_to(const std::string& slot, const DesiredState& desired, OpenedArtifact opened);
  void phase_enter(DeployPhase phase, const std::string& last_failure);
  void finish(const std::string& result, const std::string& error);
  bool report_final();
  bool report(const std::string& event, const std::string& message, const DeploymentRecord& record);
  nlohmann::json details(const DeploymentRecord* record) const;
  void state_save();
  void staging_clean(const std::string& keep);
  void check_cancelled() const;
  bool cancelled() const;
  void log(const std::string& line) const;

  DeployerOptions options_;
  SlotLayout layout_;
  DeployState state_;
  std::string serving_slot_;    // "" : the factory artifact
  std::string serving_sha256_;  // its manifest
  std::string serving_name_;
  bool boot_settled_ = false;   // the serving slot's boot attempt was cleared
  std::chrono::steady_clock::time_point started_at_;
  void boot_settle();
  DeployReporter* reporter_ = nullptr;
  std::function<void(std::shared_ptr<Session>)> swap_;

  mutable std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<std::string> queue_;
  bool stopping_ = false;
  bool resume_pending_ = false;
  bool state_due_ = false;  // a SUBACK (a new connection): report the state
  std::optional<std::chrono::steady_clock::time_point> subscribed_at_;
  std::thread thread_;
};

}  // namespace edgesmith
