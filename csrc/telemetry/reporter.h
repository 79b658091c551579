// A Session's telemetry: a Publisher that announces the session's artifact in its birth and, every
// interval, publishes the window's summary (WindowSummariser) and a spool_dropped event when the
// spool had to drop messages. What edgesmith-agent and Python's edgesmith.runtime.telemetry use.
#pragma once

#include <condition_variable>
#include <functional>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include <nlohmann/json.hpp>

#include "runtime/session.h"
#include "telemetry/publisher.h"
#include "telemetry/window.h"

namespace edgesmith {

/// How a SessionReporter reports.
struct ReporterOptions {
  std::string credentials_path;      ///< the JSON file `edgesmith broker add-device` writes
  std::string data_dir;              ///< holds spool.db (created when missing)
  double interval_s = 10.0;          ///< one telemetry message per interval
  uint64_t spool_max_bytes = SPOOL_DEFAULT_MAX_BYTES;
  std::string thermal_root = "/sys/class/thermal";
  std::string expect_device;         ///< when set, the credentials must be this device's
  std::string expect_fleet;          ///< when set, the credentials must be in this fleet
  /// When set, the device's `desired` topic is subscribed and its messages go here (on Paho's
  /// thread; keep it short), and on_subscribed is told after each SUBACK (docs/deployment.md).
  std::function<void(const std::string& payload, bool retained)> on_desired;
  std::function<void()> on_subscribed;
  /// When set, the device's `shadow-desired` topic is subscribed and its messages go here (on
  /// Paho's thread; keep it short); on_shadow_subscribed after each of its SUBACKs (docs/shadow.md).
  std::function<void(const std::string& payload, bool retained)> on_shadow;
  std::function<void()> on_shadow_subscribed;
  /// When set, the device's `capture-desired` topic is subscribed and its messages go here (on
  /// Paho's thread; keep it short) (docs/capture.md).
  std::function<void(const std::string& payload, bool retained)> on_capture;
};

/// The birth's fields beyond the envelope for a session (target, runtime, artifact, metrics), as
/// docs/telemetry.md describes them; output references come from the manifest's monitoring section.
nlohmann::json birth_body(const Session& session, double interval_s);

/// Reports one Session at a time (the agent switches it after a deployment). A Session passed by
/// reference must outlive the reporter.
class SessionReporter {
 public:
  /// Read the credentials, open the spool; nothing is sent before reporter_start(). Throws Error.
  SessionReporter(const Session& session, ReporterOptions options);
  SessionReporter(std::shared_ptr<const Session> session, ReporterOptions options);
  /// Stops like reporter_stop(0) would, without the final window.
  ~SessionReporter();
  SessionReporter(const SessionReporter&) = delete;
  SessionReporter& operator=(const SessionReporter&) = delete;

  /// Connect, publish the birth, a `started` event and a telemetry window every interval.
  void reporter_start();

  /// Publish an event (`name` like run_error; `details` a JSON object).
  void reporter_event(const std::string& name, const std::string& message,
                      const nlohmann::json& details = nlohmann::json::object());

  /// Report `next` from now on: the current window is closed and published for the old
  /// session, a new window starts, and a new birth (same bdSeq, new seq) names the new artifact.
  void reporter_session_switch(std::shared_ptr<const Session> next);

  /// Publish a `state` message (docs/deployment.md §5); `body` holds artifact_sha256 and details.
  void reporter_state(const nlohmann::json& body);

  /// Publish a `shadow` message (docs/shadow.md); `body` holds the ShadowWindow fields beyond the
  /// envelope. The publisher's contract check applies, as for every message.
  void reporter_shadow(const nlohmann::json& body);

  /// Close the current window now and publish it (also what the interval timer does).
  void reporter_window();

  /// Publish the last (partial) window, flush for at most `timeout_s`, publish death (shutdown)
  /// and disconnect. Idempotent.
  void reporter_stop(double timeout_s);

  /// Connection and spool state, and the configured ids.
  nlohmann::json reporter_status();

  /// The publisher (for tests and the agent's status).
  Publisher& reporter_publisher() noexcept { return *publisher_; }

 private:
  void loop();
  std::shared_ptr<const Session> session_current();

  std::mutex session_mutex_;  // session_ only; never held while calling the publisher
  std::shared_ptr<const Session> session_;
  ReporterOptions options_;
  MqttCredentials credentials_;
  std::string artifact_sha256_;
  std::unique_ptr<Publisher> publisher_;
  std::unique_ptr<WindowSummariser> window_;
  std::mutex mutex_;         // window_ and the event order
  std::mutex stop_mutex_;
  std::condition_variable stop_cv_;
  bool stopping_ = false;
  bool started_ = false;
  std::thread thread_;
};

}  // namespace edgesmith
