#include "telemetry/publisher.h"

#include <MQTTAsync.h>

#include <algorithm>
#include <cstring>
#include <iostream>
#include <utility>

#include "common/contract_words.h"
#include "common/error.h"
#include "telemetry/contract_check.h"

namespace edgesmith {

namespace {

constexpr int PROTOCOL_VERSION = 1;
constexpr int CONNECT_TIMEOUT_S = 10;
constexpr double DISCONNECT_WAIT_S = 15.0;  // the DISCONNECT's 1 s timeout, and then some on a loaded device
constexpr auto PUMP_IDLE = std::chrono::milliseconds(200);
// Paho re-sends what was in flight when a connection dropped; should a PUBACK still not come this
// long after a (re)connect, the message is sent again (a duplicate the monitor drops, never a loss).
constexpr auto IN_FLIGHT_TIMEOUT = std::chrono::seconds(30);

MQTTAsync handle(void* client) { return static_cast<MQTTAsync>(client); }

std::string paho_error(int rc) {
  const char* text = MQTTAsync_strerror(rc);
  return text != nullptr ? std::string(text) : "error " + std::to_string(rc);
}

std::string failure_text(const MQTTAsync_failureData5* response) {
  if (response == nullptr) return "no reason given";
  std::string text;
  if (response->message != nullptr) text = response->message;
  if (response->reasonCode != MQTTREASONCODE_SUCCESS) {
    const char* reason = MQTTReasonCode_toString(response->reasonCode);
    text += (text.empty() ? "" : ": ") + std::string(reason != nullptr ? reason : "reason code") + " (" +
            std::to_string(static_cast<int>(response->reasonCode)) + ")";
  }
  if (text.empty()) text = paho_error(response->code);
  return text;
}

}  // namespace

// What a publish's callbacks need: which spool message it was.
struct Publisher::PublishContext {
  Publisher* publisher;
  int64_t id;
  uint64_t seq;
};

// Paho's C callbacks; they run on Paho's threads and never call Paho themselves.
struct PublisherCallbacks {
  static void connect_success(void* context, MQTTAsync_successData5* response) {
    auto* self = static_cast<Publisher*>(context);
    const bool resumed = response != nullptr && response->alt.connect.sessionPresent != 0;
    uint64_t bd_seq = 0;
    {
      std::lock_guard<std::mutex> lock(self->mutex_);
      self->connected_ = true;
      self->connecting_ = false;
      self->need_birth_ = true;
      self->need_subscribe_ = !self->options_.subscriptions.empty();
      self->connects_ += 1;
      self->backoff_s_ = self->options_.reconnect_min_s;
      for (auto& entry : self->in_flight_) entry.second = std::chrono::steady_clock::now();
      self->dirty_ = true;
      bd_seq = self->bd_seq_;
    }
    self->cv_.notify_all();
    self->options_.log("connected to " + self->options_.credentials.host + ":" +
                       std::to_string(self->options_.credentials.port) + " (bdSeq " + std::to_string(bd_seq) +
                       (resumed ? ", session resumed)" : ", new session)"));
  }

  static void connect_failure(void* context, MQTTAsync_failureData5* response) {
    auto* self = static_cast<Publisher*>(context);
    self->connect_schedule_retry("connecting failed: " + failure_text(response));
  }

  static void connection_lost(void* context, char* cause) {
    auto* self = static_cast<Publisher*>(context);
    {
      std::lock_guard<std::mutex> lock(self->mutex_);
      if (!self->connected_) return;
      self->connected_ = false;
    }
    self->connect_schedule_retry(std::string("connection lost") + (cause != nullptr ? std::string(": ") + cause : ""));
  }

  static void disconnected(void* context, MQTTProperties* /*properties*/, MQTTReasonCodes reason) {
    auto* self = static_cast<Publisher*>(context);
    {
      std::lock_guard<std::mutex> lock(self->mutex_);
      if (!self->connected_) return;
      self->connected_ = false;
    }
    const char* text = MQTTReasonCode_toString(reason);
    self->connect_schedule_retry(std::string("the broker disconnected: ") + (text != nullptr ? text : "no reason"));
  }

