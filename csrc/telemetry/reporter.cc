#include "telemetry/reporter.h"

#include <filesystem>
#include <system_error>
#include <utility>

#include "common/contract_words.h"
#include "common/digest.h"
#include "common/error.h"
#include "common/version.h"
#include "runtime/cpu_features.h"
#include "runtime/isa.h"

namespace edgesmith {

namespace {

std::string json_string(const nlohmann::json& doc, const char* a, const char* b) {
  const auto outer = doc.find(a);
  if (outer == doc.end() || !outer->is_object()) return "";
  const auto inner = outer->find(b);
  return inner != outer->end() && inner->is_string() ? inner->get<std::string>() : "";
}

}  // namespace

nlohmann::json birth_body(const Session& session, double interval_s) {
  const Manifest& manifest = session.session_manifest();
  // The signed manifest has more than the core's reader keeps (model, backend version, the
  // monitoring references): read those from its raw JSON.
  const nlohmann::json raw = nlohmann::json::parse(session.session_manifest_json(), nullptr, false);
  const nlohmann::json doc = raw.is_object() ? raw : nlohmann::json::object();
  nlohmann::json outputs = nlohmann::json::array();
  const nlohmann::json* raw_monitors = nullptr;
  if (doc.contains("monitoring") && doc["monitoring"].is_object() && doc["monitoring"].contains("outputs") &&
      doc["monitoring"]["outputs"].is_array()) {
    raw_monitors = &doc["monitoring"]["outputs"];
  }
  for (const ManifestOutputMonitor& monitor : manifest.monitoring.outputs) {
    nlohmann::json item = {{contract::F_OUTPUT_LAYOUT_NAME, monitor.name}};
    if (monitor.kind == MONITOR_KIND_CLASSES) {
      item[contract::F_OUTPUT_LAYOUT_KIND] = contract::OUTPUT_KIND_CLASSES;
      item[contract::F_OUTPUT_LAYOUT_CLASSES] = monitor.classes;
      item[contract::F_OUTPUT_LAYOUT_EDGES] = nullptr;
    } else {
      item[contract::F_OUTPUT_LAYOUT_KIND] = contract::OUTPUT_KIND_HISTOGRAM;
      item[contract::F_OUTPUT_LAYOUT_CLASSES] = nullptr;
      item[contract::F_OUTPUT_LAYOUT_EDGES] = monitor.edges;
    }
    item[contract::F_OUTPUT_LAYOUT_REFERENCE] = nullptr;
    if (raw_monitors != nullptr) {
      for (const nlohmann::json& entry : *raw_monitors) {
        if (entry.is_object() && entry.value("name", "") == monitor.name && entry.contains("reference") &&
            entry["reference"].is_array()) {
          item[contract::F_OUTPUT_LAYOUT_REFERENCE] = entry["reference"];
        }
      }
    }
    outputs.push_back(item);
  }
  std::string model = json_string(doc, "model", "name");
  std::string model_version = json_string(doc, "model", "version");
  const ManifestLatencyBuckets& latency = manifest.monitoring.latency;
  // The latency alert's baseline: the build's p50 for sporadic requests (what this agent measures
  // when it serves), else its back-to-back p50 (manifests before serving_latency_us).
  nlohmann::json build_latency = nullptr;
  if (doc.contains("build") && doc["build"].is_object()) {
    for (const char* key : {"serving_latency_us", "latency_us"}) {
      const nlohmann::json& build = doc["build"];
      if (build.contains(key) && build[key].is_number() && build[key].get<double>() > 0.0) {
        build_latency = build[key];
        break;
      }
    }
  }
  namespace c = contract;
  return {
      {c::F_BIRTH_TARGET, manifest.target_name},
      {c::F_BIRTH_RUNTIME,
       {{c::F_RUNTIME_VERSION, version_string()}, {c::F_RUNTIME_ISA, host_isa()}, {c::F_RUNTIME_CPU, cpu_model()}}},
      {c::F_BIRTH_ARTIFACT,
       {{c::F_ARTIFACT_REF_NAME, manifest.name},
        {c::F_ARTIFACT_REF_MODEL, model.empty() ? manifest.name : model},
        {c::F_ARTIFACT_REF_MODEL_VERSION, model_version.empty() ? "unknown" : model_version},
        {c::F_ARTIFACT_REF_TARGET, manifest.target_name},
        {c::F_ARTIFACT_REF_BACKEND, manifest.backend_name},
        {c::F_ARTIFACT_REF_BACKEND_VERSION, json_string(doc, "backend", "version")},
        {c::F_ARTIFACT_REF_MANIFEST_SHA256, sha256_string(session.session_manifest_json())}}},
      {c::F_BIRTH_METRICS,
       {{c::F_METRIC_SCHEMA_INTERVAL_S, interval_s},
        {c::F_METRIC_SCHEMA_LATENCY,
         {{c::F_LATENCY_LAYOUT_START_US, latency.start_us},
          {c::F_LATENCY_LAYOUT_FACTOR, latency.factor},
          {c::F_LATENCY_LAYOUT_COUNT, latency.count}}},
        {c::F_METRIC_SCHEMA_OUTPUTS, outputs},
        // What the build measured (manifest build.serving_latency_us or latency_us), when recorded.
        {c::F_METRIC_SCHEMA_BUILD_LATENCY_US, build_latency}}},
  };
}

SessionReporter::SessionReporter(const Session& session, ReporterOptions options)
    : SessionReporter(std::shared_ptr<const Session>(&session, [](const Session*) {}), std::move(options)) {}

SessionReporter::SessionReporter(std::shared_ptr<const Session> session, ReporterOptions options)
    : session_(std::move(session)), options_(std::move(options)) {
  if (!(options_.interval_s > 0.0)) {
    throw Error(ERROR_CODE_INVALID_ARGUMENT, "the telemetry interval must be a positive number of seconds");
  }
  credentials_ = credentials_read(options_.credentials_path);
  if (!options_.expect_device.empty() && options_.expect_device != credentials_.device) {
    throw Error(ERROR_CODE_INVALID_ARGUMENT, "the credentials " + options_.credentials_path + " are device " +
                                                 credentials_.device + "'s, not " + options_.expect_device +
                                                 "'s; pass that device's credentials file");
  }
  if (!options_.expect_fleet.empty() && options_.expect_fleet != credentials_.fleet) {
    throw Error(ERROR_CODE_INVALID_ARGUMENT, "the credentials " + options_.credentials_path + " are for fleet " +
                                                 credentials_.fleet + ", not " + options_.expect_fleet +
                                                 "; pass that fleet's credentials file");
  }
  std::error_code ec;
  std::filesystem::create_directories(options_.data_dir, ec);
  if (ec) {
    throw Error(ERROR_CODE_IO, "cannot create the data directory " + options_.data_dir + " (" + ec.message() + ")");
  }
  artifact_sha256_ = sha256_string(session_->session_manifest_json());
  PublisherOptions publisher;
  publisher.credentials = credentials_;
  publisher.spool_path = (std::filesystem::path(options_.data_dir) / "spool.db").string();
  publisher.spool_max_bytes = options_.spool_max_bytes;
  const double interval_s = options_.interval_s;
  publisher.birth_body = [this, interval_s] { return birth_body(*session_current(), interval_s); };
  if (options_.on_desired) {
    publisher.subscriptions.push_back(
        {telemetry_topic(credentials_.fleet, credentials_.device, "desired"), options_.on_desired, options_.on_subscribed});
  }
  if (options_.on_shadow) {
    publisher.subscriptions.push_back({telemetry_topic(credentials_.fleet, credentials_.device, contract::SHADOW_TOPIC),
                                       options_.on_shadow, options_.on_shadow_subscribed});
  }
  if (options_.on_capture) {
    publisher.subscriptions.push_back(
        {telemetry_topic(credentials_.fleet, credentials_.device, contract::CAPTURE_TOPIC), options_.on_capture, {}});
  }
  publisher_ = std::make_unique<Publisher>(std::move(publisher));
}

SessionReporter::~SessionReporter() {
  {
    std::lock_guard<std::mutex> lock(stop_mutex_);
    stopping_ = true;
  }
  stop_cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void SessionReporter::reporter_start() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (started_) return;
    started_ = true;
    window_ = std::make_unique<WindowSummariser>(session_current()->session_stats(), process_sample(), telemetry_now_ms());
  }
  publisher_->publisher_start();
  reporter_event(contract::EVENT_KIND_STARTED, "telemetry started",
                 {{"artifact", session_current()->session_manifest().name}, {"interval_s", options_.interval_s}});
  thread_ = std::thread([this] { loop(); });
}

