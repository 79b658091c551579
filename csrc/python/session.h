// Bindings of the runtime: _core.Session, _core.npy_read / npy_write.
#pragma once

#include <pybind11/pybind11.h>

namespace edgesmith::python {

/// Add Session and the .npy functions to the module.
void session_register(pybind11::module_& module);

}  // namespace edgesmith::python