  static int message_arrived(void* context, char* topic, int topic_len, MQTTAsync_message* message) {
    auto* self = static_cast<Publisher*>(context);
    const std::string name = topic_len > 0 ? std::string(topic, static_cast<size_t>(topic_len)) : std::string(topic);
    for (const PublisherSubscription& subscription : self->options_.subscriptions) {
      if (!subscription.on_message || name != subscription.topic) continue;
      const std::string payload(static_cast<const char*>(message->payload), static_cast<size_t>(message->payloadlen));
      try {
        subscription.on_message(payload, message->retained != 0);
      } catch (const std::exception& e) {
        self->options_.log(std::string("a message on ") + name + " was dropped: " + e.what());
      }
    }
    MQTTAsync_freeMessage(&message);
    MQTTAsync_free(topic);
    return 1;
  }

  static void subscribe_success(void* context, MQTTAsync_successData5* response) {
    const auto* ctx = static_cast<const Publisher::SubscribeContext*>(context);
    const PublisherSubscription& subscription = ctx->publisher->options_.subscriptions[ctx->index];
    // MQTT v5: a SUBACK may refuse the topic (reason code >= 0x80, e.g. the ACL's "not authorized").
    if (response != nullptr && response->reasonCode >= 0x80) {
      const char* text = MQTTReasonCode_toString(response->reasonCode);
      ctx->publisher->options_.log("subscribing to " + subscription.topic + " was refused: " +
                                   (text != nullptr ? text : "no reason") + "; check the device's ACL");
      return;
    }
    if (subscription.on_subscribed) subscription.on_subscribed();
  }

  static void subscribe_failure(void* context, MQTTAsync_failureData5* response) {
    const auto* ctx = static_cast<const Publisher::SubscribeContext*>(context);
    ctx->publisher->options_.log("subscribing to " + ctx->publisher->options_.subscriptions[ctx->index].topic +
                                 " failed: " + failure_text(response) + "; check the device's ACL");
  }

  static void publish_success(void* context, MQTTAsync_successData5* /*response*/) {
    std::unique_ptr<Publisher::PublishContext> ctx(static_cast<Publisher::PublishContext*>(context));
    Publisher* self = ctx->publisher;
    {
      std::lock_guard<std::mutex> lock(self->mutex_);
      self->in_flight_.erase(ctx->id);
      if (ctx->id > 0) self->acked_.insert(ctx->id);
      self->acked_count_ += 1;
      self->dirty_ = true;
    }
    self->cv_.notify_all();
  }

  static void publish_failure(void* context, MQTTAsync_failureData5* response) {
    std::unique_ptr<Publisher::PublishContext> ctx(static_cast<Publisher::PublishContext*>(context));
    Publisher* self = ctx->publisher;
    // A PUBACK with an error reason (e.g. not authorised) is the broker's final word: resending
    // cannot help, so the message leaves the spool and the refusal is logged. Anything else
    // (the connection went away) is retried.
    const bool refused = response != nullptr && response->reasonCode >= MQTTREASONCODE_UNSPECIFIED_ERROR;
    {
      std::lock_guard<std::mutex> lock(self->mutex_);
      self->in_flight_.erase(ctx->id);
      if (ctx->id > 0) {
        if (refused) {
          self->acked_.insert(ctx->id);
        } else {
          self->retry_.push_back(ctx->id);
        }
      } else {
        self->death_acked_ = true;  // the shutdown death: stop waiting for it either way
      }
      self->dirty_ = true;
    }
    self->cv_.notify_all();
    if (refused) {
      self->options_.log("the broker refused message seq " + std::to_string(ctx->seq) + " (" +
                         failure_text(response) + "); check the device's ACL");
    }
  }

  static void death_success(void* context, MQTTAsync_successData5* /*response*/) {
    auto* self = static_cast<Publisher*>(context);
    {
      std::lock_guard<std::mutex> lock(self->mutex_);
      self->death_acked_ = true;
    }
    self->cv_.notify_all();
  }