void SessionReporter::reporter_event(const std::string& name, const std::string& message,
                                     const nlohmann::json& details) {
  // The protocol's event names (^[a-z][a-z0-9_.-]{0,63}$): a monitor drops anything else.
  bool valid = !name.empty() && name.size() <= 64 && name[0] >= 'a' && name[0] <= 'z';
  for (const char c : name) {
    valid = valid && ((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '.' || c == '-');
  }
  if (!valid) {
    throw Error(ERROR_CODE_INVALID_ARGUMENT, "event name '" + name + "' is not allowed; use 1-64 lower-case "
                                             "letters, digits, '_', '.' or '-', starting with a letter");
  }
  std::lock_guard<std::mutex> lock(mutex_);
  publisher_->publisher_send(contract::MESSAGE_KIND_EVENT,
                             {{contract::F_EVENT_EVENT, name}, {contract::F_EVENT_MESSAGE, message},
                              {contract::F_EVENT_DETAILS, details.is_object() ? details : nlohmann::json::object()}});
}

std::shared_ptr<const Session> SessionReporter::session_current() {
  std::lock_guard<std::mutex> lock(session_mutex_);
  return session_;
}

void SessionReporter::reporter_session_switch(std::shared_ptr<const Session> next) {
  reporter_window();  // the old session's last window
  {
    std::lock_guard<std::mutex> lock(mutex_);
    {
      std::lock_guard<std::mutex> session_lock(session_mutex_);
      session_ = next;
    }
    artifact_sha256_ = sha256_string(next->session_manifest_json());
    if (window_) window_ = std::make_unique<WindowSummariser>(next->session_stats(), process_sample(), telemetry_now_ms());
    publisher_->publisher_rebirth();
  }
}

void SessionReporter::reporter_state(const nlohmann::json& body) {
  std::lock_guard<std::mutex> lock(mutex_);
  publisher_->publisher_send(contract::MESSAGE_KIND_STATE, body);
}

void SessionReporter::reporter_shadow(const nlohmann::json& body) {
  std::lock_guard<std::mutex> lock(mutex_);
  publisher_->publisher_send(contract::MESSAGE_KIND_SHADOW, body);
}

void SessionReporter::reporter_window() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!window_) return;
  const std::shared_ptr<const Session> session = session_current();
  nlohmann::json body = window_->window_close(session->session_stats(), process_sample(), telemetry_now_ms());
  body[contract::F_TELEMETRY_ARTIFACT_SHA256] = artifact_sha256_;
  const std::optional<double> temperature = temperature_read(options_.thermal_root);
  body[contract::F_TELEMETRY_TEMPERATURE_C] = temperature ? nlohmann::json(*temperature) : nlohmann::json(nullptr);
  Spool& spool = publisher_->publisher_spool();
  const SpoolState state = spool.spool_state();
  // queued counts what is waiting before this message; dropped_total includes drops up to now.
  body[contract::F_TELEMETRY_SPOOL] = {{contract::F_SPOOL_STATE_QUEUED, state.queued},
                                       {contract::F_SPOOL_STATE_DROPPED_TOTAL, state.dropped_total}};
  publisher_->publisher_send(contract::MESSAGE_KIND_TELEMETRY, body);
  const uint64_t unreported = spool.spool_dropped_unreported();
  if (unreported > 0) {
    const SpoolState after = spool.spool_state();
    publisher_->publisher_send(
        contract::MESSAGE_KIND_EVENT,
        {{contract::F_EVENT_EVENT, contract::EVENT_KIND_SPOOL_DROPPED},
                  {contract::F_EVENT_MESSAGE, "the spool's disk budget was exhausted: " + std::to_string(unreported) +
                                  " oldest messages dropped"},
                  {contract::F_EVENT_DETAILS, {{"dropped", unreported}, {"dropped_total", after.dropped_total},
                               {"max_bytes", options_.spool_max_bytes}}}});
    spool.spool_dropped_mark_reported(unreported);
  }
}

