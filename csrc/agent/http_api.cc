#include "agent/http_api.h"

#include "agent/http_connections.h"

#include <arpa/inet.h>
#include <httplib.h>
#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <utility>
#include <vector>

#include "common/digest.h"
#include "common/error.h"
#include "common/file.h"
#include "runtime/inputs.h"
#include "runtime/npy.h"

namespace edgesmith {

namespace {

// The ceiling over every model; each request is capped lower, at its model's inputs plus headers.
constexpr size_t MAX_REQUEST_BYTES = 256u << 20;
constexpr size_t TOKEN_MIN_CHARS = 16;
constexpr const char* INFER_PATH = "/v1/infer";

// Holds one of the limited /v1/infer slots for a scope.
class Slot {
 public:
  Slot(std::atomic<uint32_t>& in_flight, uint32_t limit) : in_flight_(in_flight) {
    taken_ = in_flight_.fetch_add(1) < limit;
    if (!taken_) in_flight_.fetch_sub(1);
  }
  ~Slot() {
    if (taken_) in_flight_.fetch_sub(1);
  }
  Slot(const Slot&) = delete;
  Slot& operator=(const Slot&) = delete;
  bool taken() const { return taken_; }

 private:
  std::atomic<uint32_t>& in_flight_;
  bool taken_ = false;
};

void json_reply(httplib::Response& response, int status, const nlohmann::json& body) {
  response.status = status;
  response.set_content(body.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace), "application/json");
}

}  // namespace

bool http_host_is_loopback(const std::string& host) {
  if (host == "localhost") return true;
  in_addr v4{};
  if (inet_pton(AF_INET, host.c_str(), &v4) == 1) return (ntohl(v4.s_addr) >> 24) == 127;
  in6_addr v6{};
  if (inet_pton(AF_INET6, host.c_str(), &v6) == 1) return IN6_IS_ADDR_LOOPBACK(&v6);
  return false;
}

std::string http_token_read(const std::string& path) {
  struct stat st {};
  if (stat(path.c_str(), &st) != 0) {
    throw Error(ERROR_CODE_INVALID_ARGUMENT, "the HTTP token file " + path + " does not exist; write a secret of at least " +
                                                 std::to_string(TOKEN_MIN_CHARS) + " characters into it (chmod 600)");
  }
  if ((st.st_mode & (S_IRWXG | S_IRWXO)) != 0) {
    throw Error(ERROR_CODE_INVALID_ARGUMENT, "the HTTP token file " + path +
                                                 " can be read or written by other users; run `chmod 600 " + path + "`");
  }
  std::string token = file_read(path, 4096, ERROR_CODE_INVALID_ARGUMENT, path);
  const auto blank = [](char c) { return c == ' ' || c == '\n' || c == '\r' || c == '\t'; };
  while (!token.empty() && blank(token.back())) token.pop_back();
  token.erase(token.begin(), std::find_if(token.begin(), token.end(), [&](char c) { return !blank(c); }));
  if (token.size() < TOKEN_MIN_CHARS) {
    throw Error(ERROR_CODE_INVALID_ARGUMENT, "the HTTP token in " + path + " has " + std::to_string(token.size()) +
                                                 " characters; use a random secret of at least " +
                                                 std::to_string(TOKEN_MIN_CHARS) + " (e.g. `openssl rand -hex 32`)");
  }
  return token;
}

nlohmann::json stats_json(const StatsSnapshot& s) {
  nlohmann::json outputs = nlohmann::json::object();
  for (const OutputSummary& o : s.outputs) {
    outputs[o.name] = {{"kind", o.kind == MONITOR_KIND_CLASSES ? "classes" : "histogram"},
                       {"counts", o.counts}, {"underflow", o.underflow}, {"overflow", o.overflow},
                       {"nan", o.nan},       {"seen", o.seen},           {"binned", o.binned}};
  }
  const double mean = s.runs > 0 ? s.latency_sum_us / static_cast<double>(s.runs) : 0.0;
  return {{"runs", s.runs},
          {"errors", s.errors},
          {"nan_input_runs", s.nan_input_runs},
          {"nan_input_values", s.nan_input_values},
          {"latency",
           {{"start_us", s.latency_buckets.start_us},
            {"factor", s.latency_buckets.factor},
            {"count", s.latency_buckets.count},
            {"buckets", s.latency_counts},
            {"underflow", s.latency_underflow},
            {"overflow", s.latency_overflow},
            {"sum_us", s.latency_sum_us},
            {"mean_us", mean},
            {"max_us", s.latency_max_us},
            {"p50_us", stats_percentile_us(s, 0.50)},
            {"p95_us", stats_percentile_us(s, 0.95)},
            {"p99_us", stats_percentile_us(s, 0.99)}}},
          {"outputs", outputs}};
}