  static void death_failure(void* context, MQTTAsync_failureData5* /*response*/) { death_success(context, nullptr); }

  static void disconnect_done(void* context, MQTTAsync_successData5* /*response*/) {
    auto* self = static_cast<Publisher*>(context);
    {
      std::lock_guard<std::mutex> lock(self->mutex_);
      self->disconnected_ = true;
    }
    self->cv_.notify_all();
  }

  static void disconnect_failed(void* context, MQTTAsync_failureData5* /*response*/) { disconnect_done(context, nullptr); }
};

std::string telemetry_topic(const std::string& fleet, const std::string& device, const std::string& kind) {
  return "edgesmith/v1/" + fleet + "/" + device + "/" + kind;
}

int64_t telemetry_now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

Publisher::Publisher(PublisherOptions options) : options_(std::move(options)) {
  const MqttCredentials& c = options_.credentials;
  if (!telemetry_id_valid(c.device) || !telemetry_id_valid(c.fleet)) {
    throw Error(ERROR_CODE_INVALID_ARGUMENT, "device and fleet ids must match ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$, got '" +
                                                 c.device + "' and '" + c.fleet + "'");
  }
  credentials_check_transport(c);
  if (!options_.log) {
    options_.log = [](const std::string& line) { std::cerr << "edgesmith telemetry: " << line << std::endl; };
  }
  if (!options_.birth_body) options_.birth_body = [] { return nlohmann::json::object(); };
  for (size_t i = 0; i < options_.subscriptions.size(); ++i) subscribe_contexts_.push_back({this, i});
  if (options_.reconnect_min_s <= 0.0) options_.reconnect_min_s = 0.1;
  options_.reconnect_max_s = std::max(options_.reconnect_max_s, options_.reconnect_min_s);
  options_.max_in_flight = std::max<uint32_t>(options_.max_in_flight, 1);
  backoff_s_ = options_.reconnect_min_s;
  spool_ = std::make_unique<Spool>(options_.spool_path, options_.spool_max_bytes);
  will_topic_ = telemetry_topic(c.fleet, c.device, contract::MESSAGE_KIND_DEATH);

  const std::string uri = (c.tls ? "ssl://" : "tcp://") + c.host + ":" + std::to_string(c.port);
  MQTTAsync_createOptions create = MQTTAsync_createOptions_initializer5;
  create.sendWhileDisconnected = 0;
  MQTTAsync client = nullptr;
  // No Paho persistence: the spool is the persistence.
  const int rc = MQTTAsync_createWithOptions(&client, uri.c_str(), c.device.c_str(), MQTTCLIENT_PERSISTENCE_NONE,
                                             nullptr, &create);
  if (rc != MQTTASYNC_SUCCESS) {
    throw Error(ERROR_CODE_INVALID_ARGUMENT, "cannot create an MQTT client for " + uri + " (" + paho_error(rc) +
                                                 "); check host and port in the credentials");
  }
  client_ = client;
  MQTTAsync_setCallbacks(client, this, &PublisherCallbacks::connection_lost, &PublisherCallbacks::message_arrived,
                         nullptr);
  MQTTAsync_setDisconnected(client, this, &PublisherCallbacks::disconnected);
}

Publisher::~Publisher() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
    stopped_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
  // Destroying the client closes the socket without DISCONNECT: the broker publishes the will.
  MQTTAsync client = handle(client_);
  if (client != nullptr) MQTTAsync_destroy(&client);
}

nlohmann::json Publisher::envelope_json(const std::string& kind, uint64_t bd_seq, uint64_t seq,
                                        const nlohmann::json& body) const {
  nlohmann::json message = body.is_object() ? body : nlohmann::json::object();
  message[contract::F_ENVELOPE_V] = contract::PROTOCOL_VERSION;
  message[contract::F_KIND] = kind;
  message[contract::F_ENVELOPE_FLEET] = options_.credentials.fleet;
  message[contract::F_ENVELOPE_DEVICE] = options_.credentials.device;
  message[contract::F_ENVELOPE_EPOCH] = spool_->spool_epoch();
  message[contract::F_ENVELOPE_BDSEQ] = bd_seq;
  message[contract::F_ENVELOPE_SEQ] = seq;
  message[contract::F_ENVELOPE_TS_MS] = telemetry_now_ms();
  message[contract::F_ENVELOPE_HISTORICAL] = false;
  return message;
}

