#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common/error.h"
#include "runtime/npy.h"
#include "test_support.h"

namespace edgesmith {
namespace {

std::string npy_bytes(uint8_t major, const std::string& header, const std::string& data) {
  std::string out("\x93NUMPY", 6);
  out += static_cast<char>(major);
  out += '\0';
  const size_t width = major == 1 ? 2 : 4;
  for (size_t i = 0; i < width; ++i) out += static_cast<char>((header.size() >> (8 * i)) & 0xff);
  return out + header + data;
}

// Parse and return the error message, failing unless it is ERROR_CODE_INVALID_ARGUMENT.
std::string npy_error(const std::string& bytes) {
  try {
    npy_parse(bytes, "t.npy");
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ERROR_CODE_INVALID_ARGUMENT) << e.what();
    return e.what();
  }
  ADD_FAILURE() << "parsed but should not have";
  return {};
}

TEST(Npy, RoundTripEveryDtypeAndShape) {
  const std::vector<std::vector<int64_t>> shapes = {{}, {0}, {3}, {2, 3}, {1, 0, 4}, {2, 1, 2, 2}};
  for (int d = DTYPE_BOOL; d <= DTYPE_FLOAT64; ++d) {
    for (const auto& shape : shapes) {
      Tensor t(static_cast<DType>(d), shape);
      auto* bytes = static_cast<uint8_t*>(t.data());
      for (size_t i = 0; i < t.byte_size(); ++i) bytes[i] = static_cast<uint8_t>(d == DTYPE_BOOL ? i % 2 : i * 7);
      const Tensor back = npy_parse(npy_serialize(t.view()));
      EXPECT_EQ(back.dtype(), t.dtype());
      EXPECT_EQ(back.shape(), shape);
      ASSERT_EQ(back.byte_size(), t.byte_size());
      EXPECT_EQ(std::memcmp(back.data(), t.data(), t.byte_size()), 0);
      // NumPy's layout: the data starts on a 64-byte boundary and the header ends with '\n'.
      const std::string bytes_out = npy_serialize(t.view());
      EXPECT_EQ((bytes_out.size() - t.byte_size()) % 64, 0u);
    }
  }
}

TEST(Npy, ReadsVersions2And3AndNumpyHeaders) {
  const std::string data(8, '\0');
  for (const uint8_t major : {uint8_t{1}, uint8_t{2}, uint8_t{3}}) {
    const Tensor t = npy_parse(npy_bytes(major, "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }   \n", data));
    EXPECT_EQ(t.shape(), (std::vector<int64_t>{2}));
  }
  // Key order and quoting vary between writers.
  const Tensor t = npy_parse(npy_bytes(1, "{\"shape\": (1, 2), \"fortran_order\": False, \"descr\": \"<i4\"}\n", data));
  EXPECT_EQ(t.dtype(), DTYPE_INT32);
}

TEST(Npy, MalformedHeadersAreTypedErrors) {
  const std::string f4 = "'descr': '<f4', ";
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"", "magic"},
      {"\x93NUMPX\x01\x00", "magic"},
      {npy_bytes(4, "{}", ""), "format version 4"},
      {std::string("\x93NUMPY\x01\x00\xff", 9), "ends inside its header"},
      {npy_bytes(1, "{" + f4 + "'fortran_order': True, 'shape': (1,), }", "abcd"), "Fortran order"},
      {npy_bytes(1, "{'descr': '>f4', 'fortran_order': False, 'shape': (1,), }", "abcd"), "dtype"},
      {npy_bytes(1, "{'descr': 'O', 'fortran_order': False, 'shape': (1,), }", "abcd"), "dtype"},
      {npy_bytes(1, "{" + f4 + "'fortran_order': False, 'shape': (2,), }", "abcd"), "truncated"},
      {npy_bytes(1, "{" + f4 + "'fortran_order': False, 'shape': (1,), }", "abcdef"), "after the data"},
      {npy_bytes(1, "{" + f4 + "'fortran_order': False, 'shape': (4294967296, 4294967296), }", ""), "overflows"},
      {npy_bytes(1, "{" + f4 + "'fortran_order': False, 'shape': (99999999999999999999,), }", ""), "64 bits"},
      {npy_bytes(1, "{" + f4 + "'fortran_order': False, 'shape': (-1,), }", ""), "non-negative"},
      {npy_bytes(1, "{" + f4 + "'shape': (1,), }", "abcd"), "lacks"},
      {npy_bytes(1, "{" + f4 + f4 + "'fortran_order': False, 'shape': (1,), }", "abcd"), "repeated"},
      {npy_bytes(1, "{" + f4 + "'fortran_order': False, 'shape': (1,), 'x': 1}", "abcd"), "unexpected"},
      {npy_bytes(1, "{" + f4 + "'fortran_order': False, 'shape': (1,)", "abcd"), "malformed"},
      {npy_bytes(1, "{'descr: '<f4'", ""), "header"},
      {npy_bytes(2, std::string(70000, ' '), ""), "more than the"},
  };
  for (const auto& [bytes, expected] : cases) {
    const std::string message = npy_error(bytes);
    EXPECT_NE(message.find(expected), std::string::npos) << "expected '" << expected << "' in: " << message;
    EXPECT_NE(message.find("t.npy"), std::string::npos) << message;
  }
}

TEST(Npy, RandomMutationsNeverCrash) {
  Tensor t(DTYPE_FLOAT32, {3, 2});
  std::memset(t.data(), 0, t.byte_size());
  const std::string valid = npy_serialize(t.view());
  std::mt19937 rng(1234);
  for (int round = 0; round < 20000; ++round) {
    std::string bytes = valid;
    const int edits = 1 + static_cast<int>(rng() % 4);
    for (int e = 0; e < edits; ++e) {
      const size_t pos = rng() % bytes.size();
      switch (rng() % 3) {
        case 0: bytes[pos] = static_cast<char>(rng()); break;
        case 1: bytes.erase(pos, 1 + rng() % 8); break;
        default: bytes.insert(pos, 1, static_cast<char>(rng())); break;
      }
      if (bytes.empty()) bytes = "x";
    }
    try {
      npy_parse(bytes);
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ERROR_CODE_INVALID_ARGUMENT);
    }
  }
}

TEST(Npy, FileReadAndWrite) {
  test::TempDir dir;
  Tensor t(DTYPE_INT64, {2});
  static_cast<int64_t*>(t.data())[0] = -7;
  static_cast<int64_t*>(t.data())[1] = 1LL << 40;
  const std::string path = (dir.path() / "x.npy").string();
  npy_write(path, t.view());
  const Tensor back = npy_read(path);
  EXPECT_EQ(static_cast<const int64_t*>(back.data())[1], 1LL << 40);
  try {
    npy_read((dir.path() / "missing.npy").string());
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ERROR_CODE_IO);
  }
}

}  // namespace
}  // namespace edgesmith
