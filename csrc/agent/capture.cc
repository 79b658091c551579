#include "agent/capture.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <httplib.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <system_error>

#include "common/contract_words.h"
#include "common/digest.h"
#include "common/error.h"
#include "deploy/download.h"
#include "deploy/envelope.h"
#include "deploy/slots.h"
#include "telemetry/publisher.h"
#include "common/url.h"

namespace fs = std::filesystem;

namespace edgesmith {

namespace c = contract;

namespace {

constexpr const char* STATE_FILE = "state.json";
constexpr const char* FLOOR_FILE = "floor.json";
constexpr const char* SAMPLES_DIR = "samples";
constexpr const char* TMP_PREFIX = ".tmp-";
constexpr uint64_t STATE_MAX_BYTES = 1 << 20;
constexpr int64_t HOUSEKEEPING_MS = 1000;  // retention and expiry are checked this often
// The runner's thread looks at the queue this often while a capture samples: the serving paths
// never wake it (that would cost them a system call).
constexpr std::chrono::milliseconds POLL_LIVE{20};
constexpr std::chrono::milliseconds POLL_IDLE{250};
constexpr size_t MAX_LABEL = 256;  // contract MAX_LABEL (model, model_version)
constexpr int64_t MAX_CLASSES = 4096;  // contract MAX_CLASSES (top1)
constexpr uint64_t ANSWER_MAX_BYTES = 64 * 1024;  // a receiver's answer to an upload is read into at most this


std::string text_read(const std::string& path) {
  std::ifstream in(path);
  if (!in) return "";
  std::stringstream text;
  text << in.rdbuf();
  return text.str().substr(0, STATE_MAX_BYTES);
}

std::string file_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return "";
  std::stringstream bytes;
  bytes << in.rdbuf();
  return bytes.str();
}

std::string json_string(const nlohmann::json& doc, const char* object, const char* key) {
  if (!doc.is_object() || !doc.contains(object) || !doc[object].is_object()) return "";
  const nlohmann::json& o = doc[object];
  return o.contains(key) && o[key].is_string() ? o[key].get<std::string>() : "";
}

// xorshift64 on a shared state: a lost update only repeats a draw, which sampling tolerates.
double draw(std::atomic<uint64_t>& state) {
  uint64_t x = state.load(std::memory_order_relaxed);
  x ^= x << 13;
  x ^= x >> 7;
  x ^= x << 17;
  state.store(x, std::memory_order_relaxed);
  return static_cast<double>(x >> 11) * 0x1.0p-53;
}

std::vector<Tensor> tensors_copy(const std::vector<Tensor>& from) {
  std::vector<Tensor> to;
  to.reserve(from.size());
  for (const Tensor& t : from) {
    Tensor copied(t.dtype(), t.shape());
    if (t.byte_size() > 0) {
      std::copy_n(static_cast<const uint8_t*>(t.data()), t.byte_size(), static_cast<uint8_t*>(copied.data()));
    }
    to.push_back(std::move(copied));
  }
  return to;
}

}  // namespace

CaptureRunner::CaptureRunner(CaptureRunnerOptions options)
    : options_(std::move(options)), dir_((fs::path(options_.data_dir) / "capture").string()) {
  if (!options_.clock_ms) options_.clock_ms = [] { return telemetry_now_ms(); };
  std::error_code ec;
  fs::create_directories(fs::path(dir_) / SAMPLES_DIR, ec);
  if (ec) throw Error(ERROR_CODE_IO, "cannot create the capture store " + dir_ + " (" + ec.message() + ")");
  fs::permissions(dir_, fs::perms::owner_all, fs::perm_options::replace, ec);
}

CaptureRunner::~CaptureRunner() { capture_stop(); }

void CaptureRunner::log(const std::string& line) const {
  if (options_.log) options_.log("capture: " + line);
}

int64_t CaptureRunner::now_ms() const { return options_.clock_ms(); }

std::string CaptureRunner::sample_path(const std::string& capture_id, const std::string& sha) const {
  return (fs::path(dir_) / SAMPLES_DIR / capture_id / sha).string();
}

void CaptureRunner::capture_start(CaptureReporter* reporter) {
  reporter_ = reporter;
  try {
    state_load();
  } catch (const nlohmann::json::exception& e) {  // a field of another type than written: start without it
    log(std::string("state.json is not as this agent writes it (") + e.what() + "); starting without a capture (stored samples stay)");
    captures_.clear();
    active_state_.reset();
    active_envelope_.clear();
    uploading_ = false;
  }
  index_load();
  thread_ = std::thread([this] { loop(); });
}

void CaptureRunner::capture_desired(const std::string& payload) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (inbox_.size() >= 16) inbox_.pop_front();  // only the newest matter
    inbox_.push_back(payload);
  }
  cv_.notify_all();
}

void CaptureRunner::capture_stop() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  halt_ = true;
  {
    std::lock_guard<std::mutex> lock(client_mutex_);  // an upload under way ends now (its socket is shut)
    if (client_ != nullptr) client_->stop();
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
  std::lock_guard<std::mutex> lock(offer_mutex_);
  live_.reset();
  active_ = false;
}