void SessionReporter::loop() {
  const auto interval = std::chrono::duration_cast<std::chrono::steady_clock::duration>(
      std::chrono::duration<double>(options_.interval_s));
  auto next = std::chrono::steady_clock::now() + interval;
  while (true) {
    {
      std::unique_lock<std::mutex> lock(stop_mutex_);
      if (stop_cv_.wait_until(lock, next, [&] { return stopping_; })) return;
    }
    try {
      reporter_window();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "edgesmith telemetry: a window was not stored: %s\n", e.what());
    }
    next += interval;
    // Fell behind (a stalled disk, a suspended process): skip the missed ticks, don't burst.
    const auto now = std::chrono::steady_clock::now();
    if (next < now) next = now + interval;
  }
}

void SessionReporter::reporter_stop(double timeout_s) {
  {
    std::lock_guard<std::mutex> lock(stop_mutex_);
    if (stopping_) return;
    stopping_ = true;
  }
  stop_cv_.notify_all();
  if (thread_.joinable()) thread_.join();
  if (started_) {
    try {
      reporter_window();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "edgesmith telemetry: the last window was not stored: %s\n", e.what());
    }
  }
  publisher_->publisher_stop(timeout_s);
}

nlohmann::json SessionReporter::reporter_status() {
  const PublisherStatus s = publisher_->publisher_status();
  return {{"device", credentials_.device},
          {"fleet", credentials_.fleet},
          {"connected", s.connected},
          {"bdSeq", s.bd_seq},
          {"seq", s.spool.seq},
          {"connects", s.connects},
          {"acked", s.acked},
          {"in_flight", s.in_flight},
          {"queued", s.spool.queued},
          {"queued_bytes", s.spool.queued_bytes},
          {"dropped_total", s.spool.dropped_total}};
}

}  // namespace edgesmith
