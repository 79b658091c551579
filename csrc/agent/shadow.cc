#include "agent/shadow.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <system_error>

#include "agent/capture.h"
#include "agent/deployer.h"
#include "agent/shadow_child.h"
#include "artifact/manifest.h"
#include "common/contract_words.h"
#include "common/digest.h"
#include "common/error.h"
#include "common/file.h"
#include "deploy/archive.h"
#include "deploy/download.h"
#include "deploy/slots.h"
#include "telemetry/publisher.h"
#include "telemetry/shadow_window.h"

namespace fs = std::filesystem;

namespace edgesmith {

namespace c = contract;

namespace {

constexpr const char* STATE_FILE = "state.json";
constexpr const char* FLOOR_FILE = "floor.json";
constexpr const char* SLOT_DIR = "candidate";
constexpr const char* STAGING_DIR = "staging";
constexpr uint64_t STATE_MAX_BYTES = 1 << 20;
// How long the thread sleeps while a candidate runs and no sample waits: the serving paths never
// wake it (that would cost them a system call), it looks again this often.
constexpr std::chrono::milliseconds POLL_LIVE{5};
constexpr std::chrono::milliseconds POLL_IDLE{250};

void remove_tree(const std::string& path) {
  std::error_code ec;
  fs::remove_all(path, ec);
}

// Written to a temporary file, synced, renamed: a reader sees the old file or the new one.
void file_write_atomic(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) throw Error(ERROR_CODE_IO, "cannot write " + tmp + "; check the data directory's permissions");
  size_t done = 0;
  while (done < text.size()) {
    const ssize_t n = ::write(fd, text.data() + done, text.size() - done);
    if (n <= 0) {
      ::close(fd);
      throw Error(ERROR_CODE_IO, "cannot write " + tmp + " (disk full?)");
    }
    done += static_cast<size_t>(n);
  }
  ::fsync(fd);
  ::close(fd);
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) throw Error(ERROR_CODE_IO, "cannot write " + path + " (" + ec.message() + ")");
  directory_sync(fs::path(path).parent_path().string());
}

std::string text_read(const std::string& path) {
  std::ifstream in(path);
  if (!in) return "";
  std::stringstream text;
  text << in.rdbuf();
  return text.str().substr(0, STATE_MAX_BYTES);
}

}  // namespace

ShadowRunner::ShadowRunner(ShadowRunnerOptions options)
    : options_(std::move(options)), dir_((fs::path(options_.data_dir) / "shadow").string()) {
  if (!options_.clock_ms) options_.clock_ms = [] { return telemetry_now_ms(); };
  std::error_code ec;
  fs::create_directories(dir_, ec);
  if (ec) throw Error(ERROR_CODE_IO, "cannot create the shadow slot " + dir_ + " (" + ec.message() + ")");
  fs::permissions(dir_, fs::perms::owner_all, fs::perm_options::replace, ec);
}

ShadowRunner::~ShadowRunner() { shadow_stop(); }

void ShadowRunner::log(const std::string& line) const {
  if (options_.log) options_.log("shadow: " + line);
}

int64_t ShadowRunner::now_ms() const { return options_.clock_ms(); }

void ShadowRunner::shadow_start(ShadowReporter* reporter, std::function<std::shared_ptr<Session>()> serving) {
  reporter_ = reporter;
  serving_ = std::move(serving);
  // A shadow recorded before a restart resumes: the same signed state, its schedule from the clock.
  const std::string saved = text_read((fs::path(dir_) / STATE_FILE).string());
  if (!saved.empty()) {
    const nlohmann::json doc = nlohmann::json::parse(saved, nullptr, false);
    try {
      if (!doc.is_object() || !doc.contains("envelope") || !doc["envelope"].is_string()) {
        throw Error(ERROR_CODE_INTEGRITY, "the shadow's state.json is not readable");
      }
      state_envelope_ = doc["envelope"].get<std::string>();
      state_ = shadow_state_parse(state_envelope_, options_.deploy_keys);
      done_.assign(state_->candidates.size(), false);
      if (doc.contains("done") && doc["done"].is_array()) {
        for (size_t i = 0; i < doc["done"].size() && i < done_.size(); ++i) done_[i] = doc["done"][i].is_boolean() && doc["done"][i].get<bool>();
      }
      log("resuming shadow " + state_->shadow_id);
    } catch (const Error& e) {
      log(std::string("the recorded shadow is dropped: ") + e.what());
      state_.reset();
      std::error_code ec;
      fs::remove(fs::path(dir_) / STATE_FILE, ec);
    }
  }
  slot_clean("");  // nothing half-written survives a restart; the candidate is fetched again
  thread_ = std::thread([this] { loop(); });
}