HttpApi::HttpApi(std::function<std::shared_ptr<Session>()> session_getter, std::string device,
                 std::function<void(const std::string&)> on_run_error, std::function<nlohmann::json()> status,
                 HttpOptions options)
    : session_(std::move(session_getter)),
      device_(std::move(device)),
      on_run_error_(std::move(on_run_error)),
      status_(std::move(status)),
      options_(std::move(options)),
      server_(std::make_unique<GuardedServer>(options_.connections,
                                              [this](const std::string& reason) { refusal_count(reason); })) {
  if (options_.max_requests == 0) options_.max_requests = 1;
  server_->set_payload_max_length(MAX_REQUEST_BYTES);
  // Before any body is read: the token, and a declared length beyond what the model can take.
  server_->set_pre_routing_handler([this](const httplib::Request& request, httplib::Response& response) {
    if (!authorized(request.get_header_value("Authorization"))) {
      refusal_count("unauthorized");
      response.set_header("WWW-Authenticate", "Bearer");
      response.set_header("Connection", "close");
      json_reply(response, 401, {{"error", "this agent needs 'Authorization: Bearer <token>' (the secret in its "
                                           "--http-token-file)"}});
      return httplib::Server::HandlerResponse::Handled;
    }
    // Only POST /v1/infer takes a body: anything else that announces one (a POST, PUT, PATCH or
    // DELETE to another path) would be read whole, up to MAX_REQUEST_BYTES, before its 404.
    const bool infer = request.method == "POST" && request.path == INFER_PATH;
    if (!infer && ((request.has_header("Content-Length") && request.get_header_value<uint64_t>("Content-Length") > 0) ||
                   request.has_header("Transfer-Encoding"))) {
      refusal_count("unexpected_body");
      response.set_header("Connection", "close");
      json_reply(response, 413, {{"error", "only POST " + std::string(INFER_PATH) + " takes a request body; " +
                                               request.method + " " + request.path.substr(0, 200) + " does not"}});
      return httplib::Server::HandlerResponse::Handled;
    }
    if (infer && request.has_header("Content-Length")) {
      const uint64_t cap = inputs_max_request_bytes(session_()->session_manifest().inputs);
      const uint64_t declared = request.get_header_value<uint64_t>("Content-Length");
      if (declared > cap) {
        refusal_count("too_large");
        response.set_header("Connection", "close");
        json_reply(response, 413, {{"error", "the request declares " + std::to_string(declared) +
                                                 " bytes, the model's inputs take at most " + std::to_string(cap) +
                                                 " as .npy files"}});
        return httplib::Server::HandlerResponse::Handled;
      }
    }
    return httplib::Server::HandlerResponse::Unhandled;
  });
  const auto infer = [this](const httplib::Request& /*request*/, httplib::Response& response,
                            const httplib::ContentReader* reader) {
    const Slot slot(in_flight_, options_.max_requests);
    if (!slot.taken()) {
      refusal_count("busy");
      response.set_header("Retry-After", "1");
      response.set_header("Connection", "close");
      json_reply(response, 503, {{"error", "the agent is serving " + std::to_string(options_.max_requests) +
                                               " inference requests already; retry after a second"}});
      return;
    }
    const std::shared_ptr<Session> session = session_();
    const Manifest& manifest = session->session_manifest();
    const uint64_t cap = inputs_max_request_bytes(manifest.inputs);
    std::string body;
    if (reader != nullptr) {
      bool too_large = false;
      const bool read = (*reader)([&](const char* data, size_t length) {
        if (length > cap - body.size()) {
          too_large = true;
          return false;
        }
        body.append(data, length);
        return true;
      });
      if (too_large) {
        refusal_count("too_large");
        response.set_header("Connection", "close");
        json_reply(response, 413, {{"error", "the request is larger than the " + std::to_string(cap) +
                                                 " bytes the model's inputs take as .npy files"}});
        return;
      }
      if (!read) {
        refusal_count("malformed");
        json_reply(response, 400, {{"error", "the request body could not be read"}});
        return;
      }
    }
    std::vector<Tensor> inputs;
    try {
      inputs = inputs_parse_npy(body.data(), body.size(), manifest.inputs);
    } catch (const Error& e) {
      refusal_count(e.code() == ERROR_CODE_INPUT ? "input_mismatch" : "malformed");
      json_reply(response, 400, {{"error", e.what()}});
      return;
    }
    body = std::string();  // the inputs hold their own copy
    std::vector<TensorView> views;
    for (const Tensor& t : inputs) views.push_back(t.view());
    std::vector<Tensor> outputs;
    const auto started = std::chrono::steady_clock::now();
    try {
      outputs = session->session_run(views);
    } catch (const Error& e) {
      // A mismatch is the client's mistake (400); the engine failing is ours (500) and reported.
      const bool input = e.code() == ERROR_CODE_INPUT || e.code() == ERROR_CODE_INVALID_ARGUMENT;
      if (input) refusal_count("input_mismatch");
      if (!input && on_run_error_) on_run_error_(e.what());
      json_reply(response, input ? 400 : 500, {{"error", e.what()}});
      return;
    }
    const double run_us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - started).count();
    std::string out;
    for (const Tensor& t : outputs) out += npy_serialize(t.view());
    response.set_content(out, "application/octet-stream");
    if (options_.on_served) options_.on_served(*session, inputs, outputs, run_us);
  };
  server_->Post(INFER_PATH, [infer](const httplib::Request& request, httplib::Response& response,
                                    const httplib::ContentReader& reader) { infer(request, response, &reader); });
  // A POST without a body never reaches the content reader.
  server_->Post(INFER_PATH, [infer](const httplib::Request& request, httplib::Response& response) {
    infer(request, response, nullptr);
  });
  server_->Get("/v1/health", [this](const httplib::Request&, httplib::Response& response) {
    const std::shared_ptr<Session> session = session_();
    const StatsSnapshot stats = session->session_stats();
    json_reply(response, 200, {{"device", device_}, {"artifact", session->session_manifest().name},
                               {"runs", stats.runs}, {"errors", stats.errors}});
  });
  server_->Get("/v1/model", [this](const httplib::Request&, httplib::Response& response) {
    const std::shared_ptr<Session> session = session_();
    json_reply(response, 200, {{"artifact", session->session_manifest().name},
                               {"manifest_sha256", sha256_string(session->session_manifest_json())},
                               {"target", session->session_manifest().target_name},
                               {"backend", session->session_manifest().backend_name}});
  });
  server_->Get("/v1/stats", [this](const httplib::Request&, httplib::Response& response) {
    nlohmann::json body = stats_json(session_()->session_stats());
    if (status_) body["telemetry"] = status_();
    body["http"] = {{"refused", http_refusals()},
                    {"max_requests", options_.max_requests},
                    {"connections", server_->connections_open()},
                    {"max_connections", options_.connections.max_connections},
                    {"max_connections_per_peer", options_.connections.max_connections_per_peer}};
    if (options_.shadow_status) body["shadow"] = options_.shadow_status();
    if (options_.capture_status) body["capture"] = options_.capture_status();
    json_reply(response, 200, body);
  });
}

