// The agent's capture runner (docs/capture.md, "On the device"): takes the signed capture states
// that arrive on the device's `capture-desired` topic, samples the requests the agent serves by the
// state's policy into a bounded, crash-safe on-disk store (<data_dir>/capture/), and uploads the
// stored records to the central receiver when told to. Off by default: nothing is captured until a
// `start` state is taken. The serving paths only offer samples (capture_offer), which never waits
// for the runner's thread: a full queue drops the sample and counts it.
#pragma once

#include <atomic>
#include <cstdint>
#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

namespace httplib {
class Client;
}

#include "agent/capture_record.h"
#include "deploy/capture_state.h"
#include "runtime/session.h"
#include "runtime/tensor.h"

namespace edgesmith {

/// Carries the runner's `capture.*` events (the agent's: the telemetry spool). May throw.
class CaptureReporter {
 public:
  virtual ~CaptureReporter() = default;
  /// A `capture.*` event; `details` holds contract CaptureReport fields.
  virtual void capture_report_event(const std::string& event, const std::string& message,
                                    const nlohmann::json& details) = 0;
};

/// What the capture runner needs.
struct CaptureRunnerOptions {
  std::string data_dir;  ///< <data_dir>/capture holds state.json, floor.json and samples/
  std::string fleet;     ///< this device's ids (a capture state must name them)
  std::string device;
  std::vector<std::vector<uint8_t>> deploy_keys;  ///< capture-state signatures
  uint64_t max_bytes = 256ull << 20;  ///< the store's budget over every capture (--capture-max-bytes)
  size_t queue = 16;                  ///< samples waiting for the writer; more are dropped and counted
  double backoff_min_s = 1.0;         ///< an upload that got no answer or a 5xx/408 waits this, doubling
  double backoff_max_s = 30.0;
  double io_timeout_s = 10.0;         ///< connect and read time-outs of one upload
  double upload_timeout_s = 60.0;     ///< one upload request, answer included, ends after this at most
  double drop_event_period_s = 2.0;   ///< dropped samples are reported at most this often, summed
  std::string tls_cafile;             ///< https: the receiver is verified with it (the broker's CA)
  std::string tls_certfile;
  std::string tls_keyfile;
  /// Unix milliseconds (ts_ms, not_after, retention); the system clock when unset.
  std::function<int64_t()> clock_ms;
  std::function<void(const std::string&)> log;
};

/// The capture runner. capture_start() once, capture_stop() at the end.
class CaptureRunner {
 public:
  explicit CaptureRunner(CaptureRunnerOptions options);
  ~CaptureRunner();
  CaptureRunner(const CaptureRunner&) = delete;
  CaptureRunner& operator=(const CaptureRunner&) = delete;

  /// Start the thread. Leftover temporary files are removed, stored samples and tokens kept, a
  /// capture recorded in state.json resumes sampling and an upload in progress resumes.
  void capture_start(CaptureReporter* reporter);

  /// A message on the capture-desired topic (Paho's thread: only queued).
  void capture_desired(const std::string& payload);

  /// The serving paths' hook, called after the answer is computed: when a capture is on and its
  /// policy takes this request, the inputs and outputs are copied into the bounded queue (full:
  /// dropped and counted). Never waits for the runner's thread; without a capture it only reads a
  /// flag. Returns whether the policy took the request (queued or dropped for a full queue).
  bool capture_offer(const Session& serving, const std::vector<Tensor>& inputs, const std::vector<Tensor>& outputs,
                     double serving_us);

  /// The shadow's hook (ShadowRunnerOptions::on_disagreement): a request capture_offer did not take
  /// on which a running shadow's top-1 differs from serving's; taken with reason `disagreement`
  /// when the capture's policy says so.
  void capture_disagreement(const Session& serving, const std::vector<Tensor>& inputs,
                            const std::vector<Tensor>& outputs);

  /// For GET /v1/stats: active, capture_id, offered, taken, queue_dropped, stored_samples, stored_bytes, uploading.
  nlohmann::json capture_status();

  /// Stop the thread; state, tokens and stored samples stay on disk.
  void capture_stop();