void ShadowRunner::shadow_desired(const std::string& payload) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (inbox_.size() >= 16) inbox_.pop_front();  // only the newest matter
    inbox_.push_back(payload);
  }
  cv_.notify_all();
}

void ShadowRunner::shadow_serving_changed() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    serving_changed_ = true;
  }
  cv_.notify_all();
}

void ShadowRunner::shadow_stop() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
  {
    std::lock_guard<std::mutex> lock(offer_mutex_);
    live_.reset();
    active_ = false;
  }
  child_.reset();
}

void ShadowRunner::shadow_offer(const Session& serving, const std::vector<Tensor>& inputs,
                                const std::vector<Tensor>& outputs, double serving_us, bool captured) {
  if (!active_.load(std::memory_order_relaxed)) return;
  std::shared_ptr<Live> live;
  {
    std::lock_guard<std::mutex> lock(offer_mutex_);
    live = live_;
  }
  if (!live || live->serving != &serving) return;
  // xorshift64 on a shared state: a lost update only repeats a draw, which sampling tolerates.
  uint64_t x = rng_state_.load(std::memory_order_relaxed);
  x ^= x << 13;
  x ^= x >> 7;
  x ^= x << 17;
  rng_state_.store(x, std::memory_order_relaxed);
  if (static_cast<double>(x >> 11) * 0x1.0p-53 >= live->sample) return;
  live->summary->shadow_offered();
  // The serving answer is already made; copying here costs only the sampled requests.
  const auto copy = [](const std::vector<Tensor>& from) {
    std::vector<Tensor> to;
    for (const Tensor& t : from) {
      Tensor copied(t.dtype(), t.shape());
      if (t.byte_size() > 0) std::copy_n(static_cast<const uint8_t*>(t.data()), t.byte_size(), static_cast<uint8_t*>(copied.data()));
      to.push_back(std::move(copied));
    }
    return to;
  };
  {
    std::lock_guard<std::mutex> lock(offer_mutex_);
    live->offered += 1;
    if (live->queue.size() >= live->queue_max) {
      live->dropped += 1;
      live->summary->shadow_dropped();
      return;
    }
  }
  Sample sample{copy(inputs), copy(outputs), serving_us, captured};
  std::lock_guard<std::mutex> lock(offer_mutex_);
  if (live->queue.size() >= live->queue_max) {  // filled while we copied
    live->dropped += 1;
    live->summary->shadow_dropped();
    return;
  }
  live->queue.push_back(std::move(sample));
}

nlohmann::json ShadowRunner::shadow_status() {
  std::lock_guard<std::mutex> lock(offer_mutex_);
  if (!live_) return {{"active", false}};
  return {{"active", true}, {"shadow_id", live_id_}, {"candidate", running_.load()}, {"offered", live_->offered},
          {"samples", live_->samples}, {"dropped", live_->dropped}};
}

// --- the shadow thread ----------------------------------------------------------------------------

void ShadowRunner::loop() {
  while (true) {
    std::deque<std::string> inbox;
    bool serving_changed = false;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      bool queued = false;
      if (active_) {
        std::lock_guard<std::mutex> offer_lock(offer_mutex_);
        queued = live_ && !live_->queue.empty();
      }
      const bool may_run = queued && std::chrono::steady_clock::now() >= run_allowed_at_;
      if (!may_run) {
        cv_.wait_for(lock, active_ ? POLL_LIVE : POLL_IDLE,
                     [&] { return stopping_ || !inbox_.empty() || serving_changed_; });
      }
      if (stopping_) return;
      inbox.swap(inbox_);
      serving_changed = serving_changed_;
      serving_changed_ = false;
    }
    try {
      for (const std::string& payload : inbox) handle(payload);
      if (serving_changed && state_) shadow_end(c::SHADOW_END_SERVING_CHANGED);
      schedule();
      if (running_ >= 0 && now_ms() >= window_due_ms_) window_publish();
      if (running_ >= 0 && std::chrono::steady_clock::now() >= run_allowed_at_) sample_run();
    } catch (const std::exception& e) {
      // Reporting or the disk failed; the shadow must never take the agent down.
      log(std::string("error: ") + e.what());
    }
  }
}

