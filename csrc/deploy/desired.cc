#include "deploy/desired.h"

#include <algorithm>
#include <filesystem>
#include <system_error>

#include "artifact/keys.h"
#include "artifact/signature.h"
#include "common/digest.h"
#include "common/error.h"

namespace fs = std::filesystem;

namespace edgesmith {

const char* const DESIRED_DOMAIN = "edgesmith-desired-v1\n";

namespace {

[[noreturn]] void refuse(const std::string& why) { throw Error(ERROR_CODE_INTEGRITY, why); }

bool hex_of(const std::string& text, size_t length) {
  return text.size() == length &&
         std::all_of(text.begin(), text.end(), [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); });
}

std::vector<uint8_t> hex_decode(const std::string& text) {
  std::vector<uint8_t> out(text.size() / 2);
  const auto nibble = [](char c) { return c <= '9' ? c - '0' : c - 'a' + 10; };
  for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<uint8_t>(nibble(text[2 * i]) * 16 + nibble(text[2 * i + 1]));
  return out;
}

const nlohmann::json& field(const nlohmann::json& doc, const char* name, const char* where) {
  const auto it = doc.find(name);
  if (it == doc.end()) refuse(std::string("the desired state is refused: ") + where + " lacks the field '" + name + "'");
  return *it;
}

std::string string_field(const nlohmann::json& doc, const char* name, const char* where, size_t max = 4096) {
  const nlohmann::json& value = field(doc, name, where);
  if (!value.is_string() || value.get_ref<const std::string&>().empty() || value.get_ref<const std::string&>().size() > max) {
    refuse(std::string("the desired state is refused: '") + name + "' in " + where + " must be a non-empty string");
  }
  return value.get<std::string>();
}

uint64_t unsigned_field(const nlohmann::json& doc, const char* name, const char* where) {
  const nlohmann::json& value = field(doc, name, where);
  if (!value.is_number_integer() || (value.is_number_integer() && !value.is_number_unsigned() && value.get<int64_t>() < 0)) {
    refuse(std::string("the desired state is refused: '") + name + "' in " + where + " must be a non-negative integer");
  }
  return value.get<uint64_t>();
}

}  // namespace

std::vector<std::vector<uint8_t>> trust_keys_read(const std::string& dir) {
  std::vector<std::string> files;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return {};
  for (const fs::directory_entry& entry : fs::directory_iterator(dir, ec)) {
    if (entry.path().extension() == ".pub" && entry.is_regular_file()) files.push_back(entry.path().string());
  }
  std::sort(files.begin(), files.end());
  std::vector<std::vector<uint8_t>> keys;
  for (const std::string& file : files) keys.push_back(public_key_read(file));
  return keys;
}

