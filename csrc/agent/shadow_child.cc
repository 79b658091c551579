#include "agent/shadow_child.h"

#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <optional>
#include <sstream>
#include <thread>
#include <utility>

#include <nlohmann/json.hpp>

#include "agent/child_process.h"
#include "common/digest.h"
#include "common/file.h"
#include "runtime/plugin.h"
#include "runtime/session.h"

namespace edgesmith {

// --- the protocol -----------------------------------------------------------------------------------
//
// After its ready line (one JSON line: {"ready": true, "manifest_sha256", "rss_increase_bytes",
// "paired", "paired_rss_bytes"[, "paired_problem"]} or {"ready": false, "code", "message"}), the
// child answers frames on its stdin/stdout, one at a time. Every integer is little-endian.
//
//   frame  := version:u8 (2)  kind:u8  code:u8 (ERROR: the ErrorCode, else 0)  0:u8  count:u32  body
//   RUN     (parent -> child): count = inputs,  body = tensor{count}
//   OUTPUTS (child -> parent): count = outputs, body = latency_us:f64 paired_us:f64 tensor{count}
//           (paired_us: the paired serving Session's run time on the same sample, < 0 without one)
//   ERROR   (child -> parent): count = bytes,   body = message (at most SHADOW_MAX_MESSAGE bytes)
//   tensor := dtype:i32 (runtime/tensor.h's codes)  ndim:u32  dims:i64{ndim}  bytes:u64  data
//
// Each side reads a tensor header, checks it against the manifest's spec of that position (dtype,
// rank, every dimension, and bytes == elements * element size) and only then allocates: a corrupt
// peer cannot make the other allocate more than the model's own tensors.

namespace {

constexpr uint8_t SHADOW_PROTOCOL_VERSION = 2;
constexpr uint8_t FRAME_KIND_RUN = 1;
constexpr uint8_t FRAME_KIND_OUTPUTS = 2;
constexpr uint8_t FRAME_KIND_ERROR = 3;
constexpr uint32_t SHADOW_MAX_MESSAGE = 4096;
constexpr size_t SHADOW_MAX_READY_LINE = 64 << 10;
constexpr double SHADOW_EXIT_WAIT_S = 2.0;

using Clock = std::chrono::steady_clock;

/// A peer that broke the protocol (the message says how).
struct ProtocolError {
  std::string message;
};

/// The peer closed its end.
struct PeerClosed {};

/// The deadline passed.
struct TimedOut {};

void put_u64(std::string& out, uint64_t v) {
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
void put_u32(std::string& out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
uint64_t get_le(const uint8_t* p, int n) {
  uint64_t v = 0;
  for (int i = n - 1; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

// Blocking I/O on one descriptor with an optional deadline (none: wait forever).
class FrameStream {
 public:
  FrameStream(int read_fd, int write_fd, std::optional<Clock::time_point> deadline)
      : read_fd_(read_fd), write_fd_(write_fd), deadline_(deadline) {}

  void write_all(const void* data, size_t size) {
    const auto* p = static_cast<const char*>(data);
    while (size > 0) {
      wait_for(write_fd_, POLLOUT);
      // MSG_NOSIGNAL: a dead child is an EPIPE here, never a SIGPIPE in the agent.
      const ssize_t n = ::send(write_fd_, p, size, MSG_NOSIGNAL);
      if (n < 0) {
        if (errno == EINTR || errno == EAGAIN) continue;
        if (errno == ENOTSOCK) {
          const ssize_t w = ::write(write_fd_, p, size);
          if (w < 0 && (errno == EINTR || errno == EAGAIN)) continue;
          if (w <= 0) throw PeerClosed{};
          p += w;
          size -= static_cast<size_t>(w);
          continue;
        }
        throw PeerClosed{};
      }
      p += n;
      size -= static_cast<size_t>(n);
    }
  }

  void read_all(void* data, size_t size) {
    auto* p = static_cast<char*>(data);
    while (size > 0) {
      wait_for(read_fd_, POLLIN);
      const ssize_t n = ::read(read_fd_, p, size);
      if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
      if (n <= 0) throw PeerClosed{};
      p += n;
      size -= static_cast<size_t>(n);
    }
  }

  uint64_t read_le(int n) {
    uint8_t bytes[8];
    read_all(bytes, static_cast<size_t>(n));
    return get_le(bytes, n);
  }

  /// One line (without '\n') of at most `max` bytes.
  std::string read_line(size_t max) {
    std::string line;
    char c = 0;
    while (true) {
      read_all(&c, 1);
      if (c == '\n') return line;
      if (line.size() >= max) throw ProtocolError{"a ready line longer than " + std::to_string(max) + " bytes"};
      line.push_back(c);
    }
  }

 private:
  void wait_for(int fd, short events) {
    while (true) {
      int timeout_ms = -1;
      if (deadline_) {
        const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(*deadline_ - Clock::now()).count();
        if (left <= 0) throw TimedOut{};
        timeout_ms = static_cast<int>(std::min<long long>(left, 1000));
      }
      struct pollfd p {fd, events, 0};
      const int ready = ::poll(&p, 1, timeout_ms);
      if (ready > 0) return;  // readable, writable, or closed (the read / send says which)
      if (ready < 0 && errno != EINTR) throw PeerClosed{};
    }
  }

  int read_fd_;
  int write_fd_;
  std::optional<Clock::time_point> deadline_;
};

void frame_header_write(std::string& out, uint8_t kind, uint32_t count) {
  out.push_back(static_cast<char>(SHADOW_PROTOCOL_VERSION));
  out.push_back(static_cast<char>(kind));
  out.push_back(0);
  out.push_back(0);
  put_u32(out, count);
}

void tensor_write(FrameStream& stream, const Tensor& t) {
  std::string header;
  put_u32(header, static_cast<uint32_t>(t.dtype()));
  put_u32(header, static_cast<uint32_t>(t.shape().size()));
  for (const int64_t d : t.shape()) put_u64(header, static_cast<uint64_t>(d));
  put_u64(header, t.byte_size());
  stream.write_all(header.data(), header.size());
  stream.write_all(t.data(), t.byte_size());
}

// Read the next `specs.size()` tensors, each checked against its spec before anything is allocated.
std::vector<Tensor> tensors_read(FrameStream& stream, uint32_t count, const std::vector<ManifestTensor>& specs,
                                 const char* what) {
  if (count != specs.size()) {
    throw ProtocolError{"a frame of " + std::to_string(count) + " " + what + "s where the model has " +
                        std::to_string(specs.size())};
  }
  std::vector<Tensor> out;
  for (const ManifestTensor& spec : specs) {
    const uint64_t dtype = stream.read_le(4);
    const uint64_t ndim = stream.read_le(4);
    const DType want = dtype_from_name(spec.dtype);
    if (dtype != static_cast<uint64_t>(want) || ndim != spec.shape.size()) {
      throw ProtocolError{std::string(what) + " '" + spec.name + "' arrived with dtype code " + std::to_string(dtype) +
                          " and rank " + std::to_string(ndim) + " where the model says " + spec.dtype + " " +
                          shape_format(spec.shape)};
    }
    for (size_t i = 0; i < ndim; ++i) {
      const uint64_t d = stream.read_le(8);
      if (d != static_cast<uint64_t>(spec.shape[i])) {
        throw ProtocolError{std::string(what) + " '" + spec.name + "' arrived with dimension " + std::to_string(i) +
                            " = " + std::to_string(d) + " where the model says " + shape_format(spec.shape)};
      }
    }
    const uint64_t bytes = stream.read_le(8);
    const uint64_t expected = static_cast<uint64_t>(shape_numel(spec.shape)) * dtype_size(want);
    if (bytes != expected) {
      throw ProtocolError{std::string(what) + " '" + spec.name + "' arrived with " + std::to_string(bytes) +
                          " bytes where the model's " + shape_format(spec.shape) + " " + spec.dtype + " has " +
                          std::to_string(expected)};
    }
    Tensor t(want, spec.shape);
    stream.read_all(t.data(), t.byte_size());
    out.push_back(std::move(t));
  }
  return out;
}

Clock::time_point deadline_after(double seconds) {
  return Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
}

std::string seconds_text(double s) {
  std::ostringstream out;
  out << s;
  return out.str();
}

}  // namespace

// --- the parent -----------------------------------------------------------------------------------

ShadowChild::ShadowChild(ShadowChildOptions options) : options_(std::move(options)) {
  // The parent reads the manifest the child is going to verify, and trusts it once the child's
  // SHA-256 of the verified manifest matches these very bytes.
  const std::string manifest_path = options_.artifact_dir + "/manifest.json";
  const std::string manifest_text = file_read(manifest_path, MANIFEST_MAX_BYTES, ERROR_CODE_MANIFEST, "manifest.json");
  manifest_ = manifest_parse(manifest_text);
  std::vector<std::string> args = {options_.executable, "--shadow-child", options_.artifact_dir,
                                   "--threads", std::to_string(options_.threads), "--nice",
                                   std::to_string(options_.nice)};
  if (!options_.paired_dir.empty()) {
    args.push_back("--paired");
    args.push_back(options_.paired_dir);
  }
  for (const std::vector<uint8_t>& key : options_.build_keys) {
    args.push_back("--key-hex");
    args.push_back(child_key_hex(key));
  }
  for (const std::string& dir : options_.backend_path) {
    args.push_back("--backend-path");
    args.push_back(dir);
  }
  ChildSpawnOptions spawn;
  spawn.stdio_socket = true;
  spawn.stderr_pipe = true;
  const ChildSpawned child = child_spawn(args, spawn, "to run the shadow candidate");
  pid_ = child.pid;
  fd_ = child.stdio_fd;
  stderr_fd_ = child.stderr_fd;
  try {
    const pid_t pid = child.pid;
    stderr_thread_ = std::thread([this, pid] {
      // The child's stderr, line by line, into the agent's, prefixed.
      std::string pending;
      char buffer[4096];
      while (true) {
        struct pollfd p {stderr_fd_, POLLIN, 0};
        const int ready = ::poll(&p, 1, 200);
        if (ready < 0 && errno != EINTR) break;
        if (ready <= 0) {
          if (stderr_stop_.load()) break;
          continue;
        }
        const ssize_t n = ::read(stderr_fd_, buffer, sizeof(buffer));
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        pending.append(buffer, static_cast<size_t>(n));
        size_t end = 0;
        while ((end = pending.find('\n')) != std::string::npos || pending.size() >= sizeof(buffer)) {
          const size_t take = end == std::string::npos ? pending.size() : end;
          std::cerr << "edgesmith-agent: shadow child " << pid << ": " << pending.substr(0, take) << std::endl;
          pending.erase(0, end == std::string::npos ? take : take + 1);
        }
      }
      if (!pending.empty()) std::cerr << "edgesmith-agent: shadow child " << pid << ": " << pending << std::endl;
    });

    nlohmann::json ready;
    try {
      FrameStream stream(fd_, fd_, deadline_after(options_.start_timeout_s));
      ready = nlohmann::json::parse(stream.read_line(SHADOW_MAX_READY_LINE), nullptr, false);
    } catch (const TimedOut&) {
      child_fail("", "did not get ready within " + seconds_text(options_.start_timeout_s) + " s and was killed");
    } catch (const PeerClosed&) {
      child_fail("while loading", "");
    } catch (const ProtocolError& e) {
      child_fail("", "broke the shadow protocol while loading (" + e.message + ") and was killed");
    }
    const auto field = [&ready](const char* key, bool (nlohmann::json::*is)() const noexcept) {
      return ready.contains(key) && (ready[key].*is)();
    };
    if (!ready.is_object() || !field("ready", &nlohmann::json::is_boolean) ||
        (ready["ready"].get<bool>() && (!field("manifest_sha256", &nlohmann::json::is_string) ||
                                        !field("rss_increase_bytes", &nlohmann::json::is_number_unsigned) ||
                                        !field("paired", &nlohmann::json::is_boolean) ||
                                        !field("paired_rss_bytes", &nlohmann::json::is_number_unsigned))) ||
        (!ready["ready"].get<bool>() && (!field("message", &nlohmann::json::is_string) ||
                                         !field("code", &nlohmann::json::is_number_integer)))) {
      child_fail("", "broke the shadow protocol while loading (its ready line is not one) and was killed");
    }
    if (!ready["ready"].get<bool>()) {
      const std::string message = ready["message"].get<std::string>();
      const int64_t code = ready["code"].get<int64_t>();
      child_end();
      dead_ = message;
      throw Error(code >= ERROR_CODE_IO && code <= ERROR_CODE_UNSUPPORTED ? static_cast<ErrorCode>(code)
                                                                            : ERROR_CODE_BACKEND,
                  message);
    }
    manifest_sha256_ = ready["manifest_sha256"].get<std::string>();
    rss_increase_bytes_ = ready["rss_increase_bytes"].get<uint64_t>();
    paired_ = ready["paired"].get<bool>();
    paired_rss_bytes_ = ready["paired_rss_bytes"].get<uint64_t>();
    if (ready.contains("paired_problem") && ready["paired_problem"].is_string()) {
      paired_problem_ = ready["paired_problem"].get<std::string>().substr(0, SHADOW_MAX_MESSAGE);
    }
    if (manifest_sha256_ != sha256_string(manifest_text)) {
      child_end();
      dead_ = "the candidate's manifest.json changed while the shadow child loaded it";
      throw Error(ERROR_CODE_INTEGRITY, dead_ + "; start the shadow again", "manifest.json");
    }
  } catch (...) {
    child_end();  // idempotent: a refusal or a death has ended the child already
    throw;
  }
}

ShadowChild::~ShadowChild() { child_end(); }

void ShadowChild::child_end() {
  const pid_t pid = pid_.load();
  if (pid > 0) {
    const double cpu = child_cpu_seconds(pid);
    if (cpu >= 0) last_cpu_seconds_ = cpu;
    pid_ = 0;
    if (fd_ >= 0) ::shutdown(fd_, SHUT_WR);  // the child's stdin ends: it exits
    child_reap_within(pid, SHADOW_EXIT_WAIT_S);
  }
  stderr_stop_ = true;
  if (stderr_thread_.joinable()) stderr_thread_.join();
  if (fd_ >= 0) ::close(fd_);
  if (stderr_fd_ >= 0) ::close(stderr_fd_);
  fd_ = -1;
  stderr_fd_ = -1;
}

void ShadowChild::child_fail(const std::string& doing, const std::string& why) {
  const pid_t pid = pid_.load();
  std::string message;
  if (!why.empty()) {
    const double cpu = pid > 0 ? child_cpu_seconds(pid) : -1.0;
    if (cpu >= 0) last_cpu_seconds_ = cpu;
    pid_ = 0;
    child_kill_reap(pid);
    message = "the candidate " + why;
  } else {
    // It closed its end: it is exiting or dead. Reap it (killing it if it lingers) and say how it ended.
    const double cpu = pid > 0 ? child_cpu_seconds(pid) : -1.0;
    if (cpu >= 0) last_cpu_seconds_ = cpu;
    pid_ = 0;
    const int status = child_reap_within(pid, SHADOW_EXIT_WAIT_S);
    const std::string signal = child_signal_name(status);
    message = signal.empty() ? "the candidate's process ended (" + child_status_describe(status) + ") " + doing
                             : "the candidate crashed (" + signal + ") " + doing;
  }
  child_end();
  dead_ = message;
  throw ShadowChildDied(message);
}

ShadowRunResult ShadowChild::shadow_run(const std::vector<Tensor>& inputs) {
  if (!dead_.empty()) throw ShadowChildDied(dead_);
  // Checked here first, so a wrong input is the caller's error and never reaches the child.
  if (inputs.size() != manifest_.inputs.size()) {
    throw Error(ERROR_CODE_INPUT, "the candidate takes " + std::to_string(manifest_.inputs.size()) + " inputs, got " +
                                      std::to_string(inputs.size()));
  }
  for (size_t i = 0; i < inputs.size(); ++i) {
    const ManifestTensor& spec = manifest_.inputs[i];
    if (dtype_name(inputs[i].dtype()) != spec.dtype || inputs[i].shape() != spec.shape) {
      throw Error(ERROR_CODE_INPUT, "the candidate's input '" + spec.name + "' is " + spec.dtype + " " +
                                        shape_format(spec.shape) + ", got " + dtype_name(inputs[i].dtype()) + " " +
                                        shape_format(inputs[i].shape()));
    }
  }
  ShadowRunResult result;
  std::string error;
  uint8_t error_code = 0;
  try {
    FrameStream stream(fd_, fd_, deadline_after(options_.run_timeout_s));
    std::string header;
    frame_header_write(header, FRAME_KIND_RUN, static_cast<uint32_t>(inputs.size()));
    stream.write_all(header.data(), header.size());
    for (const Tensor& t : inputs) tensor_write(stream, t);
    uint8_t answer[8];
    stream.read_all(answer, sizeof(answer));
    const uint32_t count = static_cast<uint32_t>(get_le(answer + 4, 4));
    if (answer[0] != SHADOW_PROTOCOL_VERSION) {
      throw ProtocolError{"protocol version " + std::to_string(answer[0])};
    }
    if (answer[1] == FRAME_KIND_ERROR) {
      if (count > SHADOW_MAX_MESSAGE) throw ProtocolError{"an error message of " + std::to_string(count) + " bytes"};
      error.resize(count);
      stream.read_all(error.data(), count);
      error_code = answer[2];
    } else if (answer[1] == FRAME_KIND_OUTPUTS) {
      uint8_t latency[16];
      stream.read_all(latency, sizeof(latency));
      uint64_t bits = get_le(latency, 8);
      std::memcpy(&result.latency_us, &bits, sizeof(bits));
      if (!std::isfinite(result.latency_us) || result.latency_us < 0) throw ProtocolError{"a latency that is not a time"};
      bits = get_le(latency + 8, 8);
      std::memcpy(&result.paired_serving_us, &bits, sizeof(bits));
      if (!std::isfinite(result.paired_serving_us)) throw ProtocolError{"a paired latency that is not a time"};
      if (!paired_ || result.paired_serving_us < 0) result.paired_serving_us = -1;
      result.outputs = tensors_read(stream, count, manifest_.outputs, "output");
    } else {
      throw ProtocolError{"frame kind " + std::to_string(answer[1])};
    }
  } catch (const TimedOut&) {
    child_fail("", "did not answer within " + seconds_text(options_.run_timeout_s) + " s and was killed");
  } catch (const PeerClosed&) {
    child_fail("while running a sample", "");
  } catch (const ProtocolError& e) {
    child_fail("", "broke the shadow protocol (" + e.message + ") and was killed");
  }
  if (!error.empty() || error_code != 0) {
    const ErrorCode code = error_code >= ERROR_CODE_IO && error_code <= ERROR_CODE_UNSUPPORTED
                               ? static_cast<ErrorCode>(error_code)
                               : ERROR_CODE_BACKEND;
    throw Error(code, "the candidate failed on the sample: " + error);
  }
  return result;
}

std::string ShadowChild::shadow_manifest_sha256() const { return manifest_sha256_; }

uint64_t ShadowChild::shadow_rss_increase_bytes() const { return rss_increase_bytes_; }

double ShadowChild::shadow_cpu_seconds() const {
  const pid_t pid = pid_.load();
  if (pid > 0) {
    const double cpu = child_cpu_seconds(pid);
    if (cpu >= 0) last_cpu_seconds_ = cpu;
  }
  return last_cpu_seconds_.load();
}

pid_t ShadowChild::shadow_pid() const { return pid_.load(); }

// --- the child ------------------------------------------------------------------------------------

int shadow_child_main(int argc, char** argv) {
  // argv: DIR [--threads N] [--nice N] [--paired SERVING_DIR] [--key-hex HEX]... [--backend-path DIR]...
  if (argc < 1) {
    std::cerr << "usage: edgesmith-agent --shadow-child DIR --threads N --key-hex HEX... [--backend-path DIR]...\n";
    return 2;
  }
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);  // a SIGKILLed agent takes its shadow with it
  // Paired timing runs two engines back to back in this process. TVM's thread pool spins for a
  // while after each call (300,000 rounds by default) and, on a busy device where this child only
  // gets idle CPU, slowed the serving run that followed it several-fold, so TVM measured faster than
  // serving. Here its workers sleep at once instead: the candidate's own figure may be a little
  // pessimistic, the serving figure paired with it is no longer polluted. A value set by the
  // operator is kept.
  ::setenv("TVM_THREAD_POOL_SPIN_COUNT", "0", 0);
  // The protocol keeps the real stdout; anything else that writes to fd 1 (an engine's chatter)
  // goes to stderr, where the agent prefixes it.
  const int out_fd = ::dup(STDOUT_FILENO);
  if (out_fd < 0 || ::dup2(STDERR_FILENO, STDOUT_FILENO) < 0) {
    std::cerr << "cannot set up the shadow protocol's stdout (" << std::strerror(errno) << ")\n";
    return 1;
  }
  FrameStream stream(STDIN_FILENO, out_fd, std::nullopt);
  const auto ready_write = [&](const nlohmann::json& line) {
    const std::string text = line.dump() + "\n";
    stream.write_all(text.data(), text.size());
  };
  const std::string dir = argv[0];
  std::unique_ptr<Session> session;
  std::unique_ptr<Session> paired;  // the serving artifact, for paired timing
  try {
    std::string paired_dir;
    std::vector<std::vector<uint8_t>> keys;
    std::vector<std::string> backend_path;
    SessionOptions session_options;
    int nice = 10;
    for (int i = 1; i < argc; i += 2) {
      const std::string flag = argv[i];
      if (i + 1 >= argc) throw Error(ERROR_CODE_INVALID_ARGUMENT, flag + " needs a value");
      const std::string value = argv[i + 1];
      if (flag == "--key-hex") {
        keys.push_back(child_key_from_hex(value));
      } else if (flag == "--backend-path") {
        backend_path.push_back(value);
      } else if (flag == "--threads") {
        session_options.threads = static_cast<int32_t>(std::stol(value));
      } else if (flag == "--paired") {
        paired_dir = value;
      } else if (flag == "--nice") {
        nice = static_cast<int>(std::stol(value));
      } else {
        throw Error(ERROR_CODE_INVALID_ARGUMENT, "unknown argument " + flag);
      }
    }
    // Before loading: the engine's threads inherit the lower priority.
    if (::setpriority(PRIO_PROCESS, 0, nice) != 0) {
      std::cerr << "cannot lower the shadow's priority to nice " << nice << " (" << std::strerror(errno) << ")\n";
    }
    // And SCHED_IDLE: the candidate gets a core only when serving (and everything else) leaves it
    // idle, so a shadow run coinciding with a served request does not share the CPU with it.
    const sched_param idle{};
    if (::sched_setscheduler(0, SCHED_IDLE, &idle) != 0) {
      std::cerr << "cannot run the shadow at SCHED_IDLE (" << std::strerror(errno) << "); it runs at nice " << nice << "\n";
    }
    plugin_search_configure(PluginSearchPolicy{false, backend_path});
    const uint64_t rss_before = child_rss_bytes();
    session = session_open(dir, keys, session_options);
    const uint64_t rss_candidate = child_rss_bytes();
    // The serving artifact, opened as the agent opens it (its manifest's threads), so its run
    // time here is the serving model's under the candidate's scheduling. A serving model this
    // child cannot open costs the shadow only its paired figures (the agent says why).
    std::string paired_problem;
    if (!paired_dir.empty()) {
      try {
        // The agent checked that the candidate can shadow the serving model; a serving artifact
        // that changed since fails its runs here, which costs only the paired figures.
        paired = session_open(paired_dir, keys);
      } catch (const std::exception& e) {
        paired.reset();
        paired_problem = e.what();
      }
    }
    const uint64_t rss_after = std::max(child_rss_bytes(), rss_candidate);
    nlohmann::json ready = {{"ready", true},
                            {"manifest_sha256", sha256_string(session->session_manifest_json())},
                            {"rss_increase_bytes", rss_after > rss_before ? rss_after - rss_before : 0},
                            {"paired", paired != nullptr},
                            {"paired_rss_bytes", paired ? rss_after - rss_candidate : 0}};
    if (!paired_problem.empty()) ready["paired_problem"] = paired_problem.substr(0, SHADOW_MAX_MESSAGE);
    ready_write(ready);
  } catch (const Error& e) {
    ready_write({{"ready", false}, {"code", static_cast<int>(e.code())}, {"message", e.what()}});
    return 0;
  } catch (const std::exception& e) {
    ready_write({{"ready", false}, {"code", static_cast<int>(ERROR_CODE_BACKEND)}, {"message", e.what()}});
    return 0;
  }
  const std::vector<ManifestTensor>& specs = session->session_manifest().inputs;
  uint64_t runs = 0;  // its parity picks which side of a pair runs first
  while (true) {
    try {
      uint8_t header[8];
      try {
        stream.read_all(header, sizeof(header));
      } catch (const PeerClosed&) {
        return 0;  // the agent closed our stdin: the shadow is over
      }
      if (header[0] != SHADOW_PROTOCOL_VERSION || header[1] != FRAME_KIND_RUN) {
        throw ProtocolError{"a frame of version " + std::to_string(header[0]) + ", kind " + std::to_string(header[1])};
      }
      const std::vector<Tensor> inputs = tensors_read(stream, static_cast<uint32_t>(get_le(header + 4, 4)), specs, "input");
      std::vector<TensorView> views;
      for (const Tensor& t : inputs) views.push_back(t.view());
      std::string frame;
      try {
        // Paired timing: the candidate and the serving model on the same sample, back to back
        // under the same scheduling, in alternating order (whichever runs second finds the
        // input in the caches and the cores awake, so neither side always gets that).
        double paired_us = -1;
        const auto paired_run = [&] {
          try {
            const auto start = Clock::now();
            paired->session_run(views);
            paired_us = std::chrono::duration<double, std::micro>(Clock::now() - start).count();
          } catch (const Error&) {
            paired_us = -1;  // the serving model's failure is not the candidate's
          }
        };
        const bool serving_first = paired && (runs++ % 2 == 1);
        // Between the two runs of a pair, a pause: an engine's thread pool spins for a while after
        // a run (TVM's, XNNPACK's), and in the same process it would take the cores from the other
        // side's run (measured: the serving model timed 2-3x slower right after TVM than after itself).
        const auto settle = [](double took_us) {
          std::this_thread::sleep_for(std::chrono::microseconds(static_cast<int64_t>(std::max(5000.0, took_us))));
        };
        if (serving_first) {
          paired_run();
          settle(paired_us);
        }
        const auto start = Clock::now();
        const std::vector<Tensor> outputs = session->session_run(views);
        const double latency_us = std::chrono::duration<double, std::micro>(Clock::now() - start).count();
        if (paired && !serving_first) {
          settle(latency_us);
          paired_run();
        }
        frame_header_write(frame, FRAME_KIND_OUTPUTS, static_cast<uint32_t>(outputs.size()));
        uint64_t bits = 0;
        std::memcpy(&bits, &latency_us, sizeof(bits));
        put_u64(frame, bits);
        std::memcpy(&bits, &paired_us, sizeof(bits));
        put_u64(frame, bits);
        stream.write_all(frame.data(), frame.size());
        for (const Tensor& t : outputs) tensor_write(stream, t);
      } catch (const Error& e) {
        std::string message = e.what();
        if (message.size() > SHADOW_MAX_MESSAGE) message.resize(SHADOW_MAX_MESSAGE);
        if (message.empty()) message = "the candidate failed";
        frame_header_write(frame, FRAME_KIND_ERROR, static_cast<uint32_t>(message.size()));
        frame[2] = static_cast<char>(e.code());
        frame += message;
        stream.write_all(frame.data(), frame.size());
      }
    } catch (const ProtocolError& e) {
      std::cerr << "the agent broke the shadow protocol (" << e.message << "); exiting\n";
      return 3;
    } catch (const PeerClosed&) {
      return 0;
    }
  }
}

}  // namespace edgesmith