void ShadowRunner::report(const std::string& event, const std::string& message, const nlohmann::json& details) {
  log(event + ": " + message);
  if (reporter_ == nullptr) return;
  try {
    reporter_->shadow_report_event(event, message, details);
  } catch (const std::exception& e) {
    log(std::string("a ") + event + " event was not stored: " + e.what());
  }
}

nlohmann::json ShadowRunner::report_details(int32_t candidate) const {
  nlohmann::json d = nlohmann::json::object();
  if (!state_) return d;
  d[c::F_SHADOW_REPORT_SHADOW_ID] = state_->shadow_id;
  d[c::F_SHADOW_REPORT_SHADOW_VERSION] = state_->version;
  if (candidate >= 0) {
    d[c::F_SHADOW_REPORT_CANDIDATE] = candidate;
    d[c::F_SHADOW_REPORT_CANDIDATE_SHA256] = state_->candidates[static_cast<size_t>(candidate)].manifest_sha256;
  }
  return d;
}

void ShadowRunner::refuse(const std::string& shadow_id, uint64_t version, int32_t candidate, const std::string& why) {
  nlohmann::json d = {{c::F_SHADOW_REPORT_SHADOW_ID, shadow_id.empty() ? "unknown" : shadow_id},
                      {c::F_SHADOW_REPORT_ERROR, why.substr(0, c::MAX_ERROR)}};
  if (version > 0) d[c::F_SHADOW_REPORT_SHADOW_VERSION] = version;
  if (candidate >= 0 && state_) {
    d[c::F_SHADOW_REPORT_CANDIDATE] = candidate;
    d[c::F_SHADOW_REPORT_CANDIDATE_SHA256] = state_->candidates[static_cast<size_t>(candidate)].manifest_sha256;
  }
  report(c::EVENT_KIND_SHADOW_REFUSED, why.substr(0, c::MAX_MESSAGE), d);
}

void ShadowRunner::handle(const std::string& payload) {
  ShadowState next;
  try {
    next = shadow_state_parse(payload, options_.deploy_keys);
  } catch (const Error& e) {
    refuse(shadow_state_unverified_id(payload), 0, -1, e.what());
    return;
  }
  if (next.fleet != options_.fleet || next.device != options_.device) {
    refuse(next.shadow_id, next.version, -1,
           "the shadow state is refused: it is for device " + next.device + " of fleet " + next.fleet + ", not " +
               options_.device + " of fleet " + options_.fleet);
    return;
  }
  const std::string floor_path = (fs::path(dir_) / FLOOR_FILE).string();
  const nlohmann::json floor = nlohmann::json::parse(text_read(floor_path), nullptr, false);
  const uint64_t highest = deploy_floor_read(floor_path);
  const std::string highest_sha = floor.is_object() && floor.contains("signed_sha256") && floor["signed_sha256"].is_string()
                                      ? floor["signed_sha256"].get<std::string>()
                                      : "";
  if (next.version == highest && next.signed_sha256 == highest_sha) return;  // the retained message again
  if (next.version <= highest) {
    refuse(next.shadow_id, next.version, -1,
           "the shadow state is refused: its version " + std::to_string(next.version) + " is not above " +
               std::to_string(highest) + ", the highest this device took (a replay, or a stale signer)");
    return;
  }
  if (shadow_state_expired(next, now_ms() / 1000)) {
    refuse(next.shadow_id, next.version, -1,
           "the shadow state is refused: it expired at " + std::to_string(next.not_after) +
               " (not_after, Unix seconds); sign a new one");
    return;
  }
  // Taken: the floor first, so a crash between the two never lets this version in twice.
  file_write_atomic(floor_path, nlohmann::json{{"v", 1}, {"highest_version", next.version},
                                               {"signed_sha256", next.signed_sha256}}.dump() + "\n");
  if (state_) shadow_end(next.action == c::SHADOW_ACTION_STOP ? c::SHADOW_END_STOPPED : c::SHADOW_END_SUPERSEDED);
  if (next.action == c::SHADOW_ACTION_STOP) return;
  state_ = next;
  state_envelope_ = payload;
  done_.assign(next.candidates.size(), false);
  state_save();
  log("took shadow " + next.shadow_id + " (version " + std::to_string(next.version) + ", " +
      std::to_string(next.candidates.size()) + " candidate(s))");
}

