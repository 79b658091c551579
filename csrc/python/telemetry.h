// Binding of the telemetry publisher: _core.TelemetryPublisher over edgesmith::SessionReporter.
#pragma once

#include <pybind11/pybind11.h>

namespace edgesmith::python {

/// Add TelemetryPublisher to the module.
void telemetry_register(pybind11::module_& module);

}  // namespace edgesmith::python
