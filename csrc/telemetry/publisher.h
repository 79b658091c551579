// The device's MQTT publisher (Eclipse Paho MQTT C, MQTTAsync, MQTT v5), after
// docs/telemetry.md:
//
//   * every message is stored in the Spool first, published at QoS 1, and deleted on its PUBACK;
//   * a persistent session (clean start off, session expiry 7 days); Paho itself re-sends the
//     messages that were in flight when a connection dropped, the spool what was never sent (or
//     everything, after a restart), in order, with `historical: true` when the message was made
//     in an earlier session than the one that publishes it;
//   * before each CONNECT: bdSeq is incremented and stored, and the will on `death` carries it
//     (reason connection-lost) with the seq the session's birth will carry; after the CONNACK the
//     birth goes first;
//   * a connection that fails or drops is retried with exponential back-off;
//   * publisher_stop(): flush, an explicit death (reason shutdown), a normal DISCONNECT (the
//     broker then discards the will).
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "telemetry/credentials.h"
#include "telemetry/spool.h"

namespace edgesmith {

/// One topic the Publisher subscribes to.
struct PublisherSubscription {
  std::string topic;
  std::function<void(const std::string& payload, bool retained)> on_message;
  std::function<void()> on_subscribed;
};

/// How a Publisher connects and what it announces.
struct PublisherOptions {
  MqttCredentials credentials;
  std::string spool_path;                              ///< usually <data-dir>/spool.db
  uint64_t spool_max_bytes = SPOOL_DEFAULT_MAX_BYTES;  ///< the spool's byte budget
  int32_t keepalive_s = 20;
  uint32_t session_expiry_s = 7 * 24 * 3600;
  double reconnect_min_s = 0.5;  ///< first retry after a failure; doubles up to reconnect_max_s
  double reconnect_max_s = 10.0;
  uint32_t max_in_flight = 100;  ///< QoS 1 messages awaiting their PUBACK at once
  /// The birth's fields beyond the envelope (target, runtime, artifact, metrics); called after
  /// each CONNACK.
  std::function<nlohmann::json()> birth_body;
  /// Topics subscribed at QoS 1 after each CONNACK (the device's `desired` and `shadow-desired`
  /// topics, docs/deployment.md, docs/shadow.md): what arrives on one goes to its on_message (on
  /// Paho's thread: keep it short), with MQTT's retain flag; its on_subscribed is told when its
  /// SUBACK arrives.
  std::vector<PublisherSubscription> subscriptions;
  /// Where connection changes are reported, one line each (default: stderr).
  std::function<void(const std::string&)> log;
};

/// What a Publisher is doing.
struct PublisherStatus {
  bool connected = false;
  uint64_t bd_seq = 0;         ///< the current session
  uint64_t connects = 0;       ///< successful CONNECTs so far
  uint64_t acked = 0;          ///< PUBACKs received so far (this process)
  uint64_t in_flight = 0;      ///< sent, awaiting the PUBACK
  SpoolState spool;
};

/// The topic of a device message: edgesmith/v1/<fleet>/<device>/<kind>.
std::string telemetry_topic(const std::string& fleet, const std::string& device, const std::string& kind);

/// Milliseconds since the epoch (the messages' ts_ms).
int64_t telemetry_now_ms();

/// An MQTT publisher with a store-and-forward spool. Thread-safe.
class Publisher {
 public:
  /// Open the spool and create the client; nothing is sent before publisher_start().
  /// Throws Error(ERROR_CODE_INVALID_ARGUMENT) for unusable credentials, ERROR_CODE_IO for the spool.
  explicit Publisher(PublisherOptions options);
  /// Stops without flushing (no death: the broker sends the will when the connection drops).
  ~Publisher();
  Publisher(const Publisher&) = delete;
  Publisher& operator=(const Publisher&) = delete;

  /// Start connecting (and reconnecting) and publishing in the background.
  void publisher_start();

  /// Store one message of `kind` (telemetry, event, state) whose fields beyond the envelope are
  /// `body`; it is published when connected.
  SpoolAppendResult publisher_send(const std::string& kind, const nlohmann::json& body);

  /// Store a new birth (the current birth_body()) in the current session: same bdSeq, a new seq;
  /// what the agent publishes after switching to another artifact.
  SpoolAppendResult publisher_rebirth();

  /// Wait until nothing is queued or in flight, at most `timeout_s`; true when everything was acknowledged.
  bool publisher_flush(double timeout_s);

  /// Flush for at most `timeout_s`, publish death (reason shutdown) when connected, disconnect
  /// normally, stop the background thread. Idempotent.
  void publisher_stop(double timeout_s);

  /// A snapshot of the connection and the spool.
  PublisherStatus publisher_status();

  /// The spool (counters, drops).
  Spool& publisher_spool() noexcept { return *spool_; }

 private:
  using Clock = std::chrono::steady_clock;
  struct PublishContext;
  struct SubscribeContext {
    Publisher* publisher;
    size_t index;  // into options_.subscriptions
  };

  nlohmann::json envelope_json(const std::string& kind, uint64_t bd_seq, uint64_t seq,
                               const nlohmann::json& body) const;
  std::string envelope(const std::string& kind, uint64_t bd_seq, uint64_t seq, const nlohmann::json& body) const;
  // Why the message would break the device contract (logged), or "" (contract_check.h).
  std::string contract_problem(const std::string& kind, uint64_t bd_seq, const nlohmann::json& body) const;
  void pump();
  void connect_attempt();
  void connect_schedule_retry(const std::string& why);
  bool publish_one(const SpoolMessage& message, uint64_t session);
  void acked_remove();

  friend struct PublisherCallbacks;  // Paho's C callbacks (publisher.cc)

  PublisherOptions options_;
  std::unique_ptr<Spool> spool_;
  void* client_ = nullptr;  // MQTTAsync
  std::string will_topic_;
  std::string will_payload_;
  std::vector<SubscribeContext> subscribe_contexts_;  // one per subscription, stable for Paho's callbacks

  std::mutex mutex_;
  std::condition_variable cv_;
  std::thread thread_;
  bool started_ = false;
  bool stopping_ = false;
  bool stopped_ = false;
  bool dirty_ = false;           // something to do for the pump
  bool connected_ = false;
  bool connecting_ = false;
  bool need_birth_ = false;
  bool need_subscribe_ = false;
  uint64_t bd_seq_ = 0;          // current session
  uint64_t birth_seq_ = 0;       // the current session's birth (and death) seq
  uint64_t connects_ = 0;
  uint64_t acked_count_ = 0;
  double backoff_s_ = 0.0;
  Clock::time_point next_attempt_{};
  int64_t cursor_ = 0;           // highest spool id handed to Paho
  std::map<int64_t, Clock::time_point> in_flight_;  // handed to Paho (when), no PUBACK yet
  std::set<int64_t> acked_;      // PUBACK received, not yet deleted from the spool
  std::vector<int64_t> retry_;   // Paho gave up on these: send again
  bool death_acked_ = false;
  bool disconnected_ = false;
};

}  // namespace edgesmith
