#include <gtest/gtest.h>

#include <cmath>
#include <thread>
#include <vector>

#include "runtime/stats.h"

namespace edgesmith {
namespace {

ManifestMonitoring monitoring_make() {
  ManifestMonitoring m;
  m.latency = {10.0, 2.0, 4};  // buckets [10,20) [20,40) [40,80) [80,160)
  ManifestOutputMonitor classes;
  classes.name = "logits";
  classes.kind = MONITOR_KIND_CLASSES;
  classes.classes = 3;
  ManifestOutputMonitor histogram;
  histogram.name = "score";
  histogram.kind = MONITOR_KIND_HISTOGRAM;
  histogram.edges = {0.0, 1.0, 2.0};
  m.outputs = {classes, histogram};
  return m;
}

const std::vector<ManifestTensor> OUTPUTS = {{"logits", "float32", {2, 3}}, {"score", "float32", {5}}};

std::vector<Tensor> outputs_make(const std::vector<float>& logits, const std::vector<float>& score) {
  std::vector<Tensor> out;
  out.emplace_back(DTYPE_FLOAT32, std::vector<int64_t>{2, 3});
  out.emplace_back(DTYPE_FLOAT32, std::vector<int64_t>{5});
  std::copy(logits.begin(), logits.end(), static_cast<float*>(out[0].data()));
  std::copy(score.begin(), score.end(), static_cast<float*>(out[1].data()));
  return out;
}

TEST(Stats, LatencyBucketsAndOverflow) {
  Stats stats(monitoring_make(), OUTPUTS);
  const auto outputs = outputs_make({0, 0, 0, 0, 0, 0}, {0, 0, 0, 0, 0});
  for (const double us : {5.0, 10.0, 19.9, 20.0, 79.0, 80.0, 159.0, 160.0, 1e6}) {
    stats.stats_record(us, 0, outputs);
  }
  stats.stats_record_error();
  const StatsSnapshot s = stats.stats_snapshot();
  EXPECT_EQ(s.runs, 9u);
  EXPECT_EQ(s.errors, 1u);
  EXPECT_EQ(s.latency_underflow, 1u);
  EXPECT_EQ(s.latency_counts, (std::vector<uint64_t>{2, 1, 1, 2}));
  EXPECT_EQ(s.latency_overflow, 2u);
  EXPECT_DOUBLE_EQ(s.latency_max_us, 1e6);
}

TEST(Stats, PercentilesFromTheHistogram) {
  Stats stats(monitoring_make(), OUTPUTS);
  const auto outputs = outputs_make({0, 0, 0, 0, 0, 0}, {0, 0, 0, 0, 0});
  StatsSnapshot empty = stats.stats_snapshot();
  EXPECT_EQ(stats_percentile_us(empty, 0.5), 0.0);
  for (int i = 0; i < 90; ++i) stats.stats_record(15.0, 0, outputs);  // bucket [10, 20)
  for (int i = 0; i < 10; ++i) stats.stats_record(100.0, 0, outputs);  // bucket [80, 160)
  const StatsSnapshot s = stats.stats_snapshot();
  const double p50 = stats_percentile_us(s, 0.50);
  const double p95 = stats_percentile_us(s, 0.95);
  const double p99 = stats_percentile_us(s, 0.99);
  EXPECT_GE(p50, 10.0);
  EXPECT_LT(p50, 20.0);
  EXPECT_GE(p95, 80.0);
  EXPECT_LE(p99, 100.0);  // capped at the slowest run seen
  EXPECT_LE(p50, p95);
  EXPECT_LE(p95, p99);
}

TEST(Stats, TheBucketAndPercentileRulesAreTheOnesTheMonitorIsBoundTo) {
  const double log2 = std::log(2.0);
  EXPECT_EQ(stats_latency_bucket(9.99, 10.0, log2, 4), -1);
  EXPECT_EQ(stats_latency_bucket(std::nan(""), 10.0, log2, 4), -1);
  EXPECT_EQ(stats_latency_bucket(10.0, 10.0, log2, 4), 0);
  EXPECT_EQ(stats_latency_bucket(39.9, 10.0, log2, 4), 1);
  EXPECT_EQ(stats_latency_bucket(159.0, 10.0, log2, 4), 3);
  EXPECT_EQ(stats_latency_bucket(160.0, 10.0, log2, 4), 4);  // overflow
  const ManifestLatencyBuckets b{10.0, 2.0, 4};
  // Empty: NaN (the binding's None; stats_percentile_us's 0).
  EXPECT_TRUE(std::isnan(stats_percentiles_us({0, 0, 0, 0}, 0, 0, b, 0.0, {0.5})[0]));
  // q = 0 with an empty first bucket: the first non-empty bucket's lower edge, never a division by 0.
  EXPECT_DOUBLE_EQ(stats_percentiles_us({0, 4, 0, 0}, 0, 0, b, 0.0, {0.0})[0], 20.0);
  const std::vector<double> q = stats_percentiles_us({2, 0, 0, 0}, 2, 1, b, 500.0, {0.1, 0.5, 1.0});
  EXPECT_DOUBLE_EQ(q[0], 10.0);                          // inside the underflow: start_us
  EXPECT_DOUBLE_EQ(q[1], 10.0 * std::pow(2.0, 0.25));   // rank 2.5: a quarter into bucket 0
  EXPECT_DOUBLE_EQ(q[2], 500.0);                         // past the buckets: the maximum seen
}

TEST(Stats, ClassCountsAndHistogram) {
  Stats stats(monitoring_make(), OUTPUTS);
  // Run 1: rows -> class 2, class 1 (NaN skipped). Run 2: an all-NaN row, class 1.
  stats.stats_record(15.0, 0, outputs_make({0.1f, 0.2f, 0.9f, NAN, -1.0f, -2.0f}, {-1.0f, 0.0f, 1.5f, 2.0f, NAN}));
  stats.stats_record(15.0, 3, outputs_make({NAN, NAN, NAN, 0, 5, 1}, {0.5f, 0.5f, 0.5f, 0.5f, 0.5f}));
  const StatsSnapshot s = stats.stats_snapshot();
  ASSERT_EQ(s.outputs.size(), 2u);
  EXPECT_EQ(s.outputs[0].name, "logits");
  EXPECT_EQ(s.outputs[0].counts, (std::vector<uint64_t>{0, 2, 1}));
  EXPECT_EQ(s.outputs[0].nan, 1u);
  EXPECT_EQ(s.outputs[1].counts, (std::vector<uint64_t>{6, 1}));
  EXPECT_EQ(s.outputs[1].underflow, 1u);
  EXPECT_EQ(s.outputs[1].overflow, 1u);
  EXPECT_EQ(s.outputs[1].nan, 1u);
  EXPECT_EQ(s.nan_input_runs, 1u);
  EXPECT_EQ(s.nan_input_values, 3u);
}

TEST(Stats, ConcurrentRecordingLosesNothing) {
  Stats stats(monitoring_make(), OUTPUTS);
  const auto outputs = outputs_make({0, 1, 0, 1, 0, 0}, {0.5f, 0.5f, 0.5f, 0.5f, 0.5f});
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 1000; ++i) stats.stats_record(30.0, 0, outputs);
    });
  }
  for (auto& thread : threads) thread.join();
  const StatsSnapshot s = stats.stats_snapshot();
  EXPECT_EQ(s.runs, 8000u);
  EXPECT_EQ(s.latency_counts[1], 8000u);
  EXPECT_EQ(s.outputs[0].counts, (std::vector<uint64_t>{8000, 8000, 0}));
}