void ShadowRunner::state_save() {
  const std::string path = (fs::path(dir_) / STATE_FILE).string();
  if (!state_) {
    std::error_code ec;
    fs::remove(path, ec);
    return;
  }
  nlohmann::json done = nlohmann::json::array();
  for (const bool d : done_) done.push_back(d);
  file_write_atomic(path, nlohmann::json{{"v", 1}, {"envelope", state_envelope_}, {"done", done}}.dump() + "\n");
}

void ShadowRunner::schedule() {
  if (!state_) return;
  const int32_t at = shadow_state_candidate_at(*state_, now_ms());
  if (running_ >= 0 && at != running_) candidate_end("", "", "");
  if (at == -2) {
    shadow_end(c::SHADOW_END_DURATION);
    return;
  }
  if (at >= 0 && running_ < 0 && !done_[static_cast<size_t>(at)]) candidate_begin(static_cast<size_t>(at));
}

void ShadowRunner::slot_clean(const std::string& keep) {
  std::error_code ec;
  for (const fs::directory_entry& entry : fs::directory_iterator(dir_, ec)) {
    const std::string name = entry.path().filename().string();
    if (name == STATE_FILE || name == FLOOR_FILE || (!keep.empty() && name == keep)) continue;
    remove_tree(entry.path().string());
  }
}

std::string ShadowRunner::candidate_fetch(size_t index) {
  const DesiredArtifact& artifact = state_->candidates[index];
  const uint64_t budget = std::min<uint64_t>(state_->max_bytes, options_.max_bytes);
  if (artifact.size > budget) {
    throw Error(ERROR_CODE_INTEGRITY, "candidate " + std::to_string(index) + " (" + artifact.name + ") is " +
                                          std::to_string(artifact.size) + " bytes, over the shadow slot's budget of " +
                                          std::to_string(budget) + " bytes (the smaller of the shadow state's max_bytes "
                                          "and the agent's --shadow-max-bytes)");
  }
  const std::string part_name = artifact.sha256 + ".tar.part";
  const std::string part = (fs::path(dir_) / part_name).string();
  slot_clean(part_name);
  DownloadOptions download;
  download.url = artifact.url;
  download.part_path = part;
  download.expected_size = artifact.size;
  download.max_bytes = budget;
  download.timeout_s = options_.download_timeout_s;
  download.cancelled = [this] {
    std::lock_guard<std::mutex> lock(mutex_);
    return stopping_;
  };
  download.log = [this](const std::string& line) { log("download: " + line); };
  download.tls_cafile = options_.tls_cafile;
  download.tls_certfile = options_.tls_certfile;
  download.tls_keyfile = options_.tls_keyfile;
  download_file(download);
  const std::string sha = sha256_file(part);
  if (sha != artifact.sha256) {
    remove_tree(part);
    throw Error(ERROR_CODE_INTEGRITY, "the downloaded candidate's SHA-256 is " + sha + ", not the " + artifact.sha256 +
                                          " the shadow state names");
  }
  const std::string staging = (fs::path(dir_) / STAGING_DIR).string();
  const std::string slot = (fs::path(dir_) / SLOT_DIR).string();
  remove_tree(staging);
  archive_extract(part, staging, budget - artifact.size);
  remove_tree(part);
  std::error_code ec;
  fs::rename(staging, slot, ec);
  if (ec) throw Error(ERROR_CODE_IO, "cannot move the candidate into the shadow slot (" + ec.message() + ")");
  return slot;
}

