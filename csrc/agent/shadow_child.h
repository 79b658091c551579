// A shadow candidate in a child process (docs/shadow.md, "The candidate runs in a child"): the
// agent binary again, `edgesmith-agent --shadow-child DIR --threads N --key-hex HEX...
// [--paired SERVING_DIR] [--backend-path DIR]...`, so a candidate that crashes or hangs on a live
// input takes only the child down. The child verifies and loads the artifact at a lower priority,
// then answers one binary frame per sample on its stdin/stdout (the protocol is in
// shadow_child.cc). With --paired it also opens the serving artifact (its own Session) and runs it
// on every sample back to back with the candidate, alternating the order, so the two run times
// are taken under the same scheduling ("Paired timing" in docs/shadow.md).
#pragma once

#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "artifact/manifest.h"
#include "common/error.h"
#include "runtime/tensor.h"

namespace edgesmith {

/// How to start a shadow child.
struct ShadowChildOptions {
  std::string executable = "/proc/self/exe";     ///< the agent binary
  std::string artifact_dir;                       ///< the candidate (in the shadow slot)
  std::string paired_dir;  ///< the serving artifact, run beside the candidate for paired timing ("": none)
  std::vector<std::vector<uint8_t>> build_keys;  ///< raw 32-byte Ed25519 keys the artifact must be signed by
  std::vector<std::string> backend_path;          ///< the agent's --backend-path directories
  int threads = 1;                                ///< the candidate's engine threads
  int nice = 10;                 ///< the child lowers its own priority (setpriority) before loading
  double start_timeout_s = 120;  ///< verify + load
  double run_timeout_s = 30;     ///< one sample
};

/// One sample's answer.
struct ShadowRunResult {
  std::vector<Tensor> outputs;  ///< the candidate's outputs, in manifest order, checked against its specs
  double latency_us = 0;        ///< Session::run in the child
  /// The serving artifact's Session::run in the child on the same sample, back to back with the
  /// candidate (paired timing); < 0 when the child has no paired serving Session.
  double paired_serving_us = -1;
};

/// Thrown by ShadowChild when the child died, hung or broke the protocol: the child is gone
/// (killed and reaped); `what()` is one sentence ("the candidate crashed (SIGSEGV) while running a
/// sample", "... did not answer within 30 s and was killed").
struct ShadowChildDied : Error {
  /// `message`: the sentence.
  explicit ShadowChildDied(const std::string& message) : Error(ERROR_CODE_BACKEND, message) {}
};

/// A running shadow child. One caller at a time (the shadow worker); the getters are thread-safe.
class ShadowChild {
 public:
  /// Spawn the child and wait for its ready line; throws Error (refused: verify/load failed, one
  /// sentence) or ShadowChildDied (it crashed or did not get ready within start_timeout_s).
  explicit ShadowChild(ShadowChildOptions options);
  /// Close the child's stdin, wait briefly, SIGKILL, reap.
  ~ShadowChild();
  ShadowChild(const ShadowChild&) = delete;
  ShadowChild& operator=(const ShadowChild&) = delete;

  /// Run one sample (inputs in the candidate manifest's order); an input the candidate rejects
  /// comes back as Error (not a death). Throws ShadowChildDied when the child crashed, hung
  /// (run_timeout_s) or answered something that is not a frame of the candidate's outputs; every
  /// later call then throws ShadowChildDied too.
  ShadowRunResult shadow_run(const std::vector<Tensor>& inputs);
  /// SHA-256 of the candidate's manifest.json, as the child verified it.
  std::string shadow_manifest_sha256() const;
  /// The candidate's manifest (read by the parent, checked against the child's SHA-256).
  const Manifest& shadow_manifest() const noexcept { return manifest_; }
  /// The child's RSS after loading minus before loading (its own figure, from the ready line):
  /// the candidate's Session and, with paired timing, the child's own serving Session.
  uint64_t shadow_rss_increase_bytes() const;
  /// Of that, what the paired serving Session added (0 without one).
  uint64_t shadow_paired_rss_bytes() const noexcept { return paired_rss_bytes_; }
  /// Whether the child opened the serving artifact for paired timing (why not: paired_problem()).
  bool shadow_paired() const noexcept { return paired_; }
  /// Why the child has no paired serving Session although one was asked for ("" otherwise).
  const std::string& shadow_paired_problem() const noexcept { return paired_problem_; }
  /// The child's utime + stime so far (/proc/<pid>/stat); the last figure once it is gone.
  double shadow_cpu_seconds() const;
  /// The child's process id (0 once it is gone).
  pid_t shadow_pid() const;

 private:
  [[noreturn]] void child_fail(const std::string& doing, const std::string& why);
  void child_end();

  ShadowChildOptions options_;
  Manifest manifest_;
  std::string manifest_sha256_;
  uint64_t rss_increase_bytes_ = 0;
  uint64_t paired_rss_bytes_ = 0;
  bool paired_ = false;
  std::string paired_problem_;
  std::atomic<pid_t> pid_{0};
  int fd_ = -1;             ///< our end of the socket that is the child's stdin and stdout
  int stderr_fd_ = -1;      ///< the child's stderr (read by stderr_thread_)
  std::thread stderr_thread_;
  std::atomic<bool> stderr_stop_{false};
  mutable std::atomic<double> last_cpu_seconds_{0};
  std::string dead_;        ///< why the child is gone ("" while it runs)
};

/// The child side: argv after `--shadow-child`. Returns the exit status.
int shadow_child_main(int argc, char** argv);

}  // namespace edgesmith
