#include <gtest/gtest.h>

#include <sodium.h>

#include <array>
#include <string>
#include <vector>

#include "common/digest.h"
#include "common/error.h"
#include "common/strings.h"
#include "test_support.h"

namespace edgesmith {
namespace {

TEST(Sha256, KnownVectors) {
  EXPECT_EQ(sha256_string(""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(sha256_string("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

TEST(Sha256, FileIsStreamedAcrossChunks) {
  // FIPS 180-2 vector: one million 'a', larger than one read chunk.
  test::TempDir dir;
  test::file_write(dir.path() / "a.bin", std::string(1000000, 'a'));
  uint64_t size = 0;
  EXPECT_EQ(sha256_file((dir.path() / "a.bin").string(), &size),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
  EXPECT_EQ(size, 1000000u);
  test::file_write(dir.path() / "big.bin", std::string((3u << 20) + 7, 'a'));
  EXPECT_EQ(sha256_file((dir.path() / "big.bin").string()),
            sha256_string(std::string((3u << 20) + 7, 'a')));
}

TEST(Sha256, MissingFileIsAnIoError) {
  try {
    sha256_file("/nonexistent/edgesmith/file");
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ERROR_CODE_IO);
  }
}

TEST(Ed25519, Rfc8032TestVector1) {
  std::vector<uint8_t> seed, public_key, signature;
  ASSERT_TRUE(hex_decode("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60", &seed));
  ASSERT_TRUE(hex_decode("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
                         &public_key));
  ASSERT_TRUE(hex_decode(
      "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b4"
      "6bd25bf5f0595bbe24655141438e7a100b",
      &signature));
  sodium_ensure_init();
  std::array<uint8_t, 32> derived{};
  std::array<uint8_t, 64> secret{};
  crypto_sign_seed_keypair(derived.data(), secret.data(), seed.data());
  EXPECT_TRUE(std::equal(derived.begin(), derived.end(), public_key.begin()));
  EXPECT_TRUE(ed25519_verify("", signature.data(), public_key.data()));
  EXPECT_FALSE(ed25519_verify("x", signature.data(), public_key.data()));
}

TEST(Ed25519, FixedKeypairSignsAndVerifies) {
  const test::TestKey key = test::test_key_make(7);
  const std::string message = "{\"schema_version\": 1}\n";
  std::array<uint8_t, 64> signature{};
  crypto_sign_detached(signature.data(), nullptr,
                       reinterpret_cast<const unsigned char*>(message.data()), message.size(),
                       key.secret_key.data());
  EXPECT_TRUE(ed25519_verify(message, signature.data(), key.public_key.data()));
  signature[10] ^= 0x01;
  EXPECT_FALSE(ed25519_verify(message, signature.data(), key.public_key.data()));
}

TEST(Strings, HexRoundTripAndQuote) {
  const uint8_t bytes[] = {0x00, 0xab, 0xff};
  EXPECT_EQ(hex_encode(bytes, 3), "00abff");
  std::vector<uint8_t> decoded;
  EXPECT_TRUE(hex_decode("00ABff", &decoded));
  EXPECT_EQ(decoded, std::vector<uint8_t>(bytes, bytes + 3));
  EXPECT_FALSE(hex_decode("0g", &decoded));
  EXPECT_FALSE(hex_decode("abc", &decoded));
  EXPECT_TRUE(hex_is_lower("00abff", 6));
  EXPECT_FALSE(hex_is_lower("00ABff", 6));
  EXPECT_EQ(string_quote("a\xff'b"), "'a\\xff\\x27b'");
  EXPECT_EQ(string_quote("abcdef", 3), "'abc...'");
}

}  // namespace
}  // namespace edgesmith
