#include "runtime/session.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <chrono>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <mutex>
#include <utility>

#include "artifact/verify.h"
#include "common/error.h"
#include "common/strings.h"
#include "runtime/compare.h"
#include "runtime/cpu_features.h"
#include "runtime/isa.h"
#include "runtime/npy.h"
#include "runtime/plugin.h"
#include "runtime/values.h"

namespace edgesmith {

namespace fs = std::filesystem;

namespace {

// Each private load copy is held by an exclusive flock on its directory for as long as it is in
// use (the descriptor is close-on-exec, so a child process never inherits the hold). A copy whose
// lock can be taken is a leftover of a process that died: the kernel dropped its lock. Unlike a PID
// check this holds across PID namespaces that share /tmp.
std::mutex& held_mutex() {
  static std::mutex mutex;
  return mutex;
}
std::map<std::string, int>& held_dirs() {
  static std::map<std::string, int> held;
  return held;
}

void private_dir_remove(const std::string& path) {
  if (path.empty()) return;
  std::error_code ec;
  fs::remove_all(path, ec);  // best effort: a leftover copy is private to this user
  std::lock_guard<std::mutex> lock(held_mutex());
  const auto found = held_dirs().find(path);
  if (found != held_dirs().end()) {  // released only once the directory is gone
    ::close(found->second);
    held_dirs().erase(found);
  }
}

// Hold `path` (a fresh private directory); false when its lock cannot be taken.
bool private_dir_hold(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) return false;
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    ::close(fd);
    return false;
  }
  std::lock_guard<std::mutex> lock(held_mutex());
  held_dirs()[path] = fd;
  return true;
}

// The bytes of the regular files under `dir` (what a private copy of it takes), not following links.
uint64_t tree_bytes(const std::string& dir) {
  uint64_t total = 0;
  std::error_code ec;
  for (fs::recursive_directory_iterator it(dir, fs::directory_options::none, ec), end; !ec && it != end;
       it.increment(ec)) {
    std::error_code size_ec;
    if (it->is_regular_file(size_ec) && !it->is_symlink(size_ec)) total += it->file_size(size_ec);
  }
  return total;
}

std::string mib(uint64_t bytes) { return std::to_string((bytes + (1u << 20) - 1) >> 20) + " MiB"; }

// Refuse an artifact whose code this machine cannot execute, before anything of it is loaded:
// another ISA (the target's, and the ELF header of a shared-library payload), or CPU features the
// target's code may use and this CPU lacks (it would die of SIGILL).
void machine_check(const Manifest& manifest, const fs::path& dir) {
  const std::string host = host_isa();
  const std::string& entry = manifest.payload.entry;
  if (payload_is_shared_library((dir / entry).string())) {
    const std::string isa = elf_isa((dir / entry).string(), entry);
    if (isa != host) {
      throw Error(ERROR_CODE_UNSUPPORTED,
                  entry + " is an " + isa + " shared library, this machine is " + host +
                      "; run it on a " + isa + " device or with `edgesmith prove`",
                  entry);
    }
  }
  if (isa_normalize(manifest.target_isa) != host) {
    throw Error(ERROR_CODE_UNSUPPORTED,
                "artifact " + string_quote(manifest.name) + " is built for " +
                    manifest.target_isa + " (target " + manifest.target_name +
                    "), this machine is " + host + "; run it on a " +
                    isa_normalize(manifest.target_isa) + " device or with `edgesmith prove`");
  }
  const std::vector<std::string> missing = cpu_features_missing(manifest.target_cpu_features);
  if (!missing.empty()) {
    std::string list;
    for (const std::string& feature : missing) list += (list.empty() ? "" : ", ") + feature;
    throw Error(ERROR_CODE_UNSUPPORTED,
                "artifact " + string_quote(manifest.name) + " (target " + manifest.target_name +
                    ") needs CPU features this CPU lacks: " + list +
                    "; run it on a CPU that has them, or build it for a target this CPU matches "
                    "(`edgesmith targets` marks the host's)");
  }
}

