// The deployment state machine (csrc/agent/deployer.h) with its seams replaced: downloads come
// from memory, the verifier and the session opener read manifest.json only, the reporter collects
// in a vector. No broker, no engine, no HTTP: what is left is the real Deployer, its real
// state.json, floor file, slots and `current` link.
#include <gtest/gtest.h>
#include <sodium.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "agent/deployer.h"
#include "artifact/signature.h"
#include "common/strings.h"
#include "common/digest.h"
#include "common/error.h"
#include "deploy/desired.h"
#include "deploy/slots.h"

namespace fs = std::filesystem;
#include "test_support.h"

using namespace edgesmith;

namespace {

constexpr int64_t NOW_S = 1790000000;

using test::TempDir;

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

void write_file(const fs::path& path, const std::string& data) {
  fs::create_directories(path.parent_path());
  std::ofstream(path, std::ios::binary) << data;
}

struct Key : test::DeployKey {
  /// `state` signed as a desired state.
  std::string envelope(const nlohmann::json& state) const {
    const std::string text = state.dump();
    return nlohmann::json{{"v", 1}, {"signed", text}, {"key_id", id()}, {"signature", sign(DESIRED_DOMAIN + text)}}.dump();
  }
};

// A one-file ustar archive builder (what the fake downloader serves).
std::string tar_of(const std::map<std::string, std::string>& files) {
  std::string out;
  for (const auto& [name, data] : files) {
    char h[512];
    std::memset(h, 0, sizeof(h));
    std::memcpy(h, name.data(), name.size());
    std::snprintf(h + 100, 8, "%07o", 0644);
    std::snprintf(h + 108, 8, "%07o", 0);
    std::snprintf(h + 116, 8, "%07o", 0);
    std::snprintf(h + 124, 12, "%011llo", static_cast<unsigned long long>(data.size()));
    std::snprintf(h + 136, 12, "%011o", 0);
    h[156] = '0';
    std::memcpy(h + 257, "ustar\0", 6);
    std::memcpy(h + 263, "00", 2);
    std::memset(h + 148, ' ', 8);
    unsigned sum = 0;
    for (const char c : h) sum += static_cast<uint8_t>(c);
    std::snprintf(h + 148, 8, "%06o", sum);
    out.append(h, 512);
    out += data;
    out.append((512 - data.size() % 512) % 512, '\0');
  }
  return out + std::string(1024, '\0');
}

// An "artifact" for the fakes: a manifest.json naming it, and a payload.
struct FakeArtifact {
  std::string name;
  std::string manifest;
  std::string archive;
  std::string url;
  explicit FakeArtifact(const std::string& n)
      : name(n), manifest(nlohmann::json{{"name", n}}.dump()),
        archive(tar_of({{"manifest.json", manifest}, {"payload.bin", "payload of " + n}})),
        url("http://artifacts.test/" + n + ".tar") {}
  std::string manifest_sha256() const { return sha256_string(manifest); }
  std::string sha256() const { return sha256_string(archive); }
};

class FakeDownloader : public DeployDownloader {
 public:
  void add(const FakeArtifact& artifact) { files_[artifact.url] = artifact.archive; }
  void downloader_fetch(const DownloadOptions& options) override {
    const auto it = files_.find(options.url);
    if (it == files_.end()) throw Error(ERROR_CODE_IO, "nothing at " + options.url);
    write_file(options.part_path, it->second);
  }

 private:
  std::map<std::string, std::string> files_;
};

class FakeVerifier : public DeployVerifier {
 public:
  std::set<DeployCheck> crash;  // these checks "crash the checking process"
  std::set<DeployCheck> fail;   // these fail as a wrong golden output does
  ArtifactCheck verifier_check(DeployCheck check, const std::string& artifact_dir) override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      calls_.push_back(check);
    }
    ArtifactCheck result;
    if (crash.count(check) > 0) {
      result.crashed = true;
      result.message = "the artifact's self-test crashed the checking process (signal 6 SIGABRT)";
    } else if (fail.count(check) > 0) {
      result.message = "the artifact failed its golden self-test (sample 0: 3 values off)";
    } else {
      result.passed = true;
      result.manifest_sha256 = sha256_string(read_file(fs::path(artifact_dir) / "manifest.json"));
    }
    return result;
  }
  std::vector<DeployCheck> calls() {
    std::lock_guard<std::mutex> lock(mutex_);
    return calls_;
  }

 private:
  std::mutex mutex_;
  std::vector<DeployCheck> calls_;
};

