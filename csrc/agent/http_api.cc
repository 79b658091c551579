#include "agent/http_api.h"

#include <httplib.h>

#include <utility>
#include <vector>

#include "common/digest.h"
#include "common/error.h"
#include "runtime/npy.h"

namespace edgesmith {

namespace {

constexpr size_t MAX_REQUEST_BYTES = 256u << 20;

void json_reply(httplib::Response& response, int status, const nlohmann::json& body) {
  response.status = status;
  response.set_content(body.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace), "application/json");
}

}  // namespace

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
                 std::function<void(const std::string&)> on_run_error, std::function<nlohmann::json()> status)
    : session_(std::move(session_getter)),
      device_(std::move(device)),
      on_run_error_(std::move(on_run_error)),
      status_(std::move(status)),
      server_(std::make_unique<httplib::Server>()) {
  server_->set_payload_max_length(MAX_REQUEST_BYTES);
  server_->Post("/v1/infer", [this](const httplib::Request& request, httplib::Response& response) {
    const std::shared_ptr<Session> session = session_();
    const Manifest& manifest = session->session_manifest();
    std::vector<Tensor> inputs;
    try {
      size_t offset = 0;
      while (offset < request.body.size()) {
        const std::string name = "input " + std::to_string(inputs.size()) + " of the request";
        inputs.push_back(npy_parse_next(request.body, &offset, name));
      }
    } catch (const Error& e) {
      json_reply(response, 400, {{"error", e.what()}});
      return;
    }
    if (inputs.size() != manifest.inputs.size()) {
      json_reply(response, 400, {{"error", "the model takes " + std::to_string(manifest.inputs.size()) +
                                               " inputs as concatenated .npy files, the request holds " +
                                               std::to_string(inputs.size())}});
      return;
    }
    std::vector<TensorView> views;
    for (const Tensor& t : inputs) views.push_back(t.view());
    std::vector<Tensor> outputs;
    try {
      outputs = session->session_run(views);
    } catch (const Error& e) {
      // A mismatch is the client's mistake (400); the engine failing is ours (500) and reported.
      const bool input = e.code() == ERROR_CODE_INPUT || e.code() == ERROR_CODE_INVALID_ARGUMENT;
      if (!input && on_run_error_) on_run_error_(e.what());
      json_reply(response, input ? 400 : 500, {{"error", e.what()}});
      return;
    }
    std::string body;
    for (const Tensor& t : outputs) body += npy_serialize(t.view());
    response.set_content(body, "application/octet-stream");
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
    json_reply(response, 200, body);
  });
}

HttpApi::~HttpApi() { http_stop(); }

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
  thread_ = std::thread([this] { server_->listen_after_bind(); });
  return bound;
}

void HttpApi::http_stop() {
  if (thread_.joinable()) {
    server_->stop();
    thread_.join();
  }
}

}  // namespace edgesmith
