#include "telemetry/shadow_window.h"

#include <algorithm>
#include <cmath>

#include "common/contract_words.h"
#include "common/error.h"
#include "runtime/session.h"
#include "runtime/values.h"
#include "telemetry/window.h"

namespace edgesmith {

namespace {

std::string tensor_describe(const ManifestTensor& t) { return "'" + t.name + "' " + t.dtype + " " + shape_format(t.shape); }

std::string names_list(const std::vector<ManifestTensor>& tensors) {
  std::string out;
  for (const ManifestTensor& t : tensors) out += (out.empty() ? "" : ", ") + t.name;
  return "(" + out + ")";
}

// The first difference between two tensor lists ("" when they are the same), `what` = "input".
std::string tensors_problem(const std::vector<ManifestTensor>& serving, const std::vector<ManifestTensor>& candidate,
                            const std::string& what) {
  if (serving.size() != candidate.size()) {
    return "the candidate has " + std::to_string(candidate.size()) + " " + what + "s " + names_list(candidate) +
           " but the serving model has " + std::to_string(serving.size()) + " " + names_list(serving);
  }
  for (size_t i = 0; i < serving.size(); ++i) {
    const ManifestTensor& s = serving[i];
    const ManifestTensor& c = candidate[i];
    if (s.name != c.name || s.dtype != c.dtype || s.shape != c.shape) {
      return "the candidate's " + what + " " + std::to_string(i) + " is " + tensor_describe(c) +
             " but the serving model's is " + tensor_describe(s);
    }
  }
  return "";
}

// The contract's bounds (Micros, Count): finite, 0..MAX_MICROS; 0..MAX_SAFE_INT.
double micros(double value) {
  if (!std::isfinite(value)) return value > 0 ? contract::MAX_MICROS : 0.0;
  return std::clamp(value, 0.0, contract::MAX_MICROS);
}
uint64_t count(uint64_t value) { return std::min<uint64_t>(value, contract::MAX_SAFE_INT); }

// Index of the largest non-NaN value of row [start, start + n), or n when every value is NaN
// (Stats' rule: the first of equal maxima).
size_t row_argmax(const Tensor& t, size_t start, size_t n) {
  size_t best = n;
  double best_value = 0.0;
  for (size_t i = 0; i < n; ++i) {
    const double value = value_load(t.data(), t.dtype(), start + i);
    if (std::isnan(value)) continue;
    if (best == n || value > best_value) {
      best = i;
      best_value = value;
    }
  }
  return best;
}

}  // namespace

std::string shadow_signature_problem(const Manifest& serving, const Manifest& candidate) {
  std::string problem = tensors_problem(serving.inputs, candidate.inputs, "input");
  if (problem.empty()) problem = tensors_problem(serving.outputs, candidate.outputs, "output");
  if (problem.empty()) return "";
  return problem + ", so it cannot shadow it (a candidate needs exactly the serving model's inputs and outputs)";
}

// One output's comparison in the current window.
struct ShadowSummary::OutputState {
  std::string name;
  int64_t classes_row = 0;  ///< > 0: a `classes` output of the serving monitoring; values per row
  uint64_t compared = 0;
  uint64_t rows = 0;
  uint64_t agree = 0;
  uint64_t nan = 0;
  double max_abs_err = 0.0;
  double max_abs_serving = 0.0;  ///< max |serving| over the values compared
};

ShadowSummary::ShadowSummary(const Manifest& serving, const Manifest& candidate, int64_t start_ms)
    : start_ms_(start_ms),
      serving_stats_(ManifestMonitoring{{}, serving.monitoring.latency}, serving.outputs),
      candidate_stats_(ManifestMonitoring{candidate.monitoring.outputs, serving.monitoring.latency}, candidate.outputs),
      paired_stats_(ManifestMonitoring{{}, serving.monitoring.latency}, serving.outputs),
      serving_outputs_(serving.outputs),
      candidate_outputs_(candidate.outputs) {
  const std::string problem = shadow_signature_problem(serving, candidate);
  if (!problem.empty()) throw Error(ERROR_CODE_INVALID_ARGUMENT, problem);
  serving_before_ = serving_stats_.stats_snapshot();
  paired_before_ = paired_stats_.stats_snapshot();
  candidate_before_ = candidate_stats_.stats_snapshot();
  for (const ManifestTensor& output : serving.outputs) {
    auto state = std::make_unique<OutputState>();
    state->name = output.name;
    for (const ManifestOutputMonitor& monitor : serving.monitoring.outputs) {
      if (monitor.name == output.name && monitor.kind == MONITOR_KIND_CLASSES) {
        state->classes_row = output.shape.empty() ? 1 : output.shape.back();
      }
    }
    outputs_.push_back(std::move(state));
  }
}

ShadowSummary::~ShadowSummary() = default;

void ShadowSummary::shadow_offered(uint64_t n) noexcept { offered_.fetch_add(n, std::memory_order_relaxed); }

void ShadowSummary::shadow_dropped(uint64_t n) noexcept { dropped_.fetch_add(n, std::memory_order_relaxed); }

void ShadowSummary::shadow_error() noexcept { errors_.fetch_add(1, std::memory_order_relaxed); }

void ShadowSummary::shadow_add(const std::vector<Tensor>& serving_outputs, double serving_us,
                               const std::vector<Tensor>& candidate_outputs, double candidate_us,
                               double paired_serving_us) {
  // Both sides must be what the (equal) output specs say; anything else is not comparable.
  const auto matches = [](const std::vector<Tensor>& got, const std::vector<ManifestTensor>& specs) {
    if (got.size() != specs.size()) return false;
    for (size_t i = 0; i < specs.size(); ++i) {
      if (got[i].shape() != specs[i].shape || dtype_name(got[i].dtype()) != specs[i].dtype) return false;
    }
    return true;
  };
  if (!matches(serving_outputs, serving_outputs_) || !matches(candidate_outputs, candidate_outputs_)) {
    shadow_error();
    return;
  }
  std::lock_guard<std::mutex> lock(mutex_);
  ++samples_;
  serving_stats_.stats_record(serving_us, 0, {});
  candidate_stats_.stats_record(candidate_us, 0, candidate_outputs);
  if (paired_serving_us >= 0 && std::isfinite(paired_serving_us)) {
    paired_stats_.stats_record(paired_serving_us, 0, {});
    ++paired_samples_;
    paired_seen_ = true;
  }
  for (size_t k = 0; k < outputs_.size(); ++k) {
    OutputState& state = *outputs_[k];
    const Tensor& serv = serving_outputs[k];
    const Tensor& cand = candidate_outputs[k];
    const auto numel = static_cast<size_t>(shape_numel(serv.shape()));
    state.compared += numel;
    for (size_t i = 0; i < numel; ++i) {
      const double s = value_load(serv.data(), serv.dtype(), i);
      const double c = value_load(cand.data(), cand.dtype(), i);
      if (!std::isfinite(s)) continue;
      if (!std::isfinite(c)) {
        ++state.nan;
        continue;
      }
      state.max_abs_err = std::max(state.max_abs_err, std::fabs(c - s));
      state.max_abs_serving = std::max(state.max_abs_serving, std::fabs(s));
    }
    if (state.classes_row > 0) {
      const auto row = static_cast<size_t>(state.classes_row);
      const size_t rows = numel / row;
      state.rows += rows;
      for (size_t r = 0; r < rows; ++r) {
        const size_t best = row_argmax(serv, r * row, row);
        if (best != row && best == row_argmax(cand, r * row, row)) ++state.agree;
      }
    } else {
      state.rows += 1;
    }
  }
}

nlohmann::json ShadowSummary::shadow_window_close(int64_t end_ms) {
  namespace c = contract;
  std::lock_guard<std::mutex> lock(mutex_);
  const StatsSnapshot serving_now = serving_stats_.stats_snapshot();
  const StatsSnapshot candidate_now = candidate_stats_.stats_snapshot();
  const StatsSnapshot serving_delta = stats_delta(serving_before_, serving_now);
  const StatsSnapshot paired_now = paired_stats_.stats_snapshot();
  const StatsSnapshot paired_delta = stats_delta(paired_before_, paired_now);
  const StatsSnapshot candidate_delta = stats_delta(candidate_before_, candidate_now);
  nlohmann::json outputs = nlohmann::json::object();
  for (const std::unique_ptr<OutputState>& state : outputs_) {
    nlohmann::json histogram = nullptr;
    for (const OutputSummary& summary : candidate_delta.outputs) {
      if (summary.name == state->name) histogram = output_window_json(summary);
    }
    nlohmann::json output = {
        {c::F_SHADOW_OUTPUT_COMPARED, count(state->compared)},
        {c::F_SHADOW_OUTPUT_ROWS, count(state->rows)},
        {c::F_SHADOW_OUTPUT_MAX_ABS_ERR, micros(state->max_abs_err)},
        {c::F_SHADOW_OUTPUT_MAX_REL_ERR,
         state->max_abs_serving > 0.0 ? micros(state->max_abs_err / state->max_abs_serving) : 0.0},
        {c::F_SHADOW_OUTPUT_NAN, count(state->nan)},
        {c::F_SHADOW_OUTPUT_HISTOGRAM, histogram},
    };
    if (state->classes_row > 0) output[c::F_SHADOW_OUTPUT_AGREE] = count(state->agree);
    outputs[state->name] = output;
    *state = OutputState{state->name, state->classes_row};
  }
  const uint64_t offered = offered_.exchange(0, std::memory_order_relaxed);
  const uint64_t dropped = dropped_.exchange(0, std::memory_order_relaxed);
  const uint64_t errors = errors_.exchange(0, std::memory_order_relaxed);
  nlohmann::json body = {
      {c::F_SHADOW_WINDOW_WINDOW_START_MS, start_ms_},
      {c::F_SHADOW_WINDOW_WINDOW_END_MS, std::max(end_ms, start_ms_)},
      {c::F_SHADOW_WINDOW_OFFERED, count(offered)},
      {c::F_SHADOW_WINDOW_SAMPLES, count(samples_)},
      {c::F_SHADOW_WINDOW_DROPPED, count(dropped)},
      {c::F_SHADOW_WINDOW_ERRORS, count(errors)},
      {c::F_SHADOW_WINDOW_LATENCY, latency_window_json(candidate_delta)},
      {c::F_SHADOW_WINDOW_SERVING_LATENCY, latency_window_json(serving_delta)},
      {c::F_SHADOW_WINDOW_OUTPUTS, outputs},
  };
  if (paired_seen_) {
    body[c::F_SHADOW_WINDOW_PAIRED_SAMPLES] = count(paired_samples_);
    body[c::F_SHADOW_WINDOW_PAIRED_SERVING_LATENCY] = latency_window_json(paired_delta);
  }
  serving_before_ = serving_now;
  candidate_before_ = candidate_now;
  paired_before_ = paired_now;
  samples_ = 0;
  paired_samples_ = 0;
  start_ms_ = std::max(end_ms, start_ms_);
  return body;
}

}  // namespace edgesmith