class FakeOpener : public DeploySessionOpener {
 public:
  OpenedArtifact opener_open(const std::string& artifact_dir) override {
    const fs::path manifest = fs::path(artifact_dir) / "manifest.json";
    if (!fs::is_regular_file(manifest)) throw Error(ERROR_CODE_IO, artifact_dir + " holds no artifact");
    const std::string text = read_file(manifest);
    OpenedArtifact opened;
    opened.manifest_sha256 = sha256_string(text);
    opened.name = nlohmann::json::parse(text).at("name");
    return opened;
  }
};

class FakeReporter : public DeployReporter {
 public:
  std::atomic<bool> broken{false};  // every report throws, as a SQLite error would
  void deploy_report_state(const nlohmann::json& body) override {
    if (broken) throw Error(ERROR_CODE_IO, "the spool failed (disk I/O error)");
    std::lock_guard<std::mutex> lock(mutex_);
    states_.push_back(body);
    cv_.notify_all();
  }
  void deploy_report_event(const std::string& event, const std::string& message, const nlohmann::json& details) override {
    if (broken) throw Error(ERROR_CODE_IO, "the spool failed (disk I/O error)");
    std::lock_guard<std::mutex> lock(mutex_);
    events_.push_back({{"event", event}, {"message", message}, {"details", details}});
    cv_.notify_all();
  }
  /// The first event named one of `names` for `deployment_id` (fails the test after 10 s).
  nlohmann::json wait_event(const std::string& deployment_id, const std::set<std::string>& names) {
    std::unique_lock<std::mutex> lock(mutex_);
    nlohmann::json found;
    const bool ok = cv_.wait_for(lock, std::chrono::seconds(10), [&] {
      for (const nlohmann::json& e : events_) {
        if (names.count(e["event"]) > 0 && e["details"]["deployment_id"] == deployment_id) {
          found = e;
          return true;
        }
      }
      return false;
    });
    EXPECT_TRUE(ok) << "no event for " << deployment_id;
    return found;
  }
  size_t wait_states(size_t n) {
    std::unique_lock<std::mutex> lock(mutex_);
    cv_.wait_for(lock, std::chrono::seconds(10), [&] { return states_.size() >= n; });
    return states_.size();
  }
  std::vector<nlohmann::json> events() {
    std::lock_guard<std::mutex> lock(mutex_);
    return events_;
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  std::vector<nlohmann::json> events_;
  std::vector<nlohmann::json> states_;
};

const std::set<std::string> FINAL = {"deploy.applied", "deploy.rolled-back", "deploy.failed", "deploy.refused"};

// One device: its data directory, factory artifact, keys and fakes, and a Deployer over them.
class Device {
 public:
  Device() {
    factory_dir = dir.path() / "factory";
    write_file(factory_dir / "manifest.json", nlohmann::json{{"name", "factory"}}.dump());
    fs::create_directories(dir.path() / "data");  // what the agent creates before the deployer boots
    downloader = std::make_shared<FakeDownloader>();
    verifier = std::make_shared<FakeVerifier>();
  }
  ~Device() { stop(); }

