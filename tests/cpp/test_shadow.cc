// Shadow evaluation's device pieces (docs/shadow.md): the signature rule, a candidate's window
// summary (ShadowSummary) on hand-made tensors, and a candidate in a child process (ShadowChild,
// the real edgesmith-agent binary with the test-only testecho backend).
#include <gtest/gtest.h>

#include <signal.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "agent/child_process.h"
#include "agent/shadow_child.h"
#include "common/contract_words.h"
#include "common/digest.h"
#include "runtime/stats.h"
#include "telemetry/contract_check.h"
#include "telemetry/shadow_window.h"
#include "test_support.h"

namespace edgesmith {
namespace {

using json = nlohmann::json;
using test::TempDir;

// The testecho artifact's manifest (inputs x f32 (2, 3), n i64 (4,); outputs y = 2x with
// monitoring classes 3, m = n with histogram [0, 1, 2, 3]; latency start 1 us, factor 2, 40
// buckets), edited by `mutate`.
Manifest echo_manifest(const std::function<void(json&)>& mutate = {}) {
  TempDir dir;
  test::echo_artifact_write(dir.path(), test::test_key_make(7), mutate);
  return manifest_read(dir.path().string());
}

template <typename T>
Tensor tensor_of(DType dtype, std::vector<int64_t> shape, const std::vector<T>& values) {
  Tensor t(dtype, std::move(shape));
  EXPECT_EQ(values.size() * sizeof(T), t.byte_size());
  std::memcpy(t.data(), values.data(), t.byte_size());
  return t;
}

Tensor y_of(const std::vector<float>& v) { return tensor_of<float>(DTYPE_FLOAT32, {2, 3}, v); }
Tensor m_of(const std::vector<int64_t>& v) { return tensor_of<int64_t>(DTYPE_INT64, {4}, v); }

// --- the signature rule -----------------------------------------------------------------------------

TEST(ShadowSignature, SameInputsAndOutputsCanShadowWhateverTheBackend) {
  const Manifest serving = echo_manifest();
  const Manifest candidate = echo_manifest([](json& m) {
    m["backend"]["name"] = "openvino";
    m["monitoring"]["outputs"] = json::array();
  });
  EXPECT_EQ(shadow_signature_problem(serving, candidate), "");
}

TEST(ShadowSignature, EachDifferenceIsNamedWithBothSides) {
  const Manifest serving = echo_manifest();
  struct Case {
    std::function<void(json&)> mutate;
    std::vector<std::string> words;
  };
  const std::vector<Case> cases = {
      {[](json& m) { m["inputs"][1]["name"] = "count"; }, {"input 1", "'count' int64 (4,)", "'n' int64 (4,)"}},
      {[](json& m) { m["inputs"][0]["dtype"] = "float16"; }, {"input 0", "'x' float16 (2, 3)", "'x' float32 (2, 3)"}},
      {[](json& m) { m["inputs"][0]["shape"] = {3, 2}; }, {"input 0", "(3, 2)", "(2, 3)"}},
      {[](json& m) {
         m["inputs"].erase(1);
         for (json& s : m["golden"]["samples"]) s["inputs"].erase(1);
       },
       {"1 inputs (x)", "2 (x, n)"}},
      {[](json& m) { m["outputs"][1]["dtype"] = "int32"; }, {"output 1", "'m' int32 (4,)", "'m' int64 (4,)"}},
      {[](json& m) {
         m["outputs"][0]["name"] = "logits";
         m["monitoring"]["outputs"][0]["name"] = "logits";
       },
       {"output 0", "'logits'", "'y'"}},
      {[](json& m) { m["outputs"][1]["shape"] = {1, 4}; }, {"output 1", "(1, 4)", "(4,)"}},
      {[](json& m) {
         m["outputs"].erase(1);
         m["monitoring"]["outputs"].erase(1);
         for (json& s : m["golden"]["samples"]) s["outputs"].erase(1);
       },
       {"1 outputs (y)", "2 (y, m)"}},
  };
  for (const Case& c : cases) {
    const std::string problem = shadow_signature_problem(serving, echo_manifest(c.mutate));
    EXPECT_EQ(problem.rfind("the candidate", 0), 0u) << problem;
    EXPECT_NE(problem.find("cannot shadow"), std::string::npos) << problem;
    for (const std::string& word : c.words) EXPECT_NE(problem.find(word), std::string::npos) << word << " in " << problem;
  }
}

TEST(ShadowSignature, TheSummaryRefusesACandidateThatCannotShadow) {
  const Manifest serving = echo_manifest();
  const Manifest candidate = echo_manifest([](json& m) { m["inputs"][0]["shape"] = {3, 2}; });
  try {
    ShadowSummary summary(serving, candidate, 0);
    FAIL() << "accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ERROR_CODE_INVALID_ARGUMENT);
    EXPECT_EQ(std::string(e.what()), shadow_signature_problem(serving, candidate));
  }
}

// --- the window summary -----------------------------------------------------------------------------

// `body` wrapped in a shadow message's envelope (the contract's example case supplies it).
json shadow_message(const json& body) {
  std::ifstream in(EDGESMITH_CONTRACT_CASES);
  json message;
  const json cases = json::parse(in)["cases"];
  for (const json& c : cases) {
    if (c["name"] == "shadow window") message = c["message"];
  }
  EXPECT_TRUE(message.is_object());
  for (const auto& [key, value] : body.items()) message[key] = value;
  message[contract::F_SHADOW_WINDOW_RSS_INCREASE_BYTES] = 1000;
  message[contract::F_SHADOW_WINDOW_CPU_SECONDS] = 0.5;
  return message;
}

TEST(ShadowSummary, AgreementErrorsAndNaNPerOutput) {
  const Manifest serving = echo_manifest();
  ShadowSummary summary(serving, echo_manifest(), 1000);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  // Row 0 agrees (class 2 both), row 1 does not (0 vs 2); largest error 2 where |serving| <= 3.
  summary.shadow_add({y_of({1, 2, 3, 3, 2, 1}), m_of({0, 1, 2, 3})}, 50,
                     {y_of({1, 2, 3.5, 1, 2, 3}), m_of({0, 1, 2, 5})}, 100);
  // A NaN where serving is finite: counted, not compared; NaN in serving: not compared at all.
  summary.shadow_add({y_of({0, 1, 0, nan, 0, 0}), m_of({0, 1, 2, 3})}, 60,
                     {y_of({0, nan, 0, 9, 0, 0}), m_of({0, 1, 2, 3})}, 120);
  const json body = summary.shadow_window_close(2000);
  EXPECT_EQ(body["window_start_ms"], 1000);
  EXPECT_EQ(body["window_end_ms"], 2000);
  EXPECT_EQ(body["samples"], 2);
  const json& y = body["outputs"]["y"];
  EXPECT_EQ(y["compared"], 12);
  EXPECT_EQ(y["rows"], 4);   // classes output (2, 3): two rows per sample
  EXPECT_EQ(y["agree"], 1);  // sample 0 row 0 only (sample 1: the NaNs move both arg-maxes)
  EXPECT_DOUBLE_EQ(y["max_abs_err"].get<double>(), 2.0);
  EXPECT_DOUBLE_EQ(y["max_rel_err"].get<double>(), 2.0 / 3.0);
  EXPECT_EQ(y["nan"], 1);
  // The candidate's own summary in its monitoring layout: arg-max classes of its 4 rows.
  EXPECT_EQ(y["histogram"]["counts"], json({2, 0, 2}));
  EXPECT_EQ(y["histogram"]["seen"], 4);
  const json& m = body["outputs"]["m"];
  EXPECT_EQ(m["rows"], 2);  // not a classes output: one row per sample
  EXPECT_FALSE(m.contains("agree"));
  EXPECT_DOUBLE_EQ(m["max_abs_err"].get<double>(), 2.0);
  EXPECT_EQ(m["nan"], 0);
  EXPECT_EQ(m["histogram"]["counts"], json({2, 2, 2}));
  EXPECT_EQ(m["histogram"]["overflow"], 2);  // 3 and 5 are >= the last edge
  EXPECT_EQ(contract_message_problem(shadow_message(body)), "");
}

TEST(ShadowSummary, LatencyIsBinnedInTheServingLayoutWithPercentiles) {
  const Manifest serving = echo_manifest();
  // The candidate's own latency layout differs; the window still uses serving's (the birth's).
  const Manifest candidate = echo_manifest([](json& m) { m["monitoring"]["latency"] = {{"start_us", 10.0}, {"factor", 1.5}, {"count", 12}}; });
  ShadowSummary summary(serving, candidate, 0);
  for (int i = 0; i < 10; ++i) {
    summary.shadow_add({y_of({1, 2, 3, 3, 2, 1}), m_of({0, 1, 2, 3})}, 40.0,
                       {y_of({1, 2, 3, 3, 2, 1}), m_of({0, 1, 2, 3})}, i < 9 ? 100.0 : 3000.0);
  }
  const json body = summary.shadow_window_close(10);
  const json& cand = body["latency"];
  const json& serv = body["serving_latency"];
  ASSERT_EQ(cand["counts"].size(), 40u);
  ASSERT_EQ(serv["counts"].size(), 40u);
  EXPECT_EQ(cand["counts"][6], 9);   // [64, 128) us with start 1, factor 2
  EXPECT_EQ(cand["counts"][11], 1);  // [2048, 4096)
  EXPECT_EQ(serv["counts"][5], 10);  // [32, 64)
  EXPECT_DOUBLE_EQ(cand["sum_us"].get<double>(), 9 * 100.0 + 3000.0);
  EXPECT_DOUBLE_EQ(cand["max_us"].get<double>(), 3000.0);
  // The percentiles are the runtime's own estimate of the same histogram.
  ManifestLatencyBuckets layout = serving.monitoring.latency;
  std::vector<uint64_t> counts(40, 0);
  counts[6] = 9;
  counts[11] = 1;
  const std::vector<double> q = stats_percentiles_us(counts, 0, 0, layout, 3000.0, {0.5, 0.95, 0.99});
  EXPECT_DOUBLE_EQ(cand["p50_us"].get<double>(), q[0]);
  EXPECT_DOUBLE_EQ(cand["p95_us"].get<double>(), q[1]);
  EXPECT_DOUBLE_EQ(cand["p99_us"].get<double>(), q[2]);
  EXPECT_GE(cand["p50_us"].get<double>(), 64.0);
  EXPECT_LT(cand["p50_us"].get<double>(), 128.0);
  EXPECT_LT(serv["p99_us"].get<double>(), 64.0);
}

TEST(ShadowSummary, PairedServingTimesHaveTheirOwnHistogramOnceAnyArrives) {
  ShadowSummary summary(echo_manifest(), echo_manifest(), 0);
  // Without paired times the window carries no paired fields (an agent that could not pair).
  summary.shadow_add({y_of({1, 2, 3, 3, 2, 1}), m_of({0, 1, 2, 3})}, 40.0, {y_of({1, 2, 3, 3, 2, 1}), m_of({0, 1, 2, 3})}, 100.0);
  const json unpaired = summary.shadow_window_close(10);
  EXPECT_FALSE(unpaired.contains("paired_serving_latency"));
  EXPECT_FALSE(unpaired.contains("paired_samples"));
  EXPECT_EQ(contract_message_problem(shadow_message(unpaired)), "");
  // Served at 40 us (the agent's own time), 300 us beside the candidate in the child: the paired
  // histogram holds the child's figure, the serving one the agent's.
  for (int i = 0; i < 4; ++i) {
    summary.shadow_add({y_of({1, 2, 3, 3, 2, 1}), m_of({0, 1, 2, 3})}, 40.0,
                       {y_of({1, 2, 3, 3, 2, 1}), m_of({0, 1, 2, 3})}, 100.0, i < 3 ? 300.0 : -1.0);
  }
  const json body = summary.shadow_window_close(20);
  EXPECT_EQ(body["samples"], 4);
  EXPECT_EQ(body["paired_samples"], 3);
  EXPECT_EQ(body["paired_serving_latency"]["counts"][8], 3);  // [256, 512) us
  EXPECT_EQ(body["serving_latency"]["counts"][5], 4);         // [32, 64)
  EXPECT_DOUBLE_EQ(body["paired_serving_latency"]["sum_us"].get<double>(), 900.0);
  EXPECT_EQ(contract_message_problem(shadow_message(body)), "");
  // Once paired, an empty window still says so (0 paired samples, not an absent figure).
  const json empty = summary.shadow_window_close(30);
  EXPECT_EQ(empty["paired_samples"], 0);
  EXPECT_EQ(empty["paired_serving_latency"]["counts"], json(std::vector<int>(40, 0)));
}

TEST(ShadowSummary, CountersAndTheNextWindowStartsEmpty) {
  ShadowSummary summary(echo_manifest(), echo_manifest(), 100);
  summary.shadow_offered(5);
  summary.shadow_offered();
  summary.shadow_dropped(2);
  summary.shadow_error();
  summary.shadow_add({y_of({1, 2, 3, 3, 2, 1}), m_of({0, 1, 2, 3})}, 10, {y_of({1, 2, 3, 3, 2, 1}), m_of({0, 1, 2, 3})}, 10);
  // Outputs that are not what the candidate's manifest says are an error, never compared.
  summary.shadow_add({y_of({1, 2, 3, 3, 2, 1}), m_of({0, 1, 2, 3})}, 10, {y_of({1, 2, 3, 3, 2, 1})}, 10);
  const json first = summary.shadow_window_close(200);
  EXPECT_EQ(first["offered"], 6);
  EXPECT_EQ(first["dropped"], 2);
  EXPECT_EQ(first["errors"], 2);
  EXPECT_EQ(first["samples"], 1);
  EXPECT_EQ(first["outputs"]["y"]["agree"], 2);
  const json second = summary.shadow_window_close(300);
  EXPECT_EQ(second["window_start_ms"], 200);
  EXPECT_EQ(second["window_end_ms"], 300);
  for (const char* key : {"offered", "dropped", "errors", "samples"}) EXPECT_EQ(second[key], 0) << key;
  EXPECT_EQ(second["outputs"]["y"]["rows"], 0);
  EXPECT_EQ(second["outputs"]["y"]["agree"], 0);
  EXPECT_EQ(second["outputs"]["y"]["max_abs_err"], 0.0);
  EXPECT_EQ(second["outputs"]["y"]["histogram"]["seen"], 0);
  EXPECT_EQ(second["latency"]["counts"], json(std::vector<int>(40, 0)));
  EXPECT_EQ(second["latency"]["p50_us"], 0.0);  // an empty window's percentiles stay inside the contract
  EXPECT_EQ(contract_message_problem(shadow_message(second)), "");
}

TEST(ShadowSummary, OutputsTheCandidateDoesNotMonitorHaveNoHistogram) {
  const Manifest candidate = echo_manifest([](json& m) {
    m["monitoring"]["outputs"] = {{{"name", "m"}, {"kind", "histogram"}, {"edges", {0.0, 10.0}}}};
  });
  ShadowSummary summary(echo_manifest(), candidate, 0);
  summary.shadow_add({y_of({1, 2, 3, 3, 2, 1}), m_of({0, 1, 2, 3})}, 10, {y_of({1, 2, 3, 3, 2, 1}), m_of({0, 1, 2, 3})}, 10);
  const json body = summary.shadow_window_close(1);
  EXPECT_TRUE(body["outputs"]["y"]["histogram"].is_null());
  EXPECT_EQ(body["outputs"]["y"]["agree"], 2);  // agreement follows the serving manifest's monitoring
  EXPECT_EQ(body["outputs"]["m"]["histogram"]["counts"], json({4}));  // the candidate's one bin
  EXPECT_EQ(contract_message_problem(shadow_message(body)), "");
}

TEST(ShadowSummary, Float16ScalarOutputsAndHugeErrorsStayInsideTheContract) {
  const auto scalar_half = [](json& m) {
    m["outputs"][0] = {{"name", "y"}, {"dtype", "float16"}, {"shape", json::array()}};
    m["monitoring"]["outputs"][0] = {{"name", "y"}, {"kind", "histogram"}, {"edges", {0.0, 1.0, 2.0}}};
  };
  ShadowSummary summary(echo_manifest(scalar_half), echo_manifest(scalar_half), 0);
  const auto half = [](uint16_t bits) { return tensor_of<uint16_t>(DTYPE_FLOAT16, {}, {bits}); };
  // 1.5 (0x3E00) against 2.0 (0x4000); then 0 against +inf (0x7C00): not finite in the candidate.
  summary.shadow_add({half(0x3E00), m_of({0, 0, 0, 0})}, 1, {half(0x4000), m_of({0, 0, 0, 0})}, 1);
  summary.shadow_add({half(0x0000), m_of({0, 0, 0, 0})}, 1, {half(0x7C00), m_of({0, 0, 0, 0})}, 1);
  // An int64 error far past what the contract carries is capped, not sent as a huge number.
  summary.shadow_add({half(0x0000), m_of({0, 0, 0, 0})}, 1,
                     {half(0x0000), m_of({std::numeric_limits<int64_t>::max(), 0, 0, 0})}, 1);
  const json body = summary.shadow_window_close(1);
  const json& y = body["outputs"]["y"];
  EXPECT_EQ(y["compared"], 3);
  EXPECT_EQ(y["rows"], 3);
  EXPECT_DOUBLE_EQ(y["max_abs_err"].get<double>(), 0.5);
  EXPECT_DOUBLE_EQ(y["max_rel_err"].get<double>(), 0.5 / 1.5);
  EXPECT_EQ(y["nan"], 1);
  EXPECT_EQ(y["histogram"]["counts"], json({1, 0}));  // the candidate's 0; its 2.0 and +inf are past the last edge
  EXPECT_EQ(y["histogram"]["overflow"], 2);
  EXPECT_DOUBLE_EQ(body["outputs"]["m"]["max_abs_err"].get<double>(), contract::MAX_MICROS);
  EXPECT_EQ(body["outputs"]["m"]["max_rel_err"], 0.0);  // serving all 0
  EXPECT_EQ(contract_message_problem(shadow_message(body)), "");
}

// --- the candidate in a child process ----------------------------------------------------------------

class ShadowChildTest : public ::testing::Test {
 protected:
  ShadowChildOptions options_for(const std::function<void(json&)>& mutate = {}) {
    test::echo_artifact_write(dir_.path() / "candidate", key_, mutate);
    ShadowChildOptions options;
    options.executable = EDGESMITH_AGENT_EXE;
    options.artifact_dir = (dir_.path() / "candidate").string();
    options.build_keys = {test::key_bytes(key_)};
    options.backend_path = {test::test_backend_dir()};
    options.start_timeout_s = 60;
    return options;
  }