bool CaptureRunner::capture_offer(const Session& serving, const std::vector<Tensor>& inputs,
                                  const std::vector<Tensor>& outputs, double /*serving_us*/) {
  if (!active_.load(std::memory_order_relaxed)) return false;
  std::shared_ptr<Live> live;
  {
    std::lock_guard<std::mutex> lock(offer_mutex_);
    live = live_;
  }
  if (!live) return false;
  offered_.fetch_add(1, std::memory_order_relaxed);
  // The policy's switches in the contract's order; the first that takes the sample is its reason.
  // `disagreement` comes last, from the shadow's thread (capture_disagreement) for requests not taken here.
  const CapturePolicy& policy = live->policy;
  const char* reason = nullptr;
  if (policy.uniform > 0.0 && draw(rng_state_) < policy.uniform) {
    reason = c::CAPTURE_REASON_UNIFORM;
  } else if (policy.low_confidence > 0.0) {
    int64_t top1 = 0;
    double confidence = 1.0;
    if (capture_confidence(serving.session_manifest(), outputs, &top1, &confidence) && confidence < policy.low_confidence) {
      reason = c::CAPTURE_REASON_LOW_CONFIDENCE;
    }
  }
  if (reason == nullptr && policy.drift && policy.drift_rate > 0.0 && draw(rng_state_) < policy.drift_rate) {
    reason = c::CAPTURE_REASON_DRIFT;
  }
  if (reason == nullptr) return false;
  enqueue(live, serving, reason, inputs, outputs);
  return true;
}

void CaptureRunner::capture_disagreement(const Session& serving, const std::vector<Tensor>& inputs,
                                         const std::vector<Tensor>& outputs) {
  if (!active_.load(std::memory_order_relaxed)) return;
  std::shared_ptr<Live> live;
  {
    std::lock_guard<std::mutex> lock(offer_mutex_);
    live = live_;
  }
  if (!live || !live->policy.disagreement) return;
  enqueue(live, serving, c::CAPTURE_REASON_DISAGREEMENT, inputs, outputs);
}

