// A device's broker login: the JSON file `edgesmith broker add-device` writes
// ({"device", "fleet", "host", "port", "username", "password", "tls", "cafile", and with mutual
// TLS "certfile" and "keyfile"}; docs/broker-security.md).
#pragma once

#include <cstdint>
#include <string>

namespace edgesmith {

/// Where and as whom a device connects.
struct MqttCredentials {
  std::string device;    ///< device id (a topic level)
  std::string fleet;     ///< fleet id (a topic level)
  std::string host = "127.0.0.1";
  int32_t port = 1883;
  std::string username;
  std::string password;
  bool tls = false;      ///< connect with TLS (ssl://)
  std::string cafile;    ///< CA certificate to verify the broker with; empty: the system's
  std::string certfile;  ///< client certificate (PEM) for mutual TLS; empty: none
  std::string keyfile;   ///< its private key (PEM)
};

/// Whether `id` is a valid fleet or device id (^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$).
bool telemetry_id_valid(const std::string& id);

/// Read a credentials file. A missing file is Error(ERROR_CODE_IO); a malformed one
/// Error(ERROR_CODE_INVALID_ARGUMENT) naming the file and the bad key.
MqttCredentials credentials_read(const std::string& path);

/// Whether `host` is this machine (localhost, 127.0.0.0/8, ::1), where plaintext never leaves it.
bool host_is_loopback(const std::string& host);

/// Refuse plaintext to a broker that is not on this machine: the password and the signed desired
/// states would cross the network in clear. Throws Error(ERROR_CODE_INVALID_ARGUMENT) naming the fix.
void credentials_check_transport(const MqttCredentials& credentials);

}  // namespace edgesmith
