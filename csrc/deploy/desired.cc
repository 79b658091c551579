#include "deploy/desired.h"

#include <algorithm>
#include <filesystem>
#include <system_error>

#include "artifact/keys.h"
#include "common/digest.h"
#include "common/error.h"
#include "deploy/envelope.h"

namespace fs = std::filesystem;

namespace edgesmith {

const char* const DESIRED_DOMAIN = "edgesmith-desired-v1\n";

namespace {

const SignedFields& desired_fields() {
  static const SignedFields fields("the desired state");
  return fields;
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
  const SignedFields& f = desired_fields();
  const std::string signed_text = f.fields_open(envelope, deploy_keys, DESIRED_DOMAIN);
  const nlohmann::json doc = nlohmann::json::parse(signed_text, nullptr, false);
  if (doc.is_discarded() || !doc.is_object()) f.fields_refuse("the signed text is not a JSON object");
  if (f.fields_unsigned(doc, "v", "the desired state") != 1) f.fields_refuse("it is not version 1");
  DesiredState state;
  state.fleet = f.fields_string(doc, "fleet", "the desired state", 64);
  state.device = f.fields_string(doc, "device", "the desired state", 64);
  state.version = f.fields_unsigned(doc, "version", "the desired state");
  if (state.version == 0) f.fields_refuse("its version must be at least 1");
  state.deployment_id = f.fields_string(doc, "deployment_id", "the desired state", 64);
  state.action = f.fields_string(doc, "action", "the desired state", 16);
  if (state.action != "deploy" && state.action != "rollback") {
    f.fields_refuse("its action '" + state.action + "' is neither deploy nor rollback");
  }
  const nlohmann::json& issued = f.fields_get(doc, "issued_at_ms", "the desired state");
  if (!issued.is_number_integer()) f.fields_refuse("'issued_at_ms' must be an integer");
  state.issued_at_ms = issued.get<int64_t>();
  state.not_after = desired_not_after_read(f, doc);
  state.artifact = desired_artifact_read(f, f.fields_get(doc, "artifact", "the desired state"));
  state.signed_sha256 = sha256_string(signed_text);
  return state;
}

int64_t desired_not_after_read(const SignedFields& f, const nlohmann::json& doc) {
  if (!doc.contains("not_after") || doc["not_after"].is_null()) return 0;
  const nlohmann::json& not_after = doc["not_after"];
  if (!not_after.is_number_unsigned() || not_after.get<uint64_t>() == 0 || not_after.get<uint64_t>() >= (1ull << 53)) {
    f.fields_refuse("'not_after' must be a positive integer (seconds since the Unix epoch)");
  }
  return static_cast<int64_t>(not_after.get<uint64_t>());
}

DesiredArtifact desired_artifact_read(const SignedFields& f, const nlohmann::json& artifact) {
  if (!artifact.is_object()) f.fields_refuse("'artifact' must be an object");
  DesiredArtifact out;
  out.url = f.fields_string(artifact, "url", "the artifact");
  if (out.url.rfind("http://", 0) != 0 && out.url.rfind("https://", 0) != 0) {
    f.fields_refuse("the artifact url '" + out.url + "' is not an http:// or https:// URL");
  }
  out.sha256 = f.fields_string(artifact, "sha256", "the artifact");
  out.manifest_sha256 = f.fields_string(artifact, "manifest_sha256", "the artifact");
  if (!envelope_hex_of(out.sha256, 64) || !envelope_hex_of(out.manifest_sha256, 64)) {
    f.fields_refuse("the artifact's sha256 and manifest_sha256 must be 64 lower-case hex characters");
  }
  out.size = f.fields_unsigned(artifact, "size", "the artifact");
  out.name = f.fields_string(artifact, "name", "the artifact", 255);
  return out;
}

bool desired_expired(const DesiredState& state, int64_t now_s) {
  return state.not_after > 0 && now_s > state.not_after + DESIRED_CLOCK_SKEW_S;
}

std::string desired_unverified_id(const std::string& envelope) {
  return envelope_unverified_field(envelope, "deployment_id");
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
