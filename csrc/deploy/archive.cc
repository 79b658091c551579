#include "deploy/archive.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
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

// One member header: false at the end-of-archive marker. Checks magic and checksum.
struct Header {
  std::string name;
  char type = '0';
  uint64_t size = 0;
};

bool header_read(int fd, Header* out) {
  char header[BLOCK];
  if (!read_exact(fd, header, BLOCK, "a header")) refuse("it has no end-of-archive marker");
  bool zero = true;
  for (const char c : header) zero = zero && c == '\0';
  if (zero) return false;  // the first of the two zero blocks; what follows is padding
  if (std::memcmp(header + 257, "ustar\0", 6) != 0) refuse("a member header is not POSIX ustar (magic)");
  // Checksum: the header's bytes with the checksum field as spaces.
  uint64_t sum = 0;
  for (size_t i = 0; i < BLOCK; ++i) sum += (i >= 148 && i < 156) ? 32u : static_cast<uint8_t>(header[i]);
  const std::string name_field = field_string(header, 100);
  const std::string prefix = field_string(header + 345, 155);
  out->name = prefix.empty() ? name_field : prefix + "/" + name_field;
  if (octal_field(header + 148, 8, out->name, "checksum") != sum) refuse("member " + out->name + "'s header checksum is wrong");
  archive_member_name_check(out->name);
  out->type = header[156];
  out->size = octal_field(header + 124, 12, out->name, "size");
  return true;
}

uint64_t padded(uint64_t size) { return size + (BLOCK - size % BLOCK) % BLOCK; }

void members_check(uint64_t members) {
  if (members > ARCHIVE_MAX_MEMBERS) {
    refuse("it has more than " + std::to_string(ARCHIVE_MAX_MEMBERS) + " members");
  }
}

void contents_check(uint64_t written, uint64_t size, uint64_t max_bytes) {
  if (size > max_bytes || written + size > max_bytes) {
    refuse("its contents exceed deploy_max_bytes (" + std::to_string(max_bytes) + " bytes)");
  }
}

}  // namespace

ArchiveSummary archive_summarize(const std::string& tar_path, uint64_t max_bytes) {
  Fd in(::open(tar_path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
  if (in.get() < 0) throw Error(ERROR_CODE_IO, "cannot open " + tar_path + " (" + std::strerror(errno) + ")");
  struct stat st {};
  if (::fstat(in.get(), &st) != 0) throw Error(ERROR_CODE_IO, "cannot stat " + tar_path + " (" + std::strerror(errno) + ")");
  ArchiveSummary summary;
  Header header;
  while (header_read(in.get(), &header)) {
    members_check(++summary.members);
    if (header.type == '5') continue;
    if (header.type == '0' || header.type == '\0') {
      contents_check(summary.content_bytes, header.size, max_bytes);
      summary.content_bytes += header.size;
    }
    const off_t next = ::lseek(in.get(), static_cast<off_t>(padded(header.size)), SEEK_CUR);
    if (next < 0 || next > st.st_size) refuse("it ends in the middle of member " + header.name);
  }
  return summary;
}

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

void archive_space_check(const std::string& dir, uint64_t need_bytes) {
  struct statvfs fs {};
  if (::statvfs(dir.c_str(), &fs) != 0) {
    throw Error(ERROR_CODE_IO, "cannot read the free space of " + dir + " (" + std::strerror(errno) + ")");
  }
  const uint64_t free_bytes = static_cast<uint64_t>(fs.f_bavail) * static_cast<uint64_t>(fs.f_frsize);
  if (free_bytes < need_bytes) {
    throw Error(ERROR_CODE_IO, "not enough free space to extract the artifact archive: it needs " +
                                   std::to_string(need_bytes) + " bytes (contents plus a " +
                                   std::to_string(ARCHIVE_FREE_SPACE_MARGIN_BYTES >> 20) + " MiB margin) and " + dir +
                                   " has " + std::to_string(free_bytes) + "; free space on the device");
  }
}

void archive_extract(const std::string& tar_path, const std::string& dest_dir, uint64_t max_bytes) {
  const ArchiveSummary summary = archive_summarize(tar_path, max_bytes);
  // Room first: a full disk must fail the deployment before it half-writes a slot.
  const std::string dest_parent = std::filesystem::path(dest_dir).parent_path().string();
  archive_space_check(dest_parent.empty() ? "." : dest_parent,
                      summary.content_bytes + summary.members * BLOCK + ARCHIVE_FREE_SPACE_MARGIN_BYTES);
  Fd in(::open(tar_path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
  if (in.get() < 0) throw Error(ERROR_CODE_IO, "cannot open " + tar_path + " (" + std::strerror(errno) + ")");
  if (::mkdir(dest_dir.c_str(), 0700) != 0) {
    throw Error(ERROR_CODE_IO, "cannot create " + dest_dir + " (" + std::strerror(errno) + ")");
  }
  Fd root(::open(dest_dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC | O_NOFOLLOW));
  if (root.get() < 0) throw Error(ERROR_CODE_IO, "cannot open " + dest_dir + " (" + std::strerror(errno) + ")");

  std::set<std::string> seen;         // every member, without a trailing '/'
  std::set<std::string> directories;  // created directories (by a member or as a parent)
  std::set<std::string> listed;       // directories that had their own member
  uint64_t written = 0;
  uint64_t members = 0;
  std::vector<char> buffer(1 << 16);
  Header header;
  while (header_read(in.get(), &header)) {
    members_check(++members);  // the file may have grown since it was summed
    const std::string& name = header.name;
    const char type = header.type;
    const uint64_t size = header.size;
    std::string key = name;
    if (key.back() == '/') key.pop_back();
    if (type == '5' && directories.count(key) > 0 && listed.count(key) == 0) {
      // `dir/` after `dir/file`: the directory exists already (created as a parent); its own entry
      // is not a duplicate. A second `dir/` entry is.
      if (size != 0) refuse("directory member " + key + " has a size");
      listed.insert(key);
      continue;
    }
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
      if (::mkdirat(root.get(), key.c_str(), 0700) != 0) {
        throw Error(ERROR_CODE_IO, "cannot create " + key + " while extracting (" + std::strerror(errno) + ")");
      }
      directories.insert(key);
      listed.insert(key);
      continue;
    }
    if (type == '1' || type == '2') refuse("member " + key + " is a link; archives hold regular files and directories only");
    if (type != '0' && type != '\0') {
      refuse("member " + key + " has type '" + std::string(1, type) + "'; archives hold regular files and directories only");
    }
    contents_check(written, size, max_bytes);
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
