#include <gtest/gtest.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "common/error.h"
#include "runtime/isa.h"
#include "runtime/npy.h"
#include "runtime/session.h"
#include "test_support.h"

namespace edgesmith {
namespace {

using json = nlohmann::json;
namespace fs = std::filesystem;

class SessionTest : public ::testing::Test {
 protected:
  void SetUp() override { setenv("EDGESMITH_BACKEND_PATH", test::test_backend_dir().c_str(), 1); }

  std::unique_ptr<Session> open(const std::function<void(json&)>& mutate = {},
                                const std::vector<std::pair<std::string, std::string>>& extra = {}) {
    // A fresh directory per artifact: leftover files would be extra (unsigned) files.
    const auto dir = dir_.path() / std::to_string(opened_++);
    test::echo_artifact_write(dir, key_, mutate, extra);
    return session_open(dir.string(), {test::key_bytes(key_)});
  }

  Error open_error(ErrorCode code, const std::function<void(json&)>& mutate = {},
                   const std::vector<std::pair<std::string, std::string>>& extra = {}) {
    try {
      open(mutate, extra);
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), code) << e.what();
      return e;
    }
    ADD_FAILURE() << "session opened but should not have";
    return Error(ERROR_CODE_IO, "");
  }

  test::TempDir dir_;
  int opened_ = 0;
  test::TestKey key_ = test::test_key_make(3);
  Tensor x_{DTYPE_FLOAT32, {2, 3}};
  Tensor n_{DTYPE_INT64, {4}};
};

std::string run_error(Session& session, const std::vector<TensorView>& inputs) {
  try {
    session.session_run(inputs);
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ERROR_CODE_INPUT) << e.what();
    return e.what();
  }
  ADD_FAILURE() << "run succeeded but should not have";
  return {};
}

TEST_F(SessionTest, RunsAndRecordsStats) {
  auto session = open();
  EXPECT_EQ(session->session_describe(), "testecho 1.0");
  for (int i = 0; i < 6; ++i) static_cast<float*>(x_.data())[i] = static_cast<float>(i);
  for (int i = 0; i < 4; ++i) static_cast<int64_t*>(n_.data())[i] = i;
  const auto outputs = session->session_run({x_.view(), n_.view()});
  ASSERT_EQ(outputs.size(), 2u);
  EXPECT_EQ(static_cast<const float*>(outputs[0].data())[5], 10.0f);
  EXPECT_EQ(static_cast<const int64_t*>(outputs[1].data())[3], 3);
  const StatsSnapshot stats = session->session_stats();
  EXPECT_EQ(stats.runs, 1u);
  EXPECT_EQ(stats.latency_counts.size(), 40u);
  EXPECT_EQ(stats.outputs[0].counts, (std::vector<uint64_t>{0, 0, 2}));  // rows [0 2 4], [6 8 10]
  EXPECT_EQ(stats.outputs[1].counts, (std::vector<uint64_t>{1, 1, 1}));  // 0, 1, 2; 3 overflows
  EXPECT_EQ(stats.outputs[1].overflow, 1u);
}

TEST_F(SessionTest, InputMismatchesAreTypedAndNamed) {
  auto session = open();
  EXPECT_NE(run_error(*session, {x_.view()}).find("the model takes 2 inputs (x, n), 1 was given"),
            std::string::npos);
  Tensor x64(DTYPE_FLOAT64, {2, 3});
  EXPECT_NE(run_error(*session, {x64.view(), n_.view()})
                .find("input 'x' has dtype float64, the model takes float32"),
            std::string::npos);
  Tensor x_wide(DTYPE_FLOAT32, {2, 4});
  EXPECT_NE(run_error(*session, {x_wide.view(), n_.view()})
                .find("input 'x' has shape (2, 4), the model takes (2, 3)"),
            std::string::npos);
  Tensor n_short(DTYPE_INT64, {3});
  EXPECT_NE(run_error(*session, {x_.view(), n_short.view()}).find("(3,), the model takes (4,)"),
            std::string::npos);
  EXPECT_EQ(session->session_stats().errors, 4u);
  EXPECT_EQ(session->session_stats().runs, 0u);
}

TEST_F(SessionTest, NanInputsAreCountedAndStillRun) {
  auto session = open();
  std::memset(x_.data(), 0, x_.byte_size());
  std::memset(n_.data(), 0, n_.byte_size());
  static_cast<float*>(x_.data())[1] = NAN;
  static_cast<float*>(x_.data())[4] = NAN;
  const auto outputs = session->session_run({x_.view(), n_.view()});
  EXPECT_TRUE(std::isnan(static_cast<const float*>(outputs[0].data())[1]));
  const StatsSnapshot stats = session->session_stats();
  EXPECT_EQ(stats.runs, 1u);
  EXPECT_EQ(stats.nan_input_runs, 1u);
  EXPECT_EQ(stats.nan_input_values, 2u);
}