TEST(Stats, LargeOutputsAreSampledAndEveryPositionIsVisited) {
  constexpr int N = 64 * 20;  // 20 chunks of 64 neighbouring values
  ManifestMonitoring m;
  ManifestOutputMonitor histogram;
  histogram.name = "mask";
  histogram.kind = MONITOR_KIND_HISTOGRAM;
  histogram.edges = {0.0, static_cast<double>(N)};
  m.outputs = {histogram};
  const std::vector<ManifestTensor> outputs = {{"mask", "float32", {1, N}}};
  std::vector<Tensor> out;
  out.emplace_back(DTYPE_FLOAT32, std::vector<int64_t>{1, N});
  auto* values = static_cast<float*>(out[0].data());
  for (int i = 0; i < N; ++i) values[i] = static_cast<float>(i);

  Stats exhaustive(m, outputs, 0);
  exhaustive.stats_record(10.0, 0, out);
  EXPECT_EQ(exhaustive.stats_snapshot().outputs[0].binned, static_cast<uint64_t>(N));

  Stats sampled(m, outputs, 128);  // 2 chunks a run, every 10th chunk
  for (int run = 0; run < 10; ++run) sampled.stats_record(10.0, 0, out);
  const OutputSummary s = sampled.stats_snapshot().outputs[0];
  EXPECT_EQ(s.seen, 10u * N);
  EXPECT_EQ(s.binned, static_cast<uint64_t>(N));
  EXPECT_EQ(s.counts, std::vector<uint64_t>{static_cast<uint64_t>(N)});
  // Ten runs with moving offsets read each position exactly once: one bin per element shows it.
  ManifestMonitoring fine = m;
  fine.outputs[0].edges.clear();
  for (int i = 0; i <= N; ++i) fine.outputs[0].edges.push_back(i);
  Stats visits(fine, outputs, 128);
  for (int run = 0; run < 10; ++run) visits.stats_record(10.0, 0, out);
  EXPECT_EQ(visits.stats_snapshot().outputs[0].counts, std::vector<uint64_t>(N, 1));
}

TEST(Stats, ClassRowsAreSampledToo) {
  ManifestMonitoring m;
  ManifestOutputMonitor classes;
  classes.name = "logits";
  classes.kind = MONITOR_KIND_CLASSES;
  classes.classes = 4;
  m.outputs = {classes};
  const std::vector<ManifestTensor> outputs = {{"logits", "float32", {100, 4}}};
  std::vector<Tensor> out;
  out.emplace_back(DTYPE_FLOAT32, std::vector<int64_t>{100, 4});
  auto* values = static_cast<float*>(out[0].data());
  for (int r = 0; r < 100; ++r) {
    for (int c = 0; c < 4; ++c) values[r * 4 + c] = c == r % 4 ? 1.0f : 0.0f;
  }
  Stats stats(m, outputs, 40);  // 10 rows of 4 a run, stride 10
  for (int run = 0; run < 10; ++run) stats.stats_record(10.0, 0, out);
  const OutputSummary s = stats.stats_snapshot().outputs[0];
  EXPECT_EQ(s.seen, 1000u);
  EXPECT_EQ(s.binned, 100u);
  EXPECT_EQ(s.counts, (std::vector<uint64_t>{25, 25, 25, 25}));
}

}  // namespace
}  // namespace edgesmith