  /// A new Deployer over the same data directory (an agent start), booted and started.
  void start(bool connect = true) {
    stop();
    DeployerOptions options;
    options.data_dir = (dir.path() / "data").string();
    options.fleet = "plant-a";
    options.device = "cam-01";
    options.factory_artifact = factory_dir.string();
    options.deploy_keys = {key.pk};
    options.max_attempts = 3;
    options.boot_settle_s = boot_settle_s;
    options.clock_s = [this] { return now_s; };
    options.downloader = downloader;
    options.verifier = verifier;
    options.opener = std::make_shared<FakeOpener>();
    options.log = [this](const std::string& line) {
      std::lock_guard<std::mutex> lock(log_mutex);
      log += line + "\n";
    };
    deployer = std::make_unique<Deployer>(options);
    deployer->deployer_boot();
    deployer->deployer_start(&reporter, [this](std::shared_ptr<Session>) { ++swaps; });
    if (connect) deployer->deployer_subscribed();
  }
  /// Boot only (an agent that dies before it reaches the broker).
  void boot_only() {
    stop();
    DeployerOptions options;
    options.data_dir = (dir.path() / "data").string();
    options.fleet = "plant-a";
    options.device = "cam-01";
    options.factory_artifact = factory_dir.string();
    options.deploy_keys = {key.pk};
    options.opener = std::make_shared<FakeOpener>();
    options.verifier = verifier;
    Deployer(options).deployer_boot();
  }
  void stop() {
    if (deployer) deployer->deployer_stop();
    deployer.reset();
  }

  /// A signed desired state for `artifact` (publish it with deployer->deployer_desired()).
  std::string desired(const FakeArtifact& artifact, uint64_t version, const std::string& deployment_id,
                      int64_t not_after = 0, const std::string& action = "deploy") {
    downloader->add(artifact);
    nlohmann::json state = {{"v", 1}, {"fleet", "plant-a"}, {"device", "cam-01"}, {"version", version},
                            {"deployment_id", deployment_id}, {"action", action}, {"issued_at_ms", NOW_S * 1000},
                            {"artifact", {{"url", artifact.url}, {"sha256", artifact.sha256()},
                                          {"size", artifact.archive.size()},
                                          {"manifest_sha256", artifact.manifest_sha256()}, {"name", artifact.name}}}};
    if (not_after != 0) state["not_after"] = not_after;
    return key.envelope(state);
  }
  nlohmann::json deploy(const FakeArtifact& artifact, uint64_t version, const std::string& deployment_id,
                        int64_t not_after = 0) {
    deployer->deployer_desired(desired(artifact, version, deployment_id, not_after));
    return reporter.wait_event(deployment_id, FINAL);
  }
  nlohmann::json state() const { return nlohmann::json::parse(read_file(deploy_dir() / "state.json")); }
  fs::path deploy_dir() const { return dir.path() / "data" / "deploy"; }
  std::string current() const {
    std::error_code ec;
    const fs::path target = fs::read_symlink(deploy_dir() / "current", ec);
    return ec ? "" : target.string();
  }

  TempDir dir;
  fs::path factory_dir;
  Key key;
  int64_t now_s = NOW_S;
  double boot_settle_s = 60.0;
  std::shared_ptr<FakeDownloader> downloader;
  std::shared_ptr<FakeVerifier> verifier;
  FakeReporter reporter;
  std::atomic<int> swaps{0};
  std::unique_ptr<Deployer> deployer;
  std::mutex log_mutex;
  std::string log;
};

}  // namespace

TEST(Deployer, PhaseNamesAreWhatStateJsonKeeps) {
  EXPECT_STREQ(deploy_phase_name(DEPLOY_PHASE_DOWNLOAD), "download");
  EXPECT_STREQ(deploy_phase_name(DEPLOY_PHASE_VERIFY), "verify");
  EXPECT_STREQ(deploy_phase_name(DEPLOY_PHASE_SELF_TEST), "self-test");
  EXPECT_STREQ(deploy_phase_name(DEPLOY_PHASE_SWITCH), "switch");
  EXPECT_STREQ(deploy_phase_name(DEPLOY_PHASE_DONE), "");
}

