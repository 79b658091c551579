#include "agent/http_connections.h"

#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <utility>

namespace edgesmith {

namespace {

using Clock = std::chrono::steady_clock;

// Waits are cut in slices this long so that stop() is seen promptly.
constexpr int POLL_SLICE_MS = 200;
// Pool threads beyond max_connections: they refuse connections over the limits at once.
constexpr uint32_t SPARE_THREADS = 4;

std::string address_text(const sockaddr_storage& addr, socklen_t length, int* port) {
  char host[NI_MAXHOST] = {0};
  char service[NI_MAXSERV] = {0};
  if (getnameinfo(reinterpret_cast<const sockaddr*>(&addr), length, host, sizeof(host), service, sizeof(service),
                  NI_NUMERICHOST | NI_NUMERICSERV) != 0) {
    *port = 0;
    return "";
  }
  *port = std::atoi(service);
  return host;
}

std::string peer_address(int sock, int* port) {
  sockaddr_storage addr{};
  socklen_t length = sizeof(addr);
  if (getpeername(sock, reinterpret_cast<sockaddr*>(&addr), &length) != 0) {
    *port = 0;
    return "";
  }
  return address_text(addr, length, port);
}

// A last word to a connection being cut off: best effort, never blocks.
void reply_and_forget(int sock, int status, const char* reason, const std::string& error, bool retry) {
  const std::string body = "{\"error\": \"" + error + "\"}";
  const std::string text = "HTTP/1.1 " + std::to_string(status) + " " + reason + "\r\n" +
                           (retry ? "Retry-After: 1\r\n" : "") +
                           "Connection: close\r\nContent-Type: application/json\r\nContent-Length: " +
                           std::to_string(body.size()) + "\r\n\r\n" + body;
  (void)::send(sock, text.data(), text.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
}

// How a request was cut off, if it was.
enum CutReason { CUT_REASON_NONE, CUT_REASON_HEADER_TIMEOUT, CUT_REASON_HEADER_TOO_LARGE };

// The socket as httplib reads and writes it, with a deadline and a byte budget on each request's
// header section (from request_begin() to headers_end(), which httplib's setup_request callback
// marks once it has parsed them).
class GuardedStream : public httplib::Stream {
 public:
  GuardedStream(int sock, double header_timeout_s, time_t read_timeout_s, time_t write_timeout_s,
                std::function<bool()> stopping)
      : sock_(sock),
        header_timeout_(std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(header_timeout_s))),
        read_timeout_(std::chrono::seconds(read_timeout_s)),
        write_timeout_(std::chrono::seconds(write_timeout_s)),
        stopping_(std::move(stopping)) {}

  void request_begin() {
    in_headers_ = true;
    header_bytes_ = 0;
    deadline_ = Clock::now() + header_timeout_;
  }
  void headers_end() { in_headers_ = false; }
  CutReason cut() const { return cut_; }

  /// Waits up to `idle` for the first byte of the next request; false when none came (or stop()).
  bool next_request_wait(Clock::duration idle) { return pos_ < len_ || readable_wait(Clock::now() + idle); }

  bool is_readable() const override {
    return pos_ < len_ || readable_wait(read_deadline());
  }

  bool is_writable() const override { return cut_ == CUT_REASON_NONE && ready_wait(POLLOUT, Clock::now() + write_timeout_); }

  ssize_t read(char* ptr, size_t size) override {
    if (cut_ != CUT_REASON_NONE) return -1;
    if (pos_ == len_) {
      if (!readable_wait(read_deadline())) {
        if (in_headers_ && Clock::now() >= deadline_) cut_ = CUT_REASON_HEADER_TIMEOUT;
        return -1;
      }
      ssize_t n;
      do {
        n = ::recv(sock_, buffer_, sizeof(buffer_), 0);
      } while (n < 0 && errno == EINTR);
      if (n <= 0) return n;
      pos_ = 0;
      len_ = static_cast<size_t>(n);
    }
    size_t n = std::min(size, len_ - pos_);
    if (in_headers_) {
      if (header_bytes_ + n > HTTP_HEADER_MAX_BYTES) {
        cut_ = CUT_REASON_HEADER_TOO_LARGE;
        return -1;
      }
      header_bytes_ += n;
    }
    std::memcpy(ptr, buffer_ + pos_, n);
    pos_ += n;
    return static_cast<ssize_t>(n);
  }

  ssize_t write(const char* ptr, size_t size) override {
    // httplib answers a request it could not read with 400; a cut-off one gets our reply instead.
    if (cut_ != CUT_REASON_NONE || !ready_wait(POLLOUT, Clock::now() + write_timeout_)) return -1;
    ssize_t n;
    do {
      n = ::send(sock_, ptr, size, MSG_NOSIGNAL);
    } while (n < 0 && errno == EINTR);
    return n;
  }

  void get_remote_ip_and_port(std::string& ip, int& port) const override { ip = peer_address(sock_, &port); }

  void get_local_ip_and_port(std::string& ip, int& port) const override {
    sockaddr_storage addr{};
    socklen_t length = sizeof(addr);
    ip = getsockname(sock_, reinterpret_cast<sockaddr*>(&addr), &length) == 0 ? address_text(addr, length, &port) : "";
  }

  socket_t socket() const override { return sock_; }

 private:
  // Reads wait the per-read timeout, and never past the header deadline.
  Clock::time_point read_deadline() const {
    const Clock::time_point by = Clock::now() + read_timeout_;
    return in_headers_ ? std::min(by, deadline_) : by;
  }

  bool readable_wait(Clock::time_point until) const { return ready_wait(POLLIN, until); }

  bool ready_wait(short events, Clock::time_point until) const {
    for (;;) {
      if (stopping_()) return false;
      const Clock::duration remaining = until - Clock::now();
      if (remaining <= Clock::duration::zero()) return false;
      // Rounded up: a wait that ends before `until` would look like a read timeout, not a deadline.
      const auto left = std::chrono::ceil<std::chrono::milliseconds>(remaining).count();
      pollfd fd{sock_, events, 0};
      const int ready = ::poll(&fd, 1, static_cast<int>(std::min<int64_t>(left, POLL_SLICE_MS)));
      if (ready > 0) return true;  // readable, writable, or hung up: the read or write says which
      if (ready < 0 && errno != EINTR) return false;
    }
  }

  int sock_;
  Clock::duration header_timeout_;
  Clock::duration read_timeout_;
  Clock::duration write_timeout_;
  std::function<bool()> stopping_;
  bool in_headers_ = false;
  size_t header_bytes_ = 0;
  Clock::time_point deadline_{};
  CutReason cut_ = CUT_REASON_NONE;
  char buffer_[4096];
  size_t pos_ = 0;
  size_t len_ = 0;
};

}  // namespace

GuardedServer::GuardedServer(HttpConnectionLimits limits, std::function<void(const std::string&)> on_refused)
    : limits_(limits), on_refused_(std::move(on_refused)) {
  if (limits_.max_connections == 0) limits_.max_connections = 1;
  if (limits_.max_connections_per_peer == 0) limits_.max_connections_per_peer = 1;
  const size_t threads = limits_.max_connections + SPARE_THREADS;
  new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
}

uint32_t GuardedServer::connections_open() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return open_;
}

