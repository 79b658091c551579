// Mapping of edgesmith::Error to the Python classes of edgesmith.runtime.errors.
#pragma once

#include <pybind11/pybind11.h>

namespace edgesmith::python {

/// Register the translator that turns edgesmith::Error into edgesmith.runtime.errors classes.
void errors_register(pybind11::module_& module);

}  // namespace edgesmith::python