  static std::vector<Tensor> inputs(float first) {
    return {tensor_of<float>(DTYPE_FLOAT32, {2, 3}, {first, 1, 2, 3, 4, 5}), m_of({7, 8, 9, 10})};
  }

  static bool process_exists(pid_t pid) { return ::kill(pid, 0) == 0 || errno != ESRCH; }

  TempDir dir_;
  test::TestKey key_ = test::test_key_make(9);
};

TEST_F(ShadowChildTest, RunsSamplesAndAnswersWithTheCandidatesOutputs) {
  const ShadowChildOptions options = options_for();
  ShadowChild child(options);
  EXPECT_GT(child.shadow_pid(), 0);
  errno = 0;
  EXPECT_GE(::getpriority(PRIO_PROCESS, static_cast<id_t>(child.shadow_pid())), options.nice);  // it lowered its priority
  EXPECT_EQ(errno, 0);
  EXPECT_EQ(child.shadow_manifest_sha256(), sha256_file(options.artifact_dir + "/manifest.json"));
  for (int run = 0; run < 3; ++run) {
    const ShadowRunResult result = child.shadow_run(inputs(static_cast<float>(run)));
    ASSERT_EQ(result.outputs.size(), 2u);
    const auto* y = static_cast<const float*>(result.outputs[0].data());
    EXPECT_EQ(y[0], 2.0f * static_cast<float>(run));
    EXPECT_EQ(y[5], 10.0f);
    EXPECT_EQ(static_cast<const int64_t*>(result.outputs[1].data())[3], 10);
    EXPECT_GT(result.latency_us, 0.0);
  }
  EXPECT_GE(child.shadow_cpu_seconds(), 0.0);
  // A wrongly shaped input is the caller's error; the child keeps running.
  try {
    child.shadow_run({m_of({1, 2, 3, 4}), m_of({1, 2, 3, 4})});
    FAIL() << "accepted";
  } catch (const ShadowChildDied& e) {
    FAIL() << "the child died: " << e.what();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ERROR_CODE_INPUT);
    EXPECT_NE(std::string(e.what()).find("'x' is float32 (2, 3)"), std::string::npos) << e.what();
  }
  EXPECT_EQ(static_cast<const float*>(child.shadow_run(inputs(4)).outputs[0].data())[0], 8.0f);
  const pid_t pid = child.shadow_pid();
  { ShadowChild moved_out(options); }  // a second child starts and ends on its own
  EXPECT_TRUE(process_exists(pid));
}

TEST_F(ShadowChildTest, PairedTimingRunsTheServingArtifactBesideTheCandidate) {
  ShadowChildOptions options = options_for();
  test::echo_artifact_write(dir_.path() / "serving", key_, [](json& m) { m["backend"]["options"] = {{"mode", "negate-double"}}; });
  options.paired_dir = (dir_.path() / "serving").string();
  ShadowChild child(options);
  EXPECT_TRUE(child.shadow_paired());
  EXPECT_EQ(child.shadow_paired_problem(), "");
  EXPECT_LE(child.shadow_paired_rss_bytes(), child.shadow_rss_increase_bytes());
  for (int run = 0; run < 4; ++run) {  // both orders of the pair
    const ShadowRunResult result = child.shadow_run(inputs(static_cast<float>(run)));
    // The answer is the candidate's (doubling), never the paired serving model's (negating).
    EXPECT_EQ(static_cast<const float*>(result.outputs[0].data())[1], 2.0f);
    EXPECT_GT(result.latency_us, 0.0);
    EXPECT_GT(result.paired_serving_us, 0.0);
  }
}

TEST_F(ShadowChildTest, AServingArtifactTheChildCannotPairCostsOnlyThePairedFigures) {
  // A serving model that fails every run: the candidate's answers still come, unpaired.
  ShadowChildOptions options = options_for();
  test::echo_artifact_write(dir_.path() / "failing", key_, [](json& m) { m["backend"]["options"] = {{"fail", "run"}}; });
  options.paired_dir = (dir_.path() / "failing").string();
  {
    ShadowChild child(options);
    EXPECT_TRUE(child.shadow_paired());
    const ShadowRunResult result = child.shadow_run(inputs(1));
    EXPECT_EQ(static_cast<const float*>(result.outputs[0].data())[1], 2.0f);
    EXPECT_LT(result.paired_serving_us, 0.0);
  }
  // One it cannot open (not there): no paired Session, and the child says why.
  options.paired_dir = (dir_.path() / "missing").string();
  ShadowChild child(options);
  EXPECT_FALSE(child.shadow_paired());
  EXPECT_NE(child.shadow_paired_problem(), "");
  EXPECT_EQ(child.shadow_paired_rss_bytes(), 0u);
  EXPECT_LT(child.shadow_run(inputs(2)).paired_serving_us, 0.0);
}

TEST_F(ShadowChildTest, ACandidateThatFailsASampleStaysUp) {
  ShadowChild child(options_for([](json& m) { m["backend"]["options"] = {{"fail", "run"}}; }));
  for (int i = 0; i < 2; ++i) {
    try {
      child.shadow_run(inputs(1));
      FAIL() << "no error";
    } catch (const ShadowChildDied& e) {
      FAIL() << "the child died: " << e.what();
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("testecho was told to fail"), std::string::npos) << e.what();
    }
  }
  EXPECT_GT(child.shadow_pid(), 0);
}

