// --synthetic-load RPS: the agent drives its own Session with the artifact's golden inputs plus
// small seeded Gaussian noise (float32/float64 inputs), for demos and tests; with --load-from FILE
// (the camera stand-in) it replays the samples of a .npy file instead, in order, looping.
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

#include "artifact/manifest.h"
#include "runtime/session.h"
#include "runtime/tensor.h"

namespace edgesmith {

/// Standard deviation of the noise added to golden float inputs.
constexpr double SYNTHETIC_NOISE_STD = 0.01;

/// Largest --load-from file read (it is held in memory whole).
constexpr uint64_t SYNTHETIC_REPLAY_MAX_BYTES = uint64_t{64} << 20;

/// Most samples a --load-from file may hold (each becomes a tensor of its own: a file of many tiny
/// samples would otherwise cost far more memory than its bytes).
constexpr int64_t SYNTHETIC_REPLAY_MAX_SAMPLES = 65536;

/// Largest .npy header a --load-from file may have (NumPy writes about 128 bytes).
constexpr uint32_t SYNTHETIC_REPLAY_MAX_HEADER_BYTES = 4096;

/// The samples of the .npy file at `path` for a model taking `inputs`: one array of the input's
/// dtype, shaped as the input (one sample), as [N, *input shape], or, when the input's first
/// dimension is 1, as [N, *input shape without it] (N samples). The file is untrusted: its size is
/// checked against `max_bytes` before it is read, its header against the model before its data.
/// Throws Error(ERROR_CODE_INPUT) naming the file, what the model expects and what it found.
std::vector<std::vector<Tensor>> synthetic_replay_read(const std::string& path, const std::string& model,
                                                       const std::vector<ManifestTensor>& inputs,
                                                       uint64_t max_bytes = SYNTHETIC_REPLAY_MAX_BYTES);

/// Which Session serves right now (the agent swaps it after a deployment).
using SessionGetter = std::function<std::shared_ptr<Session>()>;

/// A background thread running the serving Session `rps` times a second (on the golden inputs of
/// whichever Session serves: they are reloaded after a switch).
class SyntheticLoad {
 public:
  /// Load the golden inputs (every sample, used in turn), or with `load_from` the samples of that
  /// .npy file (synthetic_replay_read; replayed as they are, without noise). `shift` is added to
  /// every float input value (to show drift). `on_run_error` hears about failed runs. Throws Error
  /// when the artifact has no golden samples or the file does not fit the model.
  /// `on_served`: told of every successful run (the Session, inputs, outputs, run time in µs), the
  /// shadow's sampling hook; must not block.
  SyntheticLoad(SessionGetter session, double rps, double shift, uint32_t seed,
                std::function<void(const std::string&)> on_run_error,
                std::function<void(const Session&, const std::vector<Tensor>&, const std::vector<Tensor>&, double)>
                    on_served = {},
                std::string load_from = {});
  ~SyntheticLoad();
  SyntheticLoad(const SyntheticLoad&) = delete;
  SyntheticLoad& operator=(const SyntheticLoad&) = delete;

  /// Start the thread.
  void load_start();

  /// Stop it (waits for the run in progress).
  void load_stop();

 private:
  void loop();
  std::vector<std::vector<Tensor>> samples_load(const Session& session) const;

  SessionGetter session_;
  std::shared_ptr<Session> samples_of_;
  double rps_;
  double shift_;
  uint32_t seed_;
  std::function<void(const std::string&)> on_run_error_;
  std::function<void(const Session&, const std::vector<Tensor>&, const std::vector<Tensor>&, double)> on_served_;
  std::string load_from_;  ///< the --load-from file, or empty: the golden inputs
  std::vector<std::vector<Tensor>> samples_;
  std::mutex mutex_;
  std::condition_variable cv_;
  bool stopping_ = false;
  std::thread thread_;
};

}  // namespace edgesmith
