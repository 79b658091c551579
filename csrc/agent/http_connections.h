// The connections of the agent's HTTP API, guarded against slow and idle clients (docs/telemetry.md,
// "Slow and idle clients").
//
// cpp-httplib 0.11 (Debian's libcpp-httplib-dev, the library the agent links on amd64 and arm64)
// serves each connection on a fixed thread pool with a per-read timeout only: a client that sends
// one header line every few seconds, or keeps an idle keep-alive connection, holds a pool thread
// for as long as it likes, and a few of them starve every other client. httplib lets a subclass
// replace how one accepted connection is served (the virtual process_and_close_socket) and which
// pool serves it (new_task_queue), while its parser and routing stay as they are; so this server:
//   - admits at most `max_connections` connections, `max_connections_per_peer` from one address;
//     one beyond that is answered 503 and closed as soon as it is accepted;
//   - gives its pool `max_connections` + a few threads, so every admitted connection has its own
//     thread and the spare ones refuse the excess at once (nothing waits in httplib's queue);
//   - reads each request's header section through its own stream, which cuts the connection off
//     (408) when the headers are not complete `header_timeout_s` after the request began, or
//     (431) when they exceed HTTP_HEADER_MAX_BYTES: a slow drip, an endless header line and
//     endless header lines all end there;
//   - closes a keep-alive connection idle for `idle_timeout_s` between requests.
// A whole-header deadline needs no watchdog thread: each read waits at most until the deadline.
#pragma once

#include <httplib.h>

#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <string>

#include "agent/http_api.h"

namespace edgesmith {

/// An httplib::Server that serves connections within HttpConnectionLimits. `on_refused` is told the
/// reason of every connection it cuts off: too_many_connections, header_timeout, header_too_large.
class GuardedServer : public httplib::Server {
 public:
  GuardedServer(HttpConnectionLimits limits, std::function<void(const std::string&)> on_refused);

  /// Connections served right now (the admitted ones).
  uint32_t connections_open() const;

 private:
  bool process_and_close_socket(socket_t sock) override;
  bool admit(const std::string& peer);
  void release(const std::string& peer);
  bool stopping() const { return svr_sock_ == INVALID_SOCKET; }

  HttpConnectionLimits limits_;
  std::function<void(const std::string&)> on_refused_;
  mutable std::mutex mutex_;
  uint32_t open_ = 0;
  std::map<std::string, uint32_t> open_by_peer_;
};

}  // namespace edgesmith
