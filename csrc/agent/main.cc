// edgesmith-agent: the device side of fleet telemetry, no Python. Loads the installed artifact
// through session_open (verified first), serves it on loopback HTTP, optionally drives it with
// synthetic load, and reports birth / telemetry / events / death over MQTT from an on-disk spool
// (docs/telemetry.md). Usage: AGENT_USAGE in agent_config.cc.
//
// Exit status: 0 after SIGTERM/SIGINT, 1 when it cannot start, 2 for a usage or config mistake.
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <mutex>
#include <string>
#include <system_error>

#include <nlohmann/json.hpp>

#include "agent/agent_config.h"
#include "agent/capture.h"
#include "agent/deployer.h"
#include "agent/http_api.h"
#include "agent/shadow.h"
#include "agent/shadow_child.h"
#include "agent/synthetic_load.h"
#include "artifact/keys.h"
#include "common/error.h"
#include "common/file.h"
#include "common/version.h"
#include "deploy/desired.h"
#include "runtime/plugin.h"
#include "runtime/session.h"
#include "telemetry/credentials.h"
#include "telemetry/reporter.h"

namespace fs = std::filesystem;

namespace edgesmith {
namespace {

constexpr double SHUTDOWN_FLUSH_S = 5.0;
// Failed runs become `run_error` events, at most one per this many seconds (a client sending
// garbage must not flood the spool).
constexpr double RUN_ERROR_EVENT_PERIOD_S = 1.0;

void log_line(const std::string& line) { std::cerr << "edgesmith-agent: " << line << std::endl; }

// agent.json: how local clients find the agent. Written atomically (rename) so a reader never
// sees half a file.
void agent_file_write(const std::string& path, const nlohmann::json& doc) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << doc.dump(2) << "\n";
    if (!out) throw Error(ERROR_CODE_IO, "cannot write " + tmp + "; check the data directory's permissions");
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) throw Error(ERROR_CODE_IO, "cannot write " + path + " (" + ec.message() + ")");
}

// The shadow runner's reports go into the telemetry spool too.
class SpoolShadowReporter : public ShadowReporter {
 public:
  explicit SpoolShadowReporter(SessionReporter* reporter) : reporter_(reporter) {}
  void shadow_report_event(const std::string& event, const std::string& message,
                           const nlohmann::json& details) override {
    reporter_->reporter_event(event, message, details);
  }
  void shadow_report_window(const nlohmann::json& body) override { reporter_->reporter_shadow(body); }

 private:
  SessionReporter* reporter_;
};

// The capture runner's events go into the telemetry spool too.
class SpoolCaptureReporter : public CaptureReporter {
 public:
  explicit SpoolCaptureReporter(SessionReporter* reporter) : reporter_(reporter) {}
  void capture_report_event(const std::string& event, const std::string& message,
                            const nlohmann::json& details) override {
    reporter_->reporter_event(event, message, details);
  }

 private:
  SessionReporter* reporter_;
};

// The deployer's reports go into the telemetry spool.
class SpoolDeployReporter : public DeployReporter {
 public:
  explicit SpoolDeployReporter(SessionReporter* reporter) : reporter_(reporter) {}
  void deploy_report_state(const nlohmann::json& body) override { reporter_->reporter_state(body); }
  void deploy_report_event(const std::string& event, const std::string& message,
                           const nlohmann::json& details) override {
    reporter_->reporter_event(event, message, details);
  }

 private:
  SessionReporter* reporter_;
};

uint32_t seed_of(const std::string& device) {
  uint32_t hash = 2166136261u;  // FNV-1a: each device its own, reproducible noise
  for (const char c : device) hash = (hash ^ static_cast<uint8_t>(c)) * 16777619u;
  return hash;
}

// Private load copies (session_open) go to $TMPDIR: point it at `dir`, made if missing and only
// this user's, before any thread starts and for every child (deploy checks, shadow candidates). The
// default, under the data dir, is on the device's disk, where /tmp is often RAM (tmpfs).
void load_dir_use(const std::string& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) {
    throw Error(ERROR_CODE_IO, "cannot make the load directory " + dir + " (" + ec.message() +
                                   "); pass --load-dir DIR on a writable disk");
  }
  const std::string problem = path_trust_problem(dir, "the load directory (--load-dir)", PATH_OWNER_SELF);
  if (!problem.empty()) throw Error(ERROR_CODE_INVALID_ARGUMENT, problem);
  ::setenv("TMPDIR", fs::absolute(dir).lexically_normal().string().c_str(), 1);
}

