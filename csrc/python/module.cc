// edgesmith.runtime._core: private bindings of the C++ core. The documented Python API is
// edgesmith.runtime.artifact and edgesmith.runtime.session; nothing else should import this
// module directly.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "artifact/manifest.h"
#include "artifact/keys.h"
#include "artifact/verify.h"
#include "common/digest.h"
#include "common/url.h"
#include "common/version.h"
#include "errors.h"
#include "runtime/compare.h"
#include "runtime/cpu_features.h"
#include "runtime/isa.h"
#include "runtime/stats.h"
#include "session.h"
#ifdef EDGESMITH_WITH_TELEMETRY
#include "telemetry.h"
#endif

namespace py = pybind11;

namespace edgesmith::python {

namespace {

py::list tensors_to_python(const std::vector<ManifestTensor>& tensors) {
  py::list out;
  for (const ManifestTensor& tensor : tensors) {
    py::dict item;
    item["name"] = tensor.name;
    item["dtype"] = tensor.dtype;
    item["shape"] = py::cast(tensor.shape);
    out.append(item);
  }
  return out;
}

// The C++ reader's view of a manifest, shaped like the JSON it came from.
py::dict manifest_to_python(const Manifest& manifest) {
  py::dict out;
  out["schema_version"] = manifest.schema_version;
  out["name"] = manifest.name;
  out["payload"] = py::dict(py::arg("format") = manifest.payload.format,
                            py::arg("entry") = manifest.payload.entry);
  py::list files;
  for (const ManifestFile& file : manifest.files) {
    files.append(py::dict(py::arg("path") = file.path, py::arg("size") = file.size,
                          py::arg("sha256") = file.sha256));
  }
  out["files"] = files;
  out["inputs"] = tensors_to_python(manifest.inputs);
  out["outputs"] = tensors_to_python(manifest.outputs);
  py::list samples;
  for (const ManifestGoldenSample& sample : manifest.golden.samples) {
    samples.append(py::dict(py::arg("inputs") = py::cast(sample.inputs),
                            py::arg("outputs") = py::cast(sample.outputs)));
  }
  out["golden"] = py::dict(py::arg("samples") = samples, py::arg("atol") = manifest.golden.atol,
                           py::arg("rtol") = manifest.golden.rtol);
  py::list monitors;
  for (const ManifestOutputMonitor& monitor : manifest.monitoring.outputs) {
    py::dict item;
    item["name"] = monitor.name;
    if (monitor.kind == MONITOR_KIND_CLASSES) {
      item["kind"] = "classes";
      item["classes"] = monitor.classes;
    } else {
      item["kind"] = "histogram";
      item["edges"] = py::cast(monitor.edges);
    }
    monitors.append(item);
  }
  const ManifestLatencyBuckets& latency = manifest.monitoring.latency;
  out["monitoring"] = py::dict(
      py::arg("outputs") = monitors,
      py::arg("latency") = py::dict(py::arg("start_us") = latency.start_us,
                                    py::arg("factor") = latency.factor,
                                    py::arg("count") = latency.count));
  py::dict target(py::arg("name") = manifest.target_name, py::arg("isa") = manifest.target_isa);
  if (manifest.target_threads > 0) target["threads"] = manifest.target_threads;
  target["cpu_features"] = py::cast(manifest.target_cpu_features);
  out["target"] = target;
  out["backend"] = py::dict(py::arg("name") = manifest.backend_name,
                            py::arg("options_json") = manifest.backend_options_json);
  return out;
}

py::dict verify_artifact(const std::string& path, const std::vector<py::bytes>& trusted_keys) {
  std::vector<std::vector<uint8_t>> keys;
  for (const py::bytes& key : trusted_keys) {
    const std::string raw = key;
    keys.emplace_back(raw.begin(), raw.end());
  }
  VerifyResult result;
  {
    py::gil_scoped_release release;
    result = artifact_verify(path, keys);
  }
  py::dict out;
  out["key_id"] = result.key_id;
  out["file_count"] = result.file_count;
  out["manifest_json"] = result.manifest_json;
  return out;
}

py::dict read_manifest(const std::string& path) {
  Manifest manifest;
  {
    py::gil_scoped_release release;
    manifest = manifest_read(path);
  }
  return manifest_to_python(manifest);
}

py::tuple home_resolve_python() {
  const HomeResolution home = home_resolve();
  return py::make_tuple(home.path, home.skipped);
}

std::vector<py::bytes> trusted_keys_default_python() {
  std::vector<py::bytes> out;
  for (const std::vector<uint8_t>& key : trusted_keys_default()) {
    out.emplace_back(reinterpret_cast<const char*>(key.data()), key.size());
  }
  return out;
}

std::string sha256_file_hex(const std::string& path) {
  py::gil_scoped_release release;
  return sha256_file(path);
}

// compare.h's rule on two arrays (the toolchain's validation). Arrays are made C-contiguous and
// aligned while holding the GIL, never cast: a float16 output is compared as float16.
py::dict compare_arrays(const py::handle& got, const py::handle& expected, double atol,
                        double rtol) {
  constexpr int flags = py::array::c_style | py::detail::npy_api::NPY_ARRAY_ALIGNED_;
  const py::array arrays[] = {py::array::ensure(got, flags), py::array::ensure(expected, flags)};
  TensorView views[2];
  for (int i = 0; i < 2; ++i) {
    if (!arrays[i]) throw py::type_error("compare_arrays takes two NumPy arrays");
    // str() of a native-order dtype is its NumPy name; a big-endian one (">f4") is refused there.
    views[i].dtype = dtype_from_name(py::str(arrays[i].dtype()));
    views[i].data = arrays[i].data();
    views[i].shape.assign(arrays[i].shape(), arrays[i].shape() + arrays[i].ndim());
  }
  CompareResult result;
  {
    py::gil_scoped_release release;
    result = tensor_compare(views[0], views[1], atol, rtol);
  }
  return py::dict(py::arg("shapes_match") = result.shapes_match,
                  py::arg("passed") = result.passed, py::arg("elements") = result.elements,
                  py::arg("bad_elements") = result.bad_elements,
                  py::arg("max_abs_err") = result.max_abs_err,
                  py::arg("max_rel_err") = result.max_rel_err);
}

// stats.h's latency rules for the monitor's merged windows: one bucket per run, and the quantiles
// of a histogram given as [counts..., underflow, overflow] (None for an empty one).
int64_t latency_bucket(double latency_us, double start_us, double factor, int64_t count) {
  return stats_latency_bucket(latency_us, start_us, std::log(factor), count);
}

py::list latency_percentiles(const std::vector<uint64_t>& slots, double start_us, double factor, int64_t count,
                             double max_us, const std::vector<double>& qs) {
  if (slots.size() < 2) throw py::value_error("latency_percentiles takes [counts..., underflow, overflow]");
  const std::vector<uint64_t> counts(slots.begin(), slots.end() - 2);
  ManifestLatencyBuckets buckets;
  buckets.start_us = start_us;
  buckets.factor = factor;
  buckets.count = count;
  std::vector<double> values;
  {
    py::gil_scoped_release release;
    values = stats_percentiles_us(counts, slots[slots.size() - 2], slots.back(), buckets, max_us, qs);
  }
  py::list out;
  for (const double v : values) out.append(std::isnan(v) ? py::object(py::none()) : py::object(py::float_(v)));
  return out;
}

}  // namespace

}  // namespace edgesmith::python