TEST_F(ShadowChildTest, ACandidateThatCrashesOnALiveInputDiesAloneWithTheSignalNamed) {
  ShadowChild child(options_for([](json& m) { m["backend"]["options"] = {{"mode", "double"}, {"fail", "abort-on-run-if-negative"}}; }));
  EXPECT_EQ(static_cast<const float*>(child.shadow_run(inputs(1)).outputs[0].data())[0], 2.0f);
  const pid_t pid = child.shadow_pid();
  try {
    child.shadow_run(inputs(-1));
    FAIL() << "survived";
  } catch (const ShadowChildDied& e) {
    EXPECT_EQ(std::string(e.what()), "the candidate crashed (SIGABRT) while running a sample");
  }
  EXPECT_EQ(child.shadow_pid(), 0);
  EXPECT_FALSE(process_exists(pid));  // reaped, not a zombie
  EXPECT_THROW(child.shadow_run(inputs(1)), ShadowChildDied);
  EXPECT_GE(child.shadow_cpu_seconds(), 0.0);
}

TEST_F(ShadowChildTest, AHungCandidateIsKilledAfterTheRunTimeout) {
  ShadowChildOptions options = options_for([](json& m) { m["backend"]["options"] = {{"mode", "double"}, {"fail", "hang-on-run-if-negative"}}; });
  options.run_timeout_s = 0.5;
  ShadowChild child(options);
  const pid_t pid = child.shadow_pid();
  try {
    child.shadow_run(inputs(-3));
    FAIL() << "answered";
  } catch (const ShadowChildDied& e) {
    EXPECT_EQ(std::string(e.what()), "the candidate did not answer within 0.5 s and was killed");
  }
  EXPECT_FALSE(process_exists(pid));
  EXPECT_THROW(child.shadow_run(inputs(1)), ShadowChildDied);
}

