#include "runtime/npy.h"

#include <cctype>
#include <cstring>
#include <fstream>
#include <limits>
#include <utility>
#include <vector>

#include "common/error.h"
#include "common/file.h"
#include "common/strings.h"

namespace edgesmith {

namespace {

constexpr char NPY_MAGIC[] = "\x93NUMPY";
constexpr size_t NPY_MAGIC_BYTES = 6;

struct DescrEntry {
  const char* descr;
  DType dtype;
};

// What NumPy writes on a little-endian machine, plus the equivalent spellings of byte-sized types.
constexpr DescrEntry DESCRS[] = {
    {"|b1", DTYPE_BOOL},    {"<b1", DTYPE_BOOL},    {"|i1", DTYPE_INT8},     {"<i1", DTYPE_INT8},
    {"|u1", DTYPE_UINT8},   {"<u1", DTYPE_UINT8},   {"<i2", DTYPE_INT16},    {"<i4", DTYPE_INT32},
    {"<i8", DTYPE_INT64},   {"<u2", DTYPE_UINT16},  {"<u4", DTYPE_UINT32},   {"<u8", DTYPE_UINT64},
    {"<f2", DTYPE_FLOAT16}, {"<f4", DTYPE_FLOAT32}, {"<f8", DTYPE_FLOAT64},
};

const char* descr_of(DType dtype) {
  switch (dtype) {
    case DTYPE_BOOL: return "|b1";
    case DTYPE_INT8: return "|i1";
    case DTYPE_UINT8: return "|u1";
    case DTYPE_INT16: return "<i2";
    case DTYPE_INT32: return "<i4";
    case DTYPE_INT64: return "<i8";
    case DTYPE_UINT16: return "<u2";
    case DTYPE_UINT32: return "<u4";
    case DTYPE_UINT64: return "<u8";
    case DTYPE_FLOAT16: return "<f2";
    case DTYPE_FLOAT32: return "<f4";
    case DTYPE_FLOAT64: return "<f8";
  }
  return "";
}

[[noreturn]] void npy_fail(const std::string& name, const std::string& problem) {
  throw Error(ERROR_CODE_INVALID_ARGUMENT,
              name + " is not a .npy file edgesmith can read: " + problem);
}

// The header is a Python dict literal, e.g. {'descr': '<f4', 'fortran_order': False,
// 'shape': (1, 4), }. This parses exactly that subset: string keys, and values that are a
// string, True/False or a tuple of non-negative integers.
class HeaderParser {
 public:
  HeaderParser(const std::string& text, const std::string& name) : text_(text), name_(name) {}

  void parse(std::string* descr, bool* fortran_order, std::vector<int64_t>* shape) {
    bool seen_descr = false, seen_order = false, seen_shape = false;
    expect('{');
    while (true) {
      skip_space();
      if (peek() == '}') break;
      const std::string key = string_read();
      expect(':');
      if (key == "descr" && !seen_descr) {
        *descr = string_read();
        seen_descr = true;
      } else if (key == "fortran_order" && !seen_order) {
        *fortran_order = bool_read();
        seen_order = true;
      } else if (key == "shape" && !seen_shape) {
        *shape = shape_read();
        seen_shape = true;
      } else {
        fail("the header has an unexpected or repeated key " + string_quote(key));
      }
      skip_space();
      if (peek() == ',') {
        ++pos_;
        continue;
      }
      if (peek() != '}') fail("the header dict is malformed");
    }
    ++pos_;
    skip_space();
    if (pos_ != text_.size()) fail("the header has text after its dict");
    if (!seen_descr || !seen_order || !seen_shape) {
      fail("the header lacks one of 'descr', 'fortran_order', 'shape'");
    }
  }

 private:
  [[noreturn]] void fail(const std::string& problem) const { npy_fail(name_, problem); }

  char peek() const { return pos_ < text_.size() ? text_[pos_] : '\0'; }

  void skip_space() {
    while (pos_ < text_.size() && (text_[pos_] == ' ' || text_[pos_] == '\n' ||
                                   text_[pos_] == '\t' || text_[pos_] == '\r')) {
      ++pos_;
    }
  }

  void expect(char c) {
    skip_space();
    if (peek() != c) fail(std::string("the header dict is malformed (expected '") + c + "')");
    ++pos_;
  }

