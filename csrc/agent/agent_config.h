// edgesmith-agent's settings: a device.toml (--config) and flags that override it
// (docs/telemetry.md, "The agent").
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace edgesmith {

/// A mistake in the command line or the config file: one sentence, printed with the usage.
struct AgentConfigError {
  std::string message;
};

/// Everything the agent needs to run.
struct AgentConfig {
  std::string device;       ///< must match the credentials' device (default: theirs)
  std::string fleet;        ///< must match the credentials' fleet (default: theirs)
  std::string artifact;     ///< the installed artifact directory
  std::string credentials;  ///< the JSON file `edgesmith broker add-device` writes
  std::string data_dir;     ///< spool.db and agent.json
  std::string load_dir;     ///< private load copies of artifacts (the agent's TMPDIR); empty: <data_dir>/load
  double interval_s = 10.0;
  double synthetic_load_rps = 0.0;
  double synthetic_shift = 0.0;  ///< added to every synthetic input value (drift demos)
  std::string load_from;         ///< a .npy the synthetic load replays instead of the golden inputs
  std::string http = "127.0.0.1:0";
  std::vector<std::string> trusted_keys;  ///< .pub files; empty: the default home rule
  uint64_t spool_max_bytes = 0;           ///< 0: the spool's default
  std::string trust_dir;                  ///< build/*.pub and deploy/*.pub; empty: deployment disabled
  uint64_t deploy_max_bytes = 512ull << 20;  ///< largest artifact archive accepted
  uint64_t shadow_max_bytes = 256ull << 20;  ///< the shadow slot's budget (docs/shadow.md)
  uint64_t capture_max_bytes = 256ull << 20;  ///< the capture store's budget (docs/capture.md)
  std::string child_executable = "/proc/self/exe";  ///< started for deploy checks and shadow children
  double deploy_timeout_s = 600.0;        ///< how long one deployment's download may take
  std::string http_token_file;            ///< the Bearer token of the HTTP API; required off loopback
  uint32_t http_max_requests = 4;         ///< concurrent /v1/infer requests; more get 503
  uint32_t http_max_connections = 32;     ///< open HTTP connections; more are answered 503 and closed
  uint32_t http_max_connections_per_peer = 0;  ///< open HTTP connections from one client address (0: 8, or fewer)
  double http_header_timeout_s = 5.0;     ///< a request's headers must arrive within this (else 408)
  double http_idle_timeout_s = 5.0;       ///< an idle keep-alive connection is closed after this
  std::vector<std::string> backend_path;  ///< plugin directories (absolute); $EDGESMITH_BACKEND_PATH is ignored
};

/// The usage text (--help).
extern const char* const AGENT_USAGE;

/// Parse flags (argv[1..]) and the --config file they name. Relative paths in the file are taken
/// from the file's directory. Throws AgentConfigError naming the bad flag, key or file.
AgentConfig agent_config_parse(int argc, char** argv);

/// Split HOST:PORT; throws AgentConfigError.
void agent_http_address(const std::string& text, std::string* host, int* port);

}  // namespace edgesmith