TEST_F(ShadowChildTest, AnUnverifiableCandidateIsRefusedWithASentence) {
  ShadowChildOptions options = options_for();
  options.build_keys = {test::key_bytes(test::test_key_make(10))};  // not the key it was signed with
  try {
    ShadowChild child(options);
    FAIL() << "accepted";
  } catch (const ShadowChildDied& e) {
    FAIL() << "reported as a death: " << e.what();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ERROR_CODE_INTEGRITY) << e.what();
    EXPECT_NE(std::string(e.what()).find("manifest.sig"), std::string::npos) << e.what();
  }
}

TEST_F(ShadowChildTest, ACandidateThatCannotLoadIsRefused) {
  try {
    ShadowChild child(options_for([](json& m) { m["backend"]["options"] = {{"fail", "open"}}; }));
    FAIL() << "accepted";
  } catch (const ShadowChildDied& e) {
    FAIL() << "reported as a death: " << e.what();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ERROR_CODE_BACKEND) << e.what();
    EXPECT_NE(std::string(e.what()).find("testecho was told to fail"), std::string::npos) << e.what();
  }
}

TEST_F(ShadowChildTest, TheChildsChatterGoesToTheAgentsStderrPrefixedNeverIntoTheProtocol) {
  const ShadowChildOptions options = options_for([](json& m) { m["backend"]["options"] = {{"mode", "double"}, {"chatter", true}}; });
  testing::internal::CaptureStderr();
  pid_t pid = 0;
  {
    ShadowChild child(options);
    pid = child.shadow_pid();
    EXPECT_EQ(static_cast<const float*>(child.shadow_run(inputs(3)).outputs[0].data())[0], 6.0f);
  }  // ended: its stderr is drained
  const std::string err = testing::internal::GetCapturedStderr();
  const std::string prefix = "edgesmith-agent: shadow child " + std::to_string(pid) + ": ";
  EXPECT_NE(err.find(prefix + "testecho chatter on stdout\n"), std::string::npos) << err;
  EXPECT_NE(err.find(prefix + "testecho chatter on stderr\n"), std::string::npos) << err;
}