  std::string string_read() {
    skip_space();
    const char quote = peek();
    if (quote != '\'' && quote != '"') fail("the header dict is malformed (expected a string)");
    ++pos_;
    const size_t end = text_.find(quote, pos_);
    if (end == std::string::npos) fail("the header has an unterminated string");
    std::string value = text_.substr(pos_, end - pos_);
    if (value.find('\\') != std::string::npos) fail("the header has an escaped string");
    pos_ = end + 1;
    return value;
  }

  bool bool_read() {
    skip_space();
    if (text_.compare(pos_, 4, "True") == 0) {
      pos_ += 4;
      return true;
    }
    if (text_.compare(pos_, 5, "False") == 0) {
      pos_ += 5;
      return false;
    }
    fail("fortran_order is not True or False");
  }

  int64_t int_read() {
    skip_space();
    if (!std::isdigit(static_cast<unsigned char>(peek()))) {
      fail("a shape dimension is not a non-negative integer");
    }
    int64_t value = 0;
    while (std::isdigit(static_cast<unsigned char>(peek()))) {
      const int digit = peek() - '0';
      if (value > (std::numeric_limits<int64_t>::max() - digit) / 10) {
        fail("a shape dimension does not fit in 64 bits");
      }
      value = value * 10 + digit;
      ++pos_;
    }
    // Python 2 era writers emit "1L".
    if (peek() == 'L') ++pos_;
    return value;
  }

  std::vector<int64_t> shape_read() {
    std::vector<int64_t> shape;
    expect('(');
    while (true) {
      skip_space();
      if (peek() == ')') break;
      if (shape.size() >= 64) fail("the shape has more than 64 dimensions");
      shape.push_back(int_read());
      skip_space();
      if (peek() == ',') {
        ++pos_;
        continue;
      }
      if (peek() != ')') fail("the shape tuple is malformed");
    }
    ++pos_;
    return shape;
  }

