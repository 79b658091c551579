// The agent's deployment worker (docs/deployment.md): picks the slot to serve at boot, takes the
// signed desired states that arrive on the device's `desired` topic, applies them in its own
// thread into the inactive slot while the old Session keeps serving, swaps the serving Session,
// and reports `state` messages and `deploy.*` events.
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
#include "deploy/slots.h"
#include "runtime/session.h"
#include "telemetry/reporter.h"

namespace edgesmith {

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

  /// Choose what to serve (§4: `current` if it verifies and is good, else the other good slot,
  /// else the factory artifact) and open it. Throws Error only when the factory artifact fails.
  std::shared_ptr<Session> deployer_boot();

  /// Start the worker: `swap` makes a Session the serving one, `reporter` carries the reports.
  void deployer_start(SessionReporter* reporter, std::function<void(std::shared_ptr<Session>)> swap);

  /// A message on the desired topic (Paho's thread: only queued).
  void deployer_desired(const std::string& payload);

  /// The desired topic's SUBACK after each connect (Paho's thread): the state is reported again.
  void deployer_subscribed();

  /// Stop the worker; a deployment in progress stays in-progress in state.json (resumed at boot).
  void deployer_stop();

 private:
  struct Cancelled {};
  void loop();
  void handle(const std::string& payload);
  void apply(const DesiredState& desired, bool resumed);
  void switch_to(const std::string& slot, const DesiredState& desired, std::shared_ptr<Session> session);
  void phase_set(const std::string& phase);
  void finish(const std::string& result, const std::string& error);
  void report_final();
  void report(const std::string& event, const std::string& message, const DeploymentRecord& record);
  nlohmann::json details(const DeploymentRecord* record) const;
  void state_save();
  void staging_clean(const std::string& keep);
  void check_cancelled() const;
  void log(const std::string& line) const;

  DeployerOptions options_;
  SlotLayout layout_;
  DeployState state_;
  std::string serving_slot_;    // "" : the factory artifact
  std::string serving_sha256_;  // its manifest
  std::string serving_name_;
  SessionReporter* reporter_ = nullptr;
  std::function<void(std::shared_ptr<Session>)> swap_;

  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<std::string> queue_;
  bool stopping_ = false;
  bool resume_pending_ = false;
  bool state_due_ = false;  // a SUBACK (a new connection): report the state
  std::optional<std::chrono::steady_clock::time_point> subscribed_at_;
  std::thread thread_;
};

}  // namespace edgesmith