// A corrupt agent: the child checks a frame against its manifest before allocating, and leaves.
TEST_F(ShadowChildTest, TheChildRefusesAFrameThatIsNotItsModelsInputs) {
  const ShadowChildOptions options = options_for();
  struct Case {
    const char* why;
    std::string frame;
  };
  const auto le = [](uint64_t v, int n) {
    std::string out;
    for (int i = 0; i < n; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
    return out;
  };
  const std::string header = std::string("\x02\x01\x00\x00", 4) + le(2, 4);
  const std::string x_dims = le(DTYPE_FLOAT32, 4) + le(2, 4) + le(2, 8) + le(3, 8);
  const std::vector<Case> cases = {
      {"2^60 bytes for x", header + x_dims + le(uint64_t{1} << 60, 8)},
      {"x of (3, 3)", header + le(DTYPE_FLOAT32, 4) + le(2, 4) + le(3, 8) + le(3, 8) + le(36, 8)},
      {"x as int64", header + le(DTYPE_INT64, 4) + le(2, 4) + le(2, 8) + le(3, 8) + le(48, 8)},
      {"rank 2^31", header + le(DTYPE_FLOAT32, 4) + le(uint64_t{1} << 31, 4)},
      {"three inputs", std::string("\x02\x01\x00\x00", 4) + le(3, 4)},
      {"protocol version 1", std::string("\x01\x01\x00\x00", 4) + le(2, 4)},
  };
  for (const Case& c : cases) {
    std::vector<std::string> args = {EDGESMITH_AGENT_EXE, "--shadow-child", options.artifact_dir, "--key-hex",
                                     child_key_hex(options.build_keys[0]), "--backend-path", options.backend_path[0]};
    ChildSpawnOptions spawn;
    spawn.stdio_socket = true;
    const ChildSpawned child = child_spawn(args, spawn, "for the test");
    std::string ready;
    char ch = 0;
    while (::read(child.stdio_fd, &ch, 1) == 1 && ch != '\n') ready.push_back(ch);
    EXPECT_TRUE(json::parse(ready)["ready"].get<bool>()) << ready;
    ASSERT_EQ(::send(child.stdio_fd, c.frame.data(), c.frame.size(), MSG_NOSIGNAL), static_cast<ssize_t>(c.frame.size()));
    const int status = child_reap_within(child.pid, 20);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 3) << c.why << ": " << child_status_describe(status);
    EXPECT_LE(::read(child.stdio_fd, &ch, 1), 0) << c.why << ": the child answered";  // EOF, or a reset (unread bytes)
    ::close(child.stdio_fd);
  }
}

