#include "deploy/capture_state.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstring>
#include <fstream>
#include <regex>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "common/contract_words.h"
#include "common/digest.h"
#include "common/error.h"
#include "common/url.h"
#include "deploy/desired.h"
#include "deploy/envelope.h"
#include "deploy/slots.h"

namespace edgesmith {

namespace c = contract;

namespace {

const SignedFields& capture_fields() {
  static const SignedFields fields("the capture state");
  return fields;
}

constexpr const char* WHERE = "the capture state";
constexpr uint64_t MAX_CAPTURE_SAMPLES = 1000000;  // contract CaptureState.max_samples
constexpr uint64_t FLOOR_MAX_BYTES = 4096;
constexpr size_t MAX_URL = 2048;  // contract MAX_URL

// A share in [0, 1] (JSON integers count as numbers, as in the pydantic model); `above_zero`
// excludes 0 (low_confidence).
double share(const SignedFields& f, const nlohmann::json& doc, const char* name, double fallback, bool above_zero) {
  if (!doc.contains(name)) return fallback;
  const nlohmann::json& value = doc[name];
  const bool ok = value.is_number() && std::isfinite(value.get<double>()) && value.get<double>() <= 1.0 &&
                  (above_zero ? value.get<double>() > 0.0 : value.get<double>() >= 0.0);
  if (!ok) {
    f.fields_refuse(std::string("its policy's ") + name + " must be a number " + (above_zero ? "above 0" : "from 0") +
                    " and at most 1");
  }
  return value.get<double>();
}

bool flag(const SignedFields& f, const nlohmann::json& doc, const char* name) {
  if (!doc.contains(name)) return false;
  if (!doc[name].is_boolean()) f.fields_refuse(std::string("its policy's ") + name + " must be true or false");
  return doc[name].get<bool>();
}

CapturePolicy policy_read(const SignedFields& f, const nlohmann::json& doc) {
  if (!doc.is_object()) f.fields_refuse("its policy must be an object");
  static const std::set<std::string> known = {c::F_CAPTURE_POLICY_UNIFORM, c::F_CAPTURE_POLICY_LOW_CONFIDENCE,
                                              c::F_CAPTURE_POLICY_DRIFT, c::F_CAPTURE_POLICY_DRIFT_RATE,
                                              c::F_CAPTURE_POLICY_DISAGREEMENT};
  for (const auto& item : doc.items()) {
    if (known.count(item.key()) == 0) f.fields_refuse("its policy has an unknown field '" + item.key().substr(0, 64) + "'");
  }
  CapturePolicy policy;
  policy.uniform = share(f, doc, c::F_CAPTURE_POLICY_UNIFORM, 0.0, false);
  if (doc.contains(c::F_CAPTURE_POLICY_LOW_CONFIDENCE) && !doc[c::F_CAPTURE_POLICY_LOW_CONFIDENCE].is_null()) {
    policy.low_confidence = share(f, doc, c::F_CAPTURE_POLICY_LOW_CONFIDENCE, 0.0, true);
  }
  policy.drift = flag(f, doc, c::F_CAPTURE_POLICY_DRIFT);
  policy.drift_rate = share(f, doc, c::F_CAPTURE_POLICY_DRIFT_RATE, 0.0, false);
  policy.disagreement = flag(f, doc, c::F_CAPTURE_POLICY_DISAGREEMENT);
  return policy;
}

}  // namespace

CaptureState capture_state_from_text(const std::string& signed_text) {
  const SignedFields& f = capture_fields();
  const nlohmann::json doc = nlohmann::json::parse(signed_text, nullptr, false);
  if (doc.is_discarded() || !doc.is_object()) f.fields_refuse("the signed text is not a JSON object");
  static const std::set<std::string> known = {
      c::F_CAPTURE_STATE_V, c::F_CAPTURE_STATE_KIND, c::F_CAPTURE_STATE_FLEET, c::F_CAPTURE_STATE_DEVICE,
      c::F_CAPTURE_STATE_VERSION, c::F_CAPTURE_STATE_ISSUED_AT_MS, c::F_CAPTURE_STATE_NOT_AFTER,
      c::F_CAPTURE_STATE_CAPTURE_ID, c::F_CAPTURE_STATE_ACTION, c::F_CAPTURE_STATE_POLICY,
      c::F_CAPTURE_STATE_MAX_SAMPLES, c::F_CAPTURE_STATE_MAX_BYTES, c::F_CAPTURE_STATE_RETENTION_S,
      c::F_CAPTURE_STATE_UPLOAD_URL, c::F_CAPTURE_STATE_UPLOAD_TOKEN};
  for (const auto& item : doc.items()) {
    if (known.count(item.key()) == 0) f.fields_refuse("it has an unknown field '" + item.key().substr(0, 64) + "'");
  }
  if (f.fields_unsigned(doc, c::F_CAPTURE_STATE_V, WHERE) != 1) f.fields_refuse("it is not version 1");
  const std::string kind = f.fields_string(doc, c::F_CAPTURE_STATE_KIND, WHERE, 64);
  if (kind != "capture") f.fields_refuse("its kind is '" + kind + "', not 'capture'");
  CaptureState state;
  state.fleet = f.fields_id(doc, c::F_CAPTURE_STATE_FLEET);
  state.device = f.fields_id(doc, c::F_CAPTURE_STATE_DEVICE);
  state.version = f.fields_bounded(doc, c::F_CAPTURE_STATE_VERSION, 1, c::MAX_SAFE_INT, 0);
  if (state.version == 0) f.fields_refuse("it lacks the field 'version'");
  state.capture_id = f.fields_id(doc, c::F_CAPTURE_STATE_CAPTURE_ID);
  state.action = f.fields_string(doc, c::F_CAPTURE_STATE_ACTION, WHERE, 16);
  if (state.action != c::CAPTURE_ACTION_START && state.action != c::CAPTURE_ACTION_STOP &&
      state.action != c::CAPTURE_ACTION_UPLOAD) {
    f.fields_refuse("its action '" + state.action + "' is none of start, stop, upload");
  }
  f.fields_get(doc, c::F_CAPTURE_STATE_ISSUED_AT_MS, WHERE);
  state.issued_at_ms = static_cast<int64_t>(f.fields_bounded(doc, c::F_CAPTURE_STATE_ISSUED_AT_MS, 0, c::MAX_SAFE_INT, 0));
  state.not_after = desired_not_after_read(f, doc);
  if (doc.contains(c::F_CAPTURE_STATE_POLICY)) state.policy = policy_read(f, doc[c::F_CAPTURE_STATE_POLICY]);
  state.max_samples = f.fields_bounded(doc, c::F_CAPTURE_STATE_MAX_SAMPLES, 1, MAX_CAPTURE_SAMPLES, state.max_samples);
  state.max_bytes = f.fields_bounded(doc, c::F_CAPTURE_STATE_MAX_BYTES, 1, c::MAX_SAFE_INT, state.max_bytes);
  state.retention_s = f.fields_bounded(doc, c::F_CAPTURE_STATE_RETENTION_S, 1, c::MAX_CAPTURE_RETENTION_S, state.retention_s);
  state.upload_url = f.fields_string(doc, c::F_CAPTURE_STATE_UPLOAD_URL, WHERE, MAX_URL);
  if (state.upload_url.rfind("http://", 0) != 0 && state.upload_url.rfind("https://", 0) != 0) {
    f.fields_refuse("its upload_url '" + state.upload_url.substr(0, 64) + "' is not an http:// or https:// URL");
  }
  const bool has_token = doc.contains(c::F_CAPTURE_STATE_UPLOAD_TOKEN) && !doc[c::F_CAPTURE_STATE_UPLOAD_TOKEN].is_null();
  if (state.action == c::CAPTURE_ACTION_START) {
    if (!has_token || !doc[c::F_CAPTURE_STATE_UPLOAD_TOKEN].is_string() ||
        !envelope_hex_of(doc[c::F_CAPTURE_STATE_UPLOAD_TOKEN].get<std::string>(), 64)) {
      f.fields_refuse("a 'start' capture state carries an upload_token of 64 lower-case hex digits");
    }
    state.upload_token = doc[c::F_CAPTURE_STATE_UPLOAD_TOKEN].get<std::string>();
  } else if (has_token) {
    f.fields_refuse("a '" + state.action + "' capture state carries no upload_token (the device keeps start's)");
  }
  state.signed_sha256 = sha256_string(signed_text);
  return state;
}

CaptureState capture_state_parse(const std::string& envelope, const std::vector<std::vector<uint8_t>>& deploy_keys) {
  return capture_state_from_text(capture_fields().fields_open(envelope, deploy_keys, c::CAPTURE_DOMAIN));
}

bool capture_state_expired(const CaptureState& state, int64_t now_s) {
  return state.not_after > 0 && now_s > state.not_after + DESIRED_CLOCK_SKEW_S;
}

std::string capture_state_unverified_id(const std::string& envelope) {
  const std::string id = envelope_unverified_field(envelope, c::F_CAPTURE_STATE_CAPTURE_ID);
  static const std::regex pattern(c::ID_REGEX);
  return std::regex_match(id, pattern) ? id : "";
}

namespace {

nlohmann::json floor_doc(const std::string& floor_path) {
  std::ifstream in(floor_path);
  if (!in) return nlohmann::json::object();
  std::stringstream text;
  text << in.rdbuf();
  const nlohmann::json doc = nlohmann::json::parse(text.str().substr(0, FLOOR_MAX_BYTES), nullptr, false);
  return doc.is_object() ? doc : nlohmann::json::object();
}

}  // namespace

uint64_t capture_floor_read(const std::string& floor_path) {
  const nlohmann::json doc = floor_doc(floor_path);
  return doc.contains("highest_version") && doc["highest_version"].is_number_unsigned()
             ? doc["highest_version"].get<uint64_t>()
             : 0;
}

CaptureAdmit capture_state_admit(const CaptureState& state, const std::string& floor_path, const std::string& fleet,
                                 const std::string& device, int64_t now_s) {
  const SignedFields& f = capture_fields();
  if (state.fleet != fleet || state.device != device) {
    f.fields_refuse("it is for device " + state.device + " of fleet " + state.fleet + ", not " + device + " of fleet " +
                    fleet);
  }
  if (!url_https_or_loopback(state.upload_url)) {
    f.fields_refuse("its upload_url " + state.upload_url.substr(0, 64) +
                    " is plain http:// to a host other than this device's loopback, so the upload token would travel "
                    "in clear; name an https:// receiver");
  }
  const nlohmann::json floor = floor_doc(floor_path);
  const uint64_t highest = capture_floor_read(floor_path);
  const std::string highest_sha = floor.contains("signed_sha256") && floor["signed_sha256"].is_string()
                                      ? floor["signed_sha256"].get<std::string>()
                                      : "";
  if (state.version == highest && state.signed_sha256 == highest_sha) return CAPTURE_ADMIT_REPEATED;
  if (state.version <= highest) {
    f.fields_refuse("its version " + std::to_string(state.version) + " is not above " + std::to_string(highest) +
                    ", the highest this device took (a replay, or a stale signer)");
  }
  if (capture_state_expired(state, now_s)) {
    f.fields_refuse("it expired at " + std::to_string(state.not_after) + " (not_after, Unix seconds); sign a new one");
  }
  // The floor first: a crash between this and acting on the state never lets this version in twice.
  file_replace(floor_path, nlohmann::json{{"v", 1}, {"highest_version", state.version},
                                          {"signed_sha256", state.signed_sha256}}.dump() + "\n");
  return CAPTURE_ADMIT_TAKEN;
}

}  // namespace edgesmith
