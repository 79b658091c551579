#include "telemetry/window.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <system_error>

#include "common/contract_words.h"

namespace edgesmith {

namespace {

// A window's counter: what the cumulative counter gained, saturated at the contract's MAX_WINDOW_COUNT
// (far beyond any real window; the monitor refuses more, so a window over it would not be sent at all).
uint64_t minus(uint64_t after, uint64_t before) {
  return after >= before ? std::min<uint64_t>(after - before, contract::MAX_WINDOW_COUNT) : 0;
}

std::vector<uint64_t> minus(const std::vector<uint64_t>& after, const std::vector<uint64_t>& before) {
  std::vector<uint64_t> out(after.size());
  for (size_t i = 0; i < after.size(); ++i) out[i] = minus(after[i], i < before.size() ? before[i] : 0);
  return out;
}

// JSON numbers must be finite (the schema's Finite).
double finite(double value) { return std::isfinite(value) ? value : 0.0; }

}  // namespace

ProcessSample process_sample() {
  ProcessSample sample;
  const long page = sysconf(_SC_PAGESIZE);
  const long ticks = sysconf(_SC_CLK_TCK);
  std::ifstream statm("/proc/self/statm");
  uint64_t size_pages = 0;
  uint64_t resident_pages = 0;
  if (statm >> size_pages >> resident_pages && page > 0) {
    sample.rss_bytes = resident_pages * static_cast<uint64_t>(page);
  }
  // /proc/self/stat: "pid (comm) state ..."; comm may hold spaces, so fields are counted after
  // the last ')'. utime and stime are fields 14 and 15.
  std::ifstream stat("/proc/self/stat");
  std::string text((std::istreambuf_iterator<char>(stat)), std::istreambuf_iterator<char>());
  const size_t close = text.rfind(')');
  if (close != std::string::npos && ticks > 0) {
    std::istringstream fields(text.substr(close + 1));
    std::string field;
    uint64_t utime = 0;
    uint64_t stime = 0;
    for (int index = 3; fields >> field; ++index) {
      if (index == 14) utime = std::strtoull(field.c_str(), nullptr, 10);
      if (index == 15) {
        stime = std::strtoull(field.c_str(), nullptr, 10);
        break;
      }
    }
    sample.cpu_seconds = static_cast<double>(utime + stime) / static_cast<double>(ticks);
  }
  return sample;
}

std::optional<double> temperature_read(const std::string& thermal_root) {
  std::error_code ec;
  std::optional<double> hottest;
  for (const auto& entry : std::filesystem::directory_iterator(thermal_root, ec)) {
    if (entry.path().filename().string().rfind("thermal_zone", 0) != 0) continue;
    std::ifstream file(entry.path() / "temp");
    long long millidegrees = 0;
    if (!(file >> millidegrees)) continue;  // some zones refuse reads (e.g. a sensor that is off)
    const double celsius = static_cast<double>(millidegrees) / 1000.0;
    if (!hottest || celsius > *hottest) hottest = celsius;
  }
  return hottest;
}

StatsSnapshot stats_delta(const StatsSnapshot& before, const StatsSnapshot& after) {
  StatsSnapshot d;
  d.runs = minus(after.runs, before.runs);
  d.errors = minus(after.errors, before.errors);
  d.nan_input_runs = minus(after.nan_input_runs, before.nan_input_runs);
  d.nan_input_values = minus(after.nan_input_values, before.nan_input_values);
  d.latency_buckets = after.latency_buckets;
  d.latency_counts = minus(after.latency_counts, before.latency_counts);
  d.latency_underflow = minus(after.latency_underflow, before.latency_underflow);
  d.latency_overflow = minus(after.latency_overflow, before.latency_overflow);
  d.latency_sum_us = std::max(0.0, after.latency_sum_us - before.latency_sum_us);
  if (after.latency_max_us > before.latency_max_us) {
    d.latency_max_us = after.latency_max_us;
  } else if (d.latency_overflow > 0) {
    d.latency_max_us = after.latency_max_us;
  } else {
    double upper = 0.0;
    const ManifestLatencyBuckets& b = d.latency_buckets;
    for (size_t k = d.latency_counts.size(); k-- > 0;) {
      if (d.latency_counts[k] > 0) {
        upper = b.start_us * std::pow(b.factor, static_cast<double>(k + 1));
        break;
      }
    }
    if (upper == 0.0 && d.latency_underflow > 0) upper = b.start_us;
    d.latency_max_us = std::min(upper, after.latency_max_us);
  }
  for (const OutputSummary& a : after.outputs) {
    const OutputSummary* b = nullptr;
    for (const OutputSummary& candidate : before.outputs) {
      if (candidate.name == a.name) b = &candidate;
    }
    const OutputSummary empty;
    if (b == nullptr) b = &empty;
    OutputSummary o;
    o.name = a.name;
    o.kind = a.kind;
    o.counts = minus(a.counts, b->counts);
    o.underflow = minus(a.underflow, b->underflow);
    o.overflow = minus(a.overflow, b->overflow);
    o.nan = minus(a.nan, b->nan);
    o.seen = minus(a.seen, b->seen);
    o.binned = minus(a.binned, b->binned);
    d.outputs.push_back(std::move(o));
  }
  return d;
}

nlohmann::json latency_window_json(const StatsSnapshot& d) {
  namespace c = contract;
  return {{c::F_LATENCY_WINDOW_COUNTS, d.latency_counts},
          {c::F_LATENCY_WINDOW_UNDERFLOW, d.latency_underflow},
          {c::F_LATENCY_WINDOW_OVERFLOW, d.latency_overflow},
          {c::F_LATENCY_WINDOW_SUM_US, finite(d.latency_sum_us)},
          {c::F_LATENCY_WINDOW_MAX_US, finite(d.latency_max_us)},
          {c::F_LATENCY_WINDOW_P50_US, finite(stats_percentile_us(d, 0.50))},
          {c::F_LATENCY_WINDOW_P95_US, finite(stats_percentile_us(d, 0.95))},
          {c::F_LATENCY_WINDOW_P99_US, finite(stats_percentile_us(d, 0.99))}};
}

nlohmann::json output_window_json(const OutputSummary& o) {
  namespace c = contract;
  return {{c::F_OUTPUT_WINDOW_COUNTS, o.counts}, {c::F_OUTPUT_WINDOW_UNDERFLOW, o.underflow},
          {c::F_OUTPUT_WINDOW_OVERFLOW, o.overflow}, {c::F_OUTPUT_WINDOW_NAN, o.nan},
          {c::F_OUTPUT_WINDOW_SEEN, o.seen},         {c::F_OUTPUT_WINDOW_BINNED, o.binned}};
}

WindowSummariser::WindowSummariser(const StatsSnapshot& stats, const ProcessSample& process,
                                   int64_t start_ms)
    : stats_(stats), process_(process), start_ms_(start_ms) {}

nlohmann::json WindowSummariser::window_close(const StatsSnapshot& stats, const ProcessSample& process,
                                              int64_t end_ms) {
  const StatsSnapshot d = stats_delta(stats_, stats);
  const double cpu_seconds = std::max(0.0, process.cpu_seconds - process_.cpu_seconds);
  const double wall_seconds = static_cast<double>(std::max<int64_t>(end_ms - start_ms_, 0)) / 1000.0;
  namespace c = contract;
  nlohmann::json outputs = nlohmann::json::object();
  for (const OutputSummary& o : d.outputs) {
    outputs[o.name] = output_window_json(o);
  }
  nlohmann::json body = {
      {c::F_TELEMETRY_WINDOW_START_MS, start_ms_},
      {c::F_TELEMETRY_WINDOW_END_MS, std::max(end_ms, start_ms_)},
      {c::F_TELEMETRY_RUNS, d.runs},
      {c::F_TELEMETRY_ERRORS, d.errors},
      {c::F_TELEMETRY_NAN_INPUT_RUNS, d.nan_input_runs},
      {c::F_TELEMETRY_NAN_INPUT_VALUES, d.nan_input_values},
      {c::F_TELEMETRY_LATENCY, latency_window_json(d)},
      {c::F_TELEMETRY_OUTPUTS, outputs},
      {c::F_TELEMETRY_PROCESS,
       {{c::F_PROCESS_WINDOW_RSS_BYTES, process.rss_bytes},
        {c::F_PROCESS_WINDOW_CPU_SECONDS, finite(cpu_seconds)},
        {c::F_PROCESS_WINDOW_CPU_PERCENT, wall_seconds > 0.0 ? finite(100.0 * cpu_seconds / wall_seconds) : 0.0}}},
  };
  stats_ = stats;
  process_ = process;
  start_ms_ = std::max(end_ms, start_ms_);
  return body;
}

}  // namespace edgesmith
