// The agent's local inference API on HTTP (docs/telemetry.md, "The agent"):
//   POST /v1/infer   the inputs as .npy files concatenated in input order -> the outputs likewise;
//                    400 {"error"} for inputs that do not match the model (each header is checked
//                    against the manifest before its data is read), 413 for a body larger than the
//                    model's inputs plus their headers, 503 + Retry-After beyond the concurrency limit
//   GET  /v1/health  {"device", "artifact", "runs", "errors"}
//   GET  /v1/model   {"artifact", "manifest_sha256", "target", "backend"} of the serving model
//   GET  /v1/stats   the Session's statistics since start, plus the telemetry connection state and
//                    the HTTP refusals by reason
// Connections are limited in number (overall and per client address), in the time their headers
// take and in idle keep-alive time (HttpConnectionLimits; agent/http_connections.h says how).
// With a token, every request needs `Authorization: Bearer <token>` (401 otherwise); an address
// beyond loopback is only served with a token (the agent's --http-token-file).
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "runtime/session.h"

namespace edgesmith {

class GuardedServer;

/// The Session's statistics as JSON (counters, latency with percentiles, output summaries).
nlohmann::json stats_json(const StatsSnapshot& stats);

/// The largest request line plus headers accepted (httplib itself has no bound while reading them).
constexpr uint32_t HTTP_HEADER_MAX_BYTES = 32u << 10;

/// How many connections the API holds and for how long (agent flags --http-max-connections,
/// --http-max-connections-per-peer, --http-header-timeout, --http-idle-timeout).
struct HttpConnectionLimits {
  uint32_t max_connections = 32;          ///< open connections served at once, from all peers
  uint32_t max_connections_per_peer = 8;  ///< open connections from one client address
  double header_timeout_s = 5.0;          ///< a request's line and headers must arrive within this
  double idle_timeout_s = 5.0;            ///< a keep-alive connection idle this long is closed
};

/// How the API is served.
struct HttpOptions {
  std::string token;           ///< required as `Authorization: Bearer <token>`; empty: none (loopback only)
  uint32_t max_requests = 4;   ///< concurrent /v1/infer requests served; more get 503 + Retry-After
  HttpConnectionLimits connections;  ///< slow and idle clients (agent/http_connections.h)
  /// Told of every answered request after its response body is made (the Session that answered,
  /// inputs, outputs, run time in µs): the shadow's sampling hook (ShadowRunner::shadow_offer).
  /// Must not block.
  std::function<void(const Session&, const std::vector<Tensor>&, const std::vector<Tensor>&, double)> on_served;
  /// Extra fields of GET /v1/stats under "shadow" (ShadowRunner::shadow_status); unset: none.
  std::function<nlohmann::json()> shadow_status;
  /// Extra fields of GET /v1/stats under "capture" (CaptureRunner::capture_status); unset: none.
  std::function<nlohmann::json()> capture_status;
};

/// True when `host` (an --http host) only accepts connections from this machine: "localhost",
/// 127.0.0.0/8 or ::1.
bool http_host_is_loopback(const std::string& host);

/// The token in `path` (surrounding blanks stripped). Throws Error(ERROR_CODE_INVALID_ARGUMENT) with
/// the fix when the file is missing, shorter than 16 characters, or readable by group or others.
std::string http_token_read(const std::string& path);

/// The HTTP API of the serving Session (asked for each request: a deployment swaps it, and a
/// request in progress keeps the Session it started with).
class HttpApi {
 public:
  /// `on_run_error` is told about every failed inference (the agent reports them as events);
  /// `status` adds the telemetry state to /v1/stats.
  HttpApi(std::function<std::shared_ptr<Session>()> session, std::string device, std::function<void(const std::string&)> on_run_error,
          std::function<nlohmann::json()> status, HttpOptions options = {});
  ~HttpApi();
  HttpApi(const HttpApi&) = delete;
  HttpApi& operator=(const HttpApi&) = delete;

  /// Bind HOST:PORT (port 0: any free one) and serve in the background; returns the port.
  /// Throws Error(ERROR_CODE_IO) when the address cannot be bound.
  int http_start(const std::string& host, int port);

  /// Stop serving (waits for the server thread).
  void http_stop();

  /// Requests refused so far, by reason: unauthorized, too_large, unexpected_body, busy, malformed,
  /// input_mismatch; connections cut off: too_many_connections, header_timeout, header_too_large.
  std::map<std::string, uint64_t> http_refusals() const;

 private:
  void refusal_count(const std::string& reason);
  bool authorized(const std::string& header) const;

  std::function<std::shared_ptr<Session>()> session_;
  std::string device_;
  std::function<void(const std::string&)> on_run_error_;
  std::function<nlohmann::json()> status_;
  HttpOptions options_;
  std::atomic<uint32_t> in_flight_{0};
  mutable std::mutex refusals_mutex_;
  std::map<std::string, uint64_t> refusals_;
  std::unique_ptr<GuardedServer> server_;
  std::atomic<bool> listen_done_{false};  // the server thread has returned from listening
  std::thread thread_;
};

}  // namespace edgesmith
