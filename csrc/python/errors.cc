// The one place where C++ errors become Python exceptions:
//   ERROR_CODE_INTEGRITY        -> edgesmith.runtime.errors.IntegrityError(message, path)
//   ERROR_CODE_MANIFEST         -> edgesmith.runtime.errors.ManifestError(message, path)
//   ERROR_CODE_INVALID_ARGUMENT -> edgesmith.runtime.errors.ValueError(message)
//   ERROR_CODE_INPUT            -> edgesmith.runtime.errors.InputError(message)
//   ERROR_CODE_UNSUPPORTED      -> edgesmith.runtime.errors.UnsupportedArtifactError(message, path)
//   ERROR_CODE_BACKEND          -> edgesmith.runtime.errors.BackendError(message)
//   ERROR_CODE_IO (and others)  -> edgesmith.runtime.errors.RuntimeError(message)
#include "errors.h"

#include <exception>
#include <string>

#include "common/error.h"

namespace py = pybind11;

namespace edgesmith::python {

namespace {

// Messages and paths may quote file names from disk, which need not be UTF-8.
py::object text_to_python(const std::string& text, const char* errors) {
  PyObject* object = PyUnicode_DecodeUTF8(text.data(), static_cast<Py_ssize_t>(text.size()), errors);
  if (object == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(object);
}

void error_raise(const Error& error) {
  const py::module_ errors = py::module_::import("edgesmith.runtime.errors");
  const py::object message = text_to_python(error.what(), "replace");
  const py::object path =
      error.path().empty() ? py::none() : text_to_python(error.path(), "surrogateescape");
  py::object cls;
  py::object instance;
  switch (error.code()) {
    case ERROR_CODE_INTEGRITY:
      cls = errors.attr("IntegrityError");
      instance = cls(message, path);
      break;
    case ERROR_CODE_MANIFEST:
      cls = errors.attr("ManifestError");
      instance = cls(message, path);
      break;
    case ERROR_CODE_INVALID_ARGUMENT:
      cls = errors.attr("ValueError");
      instance = cls(message);
      break;
    case ERROR_CODE_INPUT:
      cls = errors.attr("InputError");
      instance = cls(message);
      break;
    case ERROR_CODE_UNSUPPORTED:
      cls = errors.attr("UnsupportedArtifactError");
      instance = cls(message, path);
      break;
    case ERROR_CODE_BACKEND:
      cls = errors.attr("BackendError");
      instance = cls(message);
      break;
    case ERROR_CODE_IO:
    default:
      cls = errors.attr("RuntimeError");
      instance = cls(message);
      break;
  }
  PyErr_SetObject(cls.ptr(), instance.ptr());
}

void error_translate(std::exception_ptr pending) {
  try {
    if (pending) std::rethrow_exception(pending);
  } catch (const Error& error) {
    try {
      error_raise(error);
    } catch (py::error_already_set& failure) {
      // edgesmith.runtime.errors itself failed to import: surface that, it is the real problem.
      failure.restore();
    }
  }
}

}  // namespace

void errors_register(py::module_& /*module*/) { py::register_exception_translator(&error_translate); }

}  // namespace edgesmith::python
