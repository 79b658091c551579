#include "telemetry/credentials.h"

#include <arpa/inet.h>

#include <filesystem>
#include <system_error>

#include <nlohmann/json.hpp>

#include "common/error.h"
#include "common/file.h"

namespace edgesmith {

namespace {

constexpr uint64_t CREDENTIALS_MAX_BYTES = 1u << 20;

[[noreturn]] void credentials_fail(const std::string& path, const std::string& why) {
  throw Error(ERROR_CODE_INVALID_ARGUMENT,
              "the credentials file " + path + " " + why +
                  "; write it again with `edgesmith broker add-device ID --fleet F --dir DIR`");
}

std::string string_field(const nlohmann::json& doc, const std::string& path, const char* key,
                         bool required) {
  const auto it = doc.find(key);
  if (it == doc.end() || it->is_null()) {
    if (required) credentials_fail(path, std::string("has no '") + key + "'");
    return {};
  }
  if (!it->is_string()) credentials_fail(path, std::string("has a non-string '") + key + "'");
  return it->get<std::string>();
}

}  // namespace

bool telemetry_id_valid(const std::string& id) {
  if (id.empty() || id.size() > 64) return false;
  for (size_t i = 0; i < id.size(); ++i) {
    const char c = id[i];
    const bool alnum = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9');
    if (!alnum && (i == 0 || (c != '_' && c != '.' && c != '-'))) return false;
  }
  return true;
}

MqttCredentials credentials_read(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) {
    throw Error(ERROR_CODE_IO, "the credentials file " + path +
                                   " does not exist; create it with `edgesmith broker add-device ID "
                                   "--fleet F --dir DIR`");
  }
  const std::string text = file_read(path, CREDENTIALS_MAX_BYTES, ERROR_CODE_IO, path);
  const nlohmann::json doc = nlohmann::json::parse(text, nullptr, false);
  if (doc.is_discarded() || !doc.is_object()) credentials_fail(path, "is not a JSON object");
  MqttCredentials c;
  c.device = string_field(doc, path, "device", true);
  c.fleet = string_field(doc, path, "fleet", true);
  c.host = string_field(doc, path, "host", true);
  c.username = string_field(doc, path, "username", true);
  c.password = string_field(doc, path, "password", true);
  c.cafile = string_field(doc, path, "cafile", false);
  c.certfile = string_field(doc, path, "certfile", false);
  c.keyfile = string_field(doc, path, "keyfile", false);
  if (c.certfile.empty() != c.keyfile.empty()) credentials_fail(path, "has only one of 'certfile' and 'keyfile'");
  const auto port = doc.find("port");
  if (port == doc.end() || !port->is_number_integer() || port->get<int64_t>() < 1 ||
      port->get<int64_t>() > 65535) {
    credentials_fail(path, "has no valid 'port' (an integer 1-65535)");
  }
  c.port = port->get<int32_t>();
  const auto tls = doc.find("tls");
  if (tls != doc.end() && !tls->is_null()) {
    if (!tls->is_boolean()) credentials_fail(path, "has a non-boolean 'tls'");
    c.tls = tls->get<bool>();
  }
  if (!telemetry_id_valid(c.device)) credentials_fail(path, "has an invalid 'device' id");
  if (!telemetry_id_valid(c.fleet)) credentials_fail(path, "has an invalid 'fleet' id");
  if (!c.certfile.empty() && !c.tls) credentials_fail(path, "names a 'certfile' but has 'tls' false");
  return c;
}

bool host_is_loopback(const std::string& host) {
  if (host == "localhost") return true;
  in_addr v4{};
  if (::inet_pton(AF_INET, host.c_str(), &v4) == 1) return (ntohl(v4.s_addr) >> 24) == 127;
  std::string bare = host;
  if (bare.size() > 2 && bare.front() == '[' && bare.back() == ']') bare = bare.substr(1, bare.size() - 2);
  in6_addr v6{};
  return ::inet_pton(AF_INET6, bare.c_str(), &v6) == 1 && IN6_IS_ADDR_LOOPBACK(&v6);
}

void credentials_check_transport(const MqttCredentials& c) {
  if (c.tls || host_is_loopback(c.host)) return;
  throw Error(ERROR_CODE_INVALID_ARGUMENT,
              "refusing plaintext MQTT to " + c.host + ":" + std::to_string(c.port) +
                  " (not this machine): the password and desired states would cross the network in clear; "
                  "run the broker with TLS (`edgesmith broker certs`, then `edgesmith broker up --tls`) and "
                  "write this device's credentials again with `edgesmith broker add-device`");
}

}  // namespace edgesmith