std::string Publisher::envelope(const std::string& kind, uint64_t bd_seq, uint64_t seq,
                                const nlohmann::json& body) const {
  // Error texts can carry bytes that are not UTF-8 (a file name): replaced, never a throw.
  return envelope_json(kind, bd_seq, seq, body).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

std::string Publisher::contract_problem(const std::string& kind, uint64_t bd_seq, const nlohmann::json& body) const {
  // Checked as the UTF-8 that will be sent (invalid bytes replaced), with a seq of the same form.
  const std::string text = envelope(kind, bd_seq, 1, body);
  const std::string problem = contract_message_problem(nlohmann::json::parse(text, nullptr, false));
  if (!problem.empty()) {
    options_.log("a " + kind + " message breaks the device contract (" + problem +
                 ") and was not sent: the monitor would refuse it");
  }
  return problem;
}

void Publisher::publisher_start() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (started_) return;
    started_ = true;
  }
  // The first CONNECT starts now, so what is sent from here on belongs to its session (bdSeq).
  connect_attempt();
  thread_ = std::thread([this] { pump(); });
}

SpoolAppendResult Publisher::publisher_rebirth() {
  return publisher_send(contract::MESSAGE_KIND_BIRTH, options_.birth_body());
}

SpoolAppendResult Publisher::publisher_send(const std::string& kind, const nlohmann::json& body) {
  uint64_t bd_seq;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    bd_seq = bd_seq_;
  }
  if (!contract_problem(kind, bd_seq, body).empty()) return SpoolAppendResult{};
  const std::string topic = telemetry_topic(options_.credentials.fleet, options_.credentials.device, kind);
  SpoolAppendResult result =
      spool_->spool_append(topic, bd_seq, [&](uint64_t seq) { return envelope(kind, bd_seq, seq, body); });
  {
    std::lock_guard<std::mutex> lock(mutex_);
    dirty_ = true;
  }
  cv_.notify_all();
  return result;
}

void Publisher::connect_schedule_retry(const std::string& why) {
  double delay;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    connecting_ = false;
    connected_ = false;
    delay = backoff_s_;
    backoff_s_ = std::min(backoff_s_ * 2.0, options_.reconnect_max_s);
    next_attempt_ = Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(delay));
    dirty_ = true;
  }
  cv_.notify_all();
  char when[32];
  std::snprintf(when, sizeof(when), "%.1f", delay);
  options_.log(why + "; retrying in " + when + " s");
}

