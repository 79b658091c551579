// The signed shadow state (csrc/deploy/shadow_state.h): its envelope shares the desired state's
// code and keys but not its signature domain, its fields follow runtime/contract.py ShadowState
// (the shared cases of tests/data/contract/cases.json), and its schedule.
#include <gtest/gtest.h>

#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/contract_words.h"
#include "common/digest.h"
#include "common/error.h"
#include "deploy/desired.h"
#include "deploy/shadow_state.h"
#include "test_support.h"

using namespace edgesmith;

namespace {

using Key = test::DeployKey;

nlohmann::json shadow_doc() {
  return {{"v", 1}, {"kind", "shadow"}, {"fleet", "plant-a"}, {"device", "cam-01"}, {"version", 3},
          {"shadow_id", "sh-1"}, {"action", "start"}, {"issued_at_ms", 1790000000000LL},
          {"starts_at_ms", 1790000000000LL}, {"duration_s", 90}, {"sample", 0.25}, {"cpu_share", 0.5},
          {"queue", 4}, {"max_bytes", 1 << 20},
          {"candidates", {{{"url", "http://127.0.0.1:8470/artifacts/" + std::string(64, 'a') + ".tar"},
                           {"sha256", std::string(64, 'a')}, {"size", 1234},
                           {"manifest_sha256", std::string(64, 'b')}, {"name", "digits"}}}}};
}

std::string envelope(const Key& key, const std::string& text, const std::string& domain = contract::SHADOW_DOMAIN) {
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

}  // namespace

TEST(ShadowState, AcceptsAValidEnvelope) {
  Key key;
  const std::string text = shadow_doc().dump();
  const ShadowState s = shadow_state_parse(envelope(key, text), {key.pk});
  EXPECT_EQ(s.fleet, "plant-a");
  EXPECT_EQ(s.shadow_id, "sh-1");
  EXPECT_EQ(s.version, 3u);
  EXPECT_EQ(s.action, "start");
  EXPECT_EQ(s.duration_s, 90u);
  EXPECT_DOUBLE_EQ(s.sample, 0.25);
  EXPECT_EQ(s.queue, 4u);
  ASSERT_EQ(s.candidates.size(), 1u);
  EXPECT_EQ(s.candidates[0].manifest_sha256, std::string(64, 'b'));
  EXPECT_EQ(s.signed_sha256, sha256_string(text));
  EXPECT_EQ(shadow_state_unverified_id(envelope(key, text)), "sh-1");
}

TEST(ShadowState, DomainsDoNotCross) {
  Key key;
  // A desired state's signature (its domain) does not verify as a shadow state's ...
  const std::string shadow_text = shadow_doc().dump();
  EXPECT_NE(refusal([&] { shadow_state_parse(envelope(key, shadow_text, DESIRED_DOMAIN), {key.pk}); })
                .find("the shadow state is refused: its signature"),
            std::string::npos);
  // ... and a shadow state's does not verify as a desired state's.
  const nlohmann::json desired = {{"v", 1}, {"fleet", "plant-a"}, {"device", "cam-01"}, {"version", 7},
                                  {"deployment_id", "dep-1"}, {"action", "deploy"}, {"issued_at_ms", 1},
                                  {"artifact", shadow_doc()["candidates"][0]}};
  EXPECT_NO_THROW(desired_parse(envelope(key, desired.dump(), DESIRED_DOMAIN), {key.pk}));
  EXPECT_NE(refusal([&] { desired_parse(envelope(key, desired.dump()), {key.pk}); }).find("signature"), std::string::npos);
  // Another key, no key.
  Key other;
  EXPECT_NE(refusal([&] { shadow_state_parse(envelope(other, shadow_text), {key.pk}); }).find("not among"),
            std::string::npos);
}

TEST(ShadowState, RefusesBadFields) {
  const auto problem = [](const nlohmann::json& doc) {
    return refusal([&] { shadow_state_from_text(doc.dump()); });
  };
  nlohmann::json doc = shadow_doc();
  doc["kind"] = "desired";
  EXPECT_NE(problem(doc).find("kind"), std::string::npos);
  doc = shadow_doc();
  doc["queue"] = 65;
  EXPECT_NE(problem(doc).find("queue"), std::string::npos);
  doc = shadow_doc();
  doc["sample"] = 0.0;
  EXPECT_NE(problem(doc).find("sample"), std::string::npos);
  doc = shadow_doc();
  doc["cpu_share"] = 1.5;
  EXPECT_NE(problem(doc).find("cpu_share"), std::string::npos);
  doc = shadow_doc();
  doc["duration_s"] = 0;
  EXPECT_NE(problem(doc).find("duration_s"), std::string::npos);
  doc = shadow_doc();
  doc["extra"] = 1;
  EXPECT_NE(problem(doc).find("unknown field 'extra'"), std::string::npos);
  doc = shadow_doc();
  doc["shadow_id"] = "../x";
  EXPECT_NE(problem(doc).find("shadow_id"), std::string::npos);
  doc = shadow_doc();
  doc["candidates"][0]["url"] = "file:///etc/passwd";
  EXPECT_NE(problem(doc).find("url"), std::string::npos);
  doc = shadow_doc();
  doc["action"] = "stop";
  EXPECT_NE(problem(doc).find("no candidates"), std::string::npos);
  doc["candidates"] = nlohmann::json::array();
  EXPECT_EQ(problem(doc), "");
  EXPECT_EQ(problem(nlohmann::json::array()), "the shadow state is refused: the signed text is not a JSON object");
}

TEST(ShadowState, NotAfterAllowsForClockSkew) {
  nlohmann::json doc = shadow_doc();
  doc["not_after"] = 1790000000;
  const ShadowState s = shadow_state_from_text(doc.dump());
  EXPECT_FALSE(shadow_state_expired(s, 1790000000 + DESIRED_CLOCK_SKEW_S));
  EXPECT_TRUE(shadow_state_expired(s, 1790000000 + DESIRED_CLOCK_SKEW_S + 1));
}

TEST(ShadowState, ScheduleSplitsTheDuration) {
  nlohmann::json doc = shadow_doc();
  doc["candidates"].push_back(doc["candidates"][0]);
  doc["candidates"].push_back(doc["candidates"][0]);
  const ShadowState s = shadow_state_from_text(doc.dump());
  const int64_t t0 = 1790000000000LL;
  int64_t begin = 0, end = 0;
  shadow_state_turn(s, 1, &begin, &end);
  EXPECT_EQ(begin, t0 + 30000);
  EXPECT_EQ(end, t0 + 60000);
  EXPECT_EQ(shadow_state_candidate_at(s, t0 - 1), -1);
  EXPECT_EQ(shadow_state_candidate_at(s, t0), 0);
  EXPECT_EQ(shadow_state_candidate_at(s, t0 + 29999), 0);
  EXPECT_EQ(shadow_state_candidate_at(s, t0 + 30000), 1);
  EXPECT_EQ(shadow_state_candidate_at(s, t0 + 89999), 2);
  EXPECT_EQ(shadow_state_candidate_at(s, t0 + 90000), -2);
}

TEST(ShadowState, SharedCasesAgreeWithThePydanticModels) {
  std::ifstream in(EDGESMITH_CONTRACT_CASES);
  ASSERT_TRUE(in) << "cannot open " << EDGESMITH_CONTRACT_CASES;
  size_t valid = 0, invalid = 0;
  const nlohmann::json cases = nlohmann::json::parse(in)["cases"];
  for (const nlohmann::json& c : cases) {
    if (c["schema"] != "shadow_state") continue;
    const std::string problem = refusal([&] { shadow_state_from_text(c["message"].dump()); });
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
