// Downloading an artifact archive (docs/deployment.md §4 step 2): HTTP(S) GET into a .part file,
// resumed with `Range: bytes=N-` after a failure, retried with exponential back-off until a time
// limit, never more than a byte limit.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

namespace edgesmith {

/// What to download and how hard to try.
struct DownloadOptions {
  std::string url;         ///< http:// or https://HOST[:PORT]/PATH
  std::string part_path;   ///< where the bytes go; an existing file is resumed
  uint64_t expected_size = 0;  ///< the archive's size from the desired state
  uint64_t max_bytes = 512ull << 20;  ///< refuse anything larger (Content-Length, then while writing)
  double timeout_s = 600.0;           ///< give up after this long in total
  double backoff_min_s = 1.0;         ///< first retry delay, doubling up to backoff_max_s
  double backoff_max_s = 30.0;
  double io_timeout_s = 10.0;         ///< connect and read time-outs of one attempt
  std::function<bool()> cancelled;    ///< polled; true stops the download (Error, ERROR_CODE_IO)
  std::function<void(const std::string&)> log;  ///< one line per failed attempt
  std::string tls_cafile;    ///< https: CA file the server is verified with; empty: the system's CAs
  std::string tls_certfile;  ///< https: client certificate offered (mutual TLS); empty: none
  std::string tls_keyfile;   ///< its private key
};

/// Split http(s)://HOST[:PORT]/PATH into "http(s)://HOST:PORT" and "/PATH"; throws
/// Error(ERROR_CODE_INVALID_ARGUMENT) for anything else.
void download_url_split(const std::string& url, std::string* origin, std::string* path,
                        const std::string& what = "the artifact url");

/// Download until the .part file holds `expected_size` bytes. Throws Error: ERROR_CODE_INTEGRITY
/// when the archive is larger than max_bytes or than announced, or an https server's certificate
/// does not verify (none of these is retried), ERROR_CODE_IO when
/// the time limit passes or the download is cancelled (the .part file is kept for a resume).
void download_file(const DownloadOptions& options);

}  // namespace edgesmith