void ShadowRunner::candidate_begin(size_t index) {
  const int32_t i = static_cast<int32_t>(index);
  const DesiredArtifact& artifact = state_->candidates[index];
  const auto give_up = [&](const char* event, const std::string& why) {
    slot_clean("");
    done_[index] = true;
    state_save();
    if (std::string(event) == c::EVENT_KIND_SHADOW_REFUSED) {
      refuse(state_->shadow_id, state_->version, i, why);
    } else {
      nlohmann::json d = report_details(i);
      d[c::F_SHADOW_REPORT_ERROR] = why.substr(0, c::MAX_ERROR);
      report(event, why.substr(0, c::MAX_MESSAGE), d);
    }
  };
  std::string slot;
  try {
    slot = candidate_fetch(index);
  } catch (const Error& e) {
    give_up(e.code() == ERROR_CODE_INTEGRITY ? c::EVENT_KIND_SHADOW_REFUSED : c::EVENT_KIND_SHADOW_FAILED, e.what());
    return;
  }
  // Verify and self-test in a child process, as a deployment does.
  ChildProcessVerifier verifier(options_.executable, options_.build_keys, options_.check_timeout_s,
                                [this] {
                                  std::lock_guard<std::mutex> lock(mutex_);
                                  return stopping_;
                                },
                                options_.backend_path);
  const ArtifactCheck check = verifier.verifier_check(DEPLOY_CHECK_SELF_TEST, slot);
  if (!check.passed) {
    give_up(c::EVENT_KIND_SHADOW_REFUSED, "candidate " + std::to_string(index) + " (" + artifact.name +
                                              ") failed its check: " + check.message);
    return;
  }
  if (check.manifest_sha256 != artifact.manifest_sha256) {
    give_up(c::EVENT_KIND_SHADOW_REFUSED, "candidate " + std::to_string(index) + "'s manifest SHA-256 is " +
                                              check.manifest_sha256 + ", not the " + artifact.manifest_sha256 +
                                              " the shadow state names");
    return;
  }
  const std::shared_ptr<Session> serving = serving_();
  std::unique_ptr<ShadowSummary> summary;
  try {
    const Manifest candidate = manifest_parse(
        file_read((fs::path(slot) / "manifest.json").string(), STATE_MAX_BYTES * 16, ERROR_CODE_INTEGRITY, "the candidate's manifest"));
    const std::string problem = shadow_signature_problem(serving->session_manifest(), candidate);
    if (!problem.empty()) {
      give_up(c::EVENT_KIND_SHADOW_REFUSED, "candidate " + std::to_string(index) + " (" + artifact.name +
                                                ") cannot shadow the serving model: " + problem);
      return;
    }
    ShadowChildOptions child;
    child.executable = options_.executable;
    child.artifact_dir = slot;
    // Paired timing: the child runs the serving artifact too, beside the candidate, so the latency
    // ratio compares two run times taken under the same scheduling (docs/shadow.md).
    child.paired_dir = serving->session_artifact_dir();
    child.build_keys = options_.build_keys;
    child.backend_path = options_.backend_path;
    child.threads = std::max<int32_t>(1, candidate.target_threads);
    child.run_timeout_s = options_.run_timeout_s;
    child.start_timeout_s = options_.check_timeout_s;
    child_ = std::make_unique<ShadowChild>(child);
    summary = std::make_unique<ShadowSummary>(serving->session_manifest(), child_->shadow_manifest(), now_ms());
    if (!child_->shadow_paired_problem().empty()) {
      log("candidate " + std::to_string(index) + " runs without paired timing (its windows carry no paired "
          "serving latency): the shadow child cannot open the serving artifact: " + child_->shadow_paired_problem());
    }
  } catch (const ShadowChildDied& e) {
    child_.reset();
    give_up(c::EVENT_KIND_SHADOW_FAILED, e.what());
    return;
  } catch (const Error& e) {
    child_.reset();
    give_up(c::EVENT_KIND_SHADOW_REFUSED, e.what());
    return;
  }
  running_ = i;
  compared_to_ = serving;
  serving_sha256_ = sha256_string(serving->session_manifest_json());
  candidate_sha256_ = child_->shadow_manifest_sha256();
  cpu_at_window_ = child_->shadow_cpu_seconds();
  window_due_ms_ = now_ms() + static_cast<int64_t>(options_.interval_s * 1000.0);
  run_allowed_at_ = std::chrono::steady_clock::now();
  auto live = std::make_shared<Live>();
  live->serving = serving.get();
  live->summary = std::move(summary);
  live->sample = state_->sample;
  live->queue_max = static_cast<size_t>(state_->queue);
  {
    std::lock_guard<std::mutex> lock(offer_mutex_);
    live_ = live;
    live_id_ = state_->shadow_id;
  }
  active_ = true;
  nlohmann::json d = report_details(i);
  d[c::F_SHADOW_REPORT_RSS_INCREASE_BYTES] = child_->shadow_rss_increase_bytes();
  report(c::EVENT_KIND_SHADOW_STARTED,
         "candidate " + std::to_string(index) + " (" + artifact.name + ") shadows " + serving->session_manifest().name, d);
}

