#include "runtime/stats.h"

#include <algorithm>
#include <cmath>

#include "runtime/values.h"

namespace edgesmith {

std::vector<uint64_t> Stats::Counters::load() const {
  std::vector<uint64_t> out(size);
  for (size_t i = 0; i < size; ++i) out[i] = values[i].load(std::memory_order_relaxed);
  return out;
}

namespace {

// Slots after the bins in OutputMonitorState::counts.
constexpr size_t SLOT_UNDERFLOW = 0;
constexpr size_t SLOT_OVERFLOW = 1;
constexpr size_t SLOT_NAN = 2;
constexpr size_t SLOT_SEEN = 3;
constexpr size_t SLOT_BINNED = 4;
constexpr size_t EXTRA_SLOTS = 5;

// Histogram values are sampled in chunks of this many neighbours.
constexpr size_t HISTOGRAM_CHUNK = 64;

// Which of `count` items a run reads: all when they fit in `budget`, else every `stride`-th from
// `offset`, where the offset moves with the run number (a prime step) to visit every position.
struct Sample {
  size_t offset = 0;
  size_t stride = 1;
};

Sample sample_plan(size_t count, size_t budget, uint64_t run) {
  if (budget == 0 || count <= budget) return {};
  Sample sample;
  sample.stride = (count + budget - 1) / budget;
  sample.offset = static_cast<size_t>((run * 7919u) % sample.stride);
  return sample;
}

}  // namespace

Stats::Stats(const ManifestMonitoring& monitoring, const std::vector<ManifestTensor>& outputs,
             uint64_t sample_limit)
    : latency_(monitoring.latency),
      log_factor_(std::log(monitoring.latency.factor)),
      sample_limit_(sample_limit),
      latency_counts_(static_cast<size_t>(monitoring.latency.count) + 2) {
  for (const ManifestOutputMonitor& monitor : monitoring.outputs) {
    const auto it = std::find_if(outputs.begin(), outputs.end(),
                                 [&](const ManifestTensor& t) { return t.name == monitor.name; });
    if (it == outputs.end()) continue;  // the manifest reader rejects this already
    const size_t bins = monitor.kind == MONITOR_KIND_CLASSES ? static_cast<size_t>(monitor.classes)
                                                             : monitor.edges.size() - 1;
    auto state = std::unique_ptr<OutputMonitorState>(
        new OutputMonitorState{monitor, static_cast<size_t>(it - outputs.begin()), Counters(bins + EXTRA_SLOTS)});
    monitors_.push_back(std::move(state));
  }
}

void Stats::stats_record(double latency_us, uint64_t nan_input_values,
                         const std::vector<Tensor>& outputs) {
  const uint64_t run = runs_.fetch_add(1, std::memory_order_relaxed);
  if (nan_input_values > 0) {
    nan_input_runs_.fetch_add(1, std::memory_order_relaxed);
    nan_input_values_.fetch_add(nan_input_values, std::memory_order_relaxed);
  }
  const auto ns = static_cast<uint64_t>(std::max(0.0, latency_us) * 1000.0);
  latency_sum_ns_.fetch_add(ns, std::memory_order_relaxed);
  uint64_t max = latency_max_ns_.load(std::memory_order_relaxed);
  while (ns > max && !latency_max_ns_.compare_exchange_weak(max, ns, std::memory_order_relaxed)) {
  }

  const auto count = static_cast<size_t>(latency_.count);
  const int64_t bucket = stats_latency_bucket(latency_us, latency_.start_us, log_factor_, latency_.count);
  if (bucket < 0) {
    latency_counts_.add(count);  // underflow (and NaN, which cannot happen with steady_clock)
  } else {
    latency_counts_.add(bucket >= latency_.count ? count + 1 : static_cast<size_t>(bucket));
  }

  for (const auto& state : monitors_) {
    if (state->output_index < outputs.size()) output_record(*state, outputs[state->output_index], run);
  }
}

void Stats::output_record(OutputMonitorState& state, const Tensor& output, uint64_t run) {
  const ManifestOutputMonitor& monitor = state.monitor;
  const size_t bins = state.counts.size - EXTRA_SLOTS;
  // Counted locally, then added to the shared atomics once per non-empty slot. The scratch is the
  // calling thread's, reused run after run: no allocation on the inference path.
  thread_local std::vector<uint64_t> local;
  local.assign(state.counts.size, 0);
  const auto numel = static_cast<size_t>(shape_numel(output.shape()));
  const void* data = output.data();
  if (monitor.kind == MONITOR_KIND_CLASSES) {
    const size_t row = output.shape().empty() ? 1 : static_cast<size_t>(output.shape().back());
    if (row == 0) return;
    const size_t rows = numel / row;
    const size_t budget = sample_limit_ == 0 ? 0 : std::max<size_t>(1, sample_limit_ / row);
    const Sample sample = sample_plan(rows, budget, run);
    for (size_t r = sample.offset; r < rows; r += sample.stride) {
      const size_t start = r * row;
      size_t best = row;
      double best_value = 0.0;
      for (size_t i = 0; i < row; ++i) {
        const double value = value_load(data, output.dtype(), start + i);
        if (std::isnan(value)) continue;
        if (best == row || value > best_value) {
          best = i;
          best_value = value;
        }
      }
      ++local[bins + SLOT_BINNED];
      if (best == row) {
        ++local[bins + SLOT_NAN];  // an all-NaN row
      } else if (best >= bins) {
        ++local[bins + SLOT_OVERFLOW];
      } else {
        ++local[best];
      }
    }
    local[bins + SLOT_SEEN] = rows;
  } else {
    // Sampled in runs of HISTOGRAM_CHUNK neighbours: a few cache lines per chunk instead of one
    // cache (and TLB) miss per value.
    const std::vector<double>& edges = monitor.edges;
    const size_t chunks = (numel + HISTOGRAM_CHUNK - 1) / HISTOGRAM_CHUNK;
    const size_t budget = sample_limit_ == 0 ? 0 : std::max<size_t>(1, sample_limit_ / HISTOGRAM_CHUNK);
    const Sample sample = sample_plan(chunks, budget, run);
    for (size_t c = sample.offset; c < chunks; c += sample.stride) {
      for (size_t i = c * HISTOGRAM_CHUNK; i < std::min(numel, (c + 1) * HISTOGRAM_CHUNK); ++i) {
        const double value = value_load(data, output.dtype(), i);
        ++local[bins + SLOT_BINNED];
        if (std::isnan(value)) {
          ++local[bins + SLOT_NAN];
        } else if (value < edges.front()) {
          ++local[bins + SLOT_UNDERFLOW];
        } else if (value >= edges.back()) {
          ++local[bins + SLOT_OVERFLOW];
        } else {
          const auto bin = std::upper_bound(edges.begin(), edges.end(), value) - edges.begin() - 1;
          ++local[static_cast<size_t>(bin)];
        }
      }
    }
    local[bins + SLOT_SEEN] = numel;
  }
  for (size_t i = 0; i < local.size(); ++i) {
    if (local[i] != 0) state.counts.add(i, local[i]);
  }
}

void Stats::stats_record_error() noexcept { errors_.fetch_add(1, std::memory_order_relaxed); }

StatsSnapshot Stats::stats_snapshot() const {
  StatsSnapshot out;
  out.runs = runs_.load(std::memory_order_relaxed);
  out.errors = errors_.load(std::memory_order_relaxed);
  out.nan_input_runs = nan_input_runs_.load(std::memory_order_relaxed);
  out.nan_input_values = nan_input_values_.load(std::memory_order_relaxed);
  out.latency_buckets = latency_;
  std::vector<uint64_t> latency = latency_counts_.load();
  out.latency_overflow = latency.back();
  latency.pop_back();
  out.latency_underflow = latency.back();
  latency.pop_back();
  out.latency_counts = std::move(latency);
  out.latency_sum_us = static_cast<double>(latency_sum_ns_.load(std::memory_order_relaxed)) / 1000.0;
  out.latency_max_us = static_cast<double>(latency_max_ns_.load(std::memory_order_relaxed)) / 1000.0;
  for (const auto& state : monitors_) {
    OutputSummary summary;
    summary.name = state->monitor.name;
    summary.kind = state->monitor.kind;
    std::vector<uint64_t> counts = state->counts.load();
    const size_t bins = counts.size() - EXTRA_SLOTS;
    summary.underflow = counts[bins + SLOT_UNDERFLOW];
    summary.overflow = counts[bins + SLOT_OVERFLOW];
    summary.nan = counts[bins + SLOT_NAN];
    summary.seen = counts[bins + SLOT_SEEN];
    summary.binned = counts[bins + SLOT_BINNED];
    counts.resize(bins);
    summary.counts = std::move(counts);
    out.outputs.push_back(std::move(summary));
  }
  return out;
}

int64_t stats_latency_bucket(double latency_us, double start_us, double log_factor, int64_t count) {
  if (!(latency_us >= start_us)) return -1;
  const double k = std::floor(std::log(latency_us / start_us) / log_factor);
  return k >= static_cast<double>(count) ? count : static_cast<int64_t>(k);
}

std::vector<double> stats_percentiles_us(const std::vector<uint64_t>& counts, uint64_t underflow, uint64_t overflow,
                                         const ManifestLatencyBuckets& b, double max_us,
                                         const std::vector<double>& qs) {
  uint64_t total = underflow + overflow;
  for (const uint64_t c : counts) total += c;
  std::vector<double> out;
  out.reserve(qs.size());
  for (const double q : qs) {
    if (total == 0) {
      out.push_back(std::nan(""));
      continue;
    }
    const double rank = std::clamp(q, 0.0, 1.0) * static_cast<double>(total);
    double seen = static_cast<double>(underflow);
    if (rank <= seen && underflow > 0) {
      out.push_back(b.start_us);
      continue;
    }
    double value = max_us;
    for (size_t k = 0; k < counts.size(); ++k) {
      const auto count = static_cast<double>(counts[k]);
      if (count > 0 && rank <= seen + count) {
        const double fraction = (rank - seen) / count;
        const double low = b.start_us * std::pow(b.factor, static_cast<double>(k));
        const double estimate = low * std::pow(b.factor, fraction);
        value = max_us > 0.0 ? std::min(estimate, max_us) : estimate;
        break;
      }
      seen += count;
    }
    out.push_back(value);
  }
  return out;
}

double stats_percentile_us(const StatsSnapshot& snapshot, double q) {
  const double value = stats_percentiles_us(snapshot.latency_counts, snapshot.latency_underflow,
                                            snapshot.latency_overflow, snapshot.latency_buckets,
                                            snapshot.latency_max_us, {q})[0];
  return std::isnan(value) ? 0.0 : value;
}

}  // namespace edgesmith
