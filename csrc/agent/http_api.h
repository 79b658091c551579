// The agent's local inference API on loopback HTTP (docs/telemetry.md, "The agent"):
//   POST /v1/infer   the inputs as .npy files concatenated in input order -> the outputs likewise;
//                    400 {"error"} for inputs that do not match the model
//   GET  /v1/health  {"device", "artifact", "runs", "errors"}
//   GET  /v1/model   {"artifact", "manifest_sha256", "target", "backend"} of the serving model
//   GET  /v1/stats   the Session's statistics since start, plus the telemetry connection state
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <thread>

#include <nlohmann/json.hpp>

#include "runtime/session.h"

namespace httplib {
class Server;
}

namespace edgesmith {

/// The Session's statistics as JSON (counters, latency with percentiles, output summaries).
nlohmann::json stats_json(const StatsSnapshot& stats);

/// The HTTP API of the serving Session (asked for each request: a deployment swaps it, and a
/// request in progress keeps the Session it started with).
class HttpApi {
 public:
  /// `on_run_error` is told about every failed inference (the agent reports them as events);
  /// `status` adds the telemetry state to /v1/stats.
  HttpApi(std::function<std::shared_ptr<Session>()> session, std::string device, std::function<void(const std::string&)> on_run_error,
          std::function<nlohmann::json()> status);
  ~HttpApi();
  HttpApi(const HttpApi&) = delete;
  HttpApi& operator=(const HttpApi&) = delete;

  /// Bind HOST:PORT (port 0: any free one) and serve in the background; returns the port.
  /// Throws Error(ERROR_CODE_IO) when the address cannot be bound.
  int http_start(const std::string& host, int port);

  /// Stop serving (waits for the server thread).
  void http_stop();

 private:
  std::function<std::shared_ptr<Session>()> session_;
  std::string device_;
  std::function<void(const std::string&)> on_run_error_;
  std::function<nlohmann::json()> status_;
  std::unique_ptr<httplib::Server> server_;
  std::thread thread_;
};

}  // namespace edgesmith
