// The device contract as the device's writer checks it (csrc/telemetry/contract_check.h), on the
// cases of tests/data/contract/cases.json: the same file tests/test_contract.py runs on the pydantic
// models of runtime/contract.py. Every valid device message passes, every invalid one is refused.
#include <gtest/gtest.h>

#include <fstream>
#include <string>

#include <nlohmann/json.hpp>

#include "common/contract_words.h"
#include "telemetry/contract_check.h"

namespace edgesmith {
namespace {

using json = nlohmann::json;

json cases_load() {
  std::ifstream in(EDGESMITH_CONTRACT_CASES);
  EXPECT_TRUE(in) << "cannot open " << EDGESMITH_CONTRACT_CASES;
  return json::parse(in)["cases"];
}

TEST(Contract, SharedCasesAgreeWithThePydanticModels) {
  size_t valid = 0, invalid = 0;
  for (const json& c : cases_load()) {
    if (c["schema"] != "device") continue;  // the desired state is the device's reader's (csrc/deploy)
    const std::string problem = contract_message_problem(c["message"]);
    if (c["valid"].get<bool>()) {
      EXPECT_EQ(problem, "") << c["name"].get<std::string>();
      ++valid;
    } else {
      EXPECT_NE(problem, "") << c["name"].get<std::string>() << " (" << c["why"].get<std::string>() << ") was accepted";
      ++invalid;
    }
  }
  EXPECT_GE(valid, 9u);
  EXPECT_GE(invalid, 30u);
}

TEST(Contract, ProblemsNameTheField) {
  json birth;
  for (const json& c : cases_load()) {
    if (c["name"] == "birth") birth = c["message"];
  }
  ASSERT_TRUE(birth.is_object());
  birth[contract::F_BIRTH_METRICS][contract::F_METRIC_SCHEMA_OUTPUTS][0][contract::F_OUTPUT_LAYOUT_CLASSES] =
      contract::MAX_CLASSES + 1;
  EXPECT_NE(contract_message_problem(birth).find("metrics.outputs[0].classes"), std::string::npos)
      << contract_message_problem(birth);
  EXPECT_EQ(contract_message_problem(json::array()), "the message is not a JSON object");
}

}  // namespace
}  // namespace edgesmith
