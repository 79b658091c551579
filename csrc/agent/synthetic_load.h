// --synthetic-load RPS: the agent drives its own Session with the artifact's golden inputs plus
// small seeded Gaussian noise (float32/float64 inputs), for demos and tests.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "runtime/session.h"

namespace edgesmith {

/// Standard deviation of the noise added to golden float inputs.
constexpr double SYNTHETIC_NOISE_STD = 0.01;

/// Which Session serves right now (the agent swaps it after a deployment).
using SessionGetter = std::function<std::shared_ptr<Session>()>;

/// A background thread running the serving Session `rps` times a second (on the golden inputs of
/// whichever Session serves: they are reloaded after a switch).
class SyntheticLoad {
 public:
  /// Load the golden inputs (every sample, used in turn). `shift` is added to every float input
  /// value (to show drift). `on_run_error` hears about failed runs. Throws Error when the artifact
  /// has no golden samples.
  /// `on_served`: told of every successful run (the Session, inputs, outputs, run time in µs), the
  /// shadow's sampling hook; must not block.
  SyntheticLoad(SessionGetter session, double rps, double shift, uint32_t seed,
                std::function<void(const std::string&)> on_run_error,
                std::function<void(const Session&, const std::vector<Tensor>&, const std::vector<Tensor>&, double)>
                    on_served = {});
  ~SyntheticLoad();
  SyntheticLoad(const SyntheticLoad&) = delete;
  SyntheticLoad& operator=(const SyntheticLoad&) = delete;

  /// Start the thread.
  void load_start();

  /// Stop it (waits for the run in progress).
  void load_stop();

 private:
  void loop();
  static std::vector<std::vector<Tensor>> samples_load(const Session& session);

  SessionGetter session_;
  std::shared_ptr<Session> samples_of_;
  double rps_;
  double shift_;
  uint32_t seed_;
  std::function<void(const std::string&)> on_run_error_;
  std::function<void(const Session&, const std::vector<Tensor>&, const std::vector<Tensor>&, double)> on_served_;
  std::vector<std::vector<Tensor>> samples_;
  std::mutex mutex_;
  std::condition_variable cv_;
  bool stopping_ = false;
  std::thread thread_;
};

}  // namespace edgesmith