  const std::string& text_;
  const std::string& name_;
  size_t pos_ = 0;
};

uint32_t le_read(const char* bytes, size_t width) {
  uint32_t value = 0;
  for (size_t i = 0; i < width; ++i) {
    value |= static_cast<uint32_t>(static_cast<uint8_t>(bytes[i])) << (8 * i);
  }
  return value;
}

}  // namespace

NpyHeader npy_header_parse(const char* bytes, size_t size, const std::string& name,
                           uint32_t max_header_bytes) {
  if (size < NPY_MAGIC_BYTES + 2 || std::memcmp(bytes, NPY_MAGIC, NPY_MAGIC_BYTES) != 0) {
    npy_fail(name, "it does not start with the .npy magic \\x93NUMPY");
  }
  const auto major = static_cast<uint8_t>(bytes[6]);
  if (major < 1 || major > 3) {
    npy_fail(name, "format version " + std::to_string(major) + " is not 1, 2 or 3");
  }
  const size_t length_bytes = major == 1 ? 2 : 4;
  const size_t prelude = NPY_MAGIC_BYTES + 2 + length_bytes;
  if (size < prelude) npy_fail(name, "the file ends inside its header");
  const uint32_t header_len = le_read(bytes + NPY_MAGIC_BYTES + 2, length_bytes);
  if (header_len > max_header_bytes) {
    npy_fail(name, "its header claims " + std::to_string(header_len) + " bytes, more than the " +
                       std::to_string(max_header_bytes) + " accepted");
  }
  if (size - prelude < header_len) npy_fail(name, "the file ends inside its header");
  const std::string header(bytes + prelude, header_len);  // bounded by max_header_bytes
  if (header.find('\0') != std::string::npos) npy_fail(name, "the header holds a NUL byte");

  std::string descr;
  bool fortran_order = false;
  NpyHeader out;
  HeaderParser(header, name).parse(&descr, &fortran_order, &out.shape);

  const DescrEntry* found = nullptr;
  for (const DescrEntry& entry : DESCRS) {
    if (descr == entry.descr) found = &entry;
  }
  if (found == nullptr) {
    npy_fail(name, "dtype " + string_quote(descr) +
                       " is not a little-endian bool/int/uint/float type edgesmith supports");
  }
  if (fortran_order) {
    npy_fail(name, "it is stored in Fortran order; save it with np.save(np.ascontiguousarray(x))");
  }

  // The product of the non-zero dimensions must fit too: NumPy refuses a (0, 2**40, 2**40) array.
  uint64_t numel = 1;
  uint64_t nonzero = 1;
  for (const int64_t dim : out.shape) {
    const auto d = static_cast<uint64_t>(dim);
    if (d == 0) {
      numel = 0;
      continue;
    }
    if (nonzero > (uint64_t{1} << 62) / d) npy_fail(name, "its shape overflows");
    nonzero *= d;
    numel *= d;
  }
  const size_t item = dtype_size(found->dtype);
  if (nonzero > (uint64_t{1} << 62) / item) npy_fail(name, "its shape overflows");
  out.dtype = found->dtype;
  out.data_offset = prelude + header_len;
  out.data_bytes = numel * item;
  return out;
}

namespace {

// One .npy file at `bytes[offset..size)`; `consumed` null: nothing may follow it. Reads in place:
// only the header and the tensor's own data are copied, never the rest of the buffer.
Tensor npy_parse_at(const char* bytes, size_t size, const std::string& name, size_t* consumed) {
  const NpyHeader header = npy_header_parse(bytes, size, name);
  const uint64_t available = size - header.data_offset;
  if (available < header.data_bytes) {
    npy_fail(name, "the data is truncated (" + std::to_string(available) + " bytes, the header " +
                       "promises " + std::to_string(header.data_bytes) + ")");
  }
  if (available > header.data_bytes && consumed == nullptr) {
    npy_fail(name, "it has " + std::to_string(available - header.data_bytes) +
                       " bytes after the data");
  }
  if (consumed != nullptr) *consumed = header.data_offset + static_cast<size_t>(header.data_bytes);
  Tensor tensor(header.dtype, header.shape);
  if (header.data_bytes > 0) std::memcpy(tensor.data(), bytes + header.data_offset, header.data_bytes);
  return tensor;
}

}  // namespace

Tensor npy_parse(const std::string& bytes, const std::string& name) {
  return npy_parse_at(bytes.data(), bytes.size(), name, nullptr);
}

Tensor npy_parse_next(const std::string& bytes, size_t* offset, const std::string& name) {
  if (*offset > bytes.size()) npy_fail(name, "the offset is past the end of the data");
  size_t consumed = 0;
  Tensor tensor = npy_parse_at(bytes.data() + *offset, bytes.size() - *offset, name, &consumed);
  *offset += consumed;
  return tensor;
}

Tensor npy_read(const std::string& path) {
  return npy_parse(file_read(path, NPY_MAX_FILE_BYTES, ERROR_CODE_IO, ""), string_quote(path, 200));
}

std::string npy_serialize(const TensorView& view) {
  const char* descr = descr_of(view.dtype);
  if (descr[0] == '\0') throw Error(ERROR_CODE_INVALID_ARGUMENT, "cannot write a tensor of unknown dtype");
  std::string shape = "(";
  for (size_t i = 0; i < view.shape.size(); ++i) {
    shape += std::to_string(view.shape[i]);
    shape += (view.shape.size() == 1 || i + 1 < view.shape.size()) ? "," : "";
    if (i + 1 < view.shape.size()) shape += " ";
  }
  shape += ")";
  std::string header = std::string("{'descr': '") + descr + "', 'fortran_order': False, 'shape': " +
                       shape + ", }";
  // Pad with spaces so the data starts on a 64-byte boundary; the header ends with '\n'.
  uint8_t major = 1;
  size_t prelude = NPY_MAGIC_BYTES + 2 + 2;
  if (header.size() + 1 + prelude > 65535) {
    major = 2;
    prelude = NPY_MAGIC_BYTES + 2 + 4;
  }
  const size_t total = ((prelude + header.size() + 1 + 63) / 64) * 64;
  header.append(total - prelude - header.size() - 1, ' ');
  header += '\n';

  const size_t data_bytes = static_cast<size_t>(shape_numel(view.shape)) * dtype_size(view.dtype);
  std::string out(NPY_MAGIC, NPY_MAGIC_BYTES);
  out += static_cast<char>(major);
  out += '\0';
  const auto header_len = static_cast<uint32_t>(header.size());
  for (size_t i = 0; i < prelude - NPY_MAGIC_BYTES - 2; ++i) {
    out += static_cast<char>((header_len >> (8 * i)) & 0xff);
  }
  out += header;
  if (data_bytes > 0) out.append(static_cast<const char*>(view.data), data_bytes);
  return out;
}

void npy_write(const std::string& path, const TensorView& view) {
  const std::string bytes = npy_serialize(view);
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  out.close();
  if (!out) {
    throw Error(ERROR_CODE_IO, string_quote(path, 200) + " cannot be written; check the directory "
                                                         "exists and is writable");
  }
}

}  // namespace edgesmith
