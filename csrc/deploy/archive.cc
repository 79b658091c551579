#include "deploy/archive.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <set>
#include <vector>

#include "common/error.h"

namespace edgesmith {

namespace {

constexpr size_t BLOCK = 512;

[[noreturn]] void refuse(const std::string& why) {
  throw Error(ERROR_CODE_INTEGRITY, "the artifact archive is refused: " + why);
}

class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }
  int release() {
    const int fd = fd_;
    fd_ = -1;
    return fd;
  }

 private:
  int fd_;
};

// Read exactly n bytes; false at a clean end of file before any byte.
bool read_exact(int fd, char* buffer, size_t n, const char* what) {
  size_t got = 0;
  while (got < n) {
    const ssize_t r = ::read(fd, buffer + got, n - got);
    if (r < 0) {
      if (errno == EINTR) continue;
      throw Error(ERROR_CODE_IO, std::string("cannot read the artifact archive (") + std::strerror(errno) + ")");
    }
    if (r == 0) {
      if (got == 0) return false;
      refuse(std::string("it ends in the middle of ") + what);
    }
    got += static_cast<size_t>(r);
  }
  return true;
}

void write_all(int fd, const char* data, size_t n, const std::string& name) {
  size_t done = 0;
  while (done < n) {
    const ssize_t w = ::write(fd, data + done, n - done);
    if (w < 0) {
      if (errno == EINTR) continue;
      throw Error(ERROR_CODE_IO, "cannot write " + name + " while extracting (" + std::strerror(errno) + ")");
    }
    done += static_cast<size_t>(w);
  }
}

std::string field_string(const char* data, size_t size) {
  size_t n = 0;
  while (n < size && data[n] != '\0') ++n;
  return std::string(data, n);
}

uint64_t octal_field(const char* data, size_t size, const std::string& member, const char* what) {
  uint64_t value = 0;
  size_t i = 0;
  while (i < size && data[i] == ' ') ++i;
  size_t digits = 0;
  for (; i < size && data[i] >= '0' && data[i] <= '7'; ++i, ++digits) {
    if (value > (UINT64_MAX >> 3)) refuse("member " + member + " has an out-of-range " + what);
    value = value * 8 + static_cast<uint64_t>(data[i] - '0');
  }
  for (; i < size; ++i) {
    if (data[i] != ' ' && data[i] != '\0') refuse("member " + member + " has a malformed " + what + " field");
  }
  if (digits == 0) refuse("member " + member + " has an empty " + what + " field");
  return value;
}

}  // namespace

void archive_member_name_check(const std::string& name) {
  if (name.empty()) refuse("a member has an empty name");
  if (name.size() > ARCHIVE_MAX_NAME_BYTES) {
    refuse("member " + name.substr(0, 40) + "... has a name over " + std::to_string(ARCHIVE_MAX_NAME_BYTES) + " bytes");
  }
  if (name[0] == '/') refuse("member " + name + " has an absolute name");
  if (name.find('\\') != std::string::npos || name.find('\0') != std::string::npos) {
    refuse("member " + name + " has a backslash or NUL in its name");
  }
  std::string body = name;
  if (body.back() == '/') body.pop_back();
  size_t start = 0;
  while (true) {
    const size_t slash = body.find('/', start);
    const std::string part = body.substr(start, slash == std::string::npos ? std::string::npos : slash - start);
    if (part == "..") refuse("member " + name + " has a '..' component");
    if (part.empty() || part == ".") refuse("member " + name + " has an empty or '.' component");
    if (slash == std::string::npos) break;
    start = slash + 1;
  }
}