 private:
  struct Sample {
    std::string capture_id;
    std::string reason;
    int64_t ts_ms = 0;
    std::shared_ptr<const std::string> manifest_json;
    std::string manifest_name;
    std::vector<std::string> input_names;
    std::vector<std::string> output_names;
    std::vector<Tensor> inputs;
    std::vector<Tensor> outputs;
  };
  struct Live {
    std::string capture_id;
    CapturePolicy policy;
    size_t queue_max = 0;
    std::deque<Sample> queue;
  };
  struct Stored {
    std::string capture_id;
    std::string sha256;
    uint64_t bytes = 0;
    int64_t stored_ms = 0;
  };
  struct Capture {  // what the device keeps of each capture it was given (state.json)
    std::string token;
    std::string url;
    uint64_t retention_s = 7 * 24 * 3600;
    bool uploading = false;
    int64_t upload_before_ms = 0;  // the round uploads what was stored up to the `upload` state
  };

  void enqueue(const std::shared_ptr<Live>& live, const Session& serving, const char* reason,
               const std::vector<Tensor>& inputs, const std::vector<Tensor>& outputs);
  void loop();
  void handle(const std::string& payload);
  void live_set();
  void captures_prune();
  void active_end(const std::string& stop, const std::string& error = "");
  void store_failed(const std::string& capture_id, uint64_t bytes, const std::string& why);
  void sample_store(Sample& sample);
  bool record_write(const std::string& capture_id, const std::string& sha, const std::string& record);
  bool evictable(const Stored& s) const;
  bool evict_oldest(const std::string& capture_id, const std::string& reason, uint64_t* freed);
  void drop(const std::string& capture_id, const std::string& reason, uint64_t samples, uint64_t bytes);
  void drops_flush(bool force);
  void retention_check();
  void upload_step();
  void upload_round_end(const std::string& capture_id, const std::string& error);
  void index_load();
  void state_load();
  void state_save();
  void state_change(const std::function<void()>& change);
  std::string sample_path(const std::string& capture_id, const std::string& sha) const;
  nlohmann::json report_details(const std::string& capture_id) const;
  void report(const std::string& event, const std::string& message, const nlohmann::json& details);
  void stored_publish();
  int64_t now_ms() const;
  void log(const std::string& line) const;

  CaptureRunnerOptions options_;
  std::string dir_;
  CaptureReporter* reporter_ = nullptr;

  // The runner thread's own state.
  std::optional<CaptureState> active_state_;  // the capture now sampling (its start state)
  std::string active_envelope_;
  std::string applied_sha256_;  // the signed text of the last capture state acted on (state.json)
  std::map<std::string, Capture> captures_;
  std::deque<Stored> stored_;  // oldest first
  uint64_t stored_bytes_ = 0;
  std::map<std::pair<std::string, std::string>, std::pair<uint64_t, uint64_t>> drops_;  // (capture, reason) -> samples, bytes
  int64_t drops_flushed_ms_ = 0;
  uint64_t store_failures_ = 0;  // samples not stored since the last log line about them
  int64_t store_failed_logged_ms_ = 0;
  int64_t housekeeping_ms_ = 0;
  int64_t upload_next_ms_ = 0;
  double backoff_s_ = 0;
  std::map<std::string, std::pair<uint64_t, uint64_t>> round_;  // capture -> samples, bytes acknowledged
  std::map<std::string, uint64_t> round_refused_;
  struct ManifestMeta {  // what a record says of the serving model, by its manifest's SHA-256
    std::string model;
    std::string model_version;
    std::optional<Manifest> manifest;  // outputs and monitoring: top1 and confidence
  };
  std::map<std::string, ManifestMeta> manifest_meta_;

  std::mutex offer_mutex_;
  std::shared_ptr<Live> live_;
  std::atomic<bool> active_{false};
  std::atomic<uint64_t> rng_state_{0x2545f4914f6cdd1dull};
  std::atomic<uint64_t> offered_{0};
  std::atomic<uint64_t> taken_{0};
  std::atomic<uint64_t> queue_dropped_{0};
  std::atomic<uint64_t> stored_samples_count_{0};
  std::atomic<uint64_t> stored_bytes_count_{0};
  std::atomic<bool> uploading_{false};

  std::atomic<bool> halt_{false};  // capture_stop(): an upload under way ends
  std::mutex client_mutex_;
  httplib::Client* client_ = nullptr;  // the upload under way (capture_stop shuts its socket)

  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<std::string> inbox_;
  bool stopping_ = false;
  std::thread thread_;
};

}  // namespace edgesmith
