// The window summariser: one telemetry message's body from two snapshots of a Session's
// statistics taken an interval apart (docs/telemetry.md, kind `telemetry`), plus the process's
// RSS and CPU time and the board's temperature.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "runtime/stats.h"

namespace edgesmith {

/// The process's resource use (cumulative), read from /proc/self.
struct ProcessSample {
  uint64_t rss_bytes = 0;    ///< resident set size now
  double cpu_seconds = 0.0;  ///< user + system CPU time since the process started
};

/// Read /proc/self/statm and /proc/self/stat (zeros where they cannot be read).
ProcessSample process_sample();

/// The hottest of `<thermal_root>/thermal_zone*/temp` in °C, or nothing when the board has none.
std::optional<double> temperature_read(const std::string& thermal_root = "/sys/class/thermal");

/// `after` minus `before`, counter by counter (the layout is `after`'s). The window's
/// latency_max_us is exact when the slowest run so far happened in the window (the cumulative
/// maximum grew); otherwise it is the upper edge of the window's slowest non-empty bucket,
/// capped by the cumulative maximum.
StatsSnapshot stats_delta(const StatsSnapshot& before, const StatsSnapshot& after);

/// A window's latency histogram as a telemetry message holds it (LatencyWindow: counts, underflow,
/// overflow, sum_us, max_us, p50/p95/p99_us; every number finite).
nlohmann::json latency_window_json(const StatsSnapshot& delta);

/// One monitored output's window as a telemetry message holds it (OutputWindow).
nlohmann::json output_window_json(const OutputSummary& delta);

/// Summarises a Session window by window.
class WindowSummariser {
 public:
  /// Start the first window at `start_ms` from `stats` and `process`.
  WindowSummariser(const StatsSnapshot& stats, const ProcessSample& process, int64_t start_ms);

  /// Close the window at `end_ms`: the telemetry fields runs .. process (everything but the
  /// envelope, artifact_sha256, temperature_c and spool), and start the next window there.
  nlohmann::json window_close(const StatsSnapshot& stats, const ProcessSample& process, int64_t end_ms);

  /// When the current window started (ms since the epoch).
  int64_t window_start_ms() const noexcept { return start_ms_; }

 private:
  StatsSnapshot stats_;
  ProcessSample process_;
  int64_t start_ms_;
};

}  // namespace edgesmith
