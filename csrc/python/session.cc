// _core.Session over edgesmith::Session. Inputs are converted while holding the GIL (a
// non-contiguous or misaligned array is COPIED to C order; its dtype is never changed, so a wrong
// dtype reaches session_run and is refused there with the input's name); the GIL is released
// around session_run only. Outputs are handed to NumPy without a copy.
#include "session.h"

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "common/error.h"
#include "runtime/npy.h"
#include "runtime/session.h"

namespace py = pybind11;

namespace edgesmith::python {

namespace {

// The DType of a NumPy dtype, or false when edgesmith has none (complex, object, big-endian...).
bool dtype_from_numpy(const py::dtype& dtype, DType* out) {
  const char kind = dtype.kind();
  const auto size = static_cast<size_t>(dtype.itemsize());
  if (size > 1 && dtype.byteorder() == '>') return false;
  static const std::pair<std::pair<char, size_t>, DType> table[] = {
      {{'b', 1}, DTYPE_BOOL},    {{'i', 1}, DTYPE_INT8},    {{'i', 2}, DTYPE_INT16},
      {{'i', 4}, DTYPE_INT32},   {{'i', 8}, DTYPE_INT64},   {{'u', 1}, DTYPE_UINT8},
      {{'u', 2}, DTYPE_UINT16},  {{'u', 4}, DTYPE_UINT32},  {{'u', 8}, DTYPE_UINT64},
      {{'f', 2}, DTYPE_FLOAT16}, {{'f', 4}, DTYPE_FLOAT32}, {{'f', 8}, DTYPE_FLOAT64},
  };
  for (const auto& [key, value] : table) {
    if (key.first == kind && key.second == size) {
      *out = value;
      return true;
    }
  }
  return false;
}

// A C-contiguous, aligned array with the same dtype (copied only when it is not already).
py::array array_c_order(const py::handle& value) {
  constexpr int flags = py::array::c_style | py::detail::npy_api::NPY_ARRAY_ALIGNED_;
  return py::array::ensure(value, flags);
}

TensorView view_of(const py::array& array, DType dtype) {
  TensorView view;
  view.data = array.data();
  view.dtype = dtype;
  view.shape.assign(array.shape(), array.shape() + array.ndim());
  return view;
}

// Hand a Tensor's buffer to NumPy: the array keeps the Tensor alive through a capsule.
py::array tensor_to_numpy(Tensor tensor) {
  auto* owned = new Tensor(std::move(tensor));
  py::capsule base(owned, [](void* p) { delete static_cast<Tensor*>(p); });
  return py::array(py::dtype(dtype_name(owned->dtype())), owned->shape(), {}, owned->data(), base);
}

py::list tensors_info(const std::vector<ManifestTensor>& tensors) {
  py::list out;
  for (const ManifestTensor& t : tensors) {
    out.append(py::dict(py::arg("name") = t.name, py::arg("dtype") = t.dtype,
                        py::arg("shape") = py::cast(t.shape)));
  }
  return out;
}

std::unique_ptr<Session> session_make(const std::string& path, const std::vector<py::bytes>& trusted_keys,
                                      int32_t threads, int32_t max_concurrency) {
  std::vector<std::vector<uint8_t>> keys;
  for (const py::bytes& key : trusted_keys) {
    const std::string raw = key;
    keys.emplace_back(raw.begin(), raw.end());
  }
  if (threads < 0 || max_concurrency < 0) {
    throw Error(ERROR_CODE_INVALID_ARGUMENT, "threads and max_concurrency must be >= 0");
  }
  SessionOptions options;
  options.threads = threads;
  options.max_concurrency = max_concurrency;
  py::gil_scoped_release release;
  return session_open(path, keys, options);
}

py::list session_run_py(Session& session, const py::sequence& inputs) {
  const std::vector<ManifestTensor>& specs = session.session_manifest().inputs;
  std::vector<py::array> arrays;
  std::vector<TensorView> views;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const std::string name = i < specs.size() ? "input '" + specs[i].name + "'" : "input " + std::to_string(i);
    py::array array = array_c_order(inputs[i]);
    DType dtype;
    if (!dtype_from_numpy(array.dtype(), &dtype)) {
      const std::string got = py::str(array.dtype());
      const std::string want = i < specs.size() ? specs[i].dtype : "a supported dtype";
      throw Error(ERROR_CODE_INPUT, name + " has dtype " + got + ", the model takes " + want);
    }
    views.push_back(view_of(array, dtype));
    arrays.push_back(std::move(array));
  }
  std::vector<Tensor> outputs;
  {
    py::gil_scoped_release release;
    outputs = session.session_run(views);
  }
  py::list out;
  for (Tensor& tensor : outputs) out.append(tensor_to_numpy(std::move(tensor)));
  return out;
}

py::dict stats_to_python(const StatsSnapshot& s) {
  const double mean = s.runs > 0 ? s.latency_sum_us / static_cast<double>(s.runs) : 0.0;
  py::dict latency(py::arg("start_us") = s.latency_buckets.start_us,
                   py::arg("factor") = s.latency_buckets.factor,
                   py::arg("count") = s.latency_buckets.count,
                   py::arg("buckets") = py::cast(s.latency_counts),
                   py::arg("underflow") = s.latency_underflow,
                   py::arg("overflow") = s.latency_overflow, py::arg("sum_us") = s.latency_sum_us,
                   py::arg("mean_us") = mean, py::arg("max_us") = s.latency_max_us,
                   py::arg("p50_us") = stats_percentile_us(s, 0.50),
                   py::arg("p95_us") = stats_percentile_us(s, 0.95),
                   py::arg("p99_us") = stats_percentile_us(s, 0.99));
  py::dict outputs;
  for (const OutputSummary& o : s.outputs) {
    outputs[py::str(o.name)] = py::dict(
        py::arg("kind") = o.kind == MONITOR_KIND_CLASSES ? "classes" : "histogram",
        py::arg("counts") = py::cast(o.counts), py::arg("underflow") = o.underflow,
        py::arg("overflow") = o.overflow, py::arg("nan") = o.nan, py::arg("seen") = o.seen,
        py::arg("binned") = o.binned);
  }
  return py::dict(py::arg("runs") = s.runs, py::arg("errors") = s.errors,
                  py::arg("nan_input_runs") = s.nan_input_runs,
                  py::arg("nan_input_values") = s.nan_input_values, py::arg("latency") = latency,
                  py::arg("outputs") = outputs);
}

py::dict self_test_py(Session& session) {
  SelfTestResult result;
  {
    py::gil_scoped_release release;
    result = session.session_self_test();
  }
  py::list details;
  for (const GoldenSampleResult& d : result.details) {
    details.append(py::dict(py::arg("index") = d.index, py::arg("passed") = d.passed,
                            py::arg("max_abs_err") = d.max_abs_err, py::arg("message") = d.message));
  }
  return py::dict(py::arg("passed") = result.passed, py::arg("samples") = result.samples,
                  py::arg("max_abs_err") = result.max_abs_err, py::arg("atol") = result.atol,
                  py::arg("rtol") = result.rtol, py::arg("details") = details);
}

py::array npy_read_py(const py::bytes& data) {
  const std::string bytes = data;
  return tensor_to_numpy(npy_parse(bytes));
}

py::bytes npy_write_py(const py::handle& value) {
  const py::array array = array_c_order(value);
  DType dtype;
  if (!dtype_from_numpy(array.dtype(), &dtype)) {
    throw Error(ERROR_CODE_INVALID_ARGUMENT, "dtype " + std::string(py::str(array.dtype())) +
                                                 " cannot be written by edgesmith's .npy writer");
  }
  return py::bytes(npy_serialize(view_of(array, dtype)));
}

}  // namespace