TEST(Deployer, AppliesThroughEveryPhaseOnceAndRecordsIt) {
  Device device;
  device.start();
  const FakeArtifact v2("v2");
  const nlohmann::json result = device.deploy(v2, 1, "dep-1");
  EXPECT_EQ(result["event"], "deploy.applied") << result.dump();
  EXPECT_EQ(result["details"]["slot"], "a");
  EXPECT_EQ(device.swaps, 1);
  EXPECT_EQ(device.current(), "slots/a");
  EXPECT_EQ(device.verifier->calls(), (std::vector<DeployCheck>{DEPLOY_CHECK_VERIFY, DEPLOY_CHECK_SELF_TEST}));
  device.stop();  // the worker marks the result reported just after the report
  const nlohmann::json state = device.state();
  EXPECT_EQ(state["highest_version"], 1);
  EXPECT_EQ(state["deployment"]["result"], "applied");
  EXPECT_EQ(state["deployment"]["phase"], "");
  EXPECT_TRUE(state["deployment"]["reported"].get<bool>());
  EXPECT_EQ(state["deployment"]["attempts"],
            nlohmann::json({{"download", 1}, {"verify", 1}, {"self-test", 1}, {"switch", 1}}));
  EXPECT_EQ(state["slots"]["a"]["status"], "good");
  EXPECT_EQ(state["slots"]["a"]["manifest_sha256"], v2.manifest_sha256());
  EXPECT_EQ(deploy_floor_read((device.deploy_dir() / "floor").string()), 1u);
  EXPECT_TRUE(fs::is_empty(device.deploy_dir() / "staging"));
  const std::vector<nlohmann::json> events = device.reporter.events();
  ASSERT_GE(events.size(), 2u);
  EXPECT_EQ(events[events.size() - 2]["event"], "deploy.started");
}

TEST(Deployer, ACrashingSelfTestFailsAfterMaxAttemptsAndTheOldModelServes) {
  Device device;
  device.verifier->crash = {DEPLOY_CHECK_SELF_TEST};
  device.start();
  const nlohmann::json result = device.deploy(FakeArtifact("crashes"), 1, "dep-crash");
  EXPECT_EQ(result["event"], "deploy.failed") << result.dump();
  const std::string message = result["message"];
  EXPECT_NE(message.find("self-test phase was tried 3 times"), std::string::npos) << message;
  EXPECT_NE(message.find("SIGABRT"), std::string::npos) << message;
  std::vector<DeployCheck> calls = device.verifier->calls();
  EXPECT_EQ(std::count(calls.begin(), calls.end(), DEPLOY_CHECK_SELF_TEST), 3);
  EXPECT_EQ(device.swaps, 0);
  EXPECT_EQ(device.current(), "");  // the factory artifact still serves
  const nlohmann::json state = device.state();
  EXPECT_EQ(state["deployment"]["result"], "failed");
  EXPECT_EQ(state["deployment"]["phase"], "self-test");
  EXPECT_EQ(state["slots"]["a"]["status"], "empty");
}

TEST(Deployer, AFailingSelfTestFailsAtOnce) {
  Device device;
  device.verifier->fail = {DEPLOY_CHECK_SELF_TEST};
  device.start();
  const nlohmann::json result = device.deploy(FakeArtifact("wrong"), 1, "dep-wrong");
  EXPECT_EQ(result["event"], "deploy.failed");
  EXPECT_NE(result["message"].get<std::string>().find("golden self-test"), std::string::npos);
  std::vector<DeployCheck> calls = device.verifier->calls();
  EXPECT_EQ(std::count(calls.begin(), calls.end(), DEPLOY_CHECK_SELF_TEST), 1);  // not retried
  EXPECT_EQ(device.current(), "");
}

TEST(Deployer, APhaseTheAgentDiedInMaxTimesFailsTheDeploymentOnResume) {
  Device device;
  const FakeArtifact v2("v2");
  const std::string envelope = device.desired(v2, 4, "dep-loop");
  // What three agents that crashed while verifying it left behind.
  device.boot_only();
  DeployState state = deploy_state_read((device.deploy_dir() / "state.json").string());
  DeploymentRecord record;
  record.deployment_id = "dep-loop";
  record.version = 4;
  record.action = "deploy";
  record.result = "in-progress";
  record.phase = "verify";
  record.attempts = {{"download", 1}, {"verify", 3}};
  const DesiredState parsed = desired_parse(envelope, {device.key.pk});
  record.signed_sha256 = parsed.signed_sha256;
  record.desired = desired_to_json(parsed);
  state.highest_version = 4;
  state.deployment = record;
  deploy_state_write((device.deploy_dir() / "state.json").string(), state);

  device.start();
  device.deployer->deployer_desired(envelope);  // the retained desired state, again
  const nlohmann::json result = device.reporter.wait_event("dep-loop", FINAL);
  EXPECT_EQ(result["event"], "deploy.failed") << result.dump();
  EXPECT_NE(result["message"].get<std::string>().find("verify phase was tried 3 times without finishing (the agent "
                                                      "stopped or crashed during it each time)"),
            std::string::npos)
      << result.dump();
  EXPECT_TRUE(device.verifier->calls().empty());  // not verified a fourth time
  EXPECT_EQ(device.current(), "");
}

