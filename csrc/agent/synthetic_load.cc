#include "agent/synthetic_load.h"

#include <chrono>
#include <cstring>
#include <filesystem>
#include <random>
#include <utility>

#include "common/error.h"
#include "runtime/npy.h"

namespace edgesmith {

std::vector<std::vector<Tensor>> SyntheticLoad::samples_load(const Session& session) {
  const Manifest& manifest = session.session_manifest();
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
                                 on_served)
    : session_(std::move(session)), rps_(rps), shift_(shift), seed_(seed), on_run_error_(std::move(on_run_error)),
      on_served_(std::move(on_served)) {
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
    if (session != samples_of_) {  // a deployment switched the model: its own golden inputs
      try {
        samples_ = samples_load(*session);
      } catch (const Error& e) {
        if (on_run_error_) on_run_error_(e.what());
      }
      samples_of_ = session;
    }
    const std::vector<Tensor>& golden = samples_[run % samples_.size()];
    std::vector<Tensor> inputs;
    std::vector<TensorView> views;
    for (const Tensor& g : golden) {
      Tensor t(g.dtype(), g.shape());
      if (g.byte_size() > 0) std::memcpy(t.data(), g.data(), g.byte_size());
      // float16 inputs stay as recorded (the core has no half-precision writer).
      const auto n = static_cast<size_t>(shape_numel(g.shape()));
      if (g.dtype() == DTYPE_FLOAT32) {
        auto* values = static_cast<float*>(t.data());
        for (size_t i = 0; i < n; ++i) values[i] += static_cast<float>(shift_ + noise(rng));
      } else if (g.dtype() == DTYPE_FLOAT64) {
        auto* values = static_cast<double*>(t.data());
        for (size_t i = 0; i < n; ++i) values[i] += shift_ + noise(rng);
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