// The plugin named by backend.name must say it runs payload.format.
void format_check(const Manifest& manifest, const BackendPlugin& plugin) {
  for (const std::string& format : plugin.formats) {
    if (format == manifest.payload.format) return;
  }
  std::string runs;
  for (const std::string& format : plugin.formats) runs += (runs.empty() ? "" : ", ") + format;
  throw Error(ERROR_CODE_UNSUPPORTED,
              "backend '" + manifest.backend_name + "' of this runtime runs " +
                  (runs.empty() ? std::string("no payload format") : runs) + " payloads, and " +
                  manifest.name + "'s payload is " + manifest.payload.format +
                  "; rebuild the artifact with `edgesmith build` or update the runtime");
}

// A fresh directory only this user can enter (mkdtemp: mode 0700, a new name), removed on scope exit
// unless its path is cleared.
constexpr const char* LOAD_DIR_PREFIX = "edgesmith-load-";

// Copies left by a process that died before removing them (a crash during load or self-test):
// named edgesmith-load-<pid>-XXXXXX, a directory owned by this user, whose lock nobody holds. A
// directory not older than a minute is left alone whatever its lock says: its maker may be between
// mkdtemp and taking the lock.
void stale_copies_remove(const std::string& base) {
  std::error_code ec;
  const auto now = std::chrono::system_clock::now();
  for (fs::directory_iterator it(base, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (name.rfind(LOAD_DIR_PREFIX, 0) != 0) continue;
    struct stat st {};
    if (::lstat(it->path().c_str(), &st) != 0 || !S_ISDIR(st.st_mode) || st.st_uid != ::geteuid()) continue;
    if (now - std::chrono::system_clock::from_time_t(st.st_mtime) < std::chrono::minutes(1)) continue;
    const int fd = ::open(it->path().c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) continue;
    if (::flock(fd, LOCK_EX | LOCK_NB) == 0) {
      std::error_code remove_ec;
      fs::remove_all(it->path(), remove_ec);  // removed while we hold its lock
    }
    ::close(fd);
  }
}

// A fresh directory only this user can enter (mkdtemp: mode 0700, a new name), removed on scope exit
// unless its path is cleared.
struct PrivateDir {
  /// `needed`: the bytes the copy will take (checked against the free space first).
  explicit PrivateDir(uint64_t needed) {
    const char* tmp = std::getenv("TMPDIR");
    const std::string base = tmp != nullptr && tmp[0] == '/' ? tmp : "/tmp";
    stale_copies_remove(base);
    struct statvfs fs_info {};
    if (::statvfs(base.c_str(), &fs_info) == 0) {
      const uint64_t free_bytes = static_cast<uint64_t>(fs_info.f_bavail) * fs_info.f_frsize;
      if (needed > free_bytes) {
        throw Error(ERROR_CODE_IO, "cannot load the artifact: its private copy needs " + mib(needed) + " and " + base +
                                       " (TMPDIR) has " + mib(free_bytes) +
                                       " free; free space there, or point TMPDIR (the agent: --load-dir) at a directory on a disk with room");
      }
    }
    std::string templ = base + "/" + LOAD_DIR_PREFIX + std::to_string(::getpid()) + "-XXXXXX";
    if (::mkdtemp(templ.data()) == nullptr) {
      throw Error(ERROR_CODE_IO, "cannot make a private directory under " + base + " to load the artifact from (" +
                                     std::strerror(errno) + "); set TMPDIR to a writable directory");
    }
    path = templ;
    if (!private_dir_hold(path)) {
      private_dir_remove(path);
      throw Error(ERROR_CODE_IO, "cannot lock the private directory " + templ + " to load the artifact from (" +
                                     std::strerror(errno) + "); set TMPDIR to a local directory");
    }
  }
  ~PrivateDir() { private_dir_remove(path); }
  PrivateDir(const PrivateDir&) = delete;
  PrivateDir& operator=(const PrivateDir&) = delete;
  std::string path;
};

std::vector<DType> dtypes_of(const std::vector<ManifestTensor>& tensors) {
  std::vector<DType> out;
  for (const ManifestTensor& t : tensors) out.push_back(dtype_from_name(t.dtype));
  return out;
}

std::string names_of(const std::vector<ManifestTensor>& tensors) {
  std::string out;
  for (const ManifestTensor& t : tensors) out += (out.empty() ? "" : ", ") + t.name;
  return out;
}

[[noreturn]] void input_fail(const std::string& message) {
  throw Error(ERROR_CODE_INPUT, message);
}

// compare.h's rule, output by output; the first failing output explains the sample's failure.
void outputs_compare(const std::vector<Tensor>& got, const std::vector<Tensor>& expected,
                     const Manifest& manifest, GoldenSampleResult* result) {
  for (size_t o = 0; o < got.size(); ++o) {
    const std::string& name = manifest.outputs[o].name;
    const CompareResult cmp = tensor_compare(got[o].view(), expected[o].view(),
                                             manifest.golden.atol, manifest.golden.rtol);
    if (cmp.max_abs_err > result->max_abs_err) result->max_abs_err = cmp.max_abs_err;
    if (cmp.passed || !result->passed) continue;
    result->passed = false;
    result->message =
        cmp.shapes_match
            ? "output '" + name + "': " + std::to_string(cmp.bad_elements) + " of " +
                  std::to_string(cmp.elements) + " elements are outside the tolerance"
            : "output '" + name + "' has shape " + shape_format(got[o].shape()) +
                  ", the golden output has " + shape_format(expected[o].shape());
  }
}

}  // namespace