void archive_extract(const std::string& tar_path, const std::string& dest_dir, uint64_t max_bytes) {
  Fd in(::open(tar_path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
  if (in.get() < 0) throw Error(ERROR_CODE_IO, "cannot open " + tar_path + " (" + std::strerror(errno) + ")");
  if (::mkdir(dest_dir.c_str(), 0700) != 0) {
    throw Error(ERROR_CODE_IO, "cannot create " + dest_dir + " (" + std::strerror(errno) + ")");
  }
  Fd root(::open(dest_dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC | O_NOFOLLOW));
  if (root.get() < 0) throw Error(ERROR_CODE_IO, "cannot open " + dest_dir + " (" + std::strerror(errno) + ")");

  std::set<std::string> seen;        // every member, without a trailing '/'
  std::set<std::string> directories;  // created directories
  uint64_t written = 0;
  char header[BLOCK];
  std::vector<char> buffer(1 << 16);
  bool ended = false;
  while (!ended) {
    if (!read_exact(in.get(), header, BLOCK, "a header")) refuse("it has no end-of-archive marker");
    bool zero = true;
    for (const char c : header) zero = zero && c == '\0';
    if (zero) {
      ended = true;  // the first of the two zero blocks; what follows is padding
      break;
    }
    if (std::memcmp(header + 257, "ustar\0", 6) != 0) refuse("a member header is not POSIX ustar (magic)");
    // Checksum: the header's bytes with the checksum field as spaces.
    uint64_t sum = 0;
    for (size_t i = 0; i < BLOCK; ++i) sum += (i >= 148 && i < 156) ? 32u : static_cast<uint8_t>(header[i]);
    const std::string name_field = field_string(header, 100);
    const std::string prefix = field_string(header + 345, 155);
    const std::string name = prefix.empty() ? name_field : prefix + "/" + name_field;
    if (octal_field(header + 148, 8, name, "checksum") != sum) refuse("member " + name + "'s header checksum is wrong");
    archive_member_name_check(name);
    const char type = header[156];
    const uint64_t size = octal_field(header + 124, 12, name, "size");
    std::string key = name;
    if (key.back() == '/') key.pop_back();
    if (!seen.insert(key).second) refuse("member " + key + " appears twice");
    // Parents must be directories this extraction created (or be created now, never through a link).
    size_t slash = key.find('/');
    while (slash != std::string::npos) {
      const std::string parent = key.substr(0, slash);
      if (directories.count(parent) == 0) {
        if (seen.count(parent) > 0) refuse("member " + key + " is inside " + parent + ", which is not a directory");
        if (::mkdirat(root.get(), parent.c_str(), 0700) != 0) {
          throw Error(ERROR_CODE_IO, "cannot create " + parent + " while extracting (" + std::strerror(errno) + ")");
        }
        directories.insert(parent);
        seen.insert(parent);
      }
      slash = key.find('/', slash + 1);
    }
    if (type == '5') {
      if (size != 0) refuse("directory member " + key + " has a size");
      if (directories.count(key) == 0) {
        if (::mkdirat(root.get(), key.c_str(), 0700) != 0) {
          throw Error(ERROR_CODE_IO, "cannot create " + key + " while extracting (" + std::strerror(errno) + ")");
        }
        directories.insert(key);
      }
      continue;
    }
    if (type == '1' || type == '2') refuse("member " + key + " is a link; archives hold regular files and directories only");
    if (type != '0' && type != '\0') {
      refuse("member " + key + " has type '" + std::string(1, type) + "'; archives hold regular files and directories only");
    }
    if (size > max_bytes || written + size > max_bytes) {
      refuse("its contents exceed deploy_max_bytes (" + std::to_string(max_bytes) + " bytes)");
    }
    Fd out(::openat(root.get(), key.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600));
    if (out.get() < 0) throw Error(ERROR_CODE_IO, "cannot create " + key + " while extracting (" + std::strerror(errno) + ")");
    uint64_t left = size;
    while (left > 0) {
      const size_t n = static_cast<size_t>(std::min<uint64_t>(left, buffer.size()));
      const std::string what = "member " + key;
      if (!read_exact(in.get(), buffer.data(), n, what.c_str())) refuse("it ends in the middle of " + what);
      write_all(out.get(), buffer.data(), n, key);
      left -= n;
    }
    written += size;
    const size_t pad = static_cast<size_t>((BLOCK - size % BLOCK) % BLOCK);
    if (pad > 0 && !read_exact(in.get(), buffer.data(), pad, "padding")) refuse("it ends in the middle of member " + key);
    if (::fsync(out.get()) != 0) throw Error(ERROR_CODE_IO, "cannot sync " + key + " (" + std::strerror(errno) + ")");
  }
  if (seen.empty()) refuse("it holds no member");
  // Durable before the slot is switched to: every created directory's entries, then the root's.
  for (const std::string& dir : directories) {
    Fd fd(::openat(root.get(), dir.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
    if (fd.get() >= 0) ::fsync(fd.get());
  }
  ::fsync(root.get());
}

}  // namespace edgesmith
