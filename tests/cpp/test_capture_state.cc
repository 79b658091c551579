// The signed capture state (csrc/deploy/capture_state.h): the shared envelope under its own
// signature domain, its fields as runtime/contract.py CaptureState (with the shared cases of
// tests/data/contract/cases.json), and its own version floor.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/contract_words.h"
#include "common/digest.h"
#include "common/error.h"
#include "deploy/capture_state.h"
#include "deploy/desired.h"
#include "deploy/shadow_state.h"
#include "test_support.h"
#include "common/url.h"

using namespace edgesmith;

namespace {

using Key = test::DeployKey;
const std::string TOKEN = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

nlohmann::json capture_doc() {
  return {{"v", 1}, {"kind", "capture"}, {"fleet", "plant-a"}, {"device", "cam-01"}, {"version", 4},
          {"capture_id", "cap-20261207-1200-abc123"}, {"action", "start"}, {"issued_at_ms", 1790000000000LL},
          {"not_after", 1790000600},
          {"policy", {{"uniform", 0.25}, {"low_confidence", 0.6}, {"drift", true}, {"drift_rate", 0.1}, {"disagreement", false}}},
          {"max_samples", 50}, {"max_bytes", 1 << 20}, {"retention_s", 3600},
          {"upload_url", "http://127.0.0.1:8471"}, {"upload_token", TOKEN}};
}

std::string envelope(const Key& key, const std::string& text, const std::string& domain = contract::CAPTURE_DOMAIN) {
  return nlohmann::json{{"v", 1}, {"signed", text}, {"key_id", key.id()}, {"signature", key.sign(domain + text)}}.dump();
}

template <typename F>
std::string refusal(F&& parse) {
  try {
    parse();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ERROR_CODE_INTEGRITY);
    return e.what();
  }
  return "";
}

std::string temp_dir() {
  const std::string dir = (std::filesystem::temp_directory_path() /
                           ("edgesmith-capture-state-" + std::to_string(::testing::UnitTest::GetInstance()->random_seed()) +
                            "-" + ::testing::UnitTest::GetInstance()->current_test_info()->name()))
                              .string();
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

}  // namespace

TEST(CaptureState, AcceptsAValidEnvelope) {
  Key key;
  const std::string text = capture_doc().dump();
  const CaptureState s = capture_state_parse(envelope(key, text), {key.pk});
  EXPECT_EQ(s.fleet, "plant-a");
  EXPECT_EQ(s.device, "cam-01");
  EXPECT_EQ(s.version, 4u);
  EXPECT_EQ(s.capture_id, "cap-20261207-1200-abc123");
  EXPECT_EQ(s.action, "start");
  EXPECT_DOUBLE_EQ(s.policy.uniform, 0.25);
  EXPECT_DOUBLE_EQ(s.policy.low_confidence, 0.6);
  EXPECT_TRUE(s.policy.drift);
  EXPECT_DOUBLE_EQ(s.policy.drift_rate, 0.1);
  EXPECT_FALSE(s.policy.disagreement);
  EXPECT_EQ(s.max_samples, 50u);
  EXPECT_EQ(s.max_bytes, 1u << 20);
  EXPECT_EQ(s.retention_s, 3600u);
  EXPECT_EQ(s.upload_url, "http://127.0.0.1:8471");
  EXPECT_EQ(s.upload_token, TOKEN);
  EXPECT_EQ(s.signed_sha256, sha256_string(text));
  EXPECT_EQ(capture_state_unverified_id(envelope(key, text)), "cap-20261207-1200-abc123");
}

TEST(CaptureState, DomainsDoNotCross) {
  Key key;
  const std::string text = capture_doc().dump();
  // A capture state signed over another kind's domain does not verify ...
  for (const std::string& domain : {std::string(DESIRED_DOMAIN), std::string(contract::SHADOW_DOMAIN)}) {
    EXPECT_NE(refusal([&] { capture_state_parse(envelope(key, text, domain), {key.pk}); })
                  .find("the capture state is refused: its signature"),
              std::string::npos);
  }
  // ... and a capture state's signature verifies as neither a desired nor a shadow state's.
  EXPECT_NE(refusal([&] { desired_parse(envelope(key, text), {key.pk}); }).find("signature"), std::string::npos);
  EXPECT_NE(refusal([&] { shadow_state_parse(envelope(key, text), {key.pk}); }).find("signature"), std::string::npos);
  Key other;
  EXPECT_NE(refusal([&] { capture_state_parse(envelope(other, text), {key.pk}); }).find("not among"), std::string::npos);
}