std::string shape_format(const std::vector<int64_t>& shape) {
  std::string out = "(";
  for (size_t i = 0; i < shape.size(); ++i) {
    out += (i > 0 ? ", " : "") + std::to_string(shape[i]);
  }
  return out + (shape.size() == 1 ? ",)" : ")");
}

Session::Session(std::string artifact_dir, std::string key_id, Manifest manifest,
                 std::string manifest_json, std::unique_ptr<PluginBackend> backend, std::string load_dir)
    : artifact_dir_(std::move(artifact_dir)),
      load_dir_(load_dir.empty() ? artifact_dir_ : std::move(load_dir)),
      key_id_(std::move(key_id)),
      manifest_(std::move(manifest)),
      manifest_json_(std::move(manifest_json)),
      input_dtypes_(dtypes_of(manifest_.inputs)),
      backend_(std::move(backend)),
      stats_(manifest_.monitoring, manifest_.outputs) {}

Session::~Session() {
  backend_.reset();
  if (load_dir_ != artifact_dir_) private_dir_remove(load_dir_);
}

std::string Session::session_describe() const { return backend_->backend_describe(); }

std::vector<Tensor> Session::run_checked(const std::vector<TensorView>& inputs,
                                         double* latency_us, uint64_t* nan_values) {
  const std::vector<ManifestTensor>& specs = manifest_.inputs;
  if (inputs.size() != specs.size()) {
    input_fail("the model takes " + std::to_string(specs.size()) + " input" +
               (specs.size() == 1 ? "" : "s") + " (" + names_of(specs) + "), " +
               std::to_string(inputs.size()) + (inputs.size() == 1 ? " was" : " were") + " given");
  }
  uint64_t nans = 0;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const TensorView& view = inputs[i];
    if (view.dtype != input_dtypes_[i]) {
      input_fail("input '" + specs[i].name + "' has dtype " + dtype_name(view.dtype) +
                 ", the model takes " + specs[i].dtype);
    }
    if (view.shape != specs[i].shape) {
      input_fail("input '" + specs[i].name + "' has shape " + shape_format(view.shape) +
                 ", the model takes " + shape_format(specs[i].shape));
    }
    if (view.data == nullptr) input_fail("input '" + specs[i].name + "' has no data");
    nans += view_nan_count(view);
  }

  // The plugin writes into outputs allocated with the manifest's dtypes and static shapes, so
  // what comes back always matches the manifest.
  std::vector<Tensor> outputs;
  outputs.reserve(manifest_.outputs.size());
  const auto start = std::chrono::steady_clock::now();
  const PluginStatus status = backend_->backend_run(inputs, &outputs);
  const auto stop = std::chrono::steady_clock::now();
  if (!status.ok()) {
    throw Error(ERROR_CODE_BACKEND, "backend '" + manifest_.backend_name + "' failed to run " +
                                        manifest_.name + ": " + status.message);
  }
  *latency_us = std::chrono::duration<double, std::micro>(stop - start).count();
  *nan_values = nans;
  return outputs;
}

