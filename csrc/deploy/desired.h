// The signed desired state a device receives on its `desired` topic (docs/deployment.md §2-3).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace edgesmith {

class SignedFields;

/// The prefix signed before the desired-state text (never valid as a manifest signature).
extern const char* const DESIRED_DOMAIN;

/// How far the device's clock may be behind the signer's: a desired state is refused once the
/// device's clock is past its not_after by more than this (docs/deployment.md §3).
constexpr int64_t DESIRED_CLOCK_SKEW_S = 300;

/// What to download.
struct DesiredArtifact {
  std::string url;              ///< http://HOST:PORT/artifacts/<sha256>.tar
  std::string sha256;           ///< of the archive bytes
  uint64_t size = 0;            ///< archive bytes
  std::string manifest_sha256;  ///< of the artifact's manifest.json
  std::string name;             ///< the artifact's name
};

/// A verified desired state.
struct DesiredState {
  std::string fleet;
  std::string device;
  uint64_t version = 0;
  std::string deployment_id;
  std::string action;  ///< "deploy" or "rollback"
  int64_t issued_at_ms = 0;
  int64_t not_after = 0;  ///< seconds since the Unix epoch after which it is refused; 0: none given
  DesiredArtifact artifact;
  std::string signed_sha256;  ///< SHA-256 of the signed text: identifies this exact desired state
};

/// The 32-byte Ed25519 keys in DIR/*.pub, sorted by file name; a missing directory gives none.
/// A malformed .pub throws Error(ERROR_CODE_INVALID_ARGUMENT).
std::vector<std::vector<uint8_t>> trust_keys_read(const std::string& dir);

/// Parse an envelope and check its fields, key id and signature against `deploy_keys`.
/// Throws Error(ERROR_CODE_INTEGRITY) with one sentence saying why it is refused.
DesiredState desired_parse(const std::string& envelope, const std::vector<std::vector<uint8_t>>& deploy_keys);

/// The optional `not_after` of a signed state (0: none); refused through `fields` when malformed.
int64_t desired_not_after_read(const SignedFields& fields, const nlohmann::json& doc);

/// An artifact entry of a signed state (a desired state's `artifact`, a shadow state's candidates).
DesiredArtifact desired_artifact_read(const SignedFields& fields, const nlohmann::json& artifact);

/// Whether a desired state has expired at `now_s` (Unix seconds): past not_after by more than
/// DESIRED_CLOCK_SKEW_S. A desired state without not_after never expires.
bool desired_expired(const DesiredState& state, int64_t now_s);

/// The deployment id of an envelope read without any check ("" when there is none): only to
/// name a refused desired state in a report.
std::string desired_unverified_id(const std::string& envelope);

/// The desired state as JSON (state.json keeps it to resume an interrupted deployment).
nlohmann::json desired_to_json(const DesiredState& state);
DesiredState desired_from_json(const nlohmann::json& doc);

}  // namespace edgesmith