PYBIND11_MODULE(_core, m) {
  using namespace edgesmith::python;
  m.doc() = "Private bindings of the edgesmith C++ core; use edgesmith.runtime.artifact instead.";
  m.attr("__version__") = edgesmith::version_string();
  errors_register(m);

  m.def("verify_artifact", &verify_artifact, py::arg("path"), py::arg("trusted_keys"),
        "Check integrity rules 1-8 of docs/artifact.md; return {key_id, file_count, "
        "manifest_json}. Raises IntegrityError / ManifestError naming the offending file.");
  m.def("read_manifest", &read_manifest, py::arg("path"),
        "Parse an artifact directory's (or a file's) manifest.json with the C++ reader, without "
        "checking the signature; return its fields as plain dicts and lists.");
  m.def("home_resolve", &home_resolve_python,
        "(home, skipped): $EDGESMITH_HOME, else the nearest .edgesmith above the working directory "
        "that the user owns and nobody else can write, else ~/.edgesmith; `skipped` is a sentence "
        "when a .edgesmith was passed over for its ownership or permissions (else '').");
  m.def("trusted_keys_default", &trusted_keys_default_python,
        "The raw 32-byte keys of <home>/keys/*.pub then <home>/trusted/*.pub; raises ValueError "
        "when the home or a key directory is owned by another user or writable by others.");
  m.def("url_https_or_loopback", &edgesmith::url_https_or_loopback, py::arg("url"),
        "Whether a device may send a secret (an upload token) to url: https://, or http:// to the "
        "loopback. The agent's rule (csrc/common/url.h), so the central side refuses what devices refuse.");
  m.def("sha256_file", &sha256_file_hex, py::arg("path"),
        "Lower-case hex SHA-256 of a file, streamed in chunks.");
  m.def("compare_arrays", &compare_arrays, py::arg("got"), py::arg("expected"), py::arg("atol"),
        py::arg("rtol"),
        "Compare got with expected by edgesmith's one output rule (NaN only matches NaN, an "
        "infinity only the same infinity, else |y - e| <= atol + rtol * |e|); return "
        "{shapes_match, passed, elements, bad_elements, max_abs_err, max_rel_err}, errors over "
        "finite pairs.");
  m.def("latency_bucket", &latency_bucket, py::arg("latency_us"), py::arg("start_us"), py::arg("factor"),
        py::arg("count"),
        "The device runtime's latency bucket of one run: -1 underflow, count overflow, else k.");
  m.def("latency_percentiles", &latency_percentiles, py::arg("slots"), py::arg("start_us"), py::arg("factor"),
        py::arg("count"), py::arg("max_us"), py::arg("qs"),
        "The device runtime's quantile estimate (stats_percentiles_us) of [counts..., underflow, "
        "overflow]; None for each q of an empty histogram.");
  m.def("host_isa", &edgesmith::host_isa,
        "This machine's ISA as edgesmith targets name it (x86_64, aarch64, ...).");
  m.def("cpu_model", &edgesmith::cpu_model,
        "This CPU's model as a device reports it in its birth (runtime.cpu): cpuid's brand string on "
        "x86-64, the core named from MIDR_EL1 on aarch64.");
  m.def("cpu_features_host", &edgesmith::cpu_features_host,
        "The CPU features (as /proc/cpuinfo names them) this runtime checks and this CPU has.");
  m.def("cpu_features_missing", &edgesmith::cpu_features_missing, py::arg("features"),
        "The entries of `features` this CPU lacks (unknown names included, marked as such): the "
        "rule Session applies to a manifest's target.cpu_features before loading anything.");
  session_register(m);
#ifdef EDGESMITH_WITH_TELEMETRY
  telemetry_register(m);
#endif
}
