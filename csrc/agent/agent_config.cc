#include "agent/agent_config.h"

#define TOML_HEADER_ONLY 1
#define TOML_EXCEPTIONS 1
#include <toml++/toml.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <optional>
#include <sstream>

#include "agent/http_api.h"
#include "telemetry/spool.h"

namespace fs = std::filesystem;

namespace edgesmith {

const char* const AGENT_USAGE =
    "usage: edgesmith-agent --config device.toml [flags...]\n"
    "       edgesmith-agent --device ID --fleet F --artifact DIR --credentials FILE --data-dir DIR [--load-dir DIR]\n"
    "                       [--interval SECONDS] [--synthetic-load RPS [--load-from FILE.npy]] [--http HOST:PORT]\n"
    "                       [--key FILE.pub ...]\n"
    "                       [--trust-dir DIR [--deploy-max-bytes N] [--deploy-timeout SECONDS]\n"
    "                                    [--shadow-max-bytes N] [--capture-max-bytes N]\n"
    "                                    [--child-executable FILE]]\n"
    "                       [--http-token-file FILE] [--http-max-requests N] [--backend-path DIR ...]\n"
    "                       [--http-max-connections N] [--http-max-connections-per-peer N]\n"
    "                       [--http-header-timeout SECONDS] [--http-idle-timeout SECONDS]\n"
    "\n"
    "Serve an artifact on loopback HTTP and report telemetry over MQTT (docs/telemetry.md).\n"
    "  --config FILE         TOML with the keys below (device, fleet, artifact, credentials, data_dir, load_dir,\n"
    "                        interval_s, synthetic_load_rps, load_from, http, trusted_keys, spool_max_bytes,\n"
    "                        trust_dir, deploy_max_bytes, deploy_timeout_s, shadow_max_bytes,\n"
    "                        capture_max_bytes, child_executable, http_token_file, http_max_requests,\n"
    "                        http_max_connections, http_max_connections_per_peer, http_header_timeout_s,\n"
    "                        http_idle_timeout_s, backend_path);\n"
    "                        flags override it, relative paths are taken from its directory\n"
    "  --device ID           this device (default: the credentials' device; must match them)\n"
    "  --fleet F             its fleet (default: the credentials' fleet; must match them)\n"
    "  --artifact DIR        the installed artifact, verified before it is loaded\n"
    "  --credentials FILE    the JSON file `edgesmith broker add-device --json` writes\n"
    "  --data-dir DIR        the spool (spool.db) and agent.json (the HTTP port) live here\n"
    "  --load-dir DIR        private copies of artifacts are loaded from here (default <data-dir>/load;\n"
    "                        it becomes the TMPDIR of the agent and its children): a disk, not RAM\n"
    "  --interval SECONDS    one telemetry summary per interval (default 10)\n"
    "  --synthetic-load RPS  run the model itself RPS times a second on its golden inputs plus\n"
    "                        small seeded noise (demos and tests; default 0: off)\n"
    "  --synthetic-shift X   add X to every synthetic input value (to show drift)\n"
    "  --load-from FILE.npy  the camera stand-in: the synthetic load replays this file's samples (one\n"
    "                        array: the input's shape, or N samples of it), in order, looping\n"
    "  --http HOST:PORT      local inference API (default 127.0.0.1:0: any free port); an address\n"
    "                        beyond loopback needs --http-token-file\n"
    "  --http-token-file FILE  clients must send 'Authorization: Bearer <the file's secret>'\n"
    "                        (at least 16 characters, the file chmod 600)\n"
    "  --http-max-requests N inference requests served at once (default 4); more get 503\n"
    "  --http-max-connections N  HTTP connections held at once (default 32, at most 1024); one more\n"
    "                        is answered 503 and closed when it is accepted\n"
    "  --http-max-connections-per-peer N  of which from one client address (default 8, or\n"
    "                        --http-max-connections when that is lower)\n"
    "  --http-header-timeout SECONDS  a request's line and headers must arrive within this (default 5,\n"
    "                        0.1 to 600); a slower client gets 408 and is disconnected\n"
    "  --http-idle-timeout SECONDS  a keep-alive connection idle this long is closed (default 5, 0.1 to 600)\n"
    "  --backend-path DIR    an absolute directory of backend plugins, searched first (repeatable;\n"
    "                        the agent ignores EDGESMITH_BACKEND_PATH)\n"
    "  --key FILE.pub        trusted signing key (default: $EDGESMITH_HOME/{keys,trusted}/*.pub)\n"
    "  --spool-max-bytes N   the spool's disk budget (default 33554432); the oldest messages are\n"
    "                        dropped, counted and reported when it is exhausted\n"
    "  --trust-dir DIR       enable deployment (docs/deployment.md): DIR/build/*.pub sign artifacts,\n"
    "                        DIR/deploy/*.pub sign desired states; the agent then serves the A/B slot\n"
    "                        under <data-dir>/deploy (--artifact is the factory artifact)\n"
    "  --deploy-max-bytes N  largest artifact archive accepted (default 536870912)\n"
    "  --deploy-timeout SECONDS  give up a deployment's download after this long (default 600)\n"
    "  --shadow-max-bytes N  the shadow slot's budget (<data-dir>/shadow: a candidate's archive and\n"
    "                        its files; default 268435456); a shadow state's max_bytes may lower it.\n"
    "                        With --trust-dir the agent takes signed shadow states (docs/shadow.md)\n"
    "  --capture-max-bytes N the capture store's budget (<data-dir>/capture: captured samples of every\n"
    "                        capture; default 268435456); the oldest samples go first. With\n"
    "                        --trust-dir the agent takes signed capture states (docs/capture.md)\n"
    "  --child-executable FILE  the program started for deploy checks and shadow candidates, with the\n"
    "                        agent's child arguments (default: the agent itself); an emulated agent\n"
    "                        names a wrapper that starts the agent under its emulator\n"
    "\n"
    "HTTP: POST /v1/infer (the inputs as concatenated .npy -> the outputs as concatenated .npy),\n"
    "GET /v1/health, GET /v1/model, GET /v1/stats. SIGTERM or SIGINT: last window, flush, death, disconnect.\n";

namespace {

double seconds_parse(const std::string& what, const std::string& text, bool zero_ok) {
  char* end = nullptr;
  errno = 0;
  const double value = std::strtod(text.c_str(), &end);
  if (text.empty() || *end != '\0' || errno != 0 || !std::isfinite(value) || value < 0.0 ||
      (!zero_ok && value == 0.0)) {
    throw AgentConfigError{what + " takes a " + (zero_ok ? "non-negative" : "positive") + " number, got '" + text + "'"};
  }
  return value;
}

// HTTP connection counts and timeouts: bounded so that a typo cannot starve or stall the API.
constexpr long HTTP_CONNECTIONS_MAX = 1024;
constexpr uint32_t HTTP_CONNECTIONS_PER_PEER_DEFAULT = 8;
constexpr double HTTP_TIMEOUT_MIN_S = 0.1;
constexpr double HTTP_TIMEOUT_MAX_S = 600.0;

uint32_t connections_parse(const std::string& what, const std::string& text) {
  char* end = nullptr;
  errno = 0;
  const long n = std::strtol(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || errno != 0 || n < 1 || n > HTTP_CONNECTIONS_MAX) {
    throw AgentConfigError{what + " takes a number from 1 to " + std::to_string(HTTP_CONNECTIONS_MAX) + ", got '" + text + "'"};
  }
  return static_cast<uint32_t>(n);
}

double timeout_check(const std::string& what, double seconds) {
  if (!(seconds >= HTTP_TIMEOUT_MIN_S && seconds <= HTTP_TIMEOUT_MAX_S)) {
    throw AgentConfigError{what + " must be from 0.1 to 600 seconds"};
  }
  return seconds;
}

uint64_t bytes_parse(const std::string& what, const std::string& text) {
  char* end = nullptr;
  errno = 0;
  const unsigned long long value = std::strtoull(text.c_str(), &end, 10);
  if (text.empty() || text[0] == '-' || *end != '\0' || errno != 0 || value < 1024) {
    throw AgentConfigError{what + " takes a number of bytes (at least 1024), got '" + text + "'"};
  }
  return value;
}

std::string path_from(const fs::path& base, const std::string& value) {
  const fs::path p(value);
  return p.is_absolute() ? value : (base / p).lexically_normal().string();
}

void toml_apply(const std::string& file, AgentConfig* config) {
  std::error_code ec;
  if (!fs::is_regular_file(file, ec)) throw AgentConfigError{"the config file " + file + " does not exist"};
  toml::table table;
  try {
    table = toml::parse_file(file);
  } catch (const toml::parse_error& e) {
    std::ostringstream where;
    where << e.source().begin;
    throw AgentConfigError{file + " is not valid TOML (" + std::string(e.description()) + " at " + where.str() + ")"};
  }
  const fs::path base = fs::absolute(fs::path(file)).parent_path();
  static const char* const KNOWN =
      "device, fleet, artifact, credentials, data_dir, load_dir, interval_s, synthetic_load_rps, synthetic_shift, load_from, http, "
      "trusted_keys, spool_max_bytes, trust_dir, deploy_max_bytes, deploy_timeout_s, shadow_max_bytes, capture_max_bytes, "
      "child_executable, "
      "http_token_file, "
      "http_max_requests, http_max_connections, http_max_connections_per_peer, http_header_timeout_s, "
      "http_idle_timeout_s, backend_path";
  for (const auto& [key, node] : table) {
    const std::string name(key.str());
    const auto text = [&]() -> std::string {
      if (!node.is_string()) throw AgentConfigError{file + ": '" + name + "' must be a string"};
      return *node.value<std::string>();
    };
    const auto number = [&]() -> double {
      if (!node.is_number()) throw AgentConfigError{file + ": '" + name + "' must be a number"};
      return *node.value<double>();
    };
    if (name == "device") {
      config->device = text();
    } else if (name == "fleet") {
      config->fleet = text();
    } else if (name == "artifact") {
      config->artifact = path_from(base, text());
    } else if (name == "credentials") {
      config->credentials = path_from(base, text());
    } else if (name == "data_dir") {
      config->data_dir = path_from(base, text());
    } else if (name == "load_dir") {
      config->load_dir = path_from(base, text());
    } else if (name == "http") {
      config->http = text();
    } else if (name == "interval_s") {
      config->interval_s = number();
      if (!(config->interval_s > 0.0)) throw AgentConfigError{file + ": 'interval_s' must be positive"};
    } else if (name == "synthetic_load_rps") {
      config->synthetic_load_rps = number();
      if (!(config->synthetic_load_rps >= 0.0)) throw AgentConfigError{file + ": 'synthetic_load_rps' must be >= 0"};
    } else if (name == "synthetic_shift") {
      config->synthetic_shift = number();
    } else if (name == "load_from") {
      config->load_from = path_from(base, text());
    } else if (name == "spool_max_bytes") {
      if (!node.is_integer() || *node.value<int64_t>() < 1024) {
        throw AgentConfigError{file + ": 'spool_max_bytes' must be an integer of at least 1024"};
      }
      config->spool_max_bytes = static_cast<uint64_t>(*node.value<int64_t>());
    } else if (name == "trust_dir") {
      config->trust_dir = path_from(base, text());
    } else if (name == "deploy_max_bytes") {
      if (!node.is_integer() || *node.value<int64_t>() < 1024) {
        throw AgentConfigError{file + ": 'deploy_max_bytes' must be an integer of at least 1024"};
      }
      config->deploy_max_bytes = static_cast<uint64_t>(*node.value<int64_t>());
    } else if (name == "shadow_max_bytes") {
      if (!node.is_integer() || *node.value<int64_t>() < 1024) {
        throw AgentConfigError{file + ": 'shadow_max_bytes' must be an integer of at least 1024"};
      }
      config->shadow_max_bytes = static_cast<uint64_t>(*node.value<int64_t>());
    } else if (name == "capture_max_bytes") {
      if (!node.is_integer() || *node.value<int64_t>() < 1024) {
        throw AgentConfigError{file + ": 'capture_max_bytes' must be an integer of at least 1024"};
      }
      config->capture_max_bytes = static_cast<uint64_t>(*node.value<int64_t>());
    } else if (name == "child_executable") {
      config->child_executable = path_from(base, text());
    } else if (name == "deploy_timeout_s") {
      config->deploy_timeout_s = number();
      if (!(config->deploy_timeout_s > 0.0)) throw AgentConfigError{file + ": 'deploy_timeout_s' must be positive"};
    } else if (name == "http_token_file") {
      config->http_token_file = path_from(base, text());
    } else if (name == "http_max_requests") {
      if (!node.is_integer() || *node.value<int64_t>() < 1 || *node.value<int64_t>() > 1024) {
        throw AgentConfigError{file + ": 'http_max_requests' must be an integer from 1 to 1024"};
      }
      config->http_max_requests = static_cast<uint32_t>(*node.value<int64_t>());
    } else if (name == "http_max_connections" || name == "http_max_connections_per_peer") {
      if (!node.is_integer() || *node.value<int64_t>() < 1 || *node.value<int64_t>() > HTTP_CONNECTIONS_MAX) {
        throw AgentConfigError{file + ": '" + name + "' must be an integer from 1 to 1024"};
      }
      (name == "http_max_connections" ? config->http_max_connections : config->http_max_connections_per_peer) =
          static_cast<uint32_t>(*node.value<int64_t>());
    } else if (name == "http_header_timeout_s") {
      config->http_header_timeout_s = timeout_check(file + ": 'http_header_timeout_s'", number());
    } else if (name == "http_idle_timeout_s") {
      config->http_idle_timeout_s = timeout_check(file + ": 'http_idle_timeout_s'", number());
    } else if (name == "backend_path") {
      const toml::array* dirs = node.as_array();
      if (dirs == nullptr) throw AgentConfigError{file + ": 'backend_path' must be a list of directories"};
      config->backend_path.clear();
      for (const toml::node& entry : *dirs) {
        if (!entry.is_string()) throw AgentConfigError{file + ": 'backend_path' must be a list of directories"};
        config->backend_path.push_back(path_from(base, *entry.value<std::string>()));
      }
    } else if (name == "trusted_keys") {
      const toml::array* keys = node.as_array();
      if (keys == nullptr) throw AgentConfigError{file + ": 'trusted_keys' must be a list of .pub file paths"};
      config->trusted_keys.clear();
      for (const toml::node& entry : *keys) {
        if (!entry.is_string()) throw AgentConfigError{file + ": 'trusted_keys' must be a list of .pub file paths"};
        config->trusted_keys.push_back(path_from(base, *entry.value<std::string>()));
      }
    } else {
      throw AgentConfigError{file + ": unknown key '" + name + "' (known keys: " + KNOWN + ")"};
    }
  }
}

}  // namespace

void agent_http_address(const std::string& text, std::string* host, int* port) {
  const size_t colon = text.rfind(':');
  if (colon == std::string::npos || colon == 0) {
    throw AgentConfigError{"--http takes HOST:PORT (e.g. 127.0.0.1:8080, port 0 for any), got '" + text + "'"};
  }
  const std::string port_text = text.substr(colon + 1);
  char* end = nullptr;
  const long value = std::strtol(port_text.c_str(), &end, 10);
  if (port_text.empty() || *end != '\0' || value < 0 || value > 65535) {
    throw AgentConfigError{"--http takes HOST:PORT with a port 0-65535, got '" + text + "'"};
  }
  *host = text.substr(0, colon);
  if (host->size() > 2 && host->front() == '[' && host->back() == ']') *host = host->substr(1, host->size() - 2);
  *port = static_cast<int>(value);
}

AgentConfig agent_config_parse(int argc, char** argv) {
  std::string config_file;
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--config") {
      if (i + 1 >= argc) throw AgentConfigError{"--config needs a value"};
      config_file = argv[i + 1];
    }
  }
  AgentConfig config;
  if (!config_file.empty()) toml_apply(config_file, &config);
  std::vector<std::string> keys;
  std::vector<std::string> backend_path;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw AgentConfigError{arg + " needs a value"};
      return argv[++i];
    };
    if (arg == "--config") {
      ++i;
    } else if (arg == "--device") {
      config.device = value();
    } else if (arg == "--fleet") {
      config.fleet = value();
    } else if (arg == "--artifact") {
      config.artifact = value();
    } else if (arg == "--credentials") {
      config.credentials = value();
    } else if (arg == "--data-dir") {
      config.data_dir = value();
    } else if (arg == "--load-dir") {
      config.load_dir = value();
    } else if (arg == "--interval") {
      config.interval_s = seconds_parse(arg, value(), false);
    } else if (arg == "--synthetic-load") {
      config.synthetic_load_rps = seconds_parse(arg, value(), true);
    } else if (arg == "--synthetic-shift") {
      const std::string text = value();
      char* end = nullptr;
      config.synthetic_shift = std::strtod(text.c_str(), &end);
      if (text.empty() || *end != '\0' || !std::isfinite(config.synthetic_shift)) {
        throw AgentConfigError{"--synthetic-shift takes a number, got '" + text + "'"};
      }
    } else if (arg == "--load-from") {
      config.load_from = value();
    } else if (arg == "--http") {
      config.http = value();
    } else if (arg == "--key") {
      keys.push_back(value());
    } else if (arg == "--trust-dir") {
      config.trust_dir = value();
    } else if (arg == "--deploy-max-bytes") {
      config.deploy_max_bytes = bytes_parse(arg, value());
    } else if (arg == "--shadow-max-bytes") {
      config.shadow_max_bytes = bytes_parse(arg, value());
    } else if (arg == "--capture-max-bytes") {
      config.capture_max_bytes = bytes_parse(arg, value());
    } else if (arg == "--child-executable") {
      config.child_executable = value();
      if (!fs::path(config.child_executable).is_absolute()) {
        throw AgentConfigError{"--child-executable takes an absolute path, got '" + config.child_executable + "'"};
      }
    } else if (arg == "--deploy-timeout") {
      config.deploy_timeout_s = seconds_parse(arg, value(), false);
    } else if (arg == "--http-token-file") {
      config.http_token_file = value();
    } else if (arg == "--http-max-requests") {
      const std::string text = value();
      char* end = nullptr;
      const long n = std::strtol(text.c_str(), &end, 10);
      if (text.empty() || *end != '\0' || n < 1 || n > 1024) {
        throw AgentConfigError{"--http-max-requests takes a number from 1 to 1024, got '" + text + "'"};
      }
      config.http_max_requests = static_cast<uint32_t>(n);
    } else if (arg == "--http-max-connections") {
      config.http_max_connections = connections_parse(arg, value());
    } else if (arg == "--http-max-connections-per-peer") {
      config.http_max_connections_per_peer = connections_parse(arg, value());
    } else if (arg == "--http-header-timeout") {
      config.http_header_timeout_s = timeout_check(arg, seconds_parse(arg, value(), false));
    } else if (arg == "--http-idle-timeout") {
      config.http_idle_timeout_s = timeout_check(arg, seconds_parse(arg, value(), false));
    } else if (arg == "--backend-path") {
      const std::string dir = value();
      if (!fs::path(dir).is_absolute()) {
        throw AgentConfigError{"--backend-path takes an absolute directory, got '" + dir + "'"};
      }
      backend_path.push_back(dir);
    } else if (arg == "--spool-max-bytes") {
      config.spool_max_bytes = bytes_parse(arg, value());
    } else {
      throw AgentConfigError{"unknown option " + arg};
    }
  }
  if (!keys.empty()) config.trusted_keys = keys;
  if (!backend_path.empty()) config.backend_path = backend_path;
  const char* where = config_file.empty() ? "" : " (or in the config file)";
  if (config.artifact.empty()) throw AgentConfigError{std::string("--artifact DIR is missing") + where};
  if (config.credentials.empty()) throw AgentConfigError{std::string("--credentials FILE is missing") + where};
  if (config.data_dir.empty()) throw AgentConfigError{std::string("--data-dir DIR is missing") + where};
  if (!config.load_from.empty() && !(config.synthetic_load_rps > 0.0)) {
    throw AgentConfigError{"--load-from " + config.load_from + " feeds the synthetic load, so it needs --synthetic-load RPS"};
  }
  if (config.http_max_connections_per_peer == 0) {
    config.http_max_connections_per_peer = std::min(HTTP_CONNECTIONS_PER_PEER_DEFAULT, config.http_max_connections);
  }
  if (config.http_max_connections_per_peer > config.http_max_connections) {
    throw AgentConfigError{"--http-max-connections-per-peer (" + std::to_string(config.http_max_connections_per_peer) +
                           ") cannot exceed --http-max-connections (" + std::to_string(config.http_max_connections) +
                           ")" + where};
  }
  std::string host;
  int port = 0;
  agent_http_address(config.http, &host, &port);
  if (!http_host_is_loopback(host) && config.http_token_file.empty()) {
    throw AgentConfigError{"--http " + config.http + " serves beyond this machine, so it needs --http-token-file FILE " +
                           "(a secret clients send as 'Authorization: Bearer ...'); or listen on 127.0.0.1"};
  }
  return config;
}

}  // namespace edgesmith