TEST(CaptureState, RefusesBadFields) {
  const auto problem = [](const nlohmann::json& doc) { return refusal([&] { capture_state_from_text(doc.dump()); }); };
  nlohmann::json doc = capture_doc();
  doc["kind"] = "shadow";
  EXPECT_NE(problem(doc).find("kind"), std::string::npos);
  doc = capture_doc();
  doc.erase("upload_token");
  EXPECT_NE(problem(doc).find("upload_token"), std::string::npos);
  doc = capture_doc();
  doc["upload_token"] = TOKEN.substr(1);
  EXPECT_NE(problem(doc).find("upload_token"), std::string::npos);
  doc = capture_doc();
  doc["upload_token"] = "0123456789ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef";
  EXPECT_NE(problem(doc).find("upload_token"), std::string::npos);
  doc = capture_doc();
  doc["action"] = "stop";  // stop and upload carry no token
  EXPECT_NE(problem(doc).find("carries no upload_token"), std::string::npos);
  doc["upload_token"] = nullptr;
  EXPECT_EQ(problem(doc), "");
  doc = capture_doc();
  doc["upload_url"] = "file:///etc/passwd";
  EXPECT_NE(problem(doc).find("upload_url"), std::string::npos);
  doc = capture_doc();
  doc["upload_url"] = "ftp://central/x";
  EXPECT_NE(problem(doc).find("upload_url"), std::string::npos);
  doc = capture_doc();
  doc.erase("upload_url");
  EXPECT_NE(problem(doc).find("upload_url"), std::string::npos);
  doc = capture_doc();
  doc["policy"]["uniform"] = 2.0;
  EXPECT_NE(problem(doc).find("uniform"), std::string::npos);
  doc = capture_doc();
  doc["policy"]["low_confidence"] = 0;
  EXPECT_NE(problem(doc).find("low_confidence"), std::string::npos);
  doc = capture_doc();
  doc["policy"]["drift"] = 1;
  EXPECT_NE(problem(doc).find("drift"), std::string::npos);
  doc = capture_doc();
  doc["policy"]["everything"] = true;
  EXPECT_NE(problem(doc).find("unknown field 'everything'"), std::string::npos);
  doc = capture_doc();
  doc["max_samples"] = 0;
  EXPECT_NE(problem(doc).find("max_samples"), std::string::npos);
  doc = capture_doc();
  doc["retention_s"] = contract::MAX_CAPTURE_RETENTION_S + 1;
  EXPECT_NE(problem(doc).find("retention_s"), std::string::npos);
  doc = capture_doc();
  doc["capture_id"] = "../x";
  EXPECT_NE(problem(doc).find("capture_id"), std::string::npos);
  doc = capture_doc();
  doc["action"] = "erase";
  EXPECT_NE(problem(doc).find("action"), std::string::npos);
  doc = capture_doc();
  doc["extra"] = 1;
  EXPECT_NE(problem(doc).find("unknown field 'extra'"), std::string::npos);
  EXPECT_EQ(problem(nlohmann::json::array()), "the capture state is refused: the signed text is not a JSON object");
  // Defaults when absent.
  doc = capture_doc();
  for (const char* name : {"policy", "max_samples", "max_bytes", "retention_s", "not_after"}) doc.erase(name);
  const CaptureState s = capture_state_from_text(doc.dump());
  EXPECT_EQ(s.max_samples, 500u);
  EXPECT_EQ(s.max_bytes, 64u << 20);
  EXPECT_EQ(s.retention_s, 7u * 24 * 3600);
  EXPECT_DOUBLE_EQ(s.policy.uniform, 0.0);
  EXPECT_DOUBLE_EQ(s.policy.low_confidence, 0.0);
  EXPECT_EQ(s.not_after, 0);
}

