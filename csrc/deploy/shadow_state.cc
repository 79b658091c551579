#include "deploy/shadow_state.h"

#include <cmath>
#include <regex>
#include <set>

#include "common/contract_words.h"
#include "common/digest.h"
#include "common/error.h"
#include "deploy/envelope.h"

namespace edgesmith {

namespace c = contract;

namespace {

const SignedFields& shadow_fields() {
  static const SignedFields fields("the shadow state");
  return fields;
}

constexpr const char* WHERE = "the shadow state";

double fraction(const SignedFields& f, const nlohmann::json& doc, const char* name, double fallback) {
  if (!doc.contains(name)) return fallback;
  const nlohmann::json& value = doc[name];
  if (!value.is_number() || !std::isfinite(value.get<double>()) || !(value.get<double>() > 0.0) || value.get<double>() > 1.0) {
    f.fields_refuse(std::string("its ") + name + " must be a number above 0 and at most 1");
  }
  return value.get<double>();
}

}  // namespace

ShadowState shadow_state_from_text(const std::string& signed_text) {
  const SignedFields& f = shadow_fields();
  const nlohmann::json doc = nlohmann::json::parse(signed_text, nullptr, false);
  if (doc.is_discarded() || !doc.is_object()) f.fields_refuse("the signed text is not a JSON object");
  static const std::set<std::string> known = {
      c::F_SHADOW_STATE_V, c::F_SHADOW_STATE_KIND, c::F_SHADOW_STATE_FLEET, c::F_SHADOW_STATE_DEVICE,
      c::F_SHADOW_STATE_VERSION, c::F_SHADOW_STATE_SHADOW_ID, c::F_SHADOW_STATE_ACTION, c::F_SHADOW_STATE_ISSUED_AT_MS,
      c::F_SHADOW_STATE_NOT_AFTER, c::F_SHADOW_STATE_STARTS_AT_MS, c::F_SHADOW_STATE_DURATION_S, c::F_SHADOW_STATE_SAMPLE,
      c::F_SHADOW_STATE_CPU_SHARE, c::F_SHADOW_STATE_QUEUE, c::F_SHADOW_STATE_MAX_BYTES, c::F_SHADOW_STATE_CANDIDATES};
  for (const auto& item : doc.items()) {
    if (known.count(item.key()) == 0) f.fields_refuse("it has an unknown field '" + item.key().substr(0, 64) + "'");
  }
  if (f.fields_unsigned(doc, c::F_SHADOW_STATE_V, WHERE) != 1) f.fields_refuse("it is not version 1");
  const std::string kind = f.fields_string(doc, c::F_SHADOW_STATE_KIND, WHERE, 64);
  if (kind != c::MESSAGE_KIND_SHADOW) f.fields_refuse("its kind is '" + kind + "', not 'shadow'");
  ShadowState state;
  state.fleet = f.fields_id(doc, c::F_SHADOW_STATE_FLEET);
  state.device = f.fields_id(doc, c::F_SHADOW_STATE_DEVICE);
  state.version = f.fields_bounded(doc, c::F_SHADOW_STATE_VERSION, 1, c::MAX_SAFE_INT, 0);
  if (state.version == 0) f.fields_refuse("it lacks the field 'version'");
  state.shadow_id = f.fields_id(doc, c::F_SHADOW_STATE_SHADOW_ID);
  state.action = f.fields_string(doc, c::F_SHADOW_STATE_ACTION, WHERE, 16);
  if (state.action != c::SHADOW_ACTION_START && state.action != c::SHADOW_ACTION_STOP) {
    f.fields_refuse("its action '" + state.action + "' is neither start nor stop");
  }
  f.fields_get(doc, c::F_SHADOW_STATE_ISSUED_AT_MS, WHERE);
  state.issued_at_ms = static_cast<int64_t>(f.fields_bounded(doc, c::F_SHADOW_STATE_ISSUED_AT_MS, 0, c::MAX_SAFE_INT, 0));
  state.not_after = desired_not_after_read(f, doc);
  state.starts_at_ms = static_cast<int64_t>(f.fields_bounded(doc, c::F_SHADOW_STATE_STARTS_AT_MS, 0, c::MAX_SAFE_INT, 0));
  state.duration_s = f.fields_bounded(doc, c::F_SHADOW_STATE_DURATION_S, 1, c::MAX_SHADOW_DURATION_S, state.duration_s);
  state.sample = fraction(f, doc, c::F_SHADOW_STATE_SAMPLE, state.sample);
  state.cpu_share = fraction(f, doc, c::F_SHADOW_STATE_CPU_SHARE, state.cpu_share);
  state.queue = f.fields_bounded(doc, c::F_SHADOW_STATE_QUEUE, 1, c::MAX_SHADOW_QUEUE, state.queue);
  state.max_bytes = f.fields_bounded(doc, c::F_SHADOW_STATE_MAX_BYTES, 1, c::MAX_SAFE_INT, state.max_bytes);
  if (doc.contains(c::F_SHADOW_STATE_CANDIDATES)) {
    const nlohmann::json& list = doc[c::F_SHADOW_STATE_CANDIDATES];
    if (!list.is_array()) f.fields_refuse("'candidates' must be a list");
    if (list.size() > c::MAX_SHADOW_CANDIDATES) {
      f.fields_refuse("it names " + std::to_string(list.size()) + " candidates; at most " +
                      std::to_string(c::MAX_SHADOW_CANDIDATES) + " are allowed");
    }
    for (const nlohmann::json& entry : list) state.candidates.push_back(desired_artifact_read(f, entry));
  }
  if (state.action == c::SHADOW_ACTION_START && state.candidates.empty()) {
    f.fields_refuse("a 'start' shadow state needs at least one candidate");
  }
  if (state.action == c::SHADOW_ACTION_STOP && !state.candidates.empty()) {
    f.fields_refuse("a 'stop' shadow state names no candidates");
  }
  state.signed_sha256 = sha256_string(signed_text);
  return state;
}

ShadowState shadow_state_parse(const std::string& envelope, const std::vector<std::vector<uint8_t>>& deploy_keys) {
  return shadow_state_from_text(shadow_fields().fields_open(envelope, deploy_keys, c::SHADOW_DOMAIN));
}

bool shadow_state_expired(const ShadowState& state, int64_t now_s) {
  return state.not_after > 0 && now_s > state.not_after + DESIRED_CLOCK_SKEW_S;
}

std::string shadow_state_unverified_id(const std::string& envelope) {
  const std::string id = envelope_unverified_field(envelope, c::F_SHADOW_STATE_SHADOW_ID);
  static const std::regex pattern(c::ID_REGEX);
  return std::regex_match(id, pattern) ? id : "";
}

void shadow_state_turn(const ShadowState& state, size_t index, int64_t* begin_ms, int64_t* end_ms) {
  const int64_t n = static_cast<int64_t>(std::max<size_t>(state.candidates.size(), 1));
  const int64_t d = static_cast<int64_t>(state.duration_s) * 1000;
  const int64_t i = static_cast<int64_t>(index);
  *begin_ms = state.starts_at_ms + i * d / n;
  *end_ms = state.starts_at_ms + (i + 1) * d / n;
}

int32_t shadow_state_candidate_at(const ShadowState& state, int64_t now_ms) {
  if (now_ms < state.starts_at_ms) return -1;
  for (size_t i = 0; i < state.candidates.size(); ++i) {
    int64_t begin = 0, end = 0;
    shadow_state_turn(state, i, &begin, &end);
    if (now_ms >= begin && now_ms < end) return static_cast<int32_t>(i);
  }
  return -2;
}

}  // namespace edgesmith
