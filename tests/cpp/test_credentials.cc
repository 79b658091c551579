// A device's broker credentials (csrc/telemetry/credentials.h): the TLS keys, and the refusal of
// plaintext to a broker that is not on this machine (docs/broker-security.md).
#include <gtest/gtest.h>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "common/error.h"
#include "telemetry/credentials.h"

namespace edgesmith {
namespace {

std::string credentials_file(const std::string& name, const std::string& json) {
  const std::filesystem::path path =
      std::filesystem::temp_directory_path() / ("edgesmith-credentials-" + std::to_string(getpid()) + "-" + name);
  std::ofstream(path) << json;
  return path.string();
}

std::string base(const std::string& extra) {
  return R"({"device": "cam-01", "fleet": "plant-a", "host": "127.0.0.1", "port": 8883, "username": "cam-01",
             "password": "p")" + extra + "}";
}

TEST(Credentials, LoopbackHostsAreThisMachine) {
  for (const char* host : {"localhost", "127.0.0.1", "127.255.0.9", "::1", "[::1]"}) {
    EXPECT_TRUE(host_is_loopback(host)) << host;
  }
  for (const char* host : {"10.0.0.5", "0.0.0.0", "128.0.0.1", "::", "::ffff:127.0.0.1x", "broker.example",
                           "localhost.example", "", "1.2.3.4.5"}) {
    EXPECT_FALSE(host_is_loopback(host)) << host;
  }
}

TEST(Credentials, PlaintextOffThisMachineIsRefusedWithTheFix) {
  MqttCredentials c;
  c.device = "cam-01";
  c.fleet = "plant-a";
  c.host = "10.0.0.5";
  c.port = 1883;
  try {
    credentials_check_transport(c);
    FAIL() << "plaintext to 10.0.0.5 was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("refusing plaintext MQTT to 10.0.0.5:1883"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("edgesmith broker up --tls"), std::string::npos) << e.what();
  }
  c.tls = true;
  EXPECT_NO_THROW(credentials_check_transport(c));
  c.tls = false;
  c.host = "127.0.0.1";
  EXPECT_NO_THROW(credentials_check_transport(c));
}

TEST(Credentials, ClientCertificateAndKeyComeTogetherWithTls) {
  const MqttCredentials c = credentials_read(credentials_file(
      "both", base(R"(, "tls": true, "cafile": "/ca.crt", "certfile": "/d.crt", "keyfile": "/d.key")")));
  EXPECT_TRUE(c.tls);
  EXPECT_EQ(c.cafile, "/ca.crt");
  EXPECT_EQ(c.certfile, "/d.crt");
  EXPECT_EQ(c.keyfile, "/d.key");
  EXPECT_THROW(credentials_read(credentials_file("cert-only", base(R"(, "tls": true, "certfile": "/d.crt")"))), Error);
  EXPECT_THROW(credentials_read(credentials_file("no-tls", base(R"(, "certfile": "/d.crt", "keyfile": "/d.key")"))),
               Error);
}

}  // namespace
}  // namespace edgesmith
