// The signed envelope both central → device states travel in (docs/deployment.md §3,
// docs/shadow.md): {"v": 1, "signed": TEXT, "key_id": HEX16, "signature": HEX128}, the signature an
// Ed25519 one by a deploy key over DOMAIN + TEXT. Each kind of state has its own domain, so a desired
// state's signature never verifies as a shadow state's and vice versa.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace edgesmith {

/// Reads the fields of one kind of signed state; every refusal is Error(ERROR_CODE_INTEGRITY) with
/// one sentence starting "<what> is refused: ".
class SignedFields {
 public:
  /// `what`: "the desired state", "the shadow state".
  explicit SignedFields(std::string what) : what_(std::move(what)) {}

  /// Throw the refusal `why`.
  [[noreturn]] void fields_refuse(const std::string& why) const;
  /// doc[name]; refused when missing (`where` names the object: "the envelope", "the artifact").
  const nlohmann::json& fields_get(const nlohmann::json& doc, const char* name, const char* where) const;
  /// A non-empty string of at most `max` bytes.
  std::string fields_string(const nlohmann::json& doc, const char* name, const char* where, size_t max = 4096) const;
  /// A non-negative integer.
  uint64_t fields_unsigned(const nlohmann::json& doc, const char* name, const char* where) const;
  /// The state's own field `name`: an id of the contract (ID_REGEX: 1-64 letters, digits, '_', '.', '-').
  std::string fields_id(const nlohmann::json& doc, const char* name) const;
  /// The state's own integer field `name` in [low, high]; `fallback` when it is absent.
  uint64_t fields_bounded(const nlohmann::json& doc, const char* name, uint64_t low, uint64_t high,
                          uint64_t fallback) const;

  /// Check the envelope's form, that its key is one of `deploy_keys` and its signature over
  /// `domain` + the signed text; returns the signed text (not yet parsed).
  std::string fields_open(const std::string& envelope, const std::vector<std::vector<uint8_t>>& deploy_keys,
                          const std::string& domain) const;

 private:
  std::string what_;
};

/// Whether `text` is `length` lower-case hex characters.
bool envelope_hex_of(const std::string& text, size_t length);

/// The signed text's field `name` read without any check ("" when there is none or it is longer than
/// 64 bytes): only to name a refused state in a report.
std::string envelope_unverified_field(const std::string& envelope, const char* name);

}  // namespace edgesmith