TEST_F(SessionTest, SelfTestPassesAndCatchesWrongOutputs) {
  auto session = open();
  const SelfTestResult result = session->session_self_test();
  EXPECT_TRUE(result.passed);
  EXPECT_EQ(result.samples, 2u);
  EXPECT_EQ(result.max_abs_err, 0.0);
  EXPECT_EQ(session->session_stats().runs, 0u);  // golden runs are not traffic

  // The identity mode returns x instead of 2x: out of tolerance.
  auto identity = open([](json& m) { m["backend"]["options"] = json::object(); });
  const SelfTestResult failed = identity->session_self_test();
  EXPECT_FALSE(failed.passed);
  EXPECT_GT(failed.max_abs_err, 1.0);
  EXPECT_NE(failed.details[0].message.find("output 'y'"), std::string::npos);
}

TEST_F(SessionTest, ConcurrentRunsMatchSerial) {
  auto session = open();
  for (int i = 0; i < 6; ++i) static_cast<float*>(x_.data())[i] = static_cast<float>(i) * 0.5f;
  std::memset(n_.data(), 0, n_.byte_size());
  const auto expected = session->session_run({x_.view(), n_.view()});
  std::vector<std::thread> threads;
  std::atomic<int> mismatches{0};
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 200; ++i) {
        const auto got = session->session_run({x_.view(), n_.view()});
        if (std::memcmp(got[0].data(), expected[0].data(), expected[0].byte_size()) != 0) ++mismatches;
      }
    });
  }
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(mismatches.load(), 0);
  EXPECT_EQ(session->session_stats().runs, 1601u);
}

TEST_F(SessionTest, TamperedArtifactIsRefusedBeforeLoad) {
  test::echo_artifact_write(dir_.path(), key_);
  test::file_write(dir_.path() / "model.bin", "testecho payload, changed");
  try {
    session_open(dir_.path().string(), {test::key_bytes(key_)});
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ERROR_CODE_INTEGRITY);
    EXPECT_EQ(e.path(), "model.bin");
  }
}

TEST_F(SessionTest, FilesSwappedAfterVerificationAreNotLoaded) {
  // Between verification and load, the payload is replaced (by a rename, by a symlink) and a golden
  // output rewritten: the backend still opens the verified payload and the self-test reads the
  // verified goldens. Reopening files by path, the load saw the swapped ones.
  for (const bool symlink : {false, true}) {
    const auto dir = dir_.path() / ("swap" + std::to_string(symlink));
    test::echo_artifact_write(dir, key_);
    SessionOptions options;
    options.on_verified = [&] {
      test::file_write(dir / "elsewhere.bin", "not a payload");
      fs::remove(dir / "model.bin");
      if (symlink) {
        fs::create_symlink(dir / "elsewhere.bin", dir / "model.bin");
      } else {
        fs::rename(dir / "elsewhere.bin", dir / "model.bin");
      }
      test::file_write(dir / "golden" / "sample_0" / "output_0.npy", npy_serialize(Tensor(DTYPE_FLOAT32, {2, 3}).view()));
    };
    std::unique_ptr<Session> session = session_open(dir.string(), {test::key_bytes(key_)}, options);
    EXPECT_EQ(session->session_describe(), "testecho 1.0");
    EXPECT_TRUE(session->session_self_test().passed);
    EXPECT_NE(session->session_load_dir(), session->session_artifact_dir());
    const fs::path load_dir = session->session_load_dir();
    EXPECT_EQ(fs::status(load_dir).permissions() & (fs::perms::group_all | fs::perms::others_all), fs::perms::none);
    session.reset();
    EXPECT_FALSE(fs::exists(load_dir)) << "the private copy outlived its session";
  }
}

TEST_F(SessionTest, CopiesOfDeadProcessesAreRemoved) {
  // A process that crashed while loading left its private copy behind: nobody holds its lock, so
  // the next load removes it. A copy whose lock is held (a live process, in any PID namespace), a
  // fresh unlocked one (its maker may not have locked it yet) and foreign names are left alone.
  test::TempDir tmp;
  const fs::path dead = tmp.path() / "edgesmith-load-4242-abcdef";
  const fs::path alive = tmp.path() / "edgesmith-load-4243-abcdef";
  const fs::path young = tmp.path() / "edgesmith-load-4244-abcdef";
  const fs::path other = tmp.path() / "not-edgesmith-load-4245-abcdef";
  for (const fs::path& dir : {dead, alive, young, other}) test::file_write(dir / "model.bin", "x");
  const auto old = fs::file_time_type::clock::now() - std::chrono::minutes(5);
  for (const fs::path& dir : {dead, alive, other}) fs::last_write_time(dir, old);
  const int held = ::open(alive.c_str(), O_RDONLY | O_DIRECTORY);
  ASSERT_GE(held, 0);
  ASSERT_EQ(::flock(held, LOCK_EX | LOCK_NB), 0);
  const char* saved = std::getenv("TMPDIR");
  const std::string saved_value = saved != nullptr ? saved : "";
  setenv("TMPDIR", tmp.path().c_str(), 1);
  auto session = open();
  EXPECT_EQ(fs::path(session->session_load_dir()).parent_path(), tmp.path());
  if (saved != nullptr) setenv("TMPDIR", saved_value.c_str(), 1); else unsetenv("TMPDIR");
  EXPECT_FALSE(fs::exists(dead));
  EXPECT_TRUE(fs::exists(alive));
  EXPECT_TRUE(fs::exists(young));
  EXPECT_TRUE(fs::exists(other));
  // This session's own copy is held while it lives: another process's clean-up cannot take it.
  const int probe = ::open(session->session_load_dir().c_str(), O_RDONLY | O_DIRECTORY);
  ASSERT_GE(probe, 0);
  EXPECT_NE(::flock(probe, LOCK_EX | LOCK_NB), 0);
  ::close(probe);
  ::close(held);
}