std::vector<Tensor> Session::session_run(const std::vector<TensorView>& inputs) {
  double latency_us = 0.0;
  uint64_t nan_values = 0;
  std::vector<Tensor> outputs;
  try {
    outputs = run_checked(inputs, &latency_us, &nan_values);
  } catch (...) {
    stats_.stats_record_error();
    throw;
  }
  stats_.stats_record(latency_us, nan_values, outputs);
  return outputs;
}

SelfTestResult Session::session_self_test() {
  SelfTestResult result;
  result.atol = manifest_.golden.atol;
  result.rtol = manifest_.golden.rtol;
  result.passed = true;
  const fs::path dir(load_dir_);
  for (size_t s = 0; s < manifest_.golden.samples.size(); ++s) {
    const ManifestGoldenSample& sample = manifest_.golden.samples[s];
    std::vector<Tensor> inputs, expected;
    for (const std::string& path : sample.inputs) inputs.push_back(npy_read((dir / path).string()));
    for (const std::string& path : sample.outputs) expected.push_back(npy_read((dir / path).string()));
    std::vector<TensorView> views;
    for (const Tensor& t : inputs) views.push_back(t.view());

    GoldenSampleResult sample_result;
    sample_result.index = static_cast<uint32_t>(s);
    sample_result.passed = true;
    double latency_us = 0.0;
    uint64_t nan_values = 0;
    const std::vector<Tensor> got = run_checked(views, &latency_us, &nan_values);
    outputs_compare(got, expected, manifest_, &sample_result);

    result.passed = result.passed && sample_result.passed;
    if (!(sample_result.max_abs_err <= result.max_abs_err)) result.max_abs_err = sample_result.max_abs_err;
    result.details.push_back(std::move(sample_result));
    ++result.samples;
  }
  return result;
}

std::unique_ptr<Session> session_open(const std::string& artifact_dir,
                                      const std::vector<std::vector<uint8_t>>& trusted_public_keys,
                                      const SessionOptions& options) {
  PrivateDir copy(tree_bytes(artifact_dir));
  VerifyResult verified = artifact_verify(artifact_dir, trusted_public_keys, copy.path);
  if (options.on_verified) options.on_verified();
  Manifest& manifest = verified.manifest;
  std::error_code ec;
  const fs::path dir = fs::canonical(artifact_dir, ec);
  if (ec) {
    throw Error(ERROR_CODE_IO, "artifact directory " + string_quote(artifact_dir) +
                                   " cannot be opened (" + ec.message() + ")");
  }
  // From here on only the verified copy is read.
  machine_check(manifest, copy.path);
  const BackendPlugin& plugin = plugin_load(manifest.backend_name);
  format_check(manifest, plugin);
  PluginOpenArgs args;
  args.artifact_dir = copy.path;
  args.manifest = manifest;
  args.manifest_json = verified.manifest_json;
  args.threads = options.threads > 0 ? options.threads : manifest.target_threads;
  args.max_concurrency = options.max_concurrency;
  std::unique_ptr<PluginBackend> backend;
  const PluginStatus status = plugin_backend_open(plugin, args, &backend);
  if (!status.ok()) {
    throw Error(ERROR_CODE_BACKEND, "backend '" + manifest.backend_name + "' could not load " +
                                        manifest.payload.entry + " of " + manifest.name + ": " +
                                        status.message);
  }
  auto session = std::make_unique<Session>(dir.string(), verified.key_id, std::move(manifest),
                                           std::move(verified.manifest_json), std::move(backend), copy.path);
  copy.path.clear();  // the Session removes it now
  return session;
}

}  // namespace edgesmith