void CaptureRunner::enqueue(const std::shared_ptr<Live>& live, const Session& serving, const char* reason,
                            const std::vector<Tensor>& inputs, const std::vector<Tensor>& outputs) {
  {
    std::lock_guard<std::mutex> lock(offer_mutex_);
    if (live->queue.size() >= live->queue_max) {
      queue_dropped_.fetch_add(1, std::memory_order_relaxed);
      return;
    }
  }
  // The serving answer is already made; copying here costs only the captured requests.
  Sample sample;
  sample.capture_id = live->capture_id;
  sample.reason = reason;
  sample.ts_ms = now_ms();
  sample.manifest_json = std::make_shared<const std::string>(serving.session_manifest_json());
  sample.manifest_name = serving.session_manifest().name;
  for (const ManifestTensor& t : serving.session_manifest().inputs) sample.input_names.push_back(t.name);
  for (const ManifestTensor& t : serving.session_manifest().outputs) sample.output_names.push_back(t.name);
  sample.inputs = tensors_copy(inputs);
  sample.outputs = tensors_copy(outputs);
  std::lock_guard<std::mutex> lock(offer_mutex_);
  if (live->queue.size() >= live->queue_max) {  // filled while we copied
    queue_dropped_.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  live->queue.push_back(std::move(sample));
  taken_.fetch_add(1, std::memory_order_relaxed);
}

nlohmann::json CaptureRunner::capture_status() {
  nlohmann::json status = {{"active", active_.load()},
                           {"offered", offered_.load()},
                           {"taken", taken_.load()},
                           {"queue_dropped", queue_dropped_.load()},
                           {"stored_samples", stored_samples_count_.load()},
                           {"stored_bytes", stored_bytes_count_.load()},
                           {"uploading", uploading_.load()}};
  std::lock_guard<std::mutex> lock(offer_mutex_);
  if (live_) status["capture_id"] = live_->capture_id;
  return status;
}

// --- state on disk --------------------------------------------------------------------------------

void CaptureRunner::state_load() {
  const std::string saved = text_read((fs::path(dir_) / STATE_FILE).string());
  if (saved.empty()) return;
  const nlohmann::json doc = nlohmann::json::parse(saved, nullptr, false);
  if (!doc.is_object()) {
    log("state.json is not readable; starting without a capture (stored samples stay)");
    return;
  }
  if (doc.contains("captures") && doc["captures"].is_object()) {
    for (const auto& item : doc["captures"].items()) {
      const nlohmann::json& v = item.value();
      if (!v.is_object()) continue;
      const auto text = [&](const char* key) { return v.contains(key) && v[key].is_string() ? v[key].get<std::string>() : ""; };
      if ((v.contains("token") && !v["token"].is_string()) || (v.contains("url") && !v["url"].is_string()) ||
          (v.contains("uploading") && !v["uploading"].is_boolean())) {
        log("state.json's record of capture " + item.key().substr(0, 64) + " has a field of the wrong type; it is forgotten (its stored samples stay)");
        continue;
      }
      Capture capture;
      capture.token = text("token");
      capture.url = text("url");
      capture.retention_s = v.contains("retention_s") && v["retention_s"].is_number_unsigned() ? v["retention_s"].get<uint64_t>() : capture.retention_s;
      capture.uploading = v.contains("uploading") && v["uploading"].get<bool>();
      capture.upload_before_ms = v.contains("upload_before_ms") && v["upload_before_ms"].is_number_integer()
                                     ? v["upload_before_ms"].get<int64_t>()
                                     : 0;
      if (!envelope_hex_of(capture.token, 64)) capture.token.clear();
      captures_[item.key()] = capture;
    }
  }
  if (doc.contains("applied_sha256") && doc["applied_sha256"].is_string()) applied_sha256_ = doc["applied_sha256"].get<std::string>();
  if (doc.contains("active") && doc["active"].is_string()) {
    try {
      active_state_ = capture_state_parse(doc["active"].get<std::string>(), options_.deploy_keys);
      active_envelope_ = doc["active"].get<std::string>();
      log("resuming capture " + active_state_->capture_id);
    } catch (const Error& e) {
      log(std::string("the recorded capture is dropped: ") + e.what());
      active_state_.reset();
    }
  }
  if (active_state_) live_set();
  for (const auto& item : captures_) {
    if (item.second.uploading) {
      uploading_ = true;  // an upload in progress resumes
      log("resuming the upload of capture " + item.first);
    }
  }
}

void CaptureRunner::state_save() {
  nlohmann::json captures = nlohmann::json::object();
  for (const auto& [id, capture] : captures_) {
    captures[id] = {{"token", capture.token}, {"url", capture.url}, {"retention_s", capture.retention_s},
                    {"uploading", capture.uploading}, {"upload_before_ms", capture.upload_before_ms}};
  }
  nlohmann::json doc = {{"v", 1}, {"captures", captures}};
  doc["active"] = active_state_ ? nlohmann::json(active_envelope_) : nlohmann::json(nullptr);
  doc["applied_sha256"] = applied_sha256_;  // the last capture state acted on (see handle)
  // Written by file_replace (0600: it holds the upload tokens), renamed into place.
  file_replace((fs::path(dir_) / STATE_FILE).string(), doc.dump() + "\n");
  bool uploading = false;
  for (const auto& item : captures_) uploading = uploading || item.second.uploading;
  uploading_ = uploading;
}

void CaptureRunner::index_load() {
  // What a crash left half-written (temporary files) goes; whole records (renamed into place only
  // after fsync) stay, oldest first by their modification time.
  const fs::path samples = fs::path(dir_) / SAMPLES_DIR;
  std::error_code ec;
  for (const fs::directory_entry& capture_dir : fs::directory_iterator(samples, ec)) {
    const std::string id = capture_dir.path().filename().string();
    std::error_code ec2;
    // symlink_status: a symlink (to a directory or not) is unlinked itself, never followed.
    if (!fs::is_directory(fs::symlink_status(capture_dir.path(), ec2))) {
      fs::remove(capture_dir.path(), ec2);
      continue;
    }
    size_t kept = 0;
    for (const fs::directory_entry& entry : fs::directory_iterator(capture_dir.path(), ec2)) {
      const std::string name = entry.path().filename().string();
      std::error_code ec3;
      struct stat st {};
      if (!envelope_hex_of(name, 64) || ::lstat(entry.path().c_str(), &st) != 0 || !S_ISREG(st.st_mode)) {
        if (name.rfind(TMP_PREFIX, 0) == 0) log("removed " + name + ", a record a crash left half-written");
        fs::remove_all(entry.path(), ec3);
        continue;
      }
      const int64_t mtime_ms = static_cast<int64_t>(st.st_mtim.tv_sec) * 1000 + st.st_mtim.tv_nsec / 1000000;
      stored_.push_back({id, name, static_cast<uint64_t>(st.st_size), mtime_ms});
      stored_bytes_ += static_cast<uint64_t>(st.st_size);
      ++kept;
    }
    if (kept == 0) fs::remove(capture_dir.path(), ec2);
  }
  std::sort(stored_.begin(), stored_.end(), [](const Stored& a, const Stored& b) { return a.stored_ms < b.stored_ms; });
  stored_publish();
  if (!stored_.empty()) log("the store holds " + std::to_string(stored_.size()) + " samples (" + std::to_string(stored_bytes_) + " bytes)");
}

void CaptureRunner::stored_publish() {
  stored_samples_count_ = stored_.size();
  stored_bytes_count_ = stored_bytes_;
}

// --- reports --------------------------------------------------------------------------------------

nlohmann::json CaptureRunner::report_details(const std::string& capture_id) const {
  nlohmann::json d = {{c::F_CAPTURE_REPORT_CAPTURE_ID, capture_id},
                      {c::F_CAPTURE_REPORT_STORED_SAMPLES, stored_.size()},
                      {c::F_CAPTURE_REPORT_STORED_BYTES, stored_bytes_}};
  if (active_state_ && active_state_->capture_id == capture_id) d[c::F_CAPTURE_REPORT_CAPTURE_VERSION] = active_state_->version;
  return d;
}

void CaptureRunner::report(const std::string& event, const std::string& message, const nlohmann::json& details) {
  log(event + ": " + message);
  if (reporter_ == nullptr) return;
  try {
    reporter_->capture_report_event(event, message.substr(0, c::MAX_MESSAGE), details);
  } catch (const std::exception& e) {
    log(std::string("a ") + event + " event was not stored: " + e.what());
  }
}

void CaptureRunner::drop(const std::string& capture_id, const std::string& reason, uint64_t samples, uint64_t bytes) {
  auto& entry = drops_[{capture_id, reason}];
  entry.first += samples;
  entry.second += bytes;
}

void CaptureRunner::drops_flush(bool force) {
  if (drops_.empty()) return;
  const int64_t now = now_ms();
  if (!force && now - drops_flushed_ms_ < static_cast<int64_t>(options_.drop_event_period_s * 1000.0)) return;
  drops_flushed_ms_ = now;
  for (const auto& [key, counts] : drops_) {
    nlohmann::json d = report_details(key.first);
    d[c::F_CAPTURE_REPORT_REASON] = key.second;
    d[c::F_CAPTURE_REPORT_SAMPLES] = counts.first;
    d[c::F_CAPTURE_REPORT_BYTES] = counts.second;
    report(c::EVENT_KIND_CAPTURE_DROPPED,
           std::to_string(counts.first) + " captured sample(s) of " + key.first + " dropped (" + key.second + ")", d);
  }
  drops_.clear();
}

// --- the runner's thread --------------------------------------------------------------------------

void CaptureRunner::loop() {
  while (true) {
    std::deque<std::string> inbox;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      bool queued = false;
      {
        std::lock_guard<std::mutex> offer_lock(offer_mutex_);
        queued = live_ && !live_->queue.empty();
      }
      const bool upload_due = uploading_ && now_ms() >= upload_next_ms_;
      if (!queued && !upload_due) {
        cv_.wait_for(lock, active_ ? POLL_LIVE : POLL_IDLE, [&] { return stopping_ || !inbox_.empty(); });
      }
      if (stopping_) break;
      inbox.swap(inbox_);
    }
    try {
      for (const std::string& payload : inbox) handle(payload);
      // The queued samples (one queue's worth, so a steady stream cannot starve the rest), then one
      // upload: a slow receiver delays the store by one request at most.
      for (size_t n = 0; n < options_.queue; ++n) {
        Sample sample;
        {
          std::lock_guard<std::mutex> lock(offer_mutex_);
          if (!live_ || live_->queue.empty()) break;
          sample = std::move(live_->queue.front());
          live_->queue.pop_front();
        }
        sample_store(sample);
      }
      const int64_t now = now_ms();
      if (now - housekeeping_ms_ >= HOUSEKEEPING_MS) {
        housekeeping_ms_ = now;
        retention_check();
        if (active_state_ && capture_state_expired(*active_state_, now / 1000)) active_end(c::CAPTURE_STOP_EXPIRED);
      }
      if (uploading_ && now_ms() >= upload_next_ms_) upload_step();
      drops_flush(false);
    } catch (const std::exception& e) {
      log(std::string("error: ") + e.what());
    }
  }
  try {
    drops_flush(true);
  } catch (const std::exception& e) {
    log(std::string("error: ") + e.what());
  }
}

