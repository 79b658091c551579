// The agent's child processes (the agent binary again: `--deploy-check`, `--shadow-child`): how
// they are spawned, killed, reaped and described, shared by ChildProcessVerifier and ShadowChild.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string>
#include <vector>

namespace edgesmith {

/// Which of the child's standard streams get a pipe back to the parent.
struct ChildSpawnOptions {
  bool stdio_socket = false;  ///< stdin and stdout are one end of a socketpair (the parent keeps the other)
  bool stdout_pipe = false;   ///< stdout is a pipe to the parent (when stdio_socket is false)
  bool stderr_pipe = false;   ///< stderr is a pipe to the parent (else inherited)
};

/// A spawned child: its pid and the parent's ends (-1 when not asked for); all close-on-exec.
struct ChildSpawned {
  pid_t pid = 0;
  int stdio_fd = -1;   ///< stdio_socket: the parent's end
  int stdout_fd = -1;  ///< stdout_pipe: the read end
  int stderr_fd = -1;  ///< stderr_pipe: the read end
};

/// posix_spawn `args` (args[0] is the executable) with no signal blocked (the agent blocks
/// SIGTERM/SIGINT in every thread). Throws Error(ERROR_CODE_IO) naming `what` ("to check the
/// artifact") when it cannot.
ChildSpawned child_spawn(const std::vector<std::string>& args, const ChildSpawnOptions& options,
                         const std::string& what);

/// SIGKILL `pid` (when > 0) and reap it; returns its wait status.
int child_kill_reap(pid_t pid);

/// Reap `pid`, waiting at most `timeout_s`, then SIGKILL and reap; returns its wait status.
int child_reap_within(pid_t pid, double timeout_s);

/// "signal 11 SIGSEGV" / "exit status 3" for a wait status.
std::string child_status_describe(int status);

/// "SIGSEGV" (or "signal 11" for a signal with no name) when the status is a death by signal, else "".
std::string child_signal_name(int status);

/// `--key-hex` argument text of a raw key, and back (throws Error(ERROR_CODE_INVALID_ARGUMENT)).
std::string child_key_hex(const std::vector<uint8_t>& key);
std::vector<uint8_t> child_key_from_hex(const std::string& text);

/// The resident set size of process `pid` in bytes (0 when it cannot be read); 0 means this process.
uint64_t child_rss_bytes(pid_t pid = 0);

/// utime + stime of process `pid` in seconds (-1 when it cannot be read); 0 means this process.
double child_cpu_seconds(pid_t pid = 0);

}  // namespace edgesmith
