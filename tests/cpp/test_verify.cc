#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "artifact/verify.h"
#include "common/error.h"
#include "test_support.h"

namespace edgesmith {
namespace {

namespace fs = std::filesystem;

class Verify : public ::testing::Test {
 protected:
  void SetUp() override { test::artifact_write(dir_.path(), key_); }

  // Verify and return the error, failing the test unless it has `code` and blames `path`.
  Error verify_error(ErrorCode code, const std::string& path,
                     const std::vector<std::vector<uint8_t>>& keys) {
    try {
      artifact_verify(dir_.path().string(), keys);
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), code) << e.what();
      EXPECT_EQ(e.path(), path) << e.what();
      EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
      return e;
    }
    ADD_FAILURE() << "artifact verified but should not have";
    return Error(ERROR_CODE_IO, "");
  }

  Error verify_error(ErrorCode code, const std::string& path) {
    return verify_error(code, path, {test::key_bytes(key_)});
  }

  void byte_flip(const std::string& rel, size_t offset) {
    std::fstream f(dir_.path() / rel, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(static_cast<std::streamoff>(offset));
    const char c = static_cast<char>(f.get());
    f.seekp(static_cast<std::streamoff>(offset));
    f.put(static_cast<char>(c ^ 0x01));
  }

  test::TempDir dir_;
  test::TestKey key_ = test::test_key_make(1);
};

TEST_F(Verify, IntactArtifactVerifies) {
  const VerifyResult result = artifact_verify(dir_.path().string(), {test::key_bytes(key_)});
  EXPECT_EQ(result.file_count, 4u);
  EXPECT_EQ(result.key_id.size(), 16u);
  EXPECT_EQ(result.manifest.payload.entry, "model.xml");
  EXPECT_FALSE(result.manifest_json.empty());
}

TEST_F(Verify, UntrustedKeyBlamesSignature) {
  const Error e = verify_error(ERROR_CODE_INTEGRITY, "manifest.sig",
                               {test::key_bytes(test::test_key_make(2))});
  EXPECT_NE(std::string(e.what()).find("not one of the 1 trusted keys"), std::string::npos);
  verify_error(ERROR_CODE_INTEGRITY, "manifest.sig", {});
}

TEST_F(Verify, MalformedTrustedKeyIsInvalidArgument) {
  try {
    artifact_verify(dir_.path().string(), {std::vector<uint8_t>(31, 0)});
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ERROR_CODE_INVALID_ARGUMENT);
  }
}

TEST_F(Verify, EveryFlippedByteIsCaught) {
  for (const std::string rel : {"manifest.json", "manifest.sig", "model.xml", "model.bin",
                                "golden/input_0.npy", "golden/output_0.npy"}) {
    const uintmax_t size = fs::file_size(dir_.path() / rel);
    for (const uintmax_t offset : {uintmax_t{0}, size / 2, size - 1}) {
      byte_flip(rel, offset);
      verify_error(ERROR_CODE_INTEGRITY, rel);
      byte_flip(rel, offset);
    }
  }
  artifact_verify(dir_.path().string(), {test::key_bytes(key_)});
}

TEST_F(Verify, ResignedManifestWithBadFileEntry) {
  // A correctly signed manifest that lists an unsafe path must still be refused (rule 7).
  const std::vector<std::pair<std::string, std::string>> payload = {
      {"golden/input_0.npy", "input-bytes"},
      {"golden/output_0.npy", "output-bytes"},
      {"model.xml", "<net/>"},
  };
  for (const std::string bad : {"../outside.bin", "/etc/hostname", "golden/../model.xml"}) {
    nlohmann::json manifest = test::manifest_make(payload);
    manifest["files"].push_back(
        {{"path", bad}, {"size", 1}, {"sha256", std::string(64, 'a')}});
    test::artifact_sign(dir_.path(), manifest.dump(2), key_);
    verify_error(ERROR_CODE_INTEGRITY, bad);
  }
}

TEST_F(Verify, MissingExtraAndTruncatedFiles) {
  fs::rename(dir_.path() / "model.bin", dir_.path() / "model.bin.moved");
  verify_error(ERROR_CODE_INTEGRITY, "model.bin");
  fs::rename(dir_.path() / "model.bin.moved", dir_.path() / "model.bin");

  test::file_write(dir_.path() / "golden" / "deep" / "extra.txt", "x");
  verify_error(ERROR_CODE_INTEGRITY, "golden/deep/extra.txt");
  fs::remove_all(dir_.path() / "golden" / "deep");

  fs::resize_file(dir_.path() / "model.bin", 100);
  const Error e = verify_error(ERROR_CODE_INTEGRITY, "model.bin");
  EXPECT_NE(std::string(e.what()).find("size is 100 bytes"), std::string::npos);
}