void CaptureRunner::handle(const std::string& payload) {
  CaptureState next;
  try {
    next = capture_state_parse(payload, options_.deploy_keys);
    // The floor is written before state.json: a state the floor holds but state.json does not
    // record as applied (a kill between the two writes, a full disk) is applied again (harmless).
    if (capture_state_admit(next, (fs::path(dir_) / FLOOR_FILE).string(), options_.fleet, options_.device,
                            now_ms() / 1000) == CAPTURE_ADMIT_REPEATED &&
        next.signed_sha256 == applied_sha256_) {
      return;
    }
  } catch (const Error& e) {
    const std::string id = capture_state_unverified_id(payload);
    log("refused " + (id.empty() ? std::string("a capture state") : id) + ": " + e.what());
    return;
  }
  log("took capture state " + std::to_string(next.version) + " (" + next.action + " " + next.capture_id + ")");
  if (next.action == c::CAPTURE_ACTION_START) {
    if (active_state_ && active_state_->capture_id != next.capture_id) active_end(c::CAPTURE_STOP_SUPERSEDED);
    captures_prune();
    state_change([&] {
      Capture& capture = captures_[next.capture_id];
      capture.token = next.upload_token;
      capture.url = next.upload_url;
      capture.retention_s = next.retention_s;
      active_state_ = next;
      active_envelope_ = payload;
      applied_sha256_ = next.signed_sha256;
    });
    live_set();
    nlohmann::json d = report_details(next.capture_id);
    report(c::EVENT_KIND_CAPTURE_STARTED, "capture " + next.capture_id + " started", d);
    return;
  }
  const auto rename = [&] {
    auto known = captures_.find(next.capture_id);
    if (known != captures_.end()) {
      known->second.url = next.upload_url;  // stop and upload name the receiver again
      known->second.retention_s = next.retention_s;
    }
    applied_sha256_ = next.signed_sha256;
  };
  if (next.action == c::CAPTURE_ACTION_STOP) {
    if (active_state_ && active_state_->capture_id == next.capture_id) {
      rename();  // saved by active_end, with the capture's end
      active_end(c::CAPTURE_STOP_STOPPED);
    } else {
      state_change(rename);
    }
    return;
  }
  auto known = captures_.find(next.capture_id);
  // upload: what is stored of this capture goes to the receiver; sampling goes on as before.
  if (known == captures_.end() || known->second.token.empty()) {
    log("cannot upload capture " + next.capture_id + ": this device was never given its token (no 'start' taken)");
    return;
  }
  state_change([&] {
    rename();
    known->second.uploading = true;
    known->second.upload_before_ms = now_ms();  // sampling goes on: later samples wait for the next upload
  });
  upload_next_ms_ = 0;
  backoff_s_ = 0;
}