TEST_F(SessionTest, ForeignIsaIsRefusedBeforeDlopen) {
  // An aarch64 ELF header on an x86_64 host (or the other way round).
  const std::string host = host_isa();
  const uint16_t machine = host == "aarch64" ? 62 : 183;
  std::string elf(64, '\0');
  elf.replace(0, 4, "\x7f" "ELF");
  elf[4] = 2;
  elf[5] = 1;
  elf[16] = 3;
  elf[18] = static_cast<char>(machine & 0xff);
  elf[19] = static_cast<char>(machine >> 8);
  const auto tvm_payload = [](json& m) { m["payload"] = {{"format", "tvm-relax-so"}, {"entry", "model.so"}}; };
  const Error foreign = open_error(ERROR_CODE_UNSUPPORTED, tvm_payload, {{"model.so", elf}});
  const std::string other = host == "aarch64" ? "x86_64" : "aarch64";
  EXPECT_NE(std::string(foreign.what()).find("model.so is an " + other + " shared library, this machine is " + host),
            std::string::npos) << foreign.what();
  EXPECT_NE(std::string(foreign.what()).find("edgesmith prove"), std::string::npos);

  const Error truncated = open_error(ERROR_CODE_UNSUPPORTED, tvm_payload, {{"model.so", "\x7f" "EL"}});
  EXPECT_NE(std::string(truncated.what()).find("model.so is not an ELF shared library (truncated or foreign)"),
            std::string::npos) << truncated.what();

  const Error target = open_error(ERROR_CODE_UNSUPPORTED, [&](json& m) { m["target"]["isa"] = other; });
  EXPECT_NE(std::string(target.what()).find("is built for " + other), std::string::npos) << target.what();
}

TEST_F(SessionTest, UnsupportedFormatsAndBackendFailures) {
  const Error tflite = open_error(ERROR_CODE_UNSUPPORTED, [](json& m) { m["payload"]["format"] = "tflite"; });
  EXPECT_NE(std::string(tflite.what()).find("backend 'testecho' of this runtime runs testecho payloads"),
            std::string::npos) << tflite.what();
  const Error missing = open_error(ERROR_CODE_BACKEND, [](json& m) { m["backend"]["name"] = "nothere"; });
  EXPECT_NE(std::string(missing.what()).find("backend 'nothere' is not built into this runtime"),
            std::string::npos);
  const Error load = open_error(ERROR_CODE_BACKEND, [](json& m) { m["backend"]["options"]["fail"] = "open"; });
  EXPECT_NE(std::string(load.what()).find("testecho was told to fail"), std::string::npos);

  auto session = open([](json& m) { m["backend"]["options"]["fail"] = "run"; });
  try {
    session->session_run({x_.view(), n_.view()});
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ERROR_CODE_BACKEND);
    EXPECT_NE(std::string(e.what()).find("testecho was told to fail"), std::string::npos);
  }
  EXPECT_EQ(session->session_stats().errors, 1u);
}

TEST_F(SessionTest, PluginExceptionsStopAtTheCTable) {
  // testecho's open function throws: the adapter turns it into a LOAD_FAILED status.
  const Error thrown = open_error(ERROR_CODE_BACKEND, [](json& m) { m["backend"]["options"]["fail"] = "throw"; });
  EXPECT_NE(std::string(thrown.what()).find("backend 'testecho' could not load"), std::string::npos) << thrown.what();
  EXPECT_NE(std::string(thrown.what()).find("testecho threw as it was told"), std::string::npos) << thrown.what();
}

TEST_F(SessionTest, OutputOfAnotherShapeIsABackendError) {
  // testecho echoes its input (2, 3) while the manifest says (3, 2): the C++ adapter refuses to
  // copy it into the runtime's (3, 2) buffer.
  auto session = open([](json& m) { m["outputs"][0]["shape"] = {3, 2}; });
  try {
    session->session_run({x_.view(), n_.view()});
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ERROR_CODE_BACKEND);
    EXPECT_NE(std::string(e.what()).find("output 0 came back as float32 (2, 3), the manifest says float32 (3, 2)"),
              std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace edgesmith