void ShadowRunner::window_publish() {
  std::shared_ptr<Live> live;
  {
    std::lock_guard<std::mutex> lock(offer_mutex_);
    live = live_;
  }
  if (!live || !child_) return;
  const int64_t now = now_ms();
  nlohmann::json body = live->summary->shadow_window_close(now);
  const double cpu = child_->shadow_cpu_seconds();
  body[c::F_SHADOW_WINDOW_SHADOW_ID] = state_->shadow_id;
  body[c::F_SHADOW_WINDOW_SHADOW_VERSION] = state_->version;
  body[c::F_SHADOW_WINDOW_CANDIDATE] = running_.load();
  body[c::F_SHADOW_WINDOW_CANDIDATE_SHA256] = candidate_sha256_;
  body[c::F_SHADOW_WINDOW_SERVING_SHA256] = serving_sha256_;
  body[c::F_SHADOW_WINDOW_RSS_INCREASE_BYTES] = child_->shadow_rss_increase_bytes();
  body[c::F_SHADOW_WINDOW_CPU_SECONDS] = std::max(0.0, cpu - cpu_at_window_);
  cpu_at_window_ = cpu;
  window_due_ms_ = now + static_cast<int64_t>(options_.interval_s * 1000.0);
  if (reporter_ == nullptr) return;
  try {
    reporter_->shadow_report_window(body);
  } catch (const std::exception& e) {
    log(std::string("a shadow window was not stored: ") + e.what());
  }
}

void ShadowRunner::sample_run() {
  std::shared_ptr<Live> live;
  Sample sample;
  {
    std::lock_guard<std::mutex> lock(offer_mutex_);
    live = live_;
    if (!live || live->queue.empty()) return;
    sample = std::move(live->queue.front());
    live->queue.pop_front();
  }
  const auto started = std::chrono::steady_clock::now();
  try {
    const ShadowRunResult result = child_->shadow_run(sample.inputs);
    live->summary->shadow_add(sample.outputs, sample.serving_us, result.outputs, result.latency_us,
                              result.paired_serving_us);
    if (options_.on_disagreement && !sample.captured && compared_to_) {
      int64_t serving_top1 = -1, candidate_top1 = -1;
      double confidence = 0.0;
      const Manifest& manifest = compared_to_->session_manifest();
      if (capture_confidence(manifest, sample.outputs, &serving_top1, &confidence) &&
          capture_confidence(manifest, result.outputs, &candidate_top1, &confidence) && serving_top1 != candidate_top1) {
        options_.on_disagreement(*compared_to_, sample.inputs, sample.outputs);
      }
    }
    std::lock_guard<std::mutex> lock(offer_mutex_);
    live->samples += 1;
  } catch (const ShadowChildDied& e) {
    live->summary->shadow_error();
    candidate_end(c::EVENT_KIND_SHADOW_FAILED, "", e.what());
    return;
  } catch (const Error& e) {
    live->summary->shadow_error();
  }
  // The CPU share: after a run of wall time t, rest t * (1/share - 1).
  const auto took = std::chrono::steady_clock::now() - started;
  run_allowed_at_ = std::chrono::steady_clock::now() +
                    std::chrono::duration_cast<std::chrono::steady_clock::duration>(took * (1.0 / state_->cpu_share - 1.0));
}

void ShadowRunner::candidate_end(const std::string& event, const std::string& reason, const std::string& error) {
  if (running_ < 0) return;
  const int32_t index = running_;
  window_publish();  // the turn's last (partial) window
  {
    std::lock_guard<std::mutex> lock(offer_mutex_);
    live_.reset();
  }
  active_ = false;
  child_.reset();
  compared_to_.reset();
  running_ = -1;
  done_[static_cast<size_t>(index)] = true;
  state_save();
  slot_clean("");
  if (!event.empty()) {
    nlohmann::json d = report_details(index);
    if (!reason.empty()) d[c::F_SHADOW_REPORT_REASON] = reason;
    if (!error.empty()) d[c::F_SHADOW_REPORT_ERROR] = error.substr(0, c::MAX_ERROR);
    report(event, (error.empty() ? "candidate " + std::to_string(index) + " ended" : error).substr(0, c::MAX_MESSAGE), d);
  }
}

void ShadowRunner::shadow_end(const std::string& reason) {
  if (!state_) return;
  candidate_end("", "", "");
  nlohmann::json d = report_details(-1);
  d[c::F_SHADOW_REPORT_REASON] = reason;
  report(c::EVENT_KIND_SHADOW_ENDED, "shadow " + state_->shadow_id + " ended (" + reason + ")", d);
  state_.reset();
  state_envelope_.clear();
  done_.clear();
  state_save();
  slot_clean("");
}

}  // namespace edgesmith