TEST(Deployer, DeletingStateJsonDoesNotLetAnOlderDesiredStateThrough) {
  Device device;
  device.start();
  EXPECT_EQ(device.deploy(FakeArtifact("v5"), 5, "dep-5")["event"], "deploy.applied");
  device.stop();
  fs::remove(device.deploy_dir() / "state.json");
  device.start();
  for (const auto& [version, id] : std::vector<std::pair<uint64_t, std::string>>{{3, "dep-3"}, {5, "dep-5b"}}) {
    const nlohmann::json result = device.deploy(FakeArtifact("old"), version, id);
    EXPECT_EQ(result["event"], "deploy.refused") << result.dump();
    EXPECT_NE(result["message"].get<std::string>().find("not above 5"), std::string::npos) << result.dump();
  }
  EXPECT_EQ(device.state()["highest_version"], 5);  // restored into the new state.json
  // The other way round: the floor file lost, state.json kept.
  device.stop();
  fs::remove(device.deploy_dir() / "floor");
  device.start();
  EXPECT_EQ(device.deploy(FakeArtifact("old"), 4, "dep-4")["event"], "deploy.refused");
  EXPECT_EQ(deploy_floor_read((device.deploy_dir() / "floor").string()), 5u);  // written again at boot
  EXPECT_EQ(device.deploy(FakeArtifact("v6"), 6, "dep-6")["event"], "deploy.applied");
}

TEST(Deployer, AnExpiredDesiredStateIsRefusedWithinTheClockSkewAllowance) {
  Device device;
  device.start();
  const nlohmann::json expired = device.deploy(FakeArtifact("late"), 1, "dep-late", NOW_S - DESIRED_CLOCK_SKEW_S - 1);
  EXPECT_EQ(expired["event"], "deploy.refused") << expired.dump();
  EXPECT_NE(expired["message"].get<std::string>().find("expired"), std::string::npos);
  EXPECT_EQ(deploy_floor_read((device.deploy_dir() / "floor").string()), 0u);  // refused before it was accepted
  const nlohmann::json skewed = device.deploy(FakeArtifact("skewed"), 2, "dep-skew", NOW_S - DESIRED_CLOCK_SKEW_S + 1);
  EXPECT_EQ(skewed["event"], "deploy.applied") << skewed.dump();
}

TEST(Deployer, AReportThatCannotBeStoredNeverChangesTheResult) {
  Device device;
  device.start();
  device.reporter.broken = true;
  const FakeArtifact v2("v2");
  device.deployer->deployer_desired(device.desired(v2, 1, "dep-quiet"));
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (std::chrono::steady_clock::now() < deadline &&
         (!fs::exists(device.deploy_dir() / "state.json") || device.state()["deployment"].is_null() ||
          device.state()["deployment"]["result"] == "in-progress")) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  nlohmann::json state = device.state();
  EXPECT_EQ(state["deployment"]["result"], "applied") << state.dump();  // not "failed"
  EXPECT_FALSE(state["deployment"]["reported"].get<bool>());
  EXPECT_EQ(device.current(), "slots/a");
  EXPECT_TRUE(device.reporter.events().empty());
  // The next connection reports it.
  device.reporter.broken = false;
  device.deployer->deployer_subscribed();
  EXPECT_EQ(device.reporter.wait_event("dep-quiet", FINAL)["event"], "deploy.applied");
  device.stop();
  EXPECT_TRUE(device.state()["deployment"]["reported"].get<bool>());
}