DesiredState desired_parse(const std::string& envelope, const std::vector<std::vector<uint8_t>>& deploy_keys) {
  const nlohmann::json outer = nlohmann::json::parse(envelope, nullptr, false);
  if (outer.is_discarded() || !outer.is_object()) refuse("the desired state is refused: the envelope is not a JSON object");
  if (unsigned_field(outer, "v", "the envelope") != 1) refuse("the desired state is refused: the envelope is not version 1");
  const nlohmann::json& signed_value = field(outer, "signed", "the envelope");
  if (!signed_value.is_string()) refuse("the desired state is refused: 'signed' in the envelope must be a string");
  const std::string signed_text = signed_value.get<std::string>();
  const std::string key_id = string_field(outer, "key_id", "the envelope");
  const std::string signature = string_field(outer, "signature", "the envelope");
  if (!hex_of(key_id, 16)) refuse("the desired state is refused: its key_id is not 16 lower-case hex characters");
  if (!hex_of(signature, 128)) refuse("the desired state is refused: its signature is not 128 lower-case hex characters");
  const std::vector<uint8_t>* key = nullptr;
  for (const std::vector<uint8_t>& candidate : deploy_keys) {
    if (candidate.size() == ED25519_PUBLIC_KEY_BYTES && key_id_compute(candidate.data()) == key_id) key = &candidate;
  }
  if (key == nullptr) {
    refuse("the desired state is refused: it is signed by key " + key_id +
           ", which is not among this device's deploy keys (trust_dir/deploy/*.pub)");
  }
  const std::vector<uint8_t> sig = hex_decode(signature);
  if (!ed25519_verify(std::string(DESIRED_DOMAIN) + signed_text, sig.data(), key->data())) {
    refuse("the desired state is refused: its signature by key " + key_id + " is not valid");
  }
  const nlohmann::json doc = nlohmann::json::parse(signed_text, nullptr, false);
  if (doc.is_discarded() || !doc.is_object()) refuse("the desired state is refused: the signed text is not a JSON object");
  if (unsigned_field(doc, "v", "the desired state") != 1) refuse("the desired state is refused: it is not version 1");
  DesiredState state;
  state.fleet = string_field(doc, "fleet", "the desired state", 64);
  state.device = string_field(doc, "device", "the desired state", 64);
  state.version = unsigned_field(doc, "version", "the desired state");
  if (state.version == 0) refuse("the desired state is refused: its version must be at least 1");
  state.deployment_id = string_field(doc, "deployment_id", "the desired state", 64);
  state.action = string_field(doc, "action", "the desired state", 16);
  if (state.action != "deploy" && state.action != "rollback") {
    refuse("the desired state is refused: its action '" + state.action + "' is neither deploy nor rollback");
  }
  const nlohmann::json& issued = field(doc, "issued_at_ms", "the desired state");
  if (!issued.is_number_integer()) refuse("the desired state is refused: 'issued_at_ms' must be an integer");
  state.issued_at_ms = issued.get<int64_t>();
  if (doc.contains("not_after") && !doc["not_after"].is_null()) {
    const nlohmann::json& not_after = doc["not_after"];
    if (!not_after.is_number_unsigned() || not_after.get<uint64_t>() == 0 || not_after.get<uint64_t>() >= (1ull << 53)) {
      refuse("the desired state is refused: 'not_after' must be a positive integer (seconds since the Unix epoch)");
    }
    state.not_after = static_cast<int64_t>(not_after.get<uint64_t>());
  }
  const nlohmann::json& artifact = field(doc, "artifact", "the desired state");
  if (!artifact.is_object()) refuse("the desired state is refused: 'artifact' must be an object");
  state.artifact.url = string_field(artifact, "url", "the artifact");
  if (state.artifact.url.rfind("http://", 0) != 0 && state.artifact.url.rfind("https://", 0) != 0) {
    refuse("the desired state is refused: the artifact url '" + state.artifact.url + "' is not an http:// or https:// URL");
  }
  state.artifact.sha256 = string_field(artifact, "sha256", "the artifact");
  state.artifact.manifest_sha256 = string_field(artifact, "manifest_sha256", "the artifact");
  if (!hex_of(state.artifact.sha256, 64) || !hex_of(state.artifact.manifest_sha256, 64)) {
    refuse("the desired state is refused: the artifact's sha256 and manifest_sha256 must be 64 lower-case hex characters");
  }
  state.artifact.size = unsigned_field(artifact, "size", "the artifact");
  state.artifact.name = string_field(artifact, "name", "the artifact", 255);
  state.signed_sha256 = sha256_string(signed_text);
  return state;
}

bool desired_expired(const DesiredState& state, int64_t now_s) {
  return state.not_after > 0 && now_s > state.not_after + DESIRED_CLOCK_SKEW_S;
}

std::string desired_unverified_id(const std::string& envelope) {
  const nlohmann::json outer = nlohmann::json::parse(envelope, nullptr, false);
  if (!outer.is_object() || !outer.contains("signed") || !outer["signed"].is_string()) return "";
  const nlohmann::json doc = nlohmann::json::parse(outer["signed"].get<std::string>(), nullptr, false);
  if (!doc.is_object() || !doc.contains("deployment_id") || !doc["deployment_id"].is_string()) return "";
  const std::string id = doc["deployment_id"];
  return id.size() <= 64 ? id : "";
}

nlohmann::json desired_to_json(const DesiredState& s) {
  return {{"fleet", s.fleet}, {"device", s.device}, {"version", s.version}, {"deployment_id", s.deployment_id},
          {"action", s.action}, {"issued_at_ms", s.issued_at_ms}, {"not_after", s.not_after}, {"signed_sha256", s.signed_sha256},
          {"artifact", {{"url", s.artifact.url}, {"sha256", s.artifact.sha256}, {"size", s.artifact.size},
                        {"manifest_sha256", s.artifact.manifest_sha256}, {"name", s.artifact.name}}}};
}

DesiredState desired_from_json(const nlohmann::json& d) {
  DesiredState s;
  s.fleet = d.at("fleet");
  s.device = d.at("device");
  s.version = d.at("version");
  s.deployment_id = d.at("deployment_id");
  s.action = d.at("action");
  s.issued_at_ms = d.at("issued_at_ms");
  s.not_after = d.value("not_after", int64_t{0});
  s.signed_sha256 = d.at("signed_sha256");
  const nlohmann::json& a = d.at("artifact");
  s.artifact.url = a.at("url");
  s.artifact.sha256 = a.at("sha256");
  s.artifact.size = a.at("size");
  s.artifact.manifest_sha256 = a.at("manifest_sha256");
  s.artifact.name = a.at("name");
  return s;
}

}  // namespace edgesmith
