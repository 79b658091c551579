// _core.TelemetryPublisher: the C++ agent's publisher (spool, MQTT, window summaries) for Python
// apps that embed a Session. The GIL is released around everything that may wait (connecting,
// the spool's disk writes, the flush at close); the publisher's own threads never touch Python.
#include "telemetry.h"

#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "common/error.h"
#include "runtime/session.h"
#include "telemetry/reporter.h"
#include "telemetry/shadow_window.h"

namespace py = pybind11;

namespace edgesmith::python {

namespace {

std::unique_ptr<SessionReporter> publisher_make(const Session& session, const std::string& credentials_path,
                                                const std::string& data_dir, double interval_s,
                                                uint64_t spool_max_bytes) {
  ReporterOptions options;
  options.credentials_path = credentials_path;
  options.data_dir = data_dir;
  options.interval_s = interval_s;
  if (spool_max_bytes > 0) options.spool_max_bytes = spool_max_bytes;
  py::gil_scoped_release release;
  auto reporter = std::make_unique<SessionReporter>(session, options);
  reporter->reporter_start();
  return reporter;
}

void publisher_event(SessionReporter& reporter, const std::string& name, const std::string& message,
                     const std::string& details_json) {
  const nlohmann::json details = nlohmann::json::parse(details_json, nullptr, false);
  if (details.is_discarded() || !details.is_object()) {
    throw Error(ERROR_CODE_INVALID_ARGUMENT, "event details must be a JSON object");
  }
  py::gil_scoped_release release;
  reporter.reporter_event(name, message, details);
}

// The device's shadow signature rule on two manifest.json texts (ManifestError when one is not a manifest).
std::string shadow_signature_problem_json(const std::string& serving_manifest_json,
                                          const std::string& candidate_manifest_json) {
  return shadow_signature_problem(manifest_parse(serving_manifest_json), manifest_parse(candidate_manifest_json));
}

}  // namespace

void telemetry_register(py::module_& m) {
  m.def("shadow_signature_problem", &shadow_signature_problem_json, py::arg("serving_manifest_json"),
        py::arg("candidate_manifest_json"),
        "Why the candidate cannot shadow the serving model ('' when it can): the device's rule "
        "(csrc/telemetry/shadow_window.h), same inputs and outputs (names, dtypes, shapes, in order).");
  py::class_<SessionReporter, std::unique_ptr<SessionReporter>>(
      m, "TelemetryPublisher", "Publishes a Session's birth, telemetry windows, events and death over MQTT.")
      // keep_alive: the Session outlives the publisher that reads its statistics.
      .def(py::init(&publisher_make), py::arg("session"), py::arg("credentials_path"), py::arg("data_dir"),
           py::arg("interval_s") = 10.0, py::arg("spool_max_bytes") = 0, py::keep_alive<1, 2>(),
           "Read the credentials, open <data_dir>/spool.db and start connecting and reporting.")
      .def("event", &publisher_event, py::arg("name"), py::arg("message"), py::arg("details_json") = "{}",
           "Store an event (details: a JSON object as text); it is published when connected.")
      .def("window", [](SessionReporter& r) {
             py::gil_scoped_release release;
             r.reporter_window();
           },
           "Close the current window now and publish its summary.")
      .def("status", [](SessionReporter& r) { return r.reporter_status().dump(); },
           "Connection and spool state as JSON text.")
      .def("close", [](SessionReporter& r, double timeout_s) {
             py::gil_scoped_release release;
             r.reporter_stop(timeout_s);
           },
           py::arg("timeout_s") = 5.0,
           "Publish the last window, flush for at most timeout_s, publish death (shutdown), disconnect.");
}

}  // namespace edgesmith::python