void Publisher::connect_attempt() {
  const MqttCredentials& c = options_.credentials;
  uint64_t bd_seq = spool_->spool_session_begin();
  const uint64_t birth_seq = spool_->spool_birth_seq();
  {
    std::lock_guard<std::mutex> lock(mutex_);
    bd_seq_ = bd_seq;
    birth_seq_ = birth_seq;
    connecting_ = true;
  }
  nlohmann::json reason = {{contract::F_DEATH_REASON, contract::DEATH_REASON_CONNECTION_LOST}};
  will_payload_ = envelope(contract::MESSAGE_KIND_DEATH, bd_seq, birth_seq, reason);

  MQTTAsync_willOptions will = MQTTAsync_willOptions_initializer;
  will.topicName = will_topic_.c_str();
  will.message = nullptr;
  will.payload.data = will_payload_.data();
  will.payload.len = static_cast<int>(will_payload_.size());
  will.qos = 1;
  will.retained = 1;  // like the birth: a monitor that subscribes later sees the session ended

  MQTTProperties properties = MQTTProperties_initializer;
  MQTTProperty expiry;
  std::memset(&expiry, 0, sizeof(expiry));
  expiry.identifier = MQTTPROPERTY_CODE_SESSION_EXPIRY_INTERVAL;
  expiry.value.integer4 = options_.session_expiry_s;
  MQTTProperties_add(&properties, &expiry);

  MQTTAsync_SSLOptions ssl = MQTTAsync_SSLOptions_initializer;
  ssl.enableServerCertAuth = 1;
  ssl.verify = 1;
  ssl.trustStore = c.cafile.empty() ? nullptr : c.cafile.c_str();
  ssl.keyStore = c.certfile.empty() ? nullptr : c.certfile.c_str();  // mutual TLS: the CN is our login
  ssl.privateKey = c.keyfile.empty() ? nullptr : c.keyfile.c_str();

  MQTTAsync_connectOptions connect = MQTTAsync_connectOptions_initializer5;
  connect.keepAliveInterval = options_.keepalive_s;
  connect.cleanstart = 0;
  connect.maxInflight = static_cast<int>(options_.max_in_flight) + 8;
  connect.username = c.username.c_str();
  connect.password = c.password.c_str();
  connect.will = &will;
  connect.connectTimeout = CONNECT_TIMEOUT_S;
  connect.connectProperties = &properties;
  connect.onSuccess5 = &PublisherCallbacks::connect_success;
  connect.onFailure5 = &PublisherCallbacks::connect_failure;
  connect.context = this;
  connect.automaticReconnect = 0;  // bdSeq and the will change per CONNECT: reconnecting is ours
  connect.ssl = c.tls ? &ssl : nullptr;
  const int rc = MQTTAsync_connect(handle(client_), &connect);
  MQTTProperties_free(&properties);
  if (rc != MQTTASYNC_SUCCESS) connect_schedule_retry("connecting failed: " + paho_error(rc));
}