int agent_main(const AgentConfig& config, const sigset_t& signals) {
  // Cheap checks first: a wrong credentials file should not wait for the engine to load.
  const MqttCredentials credentials = credentials_read(config.credentials);
  credentials_check_transport(credentials);
  if (!config.device.empty() && config.device != credentials.device) {
    throw Error(ERROR_CODE_INVALID_ARGUMENT, "--device is " + config.device + " but " + config.credentials +
                                                 " holds device " + credentials.device + "'s credentials");
  }
  if (!config.fleet.empty() && config.fleet != credentials.fleet) {
    throw Error(ERROR_CODE_INVALID_ARGUMENT, "--fleet is " + config.fleet + " but " + config.credentials +
                                                 " is for fleet " + credentials.fleet);
  }
  load_dir_use(config.load_dir.empty() ? (fs::path(config.data_dir) / "load").string() : config.load_dir);
  // Plugins come from the built-in directories and --backend-path only, never from the environment.
  plugin_search_configure(PluginSearchPolicy{false, config.backend_path});
  HttpOptions http_options;
  http_options.max_requests = config.http_max_requests;
  http_options.connections.max_connections = config.http_max_connections;
  http_options.connections.max_connections_per_peer = config.http_max_connections_per_peer;
  http_options.connections.header_timeout_s = config.http_header_timeout_s;
  http_options.connections.idle_timeout_s = config.http_idle_timeout_s;
  if (!config.http_token_file.empty()) http_options.token = http_token_read(config.http_token_file);
  std::vector<std::vector<uint8_t>> keys;
  for (const std::string& path : config.trusted_keys) keys.push_back(public_key_read(path));
  std::vector<std::vector<uint8_t>> deploy_keys;
  if (!config.trust_dir.empty()) {
    // Deployment: the trust store's build keys (plus any --key) sign artifacts, its deploy keys
    // desired states (docs/deployment.md §3).
    std::error_code ec;
    if (!fs::is_directory(config.trust_dir, ec)) {
      throw Error(ERROR_CODE_INVALID_ARGUMENT, "the trust directory " + config.trust_dir +
                                                   " does not exist; provision it with build/*.pub and deploy/*.pub");
    }
    const fs::path trust(config.trust_dir);
    for (const fs::path& dir : {trust, trust / "build", trust / "deploy"}) trust_dir_check(dir.string(), "the trust directory");
    for (auto& key : trust_keys_read((fs::path(config.trust_dir) / "build").string())) keys.push_back(std::move(key));
    deploy_keys = trust_keys_read((fs::path(config.trust_dir) / "deploy").string());
    if (keys.empty()) {
      throw Error(ERROR_CODE_INVALID_ARGUMENT, "no artifact signing keys: put the build key's .pub into " +
                                                   config.trust_dir + "/build/");
    }
    if (deploy_keys.empty()) {
      log_line("no deploy keys in " + config.trust_dir + "/deploy/: every desired state will be refused");
    }
  } else if (config.trusted_keys.empty()) {
    keys = trusted_keys_default();
  }
  if (keys.empty()) {
    throw Error(ERROR_CODE_INVALID_ARGUMENT, "no trusted public keys: pass --key FILE.pub (trusted_keys in the "
                                             "config) or copy the signer's .pub to " + keys_home() + "/trusted/");
  }
  std::unique_ptr<Deployer> deployer;
  std::shared_ptr<Session> first;
  if (!config.trust_dir.empty()) {
    DeployerOptions deploy;
    deploy.data_dir = config.data_dir;
    deploy.fleet = credentials.fleet;
    deploy.device = credentials.device;
    deploy.factory_artifact = config.artifact;
    deploy.build_keys = keys;
    deploy.deploy_keys = deploy_keys;
    deploy.max_bytes = config.deploy_max_bytes;
    deploy.timeout_s = config.deploy_timeout_s;
    deploy.log = [](const std::string& line) { log_line(line); };
    deploy.tls_cafile = credentials.cafile;  // https:// archives: the same CA options as the broker
    deploy.tls_certfile = credentials.certfile;
    deploy.tls_keyfile = credentials.keyfile;
    deploy.backend_path = config.backend_path;  // the check child searches the agent's plugin directories
    deploy.check_executable = config.child_executable;
    std::error_code ec;
    fs::create_directories(config.data_dir, ec);
    deployer = std::make_unique<Deployer>(deploy);
    first = deployer->deployer_boot();
  } else {
    first = session_open(config.artifact, keys);
  }
  // The serving Session: a deployment swaps it; each request holds the one it started with.
  std::mutex serving_mutex;
  std::shared_ptr<Session> serving = first;
  const auto serving_get = [&serving_mutex, &serving] {
    std::lock_guard<std::mutex> lock(serving_mutex);
    return serving;
  };

  // Capture (docs/capture.md) is signed like shadows: an agent with a trust directory takes it.
  std::unique_ptr<CaptureRunner> capture;
  if (deployer) {
    CaptureRunnerOptions capture_options;
    capture_options.data_dir = config.data_dir;
    capture_options.fleet = credentials.fleet;
    capture_options.device = credentials.device;
    capture_options.deploy_keys = deploy_keys;
    capture_options.max_bytes = config.capture_max_bytes;
    capture_options.tls_cafile = credentials.cafile;  // https:// receivers: the same CA options as the broker
    capture_options.tls_certfile = credentials.certfile;
    capture_options.tls_keyfile = credentials.keyfile;
    capture_options.log = [](const std::string& line) { log_line(line); };
    capture = std::make_unique<CaptureRunner>(capture_options);
  }
  CaptureRunner* capture_runner = capture.get();
  // Shadows (docs/shadow.md) need the deploy keys: an agent with a trust directory takes them.
  std::unique_ptr<ShadowRunner> shadow;
  if (deployer) {
    ShadowRunnerOptions shadow_options;
    shadow_options.data_dir = config.data_dir;
    shadow_options.fleet = credentials.fleet;
    shadow_options.device = credentials.device;
    shadow_options.build_keys = keys;
    shadow_options.deploy_keys = deploy_keys;
    shadow_options.max_bytes = config.shadow_max_bytes;
    shadow_options.download_timeout_s = config.deploy_timeout_s;
    shadow_options.check_timeout_s = config.deploy_timeout_s;
    shadow_options.interval_s = config.interval_s;
    shadow_options.backend_path = config.backend_path;
    shadow_options.executable = config.child_executable;
    shadow_options.tls_cafile = credentials.cafile;
    shadow_options.tls_certfile = credentials.certfile;
    shadow_options.tls_keyfile = credentials.keyfile;
    shadow_options.log = [](const std::string& line) { log_line(line); };
    if (capture_runner != nullptr) {  // capture's `disagreement` switch
      shadow_options.on_disagreement = [capture_runner](const Session& session, const std::vector<Tensor>& inputs,
                                                        const std::vector<Tensor>& outputs) {
        capture_runner->capture_disagreement(session, inputs, outputs);
      };
    }
    shadow = std::make_unique<ShadowRunner>(shadow_options);
  }
  ShadowRunner* shadow_runner = shadow.get();
  std::function<void(const Session&, const std::vector<Tensor>&, const std::vector<Tensor>&, double)> on_served;
  if (shadow_runner != nullptr || capture_runner != nullptr) {
    on_served = [shadow_runner, capture_runner](const Session& session, const std::vector<Tensor>& inputs,
                                                const std::vector<Tensor>& outputs, double run_us) {
      const bool captured = capture_runner != nullptr && capture_runner->capture_offer(session, inputs, outputs, run_us);
      if (shadow_runner != nullptr) shadow_runner->shadow_offer(session, inputs, outputs, run_us, captured);
    };
    http_options.on_served = on_served;
  }
  if (shadow_runner != nullptr) http_options.shadow_status = [shadow_runner] { return shadow_runner->shadow_status(); };
  if (capture_runner != nullptr) http_options.capture_status = [capture_runner] { return capture_runner->capture_status(); };

  ReporterOptions options;
  options.credentials_path = config.credentials;
  options.data_dir = config.data_dir;
  options.interval_s = config.interval_s;
  if (config.spool_max_bytes > 0) options.spool_max_bytes = config.spool_max_bytes;
  options.expect_device = config.device;
  options.expect_fleet = config.fleet;
  if (deployer) {
    Deployer* d = deployer.get();
    options.on_desired = [d](const std::string& payload, bool) { d->deployer_desired(payload); };
    options.on_subscribed = [d] { d->deployer_subscribed(); };
    options.on_shadow = [shadow_runner](const std::string& payload, bool) { shadow_runner->shadow_desired(payload); };
    options.on_capture = [capture_runner](const std::string& payload, bool) { capture_runner->capture_desired(payload); };
  }
  SessionReporter reporter(std::shared_ptr<const Session>(first), options);
  const nlohmann::json ids = reporter.reporter_status();
  const std::string device = ids["device"];

  std::mutex error_mutex;
  auto last_error_event = std::chrono::steady_clock::time_point{};
  const auto on_run_error = [&](const std::string& message) {
    {
      std::lock_guard<std::mutex> lock(error_mutex);
      const auto now = std::chrono::steady_clock::now();
      if (now - last_error_event < std::chrono::duration<double>(RUN_ERROR_EVENT_PERIOD_S)) return;
      last_error_event = now;
    }
    try {
      reporter.reporter_event("run_error", message);
    } catch (const std::exception& e) {
      log_line(std::string("a run_error event was not stored: ") + e.what());
    }
  };

  // Before the HTTP server starts: a load that cannot start (no golden inputs, a --load-from file
  // that does not fit the model) ends the agent with its sentence, with no server thread to stop.
  std::unique_ptr<SyntheticLoad> load;
  if (config.synthetic_load_rps > 0.0) {
    load = std::make_unique<SyntheticLoad>(serving_get, config.synthetic_load_rps, config.synthetic_shift,
                                           seed_of(device), on_run_error, on_served, config.load_from);
  }
  HttpApi http(serving_get, device, on_run_error, [&reporter] { return reporter.reporter_status(); }, http_options);
  std::string host;
  int port = 0;
  agent_http_address(config.http, &host, &port);
  port = http.http_start(host, port);
  const std::string agent_file = (fs::path(config.data_dir) / "agent.json").string();
  agent_file_write(agent_file, {{"pid", static_cast<int64_t>(getpid())},
                                {"device", device},
                                {"fleet", ids["fleet"]},
                                {"artifact", first->session_manifest().name},
                                {"host", host},
                                {"port", port},
                                {"url", "http://" + (host.find(':') != std::string::npos ? "[" + host + "]" : host) +
                                            ":" + std::to_string(port)}});

  reporter.reporter_start();
  SpoolDeployReporter deploy_reporter(&reporter);
  if (deployer) {
    deployer->deployer_start(&deploy_reporter, [&](std::shared_ptr<Session> next) {
      {
        std::lock_guard<std::mutex> lock(serving_mutex);
        serving = next;
      }
      reporter.reporter_session_switch(next);
      if (shadow_runner != nullptr) shadow_runner->shadow_serving_changed();
      log_line("switched to " + next->session_manifest().name + " (" + next->session_describe() + ")");
    });
  }
  SpoolShadowReporter shadow_reporter(&reporter);
  if (shadow_runner != nullptr) shadow_runner->shadow_start(&shadow_reporter, serving_get);
  SpoolCaptureReporter capture_reporter(&reporter);
  if (capture_runner != nullptr) capture_runner->capture_start(&capture_reporter);
  if (load) load->load_start();
  log_line("device " + device + " serves " + first->session_manifest().name + " (" + first->session_describe() +
           ") on http://" + host + ":" + std::to_string(port) + ", telemetry every " +
           nlohmann::json(config.interval_s).dump() + " s");

  int signal_number = 0;
  sigwait(&signals, &signal_number);
  log_line(std::string("stopping (") + (signal_number == SIGINT ? "SIGINT" : "SIGTERM") + ")");
  if (deployer) deployer->deployer_stop();
  if (load) load->load_stop();
  http.http_stop();
  if (shadow_runner != nullptr) shadow_runner->shadow_stop();
  if (capture_runner != nullptr) capture_runner->capture_stop();
  reporter.reporter_stop(SHUTDOWN_FLUSH_S);
  std::error_code ec;
  fs::remove(agent_file, ec);
  const nlohmann::json status = reporter.reporter_status();
  log_line("stopped; " + std::to_string(status["queued"].get<uint64_t>()) + " messages left in the spool");
  return 0;
}

}  // namespace
}  // namespace edgesmith

int main(int argc, char** argv) {
  using namespace edgesmith;
  // Hidden: the deployer runs a candidate artifact's load and self-test in a child process of this
  // same binary (ChildProcessVerifier), so a payload that crashes kills only the child.
  if (argc >= 2 && std::string(argv[1]) == "--deploy-check") return deploy_check_main(argc - 2, argv + 2);
  if (argc >= 2 && std::string(argv[1]) == "--shadow-child") return shadow_child_main(argc - 2, argv + 2);  // ShadowChild
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "-h" || arg == "--help") {
      std::cout << AGENT_USAGE;
      return 0;
    }
    if (arg == "--version") {
      std::cout << "edgesmith-agent " << version_string() << "\n";
      return 0;
    }
  }
  // Block the stop signals in every thread (threads inherit the mask), and take them with
  // sigwait() in main: the shutdown then runs as ordinary code, not in a signal handler.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  signal(SIGPIPE, SIG_IGN);  // a client or broker closing its socket is an error code, not a death
  try {
    return agent_main(agent_config_parse(argc, argv), signals);
  } catch (const AgentConfigError& e) {
    std::cerr << "error: " << e.message << "\n(see edgesmith-agent --help)\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
}