void session_register(py::module_& m) {
  py::class_<Session, std::unique_ptr<Session>>(m, "Session",
                                                "A verified artifact loaded into its backend.")
      .def(py::init(&session_make), py::arg("path"), py::arg("trusted_keys"),
           py::arg("threads") = 0, py::arg("max_concurrency") = 0,
           "Verify the artifact, check it runs on this ISA, load its backend plugin and open it.")
      .def_property_readonly("inputs", [](const Session& s) { return tensors_info(s.session_manifest().inputs); })
      .def_property_readonly("outputs", [](const Session& s) { return tensors_info(s.session_manifest().outputs); })
      .def_property_readonly("manifest_json", [](const Session& s) { return py::bytes(s.session_manifest_json()); })
      .def_property_readonly("key_id", &Session::session_key_id)
      .def_property_readonly("path", &Session::session_artifact_dir)
      .def_property_readonly("backend", &Session::session_describe)
      .def("run", &session_run_py, py::arg("inputs"),
           "Run once: arrays in manifest input order -> arrays in output order.")
      .def("stats", [](const Session& s) { return stats_to_python(s.session_stats()); },
           "Counters and latency/output summaries of run() calls so far.")
      .def("self_test", &self_test_py, "Run the golden samples against their expected outputs.");

  m.def("npy_read", &npy_read_py, py::arg("data"), "Parse the bytes of a .npy file.");
  m.def("npy_write", &npy_write_py, py::arg("array"), "The bytes of a .npy file holding `array`.");
}

}  // namespace edgesmith::python