TEST_F(Verify, SymlinkLeavingTheArtifact) {
  test::TempDir outside;
  fs::copy_file(dir_.path() / "model.bin", outside.path() / "model.bin");
  fs::remove(dir_.path() / "model.bin");
  fs::create_symlink(outside.path() / "model.bin", dir_.path() / "model.bin");
  const Error e = verify_error(ERROR_CODE_INTEGRITY, "model.bin");
  EXPECT_NE(std::string(e.what()).find("outside the artifact"), std::string::npos);
}

TEST_F(Verify, SymlinksAreRefusedEvenInsideTheArtifact) {
  // A symlink is refused wherever it points: it could be swapped after verification.
  fs::rename(dir_.path() / "model.bin", dir_.path() / "golden" / "model.real");
  fs::create_symlink("golden/model.real", dir_.path() / "model.bin");
  const Error e = verify_error(ERROR_CODE_INTEGRITY, "model.bin");
  EXPECT_NE(std::string(e.what()).find("symlink"), std::string::npos) << e.what();
  fs::remove(dir_.path() / "model.bin");
  fs::rename(dir_.path() / "golden" / "model.real", dir_.path() / "model.bin");
  // A symlinked folder on the way to a file too.
  fs::rename(dir_.path() / "golden", dir_.path() / "golden.real");
  fs::create_directory_symlink("golden.real", dir_.path() / "golden");
  try {
    artifact_verify(dir_.path().string(), {test::key_bytes(key_)});
    ADD_FAILURE() << "a symlinked folder verified";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ERROR_CODE_INTEGRITY) << e.what();
    EXPECT_EQ(e.path().rfind("golden/", 0), 0u) << e.what();
    EXPECT_NE(std::string(e.what()).find("symlink"), std::string::npos) << e.what();
  }
}

TEST_F(Verify, CopyHoldsTheHashedBytes) {
  test::TempDir copy;
  const VerifyResult result = artifact_verify(dir_.path().string(), {test::key_bytes(key_)}, copy.path().string());
  for (const ManifestFile& file : result.manifest.files) {
    std::ifstream a(dir_.path() / file.path, std::ios::binary), b(copy.path() / file.path, std::ios::binary);
    const std::string original((std::istreambuf_iterator<char>(a)), std::istreambuf_iterator<char>());
    const std::string copied((std::istreambuf_iterator<char>(b)), std::istreambuf_iterator<char>());
    EXPECT_EQ(copied, original) << file.path;
  }
  EXPECT_TRUE(fs::exists(copy.path() / "manifest.json"));
  EXPECT_TRUE(fs::exists(copy.path() / "manifest.sig"));
  // The copy is itself a valid artifact.
  EXPECT_NO_THROW(artifact_verify(copy.path().string(), {test::key_bytes(key_)}));
}

TEST_F(Verify, MissingOrGarbageSignature) {
  fs::remove(dir_.path() / "manifest.sig");
  verify_error(ERROR_CODE_INTEGRITY, "manifest.sig");
  test::file_write(dir_.path() / "manifest.sig", "\x01\x02not json");
  verify_error(ERROR_CODE_INTEGRITY, "manifest.sig");
  test::file_write(dir_.path() / "manifest.sig", "{\"algorithm\": \"rsa\"}");
  verify_error(ERROR_CODE_INTEGRITY, "manifest.sig");
}

TEST_F(Verify, SignedButUnknownSchemaVersion) {
  nlohmann::json manifest = nlohmann::json::parse(
      std::ifstream(dir_.path() / "manifest.json"));
  manifest["schema_version"] = 2;
  test::artifact_sign(dir_.path(), manifest.dump(2), key_);
  verify_error(ERROR_CODE_MANIFEST, "manifest.json");
}

TEST(VerifyPaths, PathCheck) {
  for (const std::string ok : {"model.so", "golden/input_0.npy", "a/b/c.bin", "..hidden"}) {
    EXPECT_NO_THROW(artifact_path_check(ok)) << ok;
  }
  for (const std::string& bad : std::vector<std::string>{"", "/abs", "..", "../x", "a/../b", "a/..", "./a", "a//b", "a/", "a\\b",
        std::string("a\0b", 3)}) {
    EXPECT_THROW(artifact_path_check(bad), Error) << bad;
  }
}

TEST(VerifyPaths, MissingDirectoryIsIoError) {
  try {
    artifact_verify("/nonexistent/edgesmith/artifact", {});
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ERROR_CODE_IO);
  }
}

}  // namespace
}  // namespace edgesmith