// `change` applied to the runner's state, then saved; when the save fails (a full disk) the state
// is as before, so memory never claims what state.json does not hold.
void CaptureRunner::state_change(const std::function<void()>& change) {
  const auto captures = captures_;
  const auto active_state = active_state_;
  const std::string active_envelope = active_envelope_;
  const std::string applied = applied_sha256_;
  change();
  try {
    state_save();
  } catch (...) {
    captures_ = captures;
    active_state_ = active_state;
    active_envelope_ = active_envelope;
    applied_sha256_ = applied;
    throw;
  }
}

// Captures with nothing left to do (not sampling, not uploading, no sample stored) are forgotten,
// tokens included, so state.json stays small over many captures.
void CaptureRunner::captures_prune() {
  for (auto it = captures_.begin(); it != captures_.end();) {
    const std::string& id = it->first;
    const bool stored = std::any_of(stored_.begin(), stored_.end(), [&](const Stored& s) { return s.capture_id == id; });
    const bool active = active_state_ && active_state_->capture_id == id;
    it = (!stored && !active && !it->second.uploading) ? captures_.erase(it) : std::next(it);
  }
}

void CaptureRunner::live_set() {
  auto live = std::make_shared<Live>();
  live->capture_id = active_state_->capture_id;
  live->policy = active_state_->policy;
  live->queue_max = options_.queue;
  std::lock_guard<std::mutex> lock(offer_mutex_);
  live_ = live;
  active_ = true;
}

void CaptureRunner::active_end(const std::string& stop, const std::string& error) {
  if (!active_state_) return;
  {
    std::lock_guard<std::mutex> lock(offer_mutex_);
    live_.reset();
    active_ = false;
  }
  drops_flush(true);
  nlohmann::json d = report_details(active_state_->capture_id);
  d[c::F_CAPTURE_REPORT_STOP] = stop;
  if (!error.empty()) d[c::F_CAPTURE_REPORT_ERROR] = error.substr(0, c::MAX_ERROR);
  const std::string id = active_state_->capture_id;
  active_state_.reset();
  active_envelope_.clear();
  state_save();
  report(c::EVENT_KIND_CAPTURE_STOPPED, "capture " + id + " stopped (" + stop + ")" + (error.empty() ? "" : ": " + error), d);
}

// --- the store ------------------------------------------------------------------------------------

// A sample an upload round is sending (stored up to its `upload` state) is never evicted while the
// round runs: the new sample is dropped instead.
bool CaptureRunner::evictable(const Stored& s) const {
  const auto capture = captures_.find(s.capture_id);
  return capture == captures_.end() || !capture->second.uploading || s.stored_ms > capture->second.upload_before_ms;
}

bool CaptureRunner::evict_oldest(const std::string& capture_id, const std::string& reason, uint64_t* freed) {
  const auto it = std::find_if(stored_.begin(), stored_.end(),
                               [&](const Stored& s) { return (capture_id.empty() || s.capture_id == capture_id) && evictable(s); });
  if (it == stored_.end()) return false;
  std::error_code ec;
  fs::remove(sample_path(it->capture_id, it->sha256), ec);
  drop(it->capture_id, reason, 1, it->bytes);
  stored_bytes_ -= it->bytes;
  if (freed != nullptr) *freed += it->bytes;
  stored_.erase(it);
  return true;
}

bool CaptureRunner::record_write(const std::string& capture_id, const std::string& sha, const std::string& record) {
  const fs::path dir = fs::path(dir_) / SAMPLES_DIR / capture_id;
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec == std::errc::no_space_on_device || ec.value() == EDQUOT) return false;
  if (ec) throw Error(ERROR_CODE_IO, "cannot create " + dir.string() + " (" + ec.message() + ")");
  const std::string tmp = (dir / (std::string(TMP_PREFIX) + sha)).string();
  const std::string path = (dir / sha).string();
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0) {
    if (errno == ENOSPC || errno == EDQUOT) return false;
    throw Error(ERROR_CODE_IO, "cannot write " + tmp + " (" + std::strerror(errno) + ")");
  }
  size_t done = 0;
  int err = 0;
  while (done < record.size()) {
    const ssize_t n = ::write(fd, record.data() + done, record.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      err = n < 0 ? errno : ENOSPC;
      break;
    }
    done += static_cast<size_t>(n);
  }
  if (err == 0 && ::fsync(fd) != 0) err = errno;
  ::close(fd);
  if (err != 0) {
    ::unlink(tmp.c_str());
    if (err == ENOSPC || err == EDQUOT) return false;
    throw Error(ERROR_CODE_IO, "cannot write " + tmp + " (" + std::strerror(err) + ")");
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const int e = errno;
    ::unlink(tmp.c_str());
    throw Error(ERROR_CODE_IO, "cannot store " + path + " (" + std::strerror(e) + ")");
  }
  directory_sync(dir.string());
  return true;
}