namespace {

bool topic_is_birth(const std::string& topic) {
  static const std::string suffix = "/birth";
  return topic.size() >= suffix.size() && topic.compare(topic.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

bool Publisher::publish_one(const SpoolMessage& message, uint64_t session) {
  std::string payload = message.payload;
  if (message.bd_seq != session) {
    nlohmann::json parsed = nlohmann::json::parse(payload, nullptr, false);
    if (parsed.is_object()) {
      parsed[contract::F_ENVELOPE_HISTORICAL] = true;
      payload = parsed.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    }
  }
  MQTTAsync_message msg = MQTTAsync_message_initializer;
  msg.payload = payload.data();
  msg.payloadlen = static_cast<int>(payload.size());
  msg.qos = 1;
  // The current session's birth is retained, so a monitor that subscribes later still learns what
  // the device runs (a replayed birth of an older session must not replace it).
  msg.retained = message.bd_seq == session && topic_is_birth(message.topic) ? 1 : 0;
  auto* context = new PublishContext{this, message.id, message.seq};
  MQTTAsync_responseOptions response = MQTTAsync_responseOptions_initializer;
  response.onSuccess5 = &PublisherCallbacks::publish_success;
  response.onFailure5 = &PublisherCallbacks::publish_failure;
  response.context = context;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    in_flight_[message.id] = Clock::now();
  }
  const int rc = MQTTAsync_sendMessage(handle(client_), message.topic.c_str(), &msg, &response);
  if (rc != MQTTASYNC_SUCCESS) {
    delete context;
    std::lock_guard<std::mutex> lock(mutex_);
    in_flight_.erase(message.id);
    retry_.push_back(message.id);
    return false;
  }
  return true;
}

void Publisher::acked_remove() {
  std::vector<int64_t> ids;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    ids.assign(acked_.begin(), acked_.end());
  }
  if (ids.empty()) return;
  spool_->spool_remove(ids);
  std::lock_guard<std::mutex> lock(mutex_);
  for (const int64_t id : ids) acked_.erase(id);
}

void Publisher::pump() {
  while (true) {
    bool connect_now = false;
    bool send_birth = false;
    bool subscribe = false;
    bool connected = false;
    uint64_t session = 0;
    size_t room = 0;
    std::vector<int64_t> retry;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      cv_.wait_for(lock, PUMP_IDLE, [&] { return dirty_ || stopped_; });
      dirty_ = false;
      if (stopped_) return;
      if (!connected_ && !connecting_ && !stopping_ && Clock::now() >= next_attempt_) connect_now = true;
      connected = connected_;
      session = bd_seq_;
      send_birth = connected_ && need_birth_;
      if (send_birth) need_birth_ = false;
      subscribe = connected_ && need_subscribe_;
      if (subscribe) need_subscribe_ = false;
      if (connected_) {
        const auto now = Clock::now();
        for (auto it = in_flight_.begin(); it != in_flight_.end();) {
          if (now - it->second > IN_FLIGHT_TIMEOUT) {
            retry_.push_back(it->first);
            it = in_flight_.erase(it);
          } else {
            ++it;
          }
        }
        retry.swap(retry_);
        room = options_.max_in_flight > in_flight_.size() ? options_.max_in_flight - in_flight_.size() : 0;
      }
    }
    try {
      acked_remove();
      if (connect_now) {
        connect_attempt();
        continue;
      }
      if (!connected) continue;
      if (send_birth) {
        uint64_t birth_seq;
        {
          std::lock_guard<std::mutex> lock(mutex_);
          birth_seq = birth_seq_;
        }
        const nlohmann::json body = options_.birth_body();
        const std::string topic =
            telemetry_topic(options_.credentials.fleet, options_.credentials.device, contract::MESSAGE_KIND_BIRTH);
        std::string payload;
        const bool keeps_contract = contract_problem(contract::MESSAGE_KIND_BIRTH, session, body).empty();
        const SpoolAppendResult stored =
            keeps_contract ? spool_->spool_append(topic, session,
                                                  [&](uint64_t seq) {
                                                    return payload =
                                                               envelope(contract::MESSAGE_KIND_BIRTH, session, seq, body);
                                                  },
                                                  birth_seq)
                           : SpoolAppendResult{};
        if (stored.id != 0) {
          SpoolMessage birth{stored.id, topic, payload, session, stored.seq};
          publish_one(birth, session);
          room = room > 0 ? room - 1 : 0;
        }
      }
      if (subscribe) {
        for (SubscribeContext& ctx : subscribe_contexts_) {
          const std::string& topic = options_.subscriptions[ctx.index].topic;
          MQTTAsync_responseOptions response = MQTTAsync_responseOptions_initializer;
          response.onSuccess5 = &PublisherCallbacks::subscribe_success;
          response.onFailure5 = &PublisherCallbacks::subscribe_failure;
          response.context = &ctx;
          const int rc = MQTTAsync_subscribe(handle(client_), topic.c_str(), 1, &response);
          if (rc != MQTTASYNC_SUCCESS) options_.log("subscribing to " + topic + " failed: " + paho_error(rc));
        }
      }
      // Paho gave up on these (the connection dropped under them): first in line again.
      std::sort(retry.begin(), retry.end());
      for (const int64_t id : retry) {
        const std::vector<SpoolMessage> one = spool_->spool_read(id - 1, 1);
        if (!one.empty() && one[0].id == id && room > 0) {
          if (!publish_one(one[0], session)) break;
          room -= 1;
        } else if (!one.empty() && one[0].id == id) {
          std::lock_guard<std::mutex> lock(mutex_);
          retry_.push_back(id);
        }
      }
      int64_t cursor;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        cursor = cursor_;
      }
      while (room > 0) {
        const std::vector<SpoolMessage> batch = spool_->spool_read(cursor, room);
        if (batch.empty()) break;
        bool failed = false;
        for (const SpoolMessage& message : batch) {
          bool skip;
          {
            std::lock_guard<std::mutex> lock(mutex_);
            skip = in_flight_.count(message.id) > 0 || acked_.count(message.id) > 0;
          }
          cursor = message.id;
          if (skip) continue;
          if (!publish_one(message, session)) {
            failed = true;
            break;
          }
          room -= 1;
        }
        if (failed) break;
      }
      {
        std::lock_guard<std::mutex> lock(mutex_);
        cursor_ = std::max(cursor_, cursor);
      }
    } catch (const std::exception& e) {
      // The spool failed (disk full, permissions): say so and keep trying rather than die.
      options_.log(std::string("spool error: ") + e.what());
      std::this_thread::sleep_for(std::chrono::seconds(1));
    }
  }
}

