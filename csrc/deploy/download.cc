#include "deploy/download.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <httplib.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <thread>

#include "common/error.h"

namespace edgesmith {

namespace {

using Clock = std::chrono::steady_clock;

uint64_t file_size(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 ? static_cast<uint64_t>(st.st_size) : 0;
}

// Why one attempt stopped without the whole file.
struct Attempt {
  bool permanent = false;
  std::string error;
};

}  // namespace

void download_url_split(const std::string& url, std::string* origin, std::string* path, const std::string& what) {
  std::string scheme;
  for (const char* candidate : {"https://", "http://"}) {
    if (url.rfind(candidate, 0) == 0) scheme = candidate;
  }
  if (scheme.empty()) {
    throw Error(ERROR_CODE_INVALID_ARGUMENT, what + " " + url + " is not an http:// or https:// URL");
  }
  const size_t slash = url.find('/', scheme.size());
  const std::string authority = url.substr(scheme.size(), slash == std::string::npos ? std::string::npos : slash - scheme.size());
  if (authority.empty() || authority.find('@') != std::string::npos) {
    throw Error(ERROR_CODE_INVALID_ARGUMENT, what + " " + url + " has no host");
  }
  *origin = scheme + authority;
  *path = slash == std::string::npos ? "/" : url.substr(slash);
}

void download_file(const DownloadOptions& o) {
  if (o.expected_size > o.max_bytes) {
    throw Error(ERROR_CODE_INTEGRITY, "the artifact archive is " + std::to_string(o.expected_size) +
                                          " bytes, over this device's deploy_max_bytes (" + std::to_string(o.max_bytes) + ")");
  }
  std::string origin;
  std::string path;
  download_url_split(o.url, &origin, &path);
  const auto log = [&](const std::string& line) {
    if (o.log) o.log(line);
  };
  const auto cancelled = [&] { return o.cancelled && o.cancelled(); };
  const auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(o.timeout_s));
  double backoff = o.backoff_min_s;
  std::string last_error = "no attempt was made";
  while (true) {
    if (cancelled()) throw Error(ERROR_CODE_IO, "the download was interrupted");
    uint64_t have = file_size(o.part_path);
    if (have > o.expected_size) {  // not this archive's prefix: start over
      ::unlink(o.part_path.c_str());
      have = 0;
    }
    if (have == o.expected_size && have > 0) return;
    Attempt attempt;
    {
      const int fd = ::open(o.part_path.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
      if (fd < 0) throw Error(ERROR_CODE_IO, "cannot write " + o.part_path + " (" + std::strerror(errno) + ")");
      uint64_t offset = have;
      if (::ftruncate(fd, static_cast<off_t>(offset)) != 0 || ::lseek(fd, static_cast<off_t>(offset), SEEK_SET) < 0) {
        ::close(fd);
        throw Error(ERROR_CODE_IO, "cannot write " + o.part_path + " (" + std::strerror(errno) + ")");
      }
      // https://: the server's certificate is verified (chain and host name) against the CA file
      // of the broker credentials when they name one, else the system's CAs; with mutual TLS the
      // device's own certificate is offered too.
      httplib::Client client = o.tls_certfile.empty() ? httplib::Client(origin)
                                                      : httplib::Client(origin, o.tls_certfile, o.tls_keyfile);
      if (!o.tls_cafile.empty()) client.set_ca_cert_path(o.tls_cafile);
      client.enable_server_certificate_verification(true);
      const auto io = std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::duration<double>(o.io_timeout_s));
      client.set_connection_timeout(std::chrono::duration_cast<std::chrono::seconds>(io).count(), io.count() % 1000000);
      client.set_read_timeout(std::chrono::duration_cast<std::chrono::seconds>(io).count(), io.count() % 1000000);
      client.set_follow_location(false);
      client.set_keep_alive(false);
      httplib::Headers headers;
      if (offset > 0) headers.emplace("Range", "bytes=" + std::to_string(offset) + "-");
      bool write_failed = false;
      const httplib::Result result = client.Get(
          path, headers,
          [&](const httplib::Response& response) {
            if (response.status == 416) {  // our part is not a prefix the server knows: restart
              attempt.error = "the server could not resume at byte " + std::to_string(offset);
              offset = 0;
              if (::ftruncate(fd, 0) != 0) write_failed = true;
              return false;
            }
            if (response.status != 200 && response.status != 206) {
              attempt.error = "the server answered HTTP " + std::to_string(response.status);
              attempt.permanent = response.status >= 400 && response.status < 500 && response.status != 408 &&
                                  response.status != 429 && response.status != 404;
              return false;
            }
            if (response.status == 200 && offset > 0) {  // no resume: the whole file again
              offset = 0;
              if (::ftruncate(fd, 0) != 0 || ::lseek(fd, 0, SEEK_SET) < 0) write_failed = true;
            }
            if (response.status == 206) {
              const std::string range = response.get_header_value("Content-Range");
              if (range.rfind("bytes " + std::to_string(offset) + "-", 0) != 0) {
                attempt.error = "the server resumed at the wrong place (" + range + ")";
                offset = 0;
                if (::ftruncate(fd, 0) != 0) write_failed = true;
                return false;
              }
            }
            if (response.has_header("Content-Length")) {
              const uint64_t length = std::strtoull(response.get_header_value("Content-Length").c_str(), nullptr, 10);
              if (offset + length > o.max_bytes) {
                attempt.permanent = true;
                attempt.error = "the artifact archive is " + std::to_string(offset + length) +
                                " bytes, over this device's deploy_max_bytes (" + std::to_string(o.max_bytes) + ")";
                return false;
              }
              if (offset + length != o.expected_size) {
                attempt.permanent = true;
                attempt.error = "the server's archive is " + std::to_string(offset + length) +
                                " bytes, not the " + std::to_string(o.expected_size) + " the desired state names";
                return false;
              }
            }
            return !write_failed;
          },
          [&](const char* data, size_t length) {
            if (cancelled()) return false;
            if (Clock::now() >= deadline) {  // a trickling server: bytes in time for the read time-out, never done
              attempt.error = "the transfer was still running at deploy_timeout_s";
              return false;
            }
            if (offset + length > o.max_bytes || offset + length > o.expected_size) {
              attempt.permanent = true;
              attempt.error = "the server sent more than the " + std::to_string(std::min(o.expected_size, o.max_bytes)) +
                              " bytes expected";
              return false;
            }
            size_t done = 0;
            while (done < length) {
              const ssize_t w = ::write(fd, data + done, length - done);
              if (w < 0 && errno == EINTR) continue;
              if (w < 0) {
                write_failed = true;
                return false;
              }
              done += static_cast<size_t>(w);
            }
            offset += length;
            return true;
          });
      ::fsync(fd);
      ::close(fd);
      if (write_failed) throw Error(ERROR_CODE_IO, "cannot write " + o.part_path + " (" + std::strerror(errno) + ")");
      if (attempt.permanent) {
        ::unlink(o.part_path.c_str());
        throw Error(ERROR_CODE_INTEGRITY, attempt.error);
      }
      if (attempt.error.empty() && !result &&
          (result.error() == httplib::Error::SSLServerVerification || result.error() == httplib::Error::SSLLoadingCerts)) {
        // The server's certificate does not verify (or the CA file cannot be read): trying again
        // cannot change that, so the deployment fails now instead of at deploy_timeout_s.
        const std::string cas = o.tls_cafile.empty() ? "the system's CAs" : "the CA file " + o.tls_cafile;
        ::unlink(o.part_path.c_str());
        throw Error(ERROR_CODE_INTEGRITY,
                    result.error() == httplib::Error::SSLLoadingCerts
                        ? "cannot load " + cas + " to verify " + origin + "; fix the device's credentials (cafile)"
                        : "the certificate of " + origin + " does not verify against " + cas +
                              " (or does not name that host); serve the archive with a certificate that CA issued, "
                              "or give the device the CA that issued it");
      }
      if (attempt.error.empty()) {
        if (!result) {
          attempt.error = "the download from " + origin + " failed (" + httplib::to_string(result.error()) + ")";
        } else if (file_size(o.part_path) != o.expected_size) {
          attempt.error = "the download stopped at byte " + std::to_string(file_size(o.part_path));
        }
      }
    }
    if (file_size(o.part_path) == o.expected_size) return;
    if (file_size(o.part_path) > have) backoff = o.backoff_min_s;  // progress: the next failure starts over
    last_error = attempt.error;
    if (cancelled()) throw Error(ERROR_CODE_IO, "the download was interrupted");
    const auto now = Clock::now();
    if (now >= deadline) {
      throw Error(ERROR_CODE_IO, "the artifact could not be downloaded within deploy_timeout_s (" +
                                     std::to_string(static_cast<int64_t>(o.timeout_s)) + " s); last: " + last_error);
    }
    char delay[32];
    std::snprintf(delay, sizeof(delay), "%.1f", backoff);
    log(last_error + "; retrying in " + delay + " s");
    const auto wake = std::min(deadline, now + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(backoff)));
    while (Clock::now() < wake && !cancelled()) std::this_thread::sleep_for(std::chrono::milliseconds(50));
    backoff = std::min(backoff * 2.0, o.backoff_max_s);
  }
}

}  // namespace edgesmith