// A corrupt child: the parent checks its answer against the candidate's outputs before allocating.
TEST_F(ShadowChildTest, TheParentRefusesAnAnswerThatIsNotTheCandidatesOutputs) {
  ShadowChildOptions options = options_for();
  const std::string script = (dir_.path() / "liar.sh").string();
  // Ready with the right manifest hash, read one request (120 bytes: the header and x and n), then
  // answer y as (2, 3) float32 carrying 2^60 bytes.
  test::file_write(script,
                   "#!/bin/sh\n"
                   "sha=$(sha256sum \"$2/manifest.json\" | cut -d' ' -f1)\n"
                   "printf '{\"ready\": true, \"manifest_sha256\": \"%s\", \"rss_increase_bytes\": 0, \"paired\": false, "
                   "\"paired_rss_bytes\": 0}\\n' \"$sha\"\n"
                   "head -c 120 > /dev/null\n"
                   "printf '\\002\\002\\000\\000\\002\\000\\000\\000' # OUTPUTS, 2 tensors\n"
                   "printf '\\000\\000\\000\\000\\000\\000\\000\\000' # latency 0\n"
                   "printf '\\000\\000\\000\\000\\000\\000\\000\\000' # paired latency 0\n"
                   "printf '\\012\\000\\000\\000\\002\\000\\000\\000' # float32, rank 2\n"
                   "printf '\\002\\000\\000\\000\\000\\000\\000\\000\\003\\000\\000\\000\\000\\000\\000\\000'\n"
                   "printf '\\000\\000\\000\\000\\000\\000\\000\\020' # 2^60 bytes\n"
                   "exec sleep 30\n");
  ::chmod(script.c_str(), 0700);
  options.executable = script;
  ShadowChild child(options);
  const pid_t pid = child.shadow_pid();
  try {
    child.shadow_run(inputs(1));
    FAIL() << "accepted";
  } catch (const ShadowChildDied& e) {
    EXPECT_EQ(std::string(e.what()),
              "the candidate broke the shadow protocol (output 'y' arrived with 1152921504606846976 bytes where the "
              "model's (2, 3) float32 has 24) and was killed");
  }
  EXPECT_FALSE(process_exists(pid));
}

}  // namespace
}  // namespace edgesmith
