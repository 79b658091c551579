// Traffic statistics of a Session, shaped by the manifest's `monitoring` section so a monitor can
// compare a device's traffic with what the build saw (docs/artifact.md).
//
// Recording is lock-free (relaxed atomics): many threads record at once while a reader takes a
// snapshot, which is consistent per counter, not across counters.
//
// Large outputs are sampled, so a run's summary costs the same for a 1x10 classifier and a
// 1x21x512x512 segmentation map: at most `sample_limit` values (histograms) or values' worth of
// rows (class counts) are binned per run, evenly strided with an offset that moves from run to
// run, so over many runs every element position is visited. `seen` and `binned` say how many.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "artifact/manifest.h"
#include "runtime/tensor.h"

namespace edgesmith {

/// A snapshot of one monitored output's summary.
struct OutputSummary {
  std::string name;
  MonitorKind kind = MONITOR_KIND_CLASSES;
  std::vector<uint64_t> counts;  ///< per class, or per histogram bin
  uint64_t underflow = 0;        ///< histogram: values below edges[0]
  uint64_t overflow = 0;         ///< histogram: values >= edges.back(); classes: arg-max >= classes
  uint64_t nan = 0;              ///< histogram: NaN values; classes: rows that are all NaN
  uint64_t seen = 0;             ///< values (histogram) or rows (classes) the runs produced
  uint64_t binned = 0;           ///< how many of them were binned (the rest skipped by sampling)
};

/// Default number of values a run's output summary reads at most (see the file comment).
constexpr uint64_t STATS_SAMPLE_LIMIT = 1024;

/// A snapshot of a Session's statistics.
struct StatsSnapshot {
  uint64_t runs = 0;              ///< successful runs
  uint64_t errors = 0;            ///< failed runs (input mismatch or backend failure)
  uint64_t nan_input_runs = 0;    ///< successful runs with at least one NaN in a float input
  uint64_t nan_input_values = 0;  ///< NaN input elements over all successful runs
  ManifestLatencyBuckets latency_buckets;  ///< how the latency buckets are laid out
  std::vector<uint64_t> latency_counts;    ///< one per bucket
  uint64_t latency_underflow = 0;          ///< runs faster than start_us
  uint64_t latency_overflow = 0;           ///< runs slower than the last bucket's upper edge
  double latency_sum_us = 0.0;             ///< sum over successful runs
  double latency_max_us = 0.0;             ///< slowest successful run
  std::vector<OutputSummary> outputs;      ///< one per `monitoring.outputs` entry
};

/// The latency below which a fraction `q` (0..1) of runs fell, estimated from the histogram
/// (log-linear interpolation inside a bucket); 0 when nothing was recorded.
double stats_percentile_us(const StatsSnapshot& snapshot, double q);

/// The latency bucket of one run: -1 below `start_us` (or NaN), `count` at or past the last
/// bucket's upper edge, else k with start_us * factor^k <= latency_us < start_us * factor^(k+1).
/// `log_factor` is std::log(factor). What Stats records; the monitor bins with it too.
int64_t stats_latency_bucket(double latency_us, double start_us, double log_factor, int64_t count);

/// The q-quantiles of a latency histogram (one count per bucket, plus underflow and overflow):
/// the rank q * n falls in the first non-empty bucket whose running total reaches it and is
/// interpolated log-linearly inside it, capped at `max_us` when it is > 0; a rank inside the
/// underflow gives start_us, one past the buckets `max_us`. NaN for each q of an empty histogram.
/// stats_percentile_us applies it; the monitor (merged windows) applies it through the binding.
std::vector<double> stats_percentiles_us(const std::vector<uint64_t>& counts, uint64_t underflow, uint64_t overflow,
                                         const ManifestLatencyBuckets& buckets, double max_us,
                                         const std::vector<double>& qs);

/// Summarises a session's traffic.
class Stats {
 public:
  /// Counters laid out for `monitoring`; `outputs` are the manifest's outputs (for their order).
  /// `sample_limit` bounds the values read per output per run (0: read every value).
  Stats(const ManifestMonitoring& monitoring, const std::vector<ManifestTensor>& outputs,
        uint64_t sample_limit = STATS_SAMPLE_LIMIT);

  /// Record one successful run: its latency, the NaN input elements, and its outputs
  /// (in manifest order) for the monitored summaries.
  void stats_record(double latency_us, uint64_t nan_input_values,
                    const std::vector<Tensor>& outputs);

  /// Record one failed run.
  void stats_record_error() noexcept;

  /// A copy of the counters.
  StatsSnapshot stats_snapshot() const;

 private:
  struct Counters {
    explicit Counters(size_t n) : size(n), values(new std::atomic<uint64_t>[n]) {
      for (size_t i = 0; i < n; ++i) values[i].store(0, std::memory_order_relaxed);
    }
    void add(size_t i, uint64_t by = 1) noexcept { values[i].fetch_add(by, std::memory_order_relaxed); }
    std::vector<uint64_t> load() const;
    size_t size;
    std::unique_ptr<std::atomic<uint64_t>[]> values;
  };

  struct OutputMonitorState {
    ManifestOutputMonitor monitor;
    size_t output_index = 0;  ///< position in the manifest's outputs
    Counters counts;          ///< per class / bin, then underflow, overflow, nan, seen, binned
  };

  void output_record(OutputMonitorState& state, const Tensor& output, uint64_t run);

  ManifestLatencyBuckets latency_;
  double log_factor_;
  uint64_t sample_limit_;
  std::atomic<uint64_t> runs_{0};
  std::atomic<uint64_t> errors_{0};
  std::atomic<uint64_t> nan_input_runs_{0};
  std::atomic<uint64_t> nan_input_values_{0};
  std::atomic<uint64_t> latency_sum_ns_{0};
  std::atomic<uint64_t> latency_max_ns_{0};
  Counters latency_counts_;  ///< buckets, then underflow, overflow
  std::vector<std::unique_ptr<OutputMonitorState>> monitors_;
};

}  // namespace edgesmith