void CaptureRunner::sample_store(Sample& sample) {
  if (!active_state_ || active_state_->capture_id != sample.capture_id) return;  // capture ended meanwhile
  const std::string manifest_sha = sha256_string(*sample.manifest_json);
  auto meta = manifest_meta_.find(manifest_sha);
  if (meta == manifest_meta_.end()) {
    if (manifest_meta_.size() >= 8) manifest_meta_.clear();  // a few models at most over an agent's life
    const nlohmann::json doc = nlohmann::json::parse(*sample.manifest_json, nullptr, false);
    ManifestMeta m;
    m.model = json_string(doc, "model", "name");
    if (m.model.empty()) m.model = sample.manifest_name;
    m.model = m.model.substr(0, MAX_LABEL);
    m.model_version = json_string(doc, "model", "version").substr(0, MAX_LABEL);
    try {
      m.manifest = manifest_parse(*sample.manifest_json);
    } catch (const Error&) {
    }
    meta = manifest_meta_.emplace(manifest_sha, std::move(m)).first;
  }
  nlohmann::json header = {{c::F_CAPTURE_RECORD_V, 1},
                           {c::F_CAPTURE_RECORD_FLEET, options_.fleet},
                           {c::F_CAPTURE_RECORD_DEVICE, options_.device},
                           {c::F_CAPTURE_RECORD_CAPTURE_ID, sample.capture_id},
                           {c::F_CAPTURE_RECORD_MANIFEST_SHA256, manifest_sha},
                           {c::F_CAPTURE_RECORD_MODEL, meta->second.model},
                           {c::F_CAPTURE_RECORD_MODEL_VERSION, meta->second.model_version},
                           {c::F_CAPTURE_RECORD_TS_MS, sample.ts_ms},
                           {c::F_CAPTURE_RECORD_REASON, sample.reason}};
  // top1 and confidence of the classes output, when the manifest names one.
  int64_t top1 = 0;
  double confidence = 0.0;
  if (meta->second.manifest && capture_confidence(*meta->second.manifest, sample.outputs, &top1, &confidence) &&
      top1 < MAX_CLASSES) {
    header[c::F_CAPTURE_RECORD_TOP1] = top1;
    header[c::F_CAPTURE_RECORD_CONFIDENCE] = confidence;
  }
  const std::string& id = sample.capture_id;
  // A model whose tensors no record can hold fails on every sample: the capture ends, with why.
  std::string unfit = capture_record_unfit(sample.inputs);
  if (unfit.empty()) unfit = capture_record_unfit(sample.outputs);
  if (!unfit.empty()) {
    drop(id, c::CAPTURE_DROP_REFUSED, 1, 0);
    active_end(c::CAPTURE_STOP_STOPPED, "the serving model's samples cannot be captured: " + unfit);
    return;
  }
  std::string record;
  try {
    record = capture_record_build(header, sample.input_names, sample.inputs, sample.output_names, sample.outputs);
  } catch (const Error& e) {
    store_failed(id, 0, e.what());
    return;
  }
  const uint64_t size = record.size();
  const std::string sha = sha256_string(record);
  const CaptureState& state = *active_state_;
  if (size > state.max_bytes || size > options_.max_bytes) {
    drop(id, c::CAPTURE_DROP_BUDGET, 1, size);
    return;
  }
  // The capture's budget, then the store's: the oldest go first.
  const auto capture_usage = [&](uint64_t* samples, uint64_t* bytes) {
    *samples = 0;
    *bytes = 0;
    for (const Stored& s : stored_) {
      if (s.capture_id == id) {
        *samples += 1;
        *bytes += s.bytes;
      }
    }
  };
  uint64_t samples = 0, bytes = 0;
  capture_usage(&samples, &bytes);
  while (samples > 0 && (samples + 1 > state.max_samples || bytes + size > state.max_bytes)) {
    if (!evict_oldest(id, c::CAPTURE_DROP_BUDGET, nullptr)) {  // only samples an upload round sends are left
      drop(id, c::CAPTURE_DROP_BUDGET, 1, size);
      stored_publish();
      return;
    }
    capture_usage(&samples, &bytes);
  }
  while (!stored_.empty() && stored_bytes_ + size > options_.max_bytes) {
    if (!evict_oldest("", c::CAPTURE_DROP_BUDGET, nullptr)) {
      drop(id, c::CAPTURE_DROP_BUDGET, 1, size);
      stored_publish();
      return;
    }
  }
  // A full disk: the oldest go until as many bytes as the record's are freed; when it still does
  // not fit (the disk is full of something else), the record is dropped itself.
  uint64_t freed = 0;
  try {
    while (!record_write(id, sha, record)) {
      if (freed >= size || !evict_oldest("", c::CAPTURE_DROP_DISK_FULL, &freed)) {
        drop(id, c::CAPTURE_DROP_DISK_FULL, 1, size);
        stored_publish();
        return;
      }
    }
  } catch (const Error& e) {  // a read-only or failing disk: counted, logged now and then
    store_failed(id, size, e.what());
    stored_publish();
    return;
  }
  const auto same = std::find_if(stored_.begin(), stored_.end(), [&](const Stored& s) { return s.sha256 == sha && s.capture_id == id; });
  if (same == stored_.end()) {  // the same bytes twice are one record
    stored_.push_back({id, sha, size, now_ms()});
    stored_bytes_ += size;
  }
  stored_publish();
}

