// edgesmith_stats_bench: what a run's output summary costs (Stats::stats_record) on a large dense
// output, reading every value versus the default sample. Prints microseconds per run and the
// ratio; not a test (timings on shared machines are noisy), run it by hand:
//   build/cpp-tests/tests/cpp/edgesmith_stats_bench
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <vector>

#include "runtime/stats.h"

namespace {

double us_per_run(edgesmith::Stats& stats, const std::vector<edgesmith::Tensor>& out, int runs) {
  double best = 1e300;
  for (int block = 0; block < 5; ++block) {  // best of blocks: steadier on a shared machine
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < runs; ++i) stats.stats_record(100.0, 0, out);
    const double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count();
    best = std::min(best, us / runs);
  }
  return best;
}

}  // namespace

int main() {
  using namespace edgesmith;
  const std::vector<int64_t> shape = {1, 21, 512, 512};  // a segmentation map (21 VOC classes)
  ManifestMonitoring monitoring;
  ManifestOutputMonitor histogram;
  histogram.name = "mask";
  histogram.kind = MONITOR_KIND_HISTOGRAM;
  for (int i = 0; i <= 16; ++i) histogram.edges.push_back(-4.0 + 0.5 * i);
  monitoring.outputs = {histogram};
  const std::vector<ManifestTensor> outputs = {{"mask", "float32", shape}};
  std::vector<Tensor> out;
  out.emplace_back(DTYPE_FLOAT32, shape);
  std::mt19937 rng(0);
  std::normal_distribution<float> normal;
  auto* values = static_cast<float*>(out[0].data());
  for (int64_t i = 0; i < shape_numel(shape); ++i) values[i] = normal(rng);

  Stats every(monitoring, outputs, 0);
  Stats sampled(monitoring, outputs);
  const double all_us = us_per_run(every, out, 3);
  const double sample_us = us_per_run(sampled, out, 2000);
  std::printf("output 1x21x512x512 float32, 16-bin histogram\n");
  std::printf("  every value:        %10.1f us/run\n", all_us);
  std::printf("  sampled (%4llu max): %10.2f us/run\n", static_cast<unsigned long long>(STATS_SAMPLE_LIMIT), sample_us);
  std::printf("  ratio sampled/every: %.5f\n", sample_us / all_us);
  return 0;
}