bool GuardedServer::admit(const std::string& peer) {
  std::lock_guard<std::mutex> lock(mutex_);
  uint32_t& from_peer = open_by_peer_[peer];
  if (open_ >= limits_.max_connections || from_peer >= limits_.max_connections_per_peer) {
    if (from_peer == 0) open_by_peer_.erase(peer);
    return false;
  }
  ++open_;
  ++from_peer;
  return true;
}

void GuardedServer::release(const std::string& peer) {
  std::lock_guard<std::mutex> lock(mutex_);
  --open_;
  if (--open_by_peer_[peer] == 0) open_by_peer_.erase(peer);
}

bool GuardedServer::process_and_close_socket(socket_t sock) {
  int port = 0;
  const std::string peer = peer_address(sock, &port);
  bool served = false;
  if (!admit(peer)) {
    if (on_refused_) on_refused_("too_many_connections");
    reply_and_forget(sock, 503, "Service Unavailable",
                     "the agent holds " + std::to_string(limits_.max_connections) + " connections (" +
                         std::to_string(limits_.max_connections_per_peer) + " per client address) already; retry after a second",
                     true);
  } else {
    GuardedStream stream(sock, limits_.header_timeout_s, read_timeout_sec_, write_timeout_sec_,
                         [this] { return stopping(); });
    const auto idle = std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(limits_.idle_timeout_s));
    for (size_t left = keep_alive_max_count_; left > 0 && !stopping(); --left) {
      // The first request's headers are due header_timeout after the accept; a later one's after
      // its first byte, which must come within the idle timeout.
      if (left != keep_alive_max_count_ && !stream.next_request_wait(idle)) break;
      stream.request_begin();
      bool connection_closed = false;
      served = process_request(stream, left == 1, connection_closed,
                               [&stream](httplib::Request&) { stream.headers_end(); });
      if (stream.cut() == CUT_REASON_HEADER_TIMEOUT) {
        if (on_refused_) on_refused_("header_timeout");
        char seconds[32];
        std::snprintf(seconds, sizeof(seconds), "%g", limits_.header_timeout_s);
        reply_and_forget(sock, 408, "Request Timeout",
                         std::string("the request line and headers must arrive within ") + seconds + " s", false);
      } else if (stream.cut() == CUT_REASON_HEADER_TOO_LARGE) {
        if (on_refused_) on_refused_("header_too_large");
        reply_and_forget(sock, 431, "Request Header Fields Too Large",
                         "the request line and headers take more than " + std::to_string(HTTP_HEADER_MAX_BYTES) + " bytes",
                         false);
      }
      if (!served || connection_closed || stream.cut() != CUT_REASON_NONE) break;
    }
    release(peer);
  }
  ::shutdown(sock, SHUT_RDWR);
  ::close(sock);
  return served;
}

}  // namespace edgesmith