HttpApi::~HttpApi() { http_stop(); }

void HttpApi::refusal_count(const std::string& reason) {
  std::lock_guard<std::mutex> lock(refusals_mutex_);
  ++refusals_[reason];
}

std::map<std::string, uint64_t> HttpApi::http_refusals() const {
  std::lock_guard<std::mutex> lock(refusals_mutex_);
  return refusals_;
}

bool HttpApi::authorized(const std::string& header) const {
  if (options_.token.empty()) return true;
  const std::string scheme = "Bearer ";
  if (header.compare(0, scheme.size(), scheme) != 0) return false;
  return secret_equal(header.substr(scheme.size()), options_.token);
}

int HttpApi::http_start(const std::string& host, int port) {
  int bound = port;
  if (port == 0) {
    bound = server_->bind_to_any_port(host);
  } else if (!server_->bind_to_port(host, port)) {
    bound = -1;
  }
  if (bound <= 0) {
    throw Error(ERROR_CODE_IO, "cannot listen on " + host + ":" + std::to_string(port) +
                                   " (in use or not an address of this machine); pick another with --http HOST:PORT");
  }
  listen_done_ = false;
  thread_ = std::thread([this] {
    server_->listen_after_bind();
    listen_done_ = true;
  });
  return bound;
}

void HttpApi::http_stop() {
  if (!thread_.joinable()) return;
  // cpp-httplib 0.11's stop() does nothing until the server thread has marked itself running: a
  // stop right after start (SIGTERM as the agent comes up) would leave that thread listening and
  // this join waiting for ever. So stop once it runs (or has already given up).
  while (!server_->is_running() && !listen_done_.load()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  server_->stop();
  thread_.join();
}

}  // namespace edgesmith
