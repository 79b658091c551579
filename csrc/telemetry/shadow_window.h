// A shadow candidate against the serving model (docs/shadow.md): whether the candidate can shadow
// it at all (the signature rule, applied on the device and, through the binding, centrally), and
// the figures of one `shadow` message, window by window.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "artifact/manifest.h"
#include "runtime/stats.h"
#include "runtime/tensor.h"

namespace edgesmith {

/// Why `candidate` cannot shadow `serving` ("" when it can): the same inputs (names, dtypes,
/// shapes, in order) and the same outputs (names, dtypes, shapes, in order). One sentence naming
/// the first difference and both sides. The device applies it before running a candidate; the
/// central side applies the same rule (through the binding) before it signs a shadow.
std::string shadow_signature_problem(const Manifest& serving, const Manifest& candidate);

/// One shadow candidate's figures, window by window: what a `shadow` message holds
/// (runtime/contract.py ShadowWindow, ShadowOutput). Thread-safe: offered/dropped/error are
/// called from serving threads (lock-free), add from the shadow worker, close from the reporter.
/// The candidate must pass shadow_signature_problem against the serving model (the constructor
/// throws Error(ERROR_CODE_INVALID_ARGUMENT) with that sentence otherwise).
class ShadowSummary {
 public:
  /// Start the first window at `start_ms`.
  ShadowSummary(const Manifest& serving, const Manifest& candidate, int64_t start_ms);
  ~ShadowSummary();
  ShadowSummary(const ShadowSummary&) = delete;
  ShadowSummary& operator=(const ShadowSummary&) = delete;

  /// A served request was sampled for the shadow.
  void shadow_offered(uint64_t n = 1) noexcept;
  /// A sampled request was dropped (queue full, CPU share used up).
  void shadow_dropped(uint64_t n = 1) noexcept;
  /// The candidate failed on a sample.
  void shadow_error() noexcept;
  /// One sample run by both: the serving outputs and run time, the candidate's outputs and run
  /// time (outputs in manifest order), and the serving model's run time beside the candidate
  /// (paired timing: in the shadow child, back to back with it; < 0: not measured). Outputs whose
  /// shape or dtype differ from the manifests are counted as an error of the candidate, never
  /// compared.
  void shadow_add(const std::vector<Tensor>& serving_outputs, double serving_us,
                  const std::vector<Tensor>& candidate_outputs, double candidate_us,
                  double paired_serving_us = -1);
  /// The ShadowWindow fields window_start_ms, window_end_ms, offered, samples, dropped, errors,
  /// latency, serving_latency, paired_samples and paired_serving_latency (once a paired time was
  /// added), outputs (everything but the envelope, shadow_id, shadow_version,
  /// candidate, candidate_sha256, serving_sha256, rss_increase_bytes and cpu_seconds) for the
  /// window ending at `end_ms`; the next window starts there.
  nlohmann::json shadow_window_close(int64_t end_ms);

 private:
  struct OutputState;
  std::atomic<uint64_t> offered_{0};
  std::atomic<uint64_t> dropped_{0};
  std::atomic<uint64_t> errors_{0};
  std::mutex mutex_;  ///< guards everything below (shadow_add against shadow_window_close)
  int64_t start_ms_;
  uint64_t samples_ = 0;
  uint64_t paired_samples_ = 0;  ///< of samples_, with a paired serving time
  bool paired_seen_ = false;     ///< a paired time was ever added: the windows carry the paired fields
  Stats serving_stats_;    ///< serving run times (the serving manifest's latency layout)
  Stats candidate_stats_;  ///< candidate run times (serving layout) and its own output summaries
  Stats paired_stats_;     ///< the serving model's run times in the shadow child (paired timing)
  StatsSnapshot serving_before_;
  StatsSnapshot paired_before_;
  StatsSnapshot candidate_before_;
  std::vector<ManifestTensor> serving_outputs_;
  std::vector<ManifestTensor> candidate_outputs_;
  std::vector<std::unique_ptr<OutputState>> outputs_;  ///< one per output, manifest order
};

}  // namespace edgesmith
