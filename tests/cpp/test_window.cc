// The window summariser (csrc/telemetry/window.h): deltas of two StatsSnapshots, the window's
// percentiles from the delta histogram, process and temperature readings.
#include <gtest/gtest.h>

#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <string>

#include "common/contract_words.h"
#include "telemetry/window.h"

namespace edgesmith {
namespace {

StatsSnapshot snapshot_make() {
  StatsSnapshot s;
  s.latency_buckets = {10.0, 2.0, 4};  // [10,20) [20,40) [40,80) [80,160)
  s.latency_counts = {0, 0, 0, 0};
  OutputSummary classes;
  classes.name = "logits";
  classes.kind = MONITOR_KIND_CLASSES;
  classes.counts = {0, 0, 0};
  s.outputs = {classes};
  return s;
}

TEST(Window, DeltaOfCountersAndOutputs) {
  StatsSnapshot before = snapshot_make();
  before.runs = 10;
  before.errors = 1;
  before.latency_counts = {10, 0, 0, 0};
  before.latency_sum_us = 150.0;
  before.latency_max_us = 19.0;
  before.outputs[0].counts = {7, 3, 0};
  before.outputs[0].seen = 10;
  before.outputs[0].binned = 10;
  StatsSnapshot after = before;
  after.runs = 14;
  after.errors = 3;
  after.nan_input_runs = 1;
  after.nan_input_values = 5;
  after.latency_counts = {10, 0, 4, 0};
  after.latency_sum_us = 150.0 + 4 * 50.0;
  after.latency_max_us = 60.0;
  after.outputs[0].counts = {7, 4, 3};
  after.outputs[0].seen = 14;
  after.outputs[0].binned = 14;

  const StatsSnapshot d = stats_delta(before, after);
  EXPECT_EQ(d.runs, 4u);
  EXPECT_EQ(d.errors, 2u);
  EXPECT_EQ(d.nan_input_runs, 1u);
  EXPECT_EQ(d.nan_input_values, 5u);
  EXPECT_EQ(d.latency_counts, (std::vector<uint64_t>{0, 0, 4, 0}));
  EXPECT_DOUBLE_EQ(d.latency_sum_us, 200.0);
  EXPECT_DOUBLE_EQ(d.latency_max_us, 60.0);  // the maximum grew in this window: exact
  ASSERT_EQ(d.outputs.size(), 1u);
  EXPECT_EQ(d.outputs[0].counts, (std::vector<uint64_t>{0, 1, 3}));
  EXPECT_EQ(d.outputs[0].seen, 4u);
  EXPECT_EQ(d.outputs[0].binned, 4u);
  // All of the window's runs are in [40, 60]: so are its percentiles (the cumulative ones are not).
  for (const double q : {0.5, 0.95, 0.99}) {
    const double p = stats_percentile_us(d, q);
    EXPECT_GE(p, 40.0) << q;
    EXPECT_LE(p, 60.0) << q;
  }
  EXPECT_LT(stats_percentile_us(after, 0.5), 20.0);
}

TEST(Window, MaxOfAWindowWithoutANewMaximumIsBoundedByItsBuckets) {
  StatsSnapshot before = snapshot_make();
  before.latency_counts = {0, 0, 0, 1};
  before.runs = 1;
  before.latency_max_us = 150.0;
  StatsSnapshot after = before;
  after.latency_counts = {2, 0, 0, 1};
  after.runs = 3;
  const StatsSnapshot d = stats_delta(before, after);
  EXPECT_DOUBLE_EQ(d.latency_max_us, 20.0);  // upper edge of [10, 20), not the old 150
  EXPECT_LE(stats_percentile_us(d, 0.99), 20.0);
}

TEST(Window, CountersSaturateAtTheContractsWindowBound) {
  // A window past MAX_WINDOW_COUNT would be refused by the monitor (and by the publisher's own check),
  // losing the window: the delta saturates instead.
  StatsSnapshot before = snapshot_make();
  StatsSnapshot after = before;
  const uint64_t huge = contract::MAX_WINDOW_COUNT * 3;
  after.runs = huge;
  after.nan_input_values = huge;
  after.latency_counts = {huge, 0, 0, 0};
  after.outputs[0].seen = huge;
  after.outputs[0].counts = {huge, 1, 0};
  const StatsSnapshot d = stats_delta(before, after);
  EXPECT_EQ(d.runs, contract::MAX_WINDOW_COUNT);
  EXPECT_EQ(d.nan_input_values, contract::MAX_WINDOW_COUNT);
  EXPECT_EQ(d.latency_counts, (std::vector<uint64_t>{contract::MAX_WINDOW_COUNT, 0, 0, 0}));
  EXPECT_EQ(d.outputs[0].seen, contract::MAX_WINDOW_COUNT);
  EXPECT_EQ(d.outputs[0].counts, (std::vector<uint64_t>{contract::MAX_WINDOW_COUNT, 1, 0}));
}

TEST(Window, CloseBuildsTheTelemetryFieldsAndMovesOn) {
  StatsSnapshot first = snapshot_make();
  ProcessSample p0;
  p0.cpu_seconds = 1.0;
  WindowSummariser window(first, p0, 1000);
  StatsSnapshot second = first;
  second.runs = 2;
  second.latency_counts = {0, 2, 0, 0};
  second.latency_sum_us = 60.0;
  second.latency_max_us = 31.0;
  second.outputs[0].counts = {0, 2, 0};
  ProcessSample p1;
  p1.cpu_seconds = 1.5;
  p1.rss_bytes = 4096;
  const nlohmann::json body = window.window_close(second, p1, 3000);
  EXPECT_EQ(body["window_start_ms"], 1000);
  EXPECT_EQ(body["window_end_ms"], 3000);
  EXPECT_EQ(body["runs"], 2);
  EXPECT_EQ(body["latency"]["counts"], nlohmann::json({0, 2, 0, 0}));
  EXPECT_DOUBLE_EQ(body["latency"]["max_us"].get<double>(), 31.0);
  EXPECT_DOUBLE_EQ(body["process"]["cpu_seconds"].get<double>(), 0.5);
  EXPECT_DOUBLE_EQ(body["process"]["cpu_percent"].get<double>(), 25.0);  // 0.5 s of 2 s
  EXPECT_EQ(body["process"]["rss_bytes"], 4096);
  EXPECT_EQ(body["outputs"]["logits"]["counts"], nlohmann::json({0, 2, 0}));
  EXPECT_EQ(window.window_start_ms(), 3000);
  // Nothing happened in the next window: zeros, not the cumulative figures.
  const nlohmann::json idle = window.window_close(second, p1, 4000);
  EXPECT_EQ(idle["runs"], 0);
  EXPECT_EQ(idle["latency"]["counts"], nlohmann::json({0, 0, 0, 0}));
  EXPECT_DOUBLE_EQ(idle["latency"]["p99_us"].get<double>(), 0.0);
  EXPECT_DOUBLE_EQ(idle["latency"]["max_us"].get<double>(), 0.0);
  EXPECT_EQ(idle["outputs"]["logits"]["counts"], nlohmann::json({0, 0, 0}));
}

TEST(Window, ProcessSampleReadsThisProcess) {
  const ProcessSample a = process_sample();
  EXPECT_GT(a.rss_bytes, 0u);
  volatile double sink = 0.0;
  for (int i = 0; i < 20000000; ++i) sink = sink + std::sqrt(static_cast<double>(i));
  const ProcessSample b = process_sample();
  EXPECT_GT(b.cpu_seconds, a.cpu_seconds);
}

TEST(Window, TemperatureIsTheHottestZoneOrNothing) {
  const std::filesystem::path root =
      std::filesystem::temp_directory_path() / ("edgesmith-thermal-" + std::to_string(getpid()));
  std::filesystem::remove_all(root);
  std::filesystem::create_directories(root);
  EXPECT_FALSE(temperature_read(root.string()).has_value());
  EXPECT_FALSE(temperature_read((root / "missing").string()).has_value());
  for (const auto& [zone, value] : {std::pair<const char*, const char*>{"thermal_zone0", "41500"},
                                    {"thermal_zone1", "57250"},
                                    {"cooling_device0", "99000"}}) {
    std::filesystem::create_directories(root / zone);
    std::ofstream(root / zone / "temp") << value << "\n";
  }
  const std::optional<double> t = temperature_read(root.string());
  ASSERT_TRUE(t.has_value());
  EXPECT_DOUBLE_EQ(*t, 57.25);
  std::filesystem::remove_all(root);
}

}  // namespace
}  // namespace edgesmith