// A sample that could not be stored (its record not built, or not written): dropped with reason
// refused, and logged at most once a minute with how many failed since.
void CaptureRunner::store_failed(const std::string& capture_id, uint64_t bytes, const std::string& why) {
  drop(capture_id, c::CAPTURE_DROP_REFUSED, 1, bytes);
  ++store_failures_;
  const int64_t now = now_ms();
  if (store_failed_logged_ms_ != 0 && now - store_failed_logged_ms_ < 60000) return;
  store_failed_logged_ms_ = now;
  log(std::to_string(store_failures_) + " sample(s) not stored (last: " + why + ")");
  store_failures_ = 0;
}

void CaptureRunner::retention_check() {
  const int64_t now = now_ms();
  bool changed = false;
  for (auto it = stored_.begin(); it != stored_.end();) {
    const auto capture = captures_.find(it->capture_id);
    const uint64_t retention_s = capture != captures_.end() ? capture->second.retention_s : 7 * 24 * 3600;
    if (now - it->stored_ms > static_cast<int64_t>(retention_s) * 1000) {
      std::error_code ec;
      fs::remove(sample_path(it->capture_id, it->sha256), ec);
      drop(it->capture_id, c::CAPTURE_DROP_RETENTION, 1, it->bytes);
      stored_bytes_ -= it->bytes;
      it = stored_.erase(it);
      changed = true;
    } else {
      ++it;
    }
  }
  if (changed) stored_publish();
}

// --- upload ---------------------------------------------------------------------------------------

void CaptureRunner::upload_round_end(const std::string& capture_id, const std::string& error) {
  captures_[capture_id].uploading = false;
  const auto acked = round_[capture_id];
  round_.erase(capture_id);
  round_refused_.erase(capture_id);
  drops_flush(true);
  state_save();
  nlohmann::json d = report_details(capture_id);
  d[c::F_CAPTURE_REPORT_SAMPLES] = acked.first;
  d[c::F_CAPTURE_REPORT_BYTES] = acked.second;
  if (!error.empty()) d[c::F_CAPTURE_REPORT_ERROR] = error.substr(0, c::MAX_ERROR);
  report(c::EVENT_KIND_CAPTURE_UPLOADED,
         std::to_string(acked.first) + " sample(s) of " + capture_id + " uploaded" + (error.empty() ? "" : "; " + error), d);
}