bool Publisher::publisher_flush(double timeout_s) {
  const auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(timeout_s));
  while (true) {
    {
      std::unique_lock<std::mutex> lock(mutex_);
      if (in_flight_.empty() && retry_.empty() && spool_->spool_state().queued == acked_.size()) return true;
      if (Clock::now() >= deadline) return false;
      cv_.wait_for(lock, std::chrono::milliseconds(20));
    }
  }
}

void Publisher::publisher_stop(double timeout_s) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (stopped_ || stopping_) return;
    stopping_ = true;  // no new connection attempts from here on
  }
  if (started_) publisher_flush(timeout_s);
  bool connected;
  uint64_t bd_seq;
  uint64_t birth_seq;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopped_ = true;
    connected = connected_;
    bd_seq = bd_seq_;
    birth_seq = birth_seq_;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
  acked_remove();
  // Paho's client must not be destroyed (~Publisher) with one of our operations under way: a
  // callback still to come would run into a freed client and a freed Publisher (Paho destroys only
  // a completely disconnected client). A CONNECT in progress ends first, either way, within its
  // own timeout; if it succeeded, the session is ended below like any other.
  {
    std::unique_lock<std::mutex> lock(mutex_);
    cv_.wait_for(lock, std::chrono::seconds(CONNECT_TIMEOUT_S + 5), [&] { return !connecting_; });
    connected = connected_;
  }
  if (!connected) return;  // the broker has already sent the will, or there was no session
  const auto wait = [&](bool Publisher::*flag, double seconds) {
    std::unique_lock<std::mutex> lock(mutex_);
    cv_.wait_for(lock, std::chrono::duration<double>(seconds), [&] { return this->*flag; });
  };
  // The shutdown death repeats the session's birth seq (docs/telemetry.md); it is not spooled: a
  // death from a session that is over means nothing after a restart.
  const std::string death =
      envelope(contract::MESSAGE_KIND_DEATH, bd_seq, birth_seq, {{contract::F_DEATH_REASON, contract::DEATH_REASON_SHUTDOWN}});
  MQTTAsync_message msg = MQTTAsync_message_initializer;
  msg.payload = const_cast<char*>(death.data());
  msg.payloadlen = static_cast<int>(death.size());
  msg.qos = 1;
  msg.retained = 1;
  MQTTAsync_responseOptions response = MQTTAsync_responseOptions_initializer;
  response.onSuccess5 = &PublisherCallbacks::death_success;
  response.onFailure5 = &PublisherCallbacks::death_failure;
  response.context = this;
  if (MQTTAsync_sendMessage(handle(client_), will_topic_.c_str(), &msg, &response) == MQTTASYNC_SUCCESS) {
    wait(&Publisher::death_acked_, 2.0);
  }
  MQTTAsync_disconnectOptions disconnect = MQTTAsync_disconnectOptions_initializer5;
  disconnect.timeout = 1000;
  disconnect.reasonCode = MQTTREASONCODE_NORMAL_DISCONNECTION;  // the broker discards the will
  disconnect.onSuccess5 = &PublisherCallbacks::disconnect_done;
  disconnect.onFailure5 = &PublisherCallbacks::disconnect_failed;
  disconnect.context = this;
  if (MQTTAsync_disconnect(handle(client_), &disconnect) == MQTTASYNC_SUCCESS) {
    // Paho answers a DISCONNECT with onSuccess or onFailure within its timeout; on a loaded device
    // that answer can come late, and destroying the client before it would free what it touches.
    wait(&Publisher::disconnected_, DISCONNECT_WAIT_S);
  }
  std::lock_guard<std::mutex> lock(mutex_);
  connected_ = false;
}

PublisherStatus Publisher::publisher_status() {
  PublisherStatus status;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    status.connected = connected_;
    status.bd_seq = bd_seq_;
    status.connects = connects_;
    status.acked = acked_count_;
    status.in_flight = in_flight_.size();
  }
  status.spool = spool_->spool_state();
  return status;
}

}  // namespace edgesmith