TEST(Deployer, ASlotThatNeverStartsWellIsLeftForTheLastGoodOne) {
  Device device;
  device.start();
  EXPECT_EQ(device.deploy(FakeArtifact("v2"), 1, "dep-v2")["event"], "deploy.applied");
  EXPECT_EQ(device.deploy(FakeArtifact("v3"), 2, "dep-v3")["event"], "deploy.applied");
  EXPECT_EQ(device.current(), "slots/b");
  // A start that reaches the broker clears the slot's boot counter.
  const size_t states = device.reporter.wait_states(0);
  device.start();
  EXPECT_GT(device.reporter.wait_states(states + 1), states);
  device.stop();
  EXPECT_EQ(device.state()["slots"]["b"]["boot_attempts"], 0);
  // Three starts that die before reporting (the new model crashes the agent) ...
  for (int i = 1; i <= 3; ++i) {
    device.boot_only();
    EXPECT_EQ(device.state()["slots"]["b"]["boot_attempts"], i);
    EXPECT_EQ(device.current(), "slots/b");
  }
  // ... and the fourth serves the last good slot and reports the deployment failed.
  device.start();
  EXPECT_EQ(device.current(), "slots/a");
  const nlohmann::json state = device.state();
  EXPECT_EQ(state["slots"]["b"]["status"], "bad");
  EXPECT_EQ(state["deployment"]["result"], "failed");
  const nlohmann::json result = device.reporter.wait_event("dep-v3", {"deploy.failed"});
  EXPECT_NE(result["message"].get<std::string>().find("started 3 times"), std::string::npos) << result.dump();
  EXPECT_EQ(result["details"]["slot"], "a");
}

TEST(Deployer, AStartThatRunsWithoutABrokerStillClearsTheBootCounter) {
  Device device;
  device.start();
  EXPECT_EQ(device.deploy(FakeArtifact("v2"), 1, "dep-v2")["event"], "deploy.applied");
  device.stop();
  // Offline restarts (no SUBACK) must not mark a healthy slot bad: running boot_settle_s counts.
  device.boot_settle_s = 0.2;
  for (int i = 0; i < 4; ++i) {
    device.start(false);
    EXPECT_EQ(device.state()["slots"]["a"]["boot_attempts"], 1);
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (device.state()["slots"]["a"]["boot_attempts"] != 0 && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    EXPECT_EQ(device.state()["slots"]["a"]["boot_attempts"], 0);
    device.stop();
  }
  EXPECT_EQ(device.state()["slots"]["a"]["status"], "good");
  EXPECT_EQ(device.current(), "slots/a");
}

TEST(Deployer, AResumeWithTheArchiveWholeIsNotADownloadAttempt) {
  Device device;
  const FakeArtifact v2("v2");
  const std::string envelope = device.desired(v2, 2, "dep-later");
  // Killed in self-test three times, each resume passing through `download` with the archive whole.
  device.boot_only();
  write_file(device.deploy_dir() / "staging" / (v2.sha256() + ".tar.part"), v2.archive);
  DeployState state;
  DeploymentRecord record;
  record.deployment_id = "dep-later";
  record.version = 2;
  record.action = "deploy";
  record.result = "in-progress";
  record.phase = "self-test";
  record.attempts = {{"download", 3}, {"verify", 1}, {"self-test", 1}};
  const DesiredState parsed = desired_parse(envelope, {device.key.pk});
  record.signed_sha256 = parsed.signed_sha256;
  record.desired = desired_to_json(parsed);
  state.highest_version = 2;
  state.deployment = record;
  deploy_state_write((device.deploy_dir() / "state.json").string(), state);
  device.start();
  device.deployer->deployer_desired(envelope);
  const nlohmann::json result = device.reporter.wait_event("dep-later", FINAL);
  EXPECT_EQ(result["event"], "deploy.applied") << result.dump();
  device.stop();
  EXPECT_EQ(device.state()["deployment"]["attempts"]["download"], 3);
}