TEST(CaptureState, FloorRefusesReplaysOtherDevicesAndExpiredStates) {
  const std::string dir = temp_dir();
  const std::string floor = dir + "/floor.json";
  const int64_t now_s = 1790000000;
  CaptureState s = capture_state_from_text(capture_doc().dump());
  EXPECT_EQ(capture_floor_read(floor), 0u);
  // Another fleet's or device's state.
  EXPECT_NE(refusal([&] { capture_state_admit(s, floor, "plant-a", "cam-02", now_s); }).find("for device cam-01"),
            std::string::npos);
  EXPECT_NE(refusal([&] { capture_state_admit(s, floor, "plant-b", "cam-01", now_s); }).find("of fleet plant-a"),
            std::string::npos);
  EXPECT_EQ(capture_floor_read(floor), 0u);  // a refusal moves no floor
  // Past not_after (+ the skew allowed): refused; at the edge: taken.
  EXPECT_NE(refusal([&] { capture_state_admit(s, floor, "plant-a", "cam-01", s.not_after + DESIRED_CLOCK_SKEW_S + 1); })
                .find("expired"),
            std::string::npos);
  EXPECT_EQ(capture_state_admit(s, floor, "plant-a", "cam-01", s.not_after + DESIRED_CLOCK_SKEW_S), CAPTURE_ADMIT_TAKEN);
  EXPECT_EQ(capture_floor_read(floor), 4u);
  // The retained message again: nothing to do, not a refusal.
  EXPECT_EQ(capture_state_admit(s, floor, "plant-a", "cam-01", now_s), CAPTURE_ADMIT_REPEATED);
  // Another text under the same version, or a lower one: a replay.
  nlohmann::json doc = capture_doc();
  doc["policy"]["uniform"] = 1.0;
  const CaptureState same_version = capture_state_from_text(doc.dump());
  EXPECT_NE(refusal([&] { capture_state_admit(same_version, floor, "plant-a", "cam-01", now_s); }).find("not above 4"),
            std::string::npos);
  doc["version"] = 3;
  EXPECT_NE(refusal([&] { capture_state_admit(capture_state_from_text(doc.dump()), floor, "plant-a", "cam-01", now_s); })
                .find("not above 4"),
            std::string::npos);
  // The floor survives (a new process reads it) and only moves up.
  doc["version"] = 5;
  doc["action"] = "upload";
  doc.erase("upload_token");
  EXPECT_EQ(capture_state_admit(capture_state_from_text(doc.dump()), floor, "plant-a", "cam-01", now_s), CAPTURE_ADMIT_TAKEN);
  EXPECT_EQ(capture_floor_read(floor), 5u);
  EXPECT_FALSE(std::filesystem::exists(floor + ".tmp"));
  std::filesystem::remove_all(dir);
}

TEST(CaptureState, SharedCasesAgreeWithThePydanticModels) {
  std::ifstream in(EDGESMITH_CONTRACT_CASES);
  ASSERT_TRUE(in) << "cannot open " << EDGESMITH_CONTRACT_CASES;
  size_t valid = 0, invalid = 0;
  const nlohmann::json cases = nlohmann::json::parse(in)["cases"];
  for (const nlohmann::json& c : cases) {
    if (c["schema"] != "capture_state") continue;
    const std::string problem = refusal([&] { capture_state_from_text(c["message"].dump()); });
    if (c["valid"].get<bool>()) {
      EXPECT_EQ(problem, "") << c["name"].get<std::string>();
      ++valid;
    } else {
      EXPECT_NE(problem, "") << c["name"].get<std::string>() << " (" << c["why"].get<std::string>() << ") was accepted";
      ++invalid;
    }
  }
  EXPECT_GE(valid, 2u);
  EXPECT_GE(invalid, 5u);
}

TEST(CaptureState, PlainHttpOnlyToTheLoopback) {
  for (const char* ok : {"https://central:8444", "https://10.0.0.5", "http://127.0.0.1:8471", "http://127.1.2.3/base",
                         "http://localhost:80", "http://LOCALHOST", "http://[::1]:8471/"}) {
    EXPECT_TRUE(url_https_or_loopback(ok)) << ok;
  }
  for (const char* bad : {"http://central:8471", "http://10.0.0.5", "http://128.0.0.1", "http://127.0.0.1.evil.example",
                          "http://[::2]:80", "http://localhost.evil.example", "http://user@127.0.0.1", "file:///etc/passwd",
                          "http://"}) {
    EXPECT_FALSE(url_https_or_loopback(bad)) << bad;
  }
  const std::string dir = temp_dir();
  nlohmann::json doc = capture_doc();
  doc["upload_url"] = "http://central:8471";
  const CaptureState s = capture_state_from_text(doc.dump());  // the contract allows it; the device does not
  EXPECT_NE(refusal([&] { capture_state_admit(s, dir + "/floor.json", "plant-a", "cam-01", 1790000000); }).find("in clear"),
            std::string::npos);
  EXPECT_EQ(capture_floor_read(dir + "/floor.json"), 0u);
  std::filesystem::remove_all(dir);
}
