// The device contract (runtime/contract.py) as the device's writer applies it: before a message is
// spooled, the publisher checks it keeps every field, word and bound of the contract, so a device
// never sends what the monitor would refuse (a birth announcing 5000 classes, an error text past
// its limit). Field names, words and limits come from the generated common/contract_words.h;
// tests/cpp/test_contract.cc runs the shared example cases (tests/data/contract/cases.json) that
// tests/test_contract.py runs on the pydantic models.
#pragma once

#include <string>

#include <nlohmann/json.hpp>

namespace edgesmith {

/// Why `message` (a whole device message: birth, death, telemetry, event or state) breaks the
/// device contract, as "<where>: <what>"; "" when it keeps it.
std::string contract_message_problem(const nlohmann::json& message);

}  // namespace edgesmith
