#include "agent/child_process.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <fstream>
#include <iterator>
#include <sstream>
#include <thread>

#include "common/error.h"

extern char** environ;

namespace edgesmith {

namespace {

void close_fd(int& fd) {
  if (fd >= 0) ::close(fd);
  fd = -1;
}

// A pipe whose ends are close-on-exec (the child gets its end through dup2 only).
void pipe_make(int fds[2], const std::string& what) {
  if (::pipe2(fds, O_CLOEXEC) != 0) {
    throw Error(ERROR_CODE_IO, "cannot create a pipe " + what + " (" + std::strerror(errno) + ")");
  }
}

std::string proc_path(pid_t pid, const char* file) {
  return pid > 0 ? "/proc/" + std::to_string(pid) + "/" + file : std::string("/proc/self/") + file;
}

}  // namespace

ChildSpawned child_spawn(const std::vector<std::string>& args, const ChildSpawnOptions& options,
                         const std::string& what) {
  int stdio[2] = {-1, -1};
  int out[2] = {-1, -1};
  int err[2] = {-1, -1};
  const auto close_all = [&] {
    for (int* fd : {&stdio[0], &stdio[1], &out[0], &out[1], &err[0], &err[1]}) close_fd(*fd);
  };
  try {
    if (options.stdio_socket && ::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, stdio) != 0) {
      throw Error(ERROR_CODE_IO, "cannot create a socket " + what + " (" + std::strerror(errno) + ")");
    }
    if (!options.stdio_socket && options.stdout_pipe) pipe_make(out, what);
    if (options.stderr_pipe) pipe_make(err, what);
  } catch (...) {
    close_all();
    throw;
  }
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  if (options.stdio_socket) {
    posix_spawn_file_actions_adddup2(&actions, stdio[1], STDIN_FILENO);
    posix_spawn_file_actions_adddup2(&actions, stdio[1], STDOUT_FILENO);
  } else if (options.stdout_pipe) {
    posix_spawn_file_actions_adddup2(&actions, out[1], STDOUT_FILENO);
  }
  if (options.stderr_pipe) posix_spawn_file_actions_adddup2(&actions, err[1], STDERR_FILENO);
  // The child starts with no signal blocked (the agent blocks SIGTERM/SIGINT in every thread).
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  sigset_t none;
  sigemptyset(&none);
  posix_spawnattr_setsigmask(&attr, &none);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK);
  std::vector<std::string> owned = args;
  std::vector<char*> argv;
  for (std::string& a : owned) argv.push_back(a.data());
  argv.push_back(nullptr);
  ChildSpawned spawned;
  const int rc = ::posix_spawn(&spawned.pid, owned.at(0).c_str(), &actions, &attr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  posix_spawnattr_destroy(&attr);
  close_fd(stdio[1]);
  close_fd(out[1]);
  close_fd(err[1]);
  if (rc != 0) {
    close_all();
    throw Error(ERROR_CODE_IO, "cannot start " + owned[0] + " " + what + " (" + std::strerror(rc) + ")");
  }
  spawned.stdio_fd = stdio[0];
  spawned.stdout_fd = out[0];
  spawned.stderr_fd = err[0];
  return spawned;
}

int child_kill_reap(pid_t pid) {
  int status = 0;
  if (pid <= 0) return status;
  ::kill(pid, SIGKILL);
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  return status;
}

int child_reap_within(pid_t pid, double timeout_s) {
  int status = 0;
  if (pid <= 0) return status;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  while (true) {
    const pid_t done = ::waitpid(pid, &status, WNOHANG);
    if (done == pid) return status;
    if (done < 0 && errno != EINTR) return status;
    if (std::chrono::steady_clock::now() >= deadline) return child_kill_reap(pid);
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

std::string child_signal_name(int status) {
  if (!WIFSIGNALED(status)) return "";
  const int sig = WTERMSIG(status);
  const char* name = ::sigabbrev_np(sig);
  return name != nullptr ? std::string("SIG") + name : "signal " + std::to_string(sig);
}

std::string child_status_describe(int status) {
  if (WIFSIGNALED(status)) {
    const int sig = WTERMSIG(status);
    const char* name = ::sigabbrev_np(sig);
    return "signal " + std::to_string(sig) + (name != nullptr ? std::string(" SIG") + name : std::string());
  }
  return "exit status " + std::to_string(WIFEXITED(status) ? WEXITSTATUS(status) : -1);
}

std::string child_key_hex(const std::vector<uint8_t>& key) {
  static const char* digits = "0123456789abcdef";
  std::string out;
  for (const uint8_t b : key) {
    out += digits[b >> 4];
    out += digits[b & 15];
  }
  return out;
}

std::vector<uint8_t> child_key_from_hex(const std::string& text) {
  if (text.size() % 2 != 0) throw Error(ERROR_CODE_INVALID_ARGUMENT, "a --key-hex value has an odd length");
  std::vector<uint8_t> out(text.size() / 2);
  const auto nibble = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    throw Error(ERROR_CODE_INVALID_ARGUMENT, "a --key-hex value is not lower-case hex");
  };
  for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<uint8_t>(nibble(text[2 * i]) * 16 + nibble(text[2 * i + 1]));
  return out;
}

uint64_t child_rss_bytes(pid_t pid) {
  std::ifstream statm(proc_path(pid, "statm"));
  uint64_t size_pages = 0;
  uint64_t resident_pages = 0;
  const long page = ::sysconf(_SC_PAGESIZE);
  if (!(statm >> size_pages >> resident_pages) || page <= 0) return 0;
  return resident_pages * static_cast<uint64_t>(page);
}

double child_cpu_seconds(pid_t pid) {
  // "pid (comm) state ...": comm may hold spaces, so fields are counted after the last ')';
  // utime and stime are fields 14 and 15.
  std::ifstream stat(proc_path(pid, "stat"));
  const std::string text((std::istreambuf_iterator<char>(stat)), std::istreambuf_iterator<char>());
  const size_t close = text.rfind(')');
  const long ticks = ::sysconf(_SC_CLK_TCK);
  if (close == std::string::npos || ticks <= 0) return -1.0;
  std::istringstream fields(text.substr(close + 1));
  std::string field;
  uint64_t utime = 0;
  for (int index = 3; fields >> field; ++index) {
    if (index == 14) utime = std::strtoull(field.c_str(), nullptr, 10);
    if (index == 15) {
      return static_cast<double>(utime + std::strtoull(field.c_str(), nullptr, 10)) / static_cast<double>(ticks);
    }
  }
  return -1.0;
}

}  // namespace edgesmith