void CaptureRunner::upload_step() {
  std::string id;
  for (const auto& [capture_id, capture] : captures_) {
    if (capture.uploading) {
      id = capture_id;
      break;
    }
  }
  if (id.empty()) {
    uploading_ = false;
    return;
  }
  const Capture& capture = captures_[id];
  const auto next = std::find_if(stored_.begin(), stored_.end(), [&](const Stored& s) {
    return s.capture_id == id && s.stored_ms <= capture.upload_before_ms;
  });
  if (next == stored_.end()) {
    upload_round_end(id, "");
    return;
  }
  const Stored item = *next;
  const std::string path = sample_path(id, item.sha256);
  const std::string body = file_bytes(path);
  const auto forget = [&] {
    std::error_code ec;
    fs::remove(path, ec);
    const auto it = std::find_if(stored_.begin(), stored_.end(),
                                 [&](const Stored& s) { return s.capture_id == id && s.sha256 == item.sha256; });
    if (it != stored_.end()) {
      stored_bytes_ -= it->bytes;
      stored_.erase(it);
    }
    stored_publish();
  };
  if (body.size() != item.bytes || sha256_string(body) != item.sha256) {  // damaged on disk: never send it
    log("the stored sample " + item.sha256 + " is damaged; removed");
    forget();
    return;
  }
  if (!url_https_or_loopback(capture.url)) {  // recorded by an agent that did not check it yet
    upload_round_end(id, "the capture receiver url " + capture.url.substr(0, 64) +
                             " is plain http:// to a host other than the loopback; the token is not sent in clear");
    return;
  }
  std::string origin, base;
  try {
    download_url_split(capture.url, &origin, &base, "the capture receiver url");
  } catch (const Error& e) {
    upload_round_end(id, e.what());
    return;
  }
  while (!base.empty() && base.back() == '/') base.pop_back();
  const std::string target = base + "/v1/captures/" + options_.fleet + "/" + options_.device + "/" + id + "/" + item.sha256;
  // https://: the receiver's certificate is verified against the broker credentials' CA file (or
  // the system's CAs), with the device's own certificate offered for mutual TLS: the same client
  // set-up as the artifact download (csrc/deploy/download.cc).
  httplib::Client client = options_.tls_certfile.empty() ? httplib::Client(origin)
                                                         : httplib::Client(origin, options_.tls_certfile, options_.tls_keyfile);
  if (!options_.tls_cafile.empty()) client.set_ca_cert_path(options_.tls_cafile);
  client.enable_server_certificate_verification(true);
  const auto io = std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::duration<double>(options_.io_timeout_s));
  client.set_connection_timeout(std::chrono::duration_cast<std::chrono::seconds>(io).count(), io.count() % 1000000);
  client.set_read_timeout(std::chrono::duration_cast<std::chrono::seconds>(io).count(), io.count() % 1000000);
  client.set_write_timeout(std::chrono::duration_cast<std::chrono::seconds>(io).count(), io.count() % 1000000);
  client.set_follow_location(false);
  client.set_keep_alive(false);
  // The whole request has one deadline (the time-outs above are per read and per write: a receiver
  // trickling bytes would otherwise hold this thread for ever) and stops with the agent; the answer
  // is read into at most ANSWER_MAX_BYTES (a receiver answering with an endless body would
  // otherwise grow memory until the agent is killed, and crash-loop it: `uploading` is persisted).
  using Clock = std::chrono::steady_clock;
  const auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(options_.upload_timeout_s));
  std::string cut;  // why this thread ended the request, when it did
  const auto go_on = [&] {
    if (halt_.load()) {
      cut = "the agent is stopping";
    } else if (Clock::now() >= deadline) {
      cut = "the request was still running after " + std::to_string(static_cast<int64_t>(options_.upload_timeout_s)) + " s";
    }
    return cut.empty();
  };
  std::string answer;
  httplib::Request request;
  request.method = "PUT";
  request.path = target;
  request.headers = {{"Authorization", "Bearer " + capture.token}, {"Content-Type", "application/octet-stream"}};
  request.content_length_ = body.size();
  request.content_provider_ = [&](size_t offset, size_t length, httplib::DataSink& sink) {
    if (!go_on()) return false;
    const size_t n = std::min<size_t>(length, 64 * 1024);
    return sink.write(body.data() + offset, n);
  };
  request.response_handler = [&](const httplib::Response& response) {
    if (response.has_header("Content-Length") &&
        std::strtoull(response.get_header_value("Content-Length").c_str(), nullptr, 10) > ANSWER_MAX_BYTES) {
      cut = "its answer is over " + std::to_string(ANSWER_MAX_BYTES) + " bytes";
      return false;
    }
    return go_on();
  };
  request.content_receiver = [&](const char* data, size_t length, uint64_t, uint64_t) {
    if (answer.size() + length > ANSWER_MAX_BYTES) {
      cut = "its answer is over " + std::to_string(ANSWER_MAX_BYTES) + " bytes";
      return false;
    }
    answer.append(data, length);
    return go_on();
  };
  httplib::Response response;
  httplib::Error error = httplib::Error::Success;
  {
    std::lock_guard<std::mutex> lock(client_mutex_);
    client_ = &client;
  }
  // The deadline also holds while no callback runs (a receiver trickling its status line and
  // headers): a watchdog shuts the request's socket then.
  std::mutex watch_mutex;
  std::condition_variable watch_cv;
  bool done = false;
  std::atomic<bool> overdue{false};
  std::thread watchdog([&] {
    std::unique_lock<std::mutex> lock(watch_mutex);
    if (!watch_cv.wait_until(lock, deadline, [&] { return done; })) {
      overdue = true;
      client.stop();
    }
  });
  bool sent = !halt_.load() && client.send(request, response, error);
  {
    std::lock_guard<std::mutex> lock(watch_mutex);
    done = true;
  }
  watch_cv.notify_all();
  watchdog.join();
  {
    std::lock_guard<std::mutex> lock(client_mutex_);
    client_ = nullptr;
  }
  if (overdue && cut.empty()) {
    cut = "the request was still running after " + std::to_string(static_cast<int64_t>(options_.upload_timeout_s)) + " s";
  }
  if (!cut.empty()) sent = false;
  if (halt_.load()) return;  // the agent stops: the sample stays, the upload resumes at the next start
  const int status = sent ? response.status : 0;
  if (status == 200 || status == 201) {  // stored, or already stored: only now is it deleted here
    auto& acked = round_[id];
    acked.first += 1;
    acked.second += item.bytes;
    forget();
    backoff_s_ = 0;
    return;
  }
  if (status == 400 || status == 409 || status == 410 || status == 411 || status == 413 || status == 422) {
    log("the receiver refused sample " + item.sha256 + " with HTTP " + std::to_string(status) + ": dropped");
    drop(id, c::CAPTURE_DROP_REFUSED, 1, item.bytes);
    forget();
    // 409: the capture's budget at the receiver is used up; more samples would be refused too.
    if (status == 409 && active_state_ && active_state_->capture_id == id) active_end(c::CAPTURE_STOP_BUDGET);
    return;
  }
  if (status == 403) {
    upload_round_end(id, "the receiver refused this device's token for capture " + id + " (HTTP 403); uploading stopped");
    return;
  }
  // A redirect (never followed: the token would go along) or another 4xx is not a receiver
  // speaking the capture protocol here: retrying would not change it.
  if ((status >= 300 && status < 400) || (status >= 400 && status < 500 && status != 408 && status != 429)) {
    upload_round_end(id, "the receiver at " + origin + " answered HTTP " + std::to_string(status) +
                             " (not a capture receiver at this URL?); uploading stopped, the samples stay");
    return;
  }
  // 408, 5xx, another answer or none: kept for a later try (uploads are idempotent).
  backoff_s_ = backoff_s_ <= 0 ? options_.backoff_min_s : std::min(options_.backoff_max_s, backoff_s_ * 2);
  upload_next_ms_ = now_ms() + static_cast<int64_t>(backoff_s_ * 1000.0);
  log("upload of " + item.sha256 + " to " + origin + " failed (" +
      (sent ? "HTTP " + std::to_string(status) : !cut.empty() ? cut : httplib::to_string(error)) + "); next try in " +
      std::to_string(static_cast<int>(backoff_s_)) + " s");
}

}  // namespace edgesmith
