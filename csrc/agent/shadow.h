// The agent's shadow runner (docs/shadow.md, "On the device"): takes the signed shadow states that
// arrive on the device's `shadow-desired` topic, downloads, verifies and self-tests each candidate
// into the shadow slot (<data_dir>/shadow/, apart from the A/B slots, with its own byte budget),
// runs it in a child process (ShadowChild) on a sampled fraction of the requests the agent serves,
// and reports a `shadow` message per telemetry interval and `shadow.*` events. The serving model is
// never touched: the serving paths only offer samples (shadow_offer), which never waits for the
// shadow's thread.
#pragma once

#include <atomic>
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

#include "deploy/shadow_state.h"
#include "runtime/session.h"
#include "runtime/tensor.h"

namespace edgesmith {

class ShadowChild;
class ShadowSummary;

/// Carries the runner's reports (the agent's: the telemetry spool). May throw; reporting is best-effort.
class ShadowReporter {
 public:
  virtual ~ShadowReporter() = default;
  /// A `shadow.*` event; `details` holds contract ShadowReport fields.
  virtual void shadow_report_event(const std::string& event, const std::string& message,
                                   const nlohmann::json& details) = 0;
  /// A `shadow` message body (the ShadowWindow fields beyond the envelope).
  virtual void shadow_report_window(const nlohmann::json& body) = 0;
};

/// What the shadow runner needs.
struct ShadowRunnerOptions {
  std::string data_dir;  ///< <data_dir>/shadow holds the slot, state.json and floor
  std::string fleet;     ///< this device's ids (a shadow state must name them)
  std::string device;
  std::vector<std::vector<uint8_t>> build_keys;   ///< artifact signatures
  std::vector<std::vector<uint8_t>> deploy_keys;  ///< shadow-state signatures
  uint64_t max_bytes = 256ull << 20;  ///< the agent's cap on the shadow slot; a state's max_bytes may lower it
  double download_timeout_s = 600.0;
  double check_timeout_s = 600.0;     ///< verify + self-test of a candidate (a child process)
  double run_timeout_s = 30.0;        ///< one sample in the candidate's child
  /// Told of each sample the candidate ran whose top-1 (the serving manifest's classes output)
  /// differs from serving's and that capture did not take already: capture's `disagreement`
  /// switch (CaptureRunner::capture_disagreement). On the shadow's thread; must not block.
  std::function<void(const Session& serving, const std::vector<Tensor>& inputs,
                     const std::vector<Tensor>& serving_outputs)> on_disagreement;
  double interval_s = 10.0;           ///< one `shadow` message per interval while a candidate runs
  std::string executable = "/proc/self/exe";  ///< the agent binary (the check and the shadow child)
  std::vector<std::string> backend_path;
  std::string tls_cafile;
  std::string tls_certfile;
  std::string tls_keyfile;
  /// Unix milliseconds (the schedule, not_after); the system clock when unset.
  std::function<int64_t()> clock_ms;
  std::function<void(const std::string&)> log;
};

/// The shadow runner. shadow_start() once, shadow_stop() at the end.
class ShadowRunner {
 public:
  explicit ShadowRunner(ShadowRunnerOptions options);
  ~ShadowRunner();
  ShadowRunner(const ShadowRunner&) = delete;
  ShadowRunner& operator=(const ShadowRunner&) = delete;

  /// Start the thread: `serving` gives the serving Session (the one candidates are compared to),
  /// `reporter` carries the reports. A shadow recorded in <data_dir>/shadow/state.json resumes.
  void shadow_start(ShadowReporter* reporter, std::function<std::shared_ptr<Session>()> serving);

  /// A message on the shadow-desired topic (Paho's thread: only queued).
  void shadow_desired(const std::string& payload);

  /// The serving paths' hook, called after the answer is computed: with probability `sample` the
  /// inputs and outputs are copied into the bounded queue (full: dropped and counted). Never waits
  /// for the shadow's thread. `serving` is the Session that answered: samples of another one than
  /// the candidate is compared to are not taken. `captured`: capture already took this request
  /// (its disagreement switch then does not take it again).
  void shadow_offer(const Session& serving, const std::vector<Tensor>& inputs, const std::vector<Tensor>& outputs,
                    double serving_us, bool captured = false);

  /// A deployment switched the serving model: a running shadow ends (reason serving-changed).
  void shadow_serving_changed();

  /// The shadow's state for GET /v1/stats: {"active": false} or its id, candidate, samples, dropped.
  nlohmann::json shadow_status();

  /// Stop the thread; a running shadow stays recorded in state.json (resumed at the next start).
  void shadow_stop();

 private:
  struct Sample {
    std::vector<Tensor> inputs;
    std::vector<Tensor> outputs;
    double serving_us = 0;
    bool captured = false;
  };
  // The candidate now running: what the serving paths see (guarded by offer_mutex_).
  struct Live {
    const Session* serving = nullptr;
    std::shared_ptr<ShadowSummary> summary;
    double sample = 0;
    size_t queue_max = 0;
    std::deque<Sample> queue;
    uint64_t offered = 0;
    uint64_t dropped = 0;
    uint64_t samples = 0;
  };

  void loop();
  void handle(const std::string& payload);
  void refuse(const std::string& shadow_id, uint64_t version, int32_t candidate, const std::string& why);
  void schedule();
  void candidate_begin(size_t index);
  void candidate_end(const std::string& event, const std::string& reason, const std::string& error);
  void shadow_end(const std::string& reason);
  void window_publish();
  void sample_run();
  std::string candidate_fetch(size_t index);
  void slot_clean(const std::string& keep);
  void state_save();
  void report(const std::string& event, const std::string& message, const nlohmann::json& details);
  nlohmann::json report_details(int32_t candidate) const;
  int64_t now_ms() const;
  void log(const std::string& line) const;

  ShadowRunnerOptions options_;
  std::string dir_;
  ShadowReporter* reporter_ = nullptr;
  std::function<std::shared_ptr<Session>()> serving_;

  // The shadow thread's own state.
  std::optional<ShadowState> state_;
  std::string state_envelope_;
  std::vector<bool> done_;           // candidates whose turn ended (ran, failed or refused)
  std::atomic<int32_t> running_{-1};  // the candidate whose child runs, -1: none
  std::unique_ptr<ShadowChild> child_;
  std::shared_ptr<Session> compared_to_;  // the serving Session of the running candidate
  std::string serving_sha256_;
  std::string candidate_sha256_;
  double cpu_at_window_ = 0;
  int64_t window_due_ms_ = 0;
  std::chrono::steady_clock::time_point run_allowed_at_{};

  std::mutex offer_mutex_;
  std::shared_ptr<Live> live_;        // null while no candidate runs
  std::string live_id_;               // its shadow id
  std::atomic<bool> active_{false};   // live_ != null (the serving paths' fast check)
  std::atomic<uint64_t> rng_state_{0x9e3779b97f4a7c15ull};

  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<std::string> inbox_;
  bool stopping_ = false;
  bool serving_changed_ = false;
  std::thread thread_;
};

}  // namespace edgesmith
