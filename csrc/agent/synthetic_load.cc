#include "agent/synthetic_load.h"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <system_error>
#include <utility>

#include "common/error.h"
#include "runtime/npy.h"
#include "runtime/session.h"

namespace edgesmith {

namespace {

// A shape with N samples in front: (N, 1, 8, 8).
std::string shape_with_n(const std::vector<int64_t>& shape) {
  std::string out = "(N";
  for (const int64_t dim : shape) out += ", " + std::to_string(dim);
  return out + (shape.empty() ? ",)" : ")");
}

std::string replay_expected(const ManifestTensor& spec) {
  std::string text = spec.dtype + " samples shaped " + shape_format(spec.shape) + " or " + shape_with_n(spec.shape);
  if (!spec.shape.empty() && spec.shape[0] == 1) {
    text += " or " + shape_with_n(std::vector<int64_t>(spec.shape.begin() + 1, spec.shape.end()));
  }
  return text + " for input '" + spec.name + "'";
}

// How many samples an array shaped `shape` holds for `spec` (0: it does not fit).
int64_t replay_count(const std::vector<int64_t>& shape, const std::vector<int64_t>& spec) {
  if (shape == spec) return 1;
  if (shape.size() == spec.size() + 1 && std::equal(spec.begin(), spec.end(), shape.begin() + 1)) return shape[0];
  if (!spec.empty() && spec[0] == 1 && shape.size() == spec.size() && !shape.empty() &&
      std::equal(spec.begin() + 1, spec.end(), shape.begin() + 1)) {
    return shape[0];
  }
  return 0;
}

}  // namespace

std::vector<std::vector<Tensor>> synthetic_replay_read(const std::string& path, const std::string& model,
                                                       const std::vector<ManifestTensor>& inputs, uint64_t max_bytes) {
  const std::string name = "--load-from " + path;
  if (inputs.size() != 1) {
    throw Error(ERROR_CODE_INPUT, name + ": a .npy file holds one array and " + model + " takes " +
                                      std::to_string(inputs.size()) + " inputs; drive it through the HTTP API instead");
  }
  const ManifestTensor& spec = inputs[0];
  std::error_code ec;
  const std::filesystem::file_status status = std::filesystem::status(path, ec);
  if (!std::filesystem::exists(status)) {
    throw Error(ERROR_CODE_IO, name + ": no such file (expected a .npy file of " + replay_expected(spec) + ")");
  }
  if (!std::filesystem::is_regular_file(status)) {
    throw Error(ERROR_CODE_IO, name + ": is not a regular file (expected a .npy file of " + replay_expected(spec) + ")");
  }
  const uintmax_t size = std::filesystem::file_size(path, ec);
  if (ec || size > max_bytes) {
    throw Error(ERROR_CODE_INPUT, name + ": expected at most " + std::to_string(max_bytes) + " bytes, found " +
                                      (ec ? "a file whose size cannot be read" : std::to_string(size) + " bytes"));
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(ERROR_CODE_IO, name + ": cannot be read (" + std::strerror(errno) + ")");
  std::string bytes;
  // Read at most max_bytes + 1, so a file growing after the size check is still caught.
  bytes.resize(static_cast<size_t>(size) + 1);
  in.read(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (in.bad()) throw Error(ERROR_CODE_IO, name + ": the file cannot be read");
  bytes.resize(static_cast<size_t>(in.gcount()));
  if (bytes.size() > max_bytes) {
    throw Error(ERROR_CODE_INPUT, name + ": expected at most " + std::to_string(max_bytes) + " bytes, found more");
  }
  NpyHeader header;
  try {
    header = npy_header_parse(bytes.data(), bytes.size(), name, SYNTHETIC_REPLAY_MAX_HEADER_BYTES);
  } catch (const Error& e) {
    throw Error(ERROR_CODE_INPUT, std::string(e.what()) + " (expected a .npy file of " + replay_expected(spec) + ")");
  }
  const DType want = dtype_from_name(spec.dtype);
  const int64_t count = replay_count(header.shape, spec.shape);
  if (header.dtype != want || count <= 0) {
    throw Error(ERROR_CODE_INPUT, name + ": expected " + replay_expected(spec) + " of " + model + ", found " +
                                      dtype_name(header.dtype) + " " + shape_format(header.shape));
  }
  if (count > SYNTHETIC_REPLAY_MAX_SAMPLES) {
    throw Error(ERROR_CODE_INPUT, name + ": expected at most " + std::to_string(SYNTHETIC_REPLAY_MAX_SAMPLES) +
                                      " samples, found " + std::to_string(count));
  }
  const uint64_t available = bytes.size() - header.data_offset;
  if (available != header.data_bytes) {
    throw Error(ERROR_CODE_INPUT, name + ": its header says " + dtype_name(header.dtype) + " " +
                                      shape_format(header.shape) + ", so expected " + std::to_string(header.data_bytes) +
                                      " bytes of data after it, found " + std::to_string(available));
  }
  const uint64_t sample_bytes = header.data_bytes / static_cast<uint64_t>(count);
  std::vector<std::vector<Tensor>> samples;
  samples.reserve(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) {
    std::vector<Tensor> one;
    Tensor& t = one.emplace_back(want, spec.shape);
    if (sample_bytes > 0) {
      std::memcpy(t.data(), bytes.data() + header.data_offset + static_cast<size_t>(i) * sample_bytes, sample_bytes);
    }
    samples.push_back(std::move(one));
  }
  return samples;
}

std::vector<std::vector<Tensor>> SyntheticLoad::samples_load(const Session& session) const {
  const Manifest& manifest = session.session_manifest();
  if (!load_from_.empty()) return synthetic_replay_read(load_from_, manifest.name, manifest.inputs);
  if (manifest.golden.samples.empty()) {
    throw Error(ERROR_CODE_INVALID_ARGUMENT, "--synthetic-load needs golden samples and " + manifest.name +
                                                 " has none; drive it through the HTTP API instead");
  }
  std::vector<std::vector<Tensor>> samples;
  for (const ManifestGoldenSample& sample : manifest.golden.samples) {
    std::vector<Tensor> inputs;
    for (const std::string& path : sample.inputs) {
      inputs.push_back(npy_read((std::filesystem::path(session.session_load_dir()) / path).string()));
    }
    samples.push_back(std::move(inputs));
  }
  return samples;
}

SyntheticLoad::SyntheticLoad(SessionGetter session, double rps, double shift, uint32_t seed,
                             std::function<void(const std::string&)> on_run_error,
                             std::function<void(const Session&, const std::vector<Tensor>&, const std::vector<Tensor>&, double)>
                                 on_served,
                             std::string load_from)
    : session_(std::move(session)), rps_(rps), shift_(shift), seed_(seed), on_run_error_(std::move(on_run_error)),
      on_served_(std::move(on_served)), load_from_(std::move(load_from)) {
  samples_of_ = session_();
  samples_ = samples_load(*samples_of_);
}

SyntheticLoad::~SyntheticLoad() { load_stop(); }

void SyntheticLoad::load_start() {
  if (rps_ <= 0.0 || thread_.joinable()) return;
  thread_ = std::thread([this] { loop(); });
}

void SyntheticLoad::load_stop() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void SyntheticLoad::loop() {
  std::mt19937 rng(seed_);
  std::normal_distribution<double> noise(0.0, SYNTHETIC_NOISE_STD);
  const auto period = std::chrono::duration_cast<std::chrono::steady_clock::duration>(std::chrono::duration<double>(1.0 / rps_));
  auto next = std::chrono::steady_clock::now();
  for (uint64_t run = 0;; ++run) {
    {
      std::unique_lock<std::mutex> lock(mutex_);
      if (cv_.wait_until(lock, next, [&] { return stopping_; })) return;
    }
    const std::shared_ptr<Session> session = session_();
    if (session != samples_of_) {  // a deployment switched the model: its own golden inputs (or the file again)
      try {
        samples_ = samples_load(*session);
      } catch (const Error& e) {
        if (on_run_error_) on_run_error_(e.what());
        if (!load_from_.empty()) samples_.clear();
      }
      samples_of_ = session;
    }
    if (samples_.empty()) {  // the file does not fit the new model, nor are there golden inputs: idle
      next += period;
      continue;
    }
    const std::vector<Tensor>& golden = samples_[run % samples_.size()];
    std::vector<Tensor> inputs;
    std::vector<TensorView> views;
    for (const Tensor& g : golden) {
      Tensor t(g.dtype(), g.shape());
      if (g.byte_size() > 0) std::memcpy(t.data(), g.data(), g.byte_size());
      // float16 inputs stay as recorded (the core has no half-precision writer).
      const auto n = static_cast<size_t>(shape_numel(g.shape()));
      // A replayed file is played as recorded (plus any --synthetic-shift), golden inputs with noise.
      const bool noisy = load_from_.empty();
      if (g.dtype() == DTYPE_FLOAT32 && (noisy || shift_ != 0.0)) {
        auto* values = static_cast<float*>(t.data());
        for (size_t i = 0; i < n; ++i) values[i] += static_cast<float>(shift_ + (noisy ? noise(rng) : 0.0));
      } else if (g.dtype() == DTYPE_FLOAT64 && (noisy || shift_ != 0.0)) {
        auto* values = static_cast<double*>(t.data());
        for (size_t i = 0; i < n; ++i) values[i] += shift_ + (noisy ? noise(rng) : 0.0);
      }
      inputs.push_back(std::move(t));
    }
    for (const Tensor& t : inputs) views.push_back(t.view());
    try {
      const auto started = std::chrono::steady_clock::now();
      const std::vector<Tensor> outputs = session->session_run(views);
      const double run_us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - started).count();
      if (on_served_) on_served_(*session, inputs, outputs, run_us);
    } catch (const Error& e) {
      if (on_run_error_) on_run_error_(e.what());
    }
    next += period;
    // Slower than asked (a slow model, a busy CPU): run back to back, without a catch-up burst.
    const auto now = std::chrono::steady_clock::now();
    if (next < now - period) next = now;
  }
}

}  // namespace edgesmith
