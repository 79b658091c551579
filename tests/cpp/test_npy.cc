#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <chrono>

#include "common/error.h"
#include "runtime/inputs.h"
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

// The agent's POST /v1/infer body: .npy files concatenated in the manifest's input order.
std::vector<ManifestTensor> request_specs() {
  ManifestTensor x;
  x.name = "x";
  x.dtype = "float32";
  x.shape = {2, 3};
  ManifestTensor n;
  n.name = "n";
  n.dtype = "int64";
  n.shape = {4};
  return {x, n};
}

std::string request_error(const std::string& body, ErrorCode code) {
  try {
    inputs_parse_npy(body.data(), body.size(), request_specs());
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), code) << e.what();
    return e.what();
  }
  ADD_FAILURE() << "parsed but should not have";
  return {};
}

TEST(InputsParse, ReadsConcatenatedInputsInManifestOrder) {
  Tensor x(DTYPE_FLOAT32, {2, 3});
  for (int i = 0; i < 6; ++i) static_cast<float*>(x.data())[i] = static_cast<float>(i) * 0.5f;
  Tensor n(DTYPE_INT64, {4});
  for (int i = 0; i < 4; ++i) static_cast<int64_t*>(n.data())[i] = -i;
  const std::string body = npy_serialize(x.view()) + npy_serialize(n.view());
  const std::vector<Tensor> got = inputs_parse_npy(body.data(), body.size(), request_specs());
  ASSERT_EQ(got.size(), 2u);
  EXPECT_EQ(std::memcmp(got[0].data(), x.data(), x.byte_size()), 0);
  EXPECT_EQ(std::memcmp(got[1].data(), n.data(), n.byte_size()), 0);
  EXPECT_LE(body.size(), inputs_max_request_bytes(request_specs()));
  EXPECT_EQ(inputs_max_request_bytes(request_specs()), 24u + 32u + 2u * (12u + INPUTS_MAX_HEADER_BYTES));
}

TEST(InputsParse, CountDtypeAndShapeAreCheckedBeforeTheData) {
  const Tensor x(DTYPE_FLOAT32, {2, 3});
  const Tensor n(DTYPE_INT64, {4});
  const std::string good = npy_serialize(x.view()) + npy_serialize(n.view());
  EXPECT_NE(request_error(npy_serialize(x.view()), ERROR_CODE_INPUT).find("takes 2 inputs (x, n)"), std::string::npos);
  EXPECT_NE(request_error(good + npy_serialize(n.view()), ERROR_CODE_INPUT).find("holds more"), std::string::npos);
  EXPECT_NE(request_error("", ERROR_CODE_INPUT).find("holds 0"), std::string::npos);
  // A header that does not match the manifest is refused even though its data is missing: the
  // data is never looked at.
  const std::string wrong_shape = npy_serialize(Tensor(DTYPE_FLOAT32, {3, 2}).view());
  EXPECT_NE(request_error(wrong_shape.substr(0, wrong_shape.size() - 24), ERROR_CODE_INPUT)
                .find("input 'x' has shape (3, 2), the model takes (2, 3)"),
            std::string::npos);
  const std::string wrong_dtype = npy_serialize(Tensor(DTYPE_FLOAT64, {2, 3}).view());
  EXPECT_NE(request_error(wrong_dtype.substr(0, 128), ERROR_CODE_INPUT).find("dtype float64"), std::string::npos);
  // A header claiming an absurd size never allocates.
  const std::string huge = npy_bytes(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000, 1000000), }", "");
  EXPECT_NE(request_error(huge, ERROR_CODE_INPUT).find("has shape"), std::string::npos);
  EXPECT_NE(request_error(good.substr(0, good.size() - 1), ERROR_CODE_INVALID_ARGUMENT).find("truncated"),
            std::string::npos);
  EXPECT_NE(request_error("garbage", ERROR_CODE_INVALID_ARGUMENT).find("input 0 ('x')"), std::string::npos);
  const std::string long_header = npy_bytes(2, std::string(INPUTS_MAX_HEADER_BYTES + 1, ' '), "");
  EXPECT_NE(request_error(long_header, ERROR_CODE_INVALID_ARGUMENT).find("more than the 4096"), std::string::npos);
}

TEST(InputsParse, ManyInputsCostLinearTime) {
  // A body of 10000 one-byte inputs against a model of 10000 inputs: parsing by offset is linear;
  // copying the rest of the body for each input (the old parser) took seconds.
  std::vector<ManifestTensor> specs(10000);
  std::string body;
  const Tensor b(DTYPE_UINT8, {1});
  const std::string one = npy_serialize(b.view());
  for (size_t i = 0; i < specs.size(); ++i) {
    specs[i].name = "i" + std::to_string(i);
    specs[i].dtype = "uint8";
    specs[i].shape = {1};
    body += one;
  }
  const auto start = std::chrono::steady_clock::now();
  const std::vector<Tensor> got = inputs_parse_npy(body.data(), body.size(), specs);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_EQ(got.size(), specs.size());
  EXPECT_LT(seconds, 0.5) << "parsing " << body.size() << " bytes took " << seconds << " s";
  size_t offset = 0;
  const auto next_start = std::chrono::steady_clock::now();
  while (offset < body.size()) npy_parse_next(body, &offset);
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - next_start).count(), 0.5);
}

}  // namespace
}  // namespace edgesmith
