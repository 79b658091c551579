#include "deploy/envelope.h"

#include <algorithm>
#include <regex>

#include "artifact/keys.h"
#include "artifact/signature.h"
#include "common/contract_words.h"
#include "common/error.h"

namespace edgesmith {

namespace {

std::vector<uint8_t> hex_decode(const std::string& text) {
  std::vector<uint8_t> out(text.size() / 2);
  const auto nibble = [](char c) { return c <= '9' ? c - '0' : c - 'a' + 10; };
  for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<uint8_t>(nibble(text[2 * i]) * 16 + nibble(text[2 * i + 1]));
  return out;
}

}  // namespace

bool envelope_hex_of(const std::string& text, size_t length) {
  return text.size() == length &&
         std::all_of(text.begin(), text.end(), [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); });
}

void SignedFields::fields_refuse(const std::string& why) const { throw Error(ERROR_CODE_INTEGRITY, what_ + " is refused: " + why); }

const nlohmann::json& SignedFields::fields_get(const nlohmann::json& doc, const char* name, const char* where) const {
  const auto it = doc.find(name);
  if (it == doc.end()) fields_refuse(std::string(where) + " lacks the field '" + name + "'");
  return *it;
}

std::string SignedFields::fields_string(const nlohmann::json& doc, const char* name, const char* where, size_t max) const {
  const nlohmann::json& value = fields_get(doc, name, where);
  if (!value.is_string() || value.get_ref<const std::string&>().empty() || value.get_ref<const std::string&>().size() > max) {
    fields_refuse(std::string("'") + name + "' in " + where + " must be a non-empty string");
  }
  return value.get<std::string>();
}

uint64_t SignedFields::fields_unsigned(const nlohmann::json& doc, const char* name, const char* where) const {
  const nlohmann::json& value = fields_get(doc, name, where);
  if (!value.is_number_integer() || (!value.is_number_unsigned() && value.get<int64_t>() < 0)) {
    fields_refuse(std::string("'") + name + "' in " + where + " must be a non-negative integer");
  }
  return value.get<uint64_t>();
}

std::string SignedFields::fields_id(const nlohmann::json& doc, const char* name) const {
  static const std::regex pattern(contract::ID_REGEX);
  const std::string value = fields_string(doc, name, what_.c_str(), 64);
  if (!std::regex_match(value, pattern)) {
    fields_refuse(std::string("its ") + name + " '" + value + "' is not an id (1-64 letters, digits, '_', '.', '-')");
  }
  return value;
}

uint64_t SignedFields::fields_bounded(const nlohmann::json& doc, const char* name, uint64_t low, uint64_t high,
                                      uint64_t fallback) const {
  if (!doc.contains(name)) return fallback;
  const uint64_t value = fields_unsigned(doc, name, what_.c_str());
  if (value < low || value > high) {
    fields_refuse(std::string("its ") + name + " " + std::to_string(value) + " is outside " + std::to_string(low) +
                  ".." + std::to_string(high));
  }
  return value;
}

std::string SignedFields::fields_open(const std::string& envelope, const std::vector<std::vector<uint8_t>>& deploy_keys,
                                      const std::string& domain) const {
  const nlohmann::json outer = nlohmann::json::parse(envelope, nullptr, false);
  if (outer.is_discarded() || !outer.is_object()) fields_refuse("the envelope is not a JSON object");
  if (fields_unsigned(outer, "v", "the envelope") != 1) fields_refuse("the envelope is not version 1");
  const nlohmann::json& signed_value = fields_get(outer, "signed", "the envelope");
  if (!signed_value.is_string()) fields_refuse("'signed' in the envelope must be a string");
  const std::string key_id = fields_string(outer, "key_id", "the envelope");
  const std::string signature = fields_string(outer, "signature", "the envelope");
  if (!envelope_hex_of(key_id, 16)) fields_refuse("its key_id is not 16 lower-case hex characters");
  if (!envelope_hex_of(signature, 128)) fields_refuse("its signature is not 128 lower-case hex characters");
  const std::vector<uint8_t>* key = nullptr;
  for (const std::vector<uint8_t>& candidate : deploy_keys) {
    if (candidate.size() == ED25519_PUBLIC_KEY_BYTES && key_id_compute(candidate.data()) == key_id) key = &candidate;
  }
  if (key == nullptr) {
    fields_refuse("it is signed by key " + key_id + ", which is not among this device's deploy keys (trust_dir/deploy/*.pub)");
  }
  const std::vector<uint8_t> sig = hex_decode(signature);
  const std::string& signed_text = signed_value.get_ref<const std::string&>();
  if (!ed25519_verify(domain + signed_text, sig.data(), key->data())) {
    fields_refuse("its signature by key " + key_id + " is not valid");
  }
  return signed_text;
}

std::string envelope_unverified_field(const std::string& envelope, const char* name) {
  const nlohmann::json outer = nlohmann::json::parse(envelope, nullptr, false);
  if (!outer.is_object() || !outer.contains("signed") || !outer["signed"].is_string()) return "";
  const nlohmann::json doc = nlohmann::json::parse(outer["signed"].get<std::string>(), nullptr, false);
  if (!doc.is_object() || !doc.contains(name) || !doc[name].is_string()) return "";
  const std::string value = doc[name];
  return value.size() <= 64 ? value : "";
}

}  // namespace edgesmith
