// edgesmith_deploy: desired-state envelopes, strict ustar extraction, state.json and the boot
// choice (docs/deployment.md).
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sodium.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <atomic>
#include <chrono>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "artifact/signature.h"
#include "common/strings.h"
#include "common/digest.h"
#include "common/error.h"
#include "deploy/archive.h"
#include "deploy/desired.h"
#include "deploy/download.h"
#include "deploy/slots.h"

namespace fs = std::filesystem;
#include "test_support.h"

using namespace edgesmith;

namespace {

using test::TempDir;

using Key = test::DeployKey;

nlohmann::json state_doc() {
  return {{"v", 1}, {"fleet", "plant-a"}, {"device", "cam-01"}, {"version", 7}, {"deployment_id", "dep-1"},
          {"action", "deploy"}, {"issued_at_ms", 1790000000000LL},
          {"artifact", {{"url", "http://127.0.0.1:8470/artifacts/" + std::string(64, 'a') + ".tar"},
                        {"sha256", std::string(64, 'a')}, {"size", 1234},
                        {"manifest_sha256", std::string(64, 'b')}, {"name", "digits"}}}};
}

std::string envelope(const Key& key, const std::string& signed_text, const std::string& prefix = DESIRED_DOMAIN) {
  return nlohmann::json{{"v", 1}, {"signed", signed_text}, {"key_id", key.id()},
                        {"signature", key.sign(prefix + signed_text)}}
      .dump();
}

std::string refusal(const std::string& text, const std::vector<std::vector<uint8_t>>& keys) {
  try {
    desired_parse(text, keys);
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ERROR_CODE_INTEGRITY);
    return e.what();
  }
  return "";
}

}  // namespace

TEST(Desired, AcceptsAValidEnvelope) {
  Key key;
  const std::string text = state_doc().dump();
  const DesiredState s = desired_parse(envelope(key, text), {key.pk});
  EXPECT_EQ(s.fleet, "plant-a");
  EXPECT_EQ(s.device, "cam-01");
  EXPECT_EQ(s.version, 7u);
  EXPECT_EQ(s.action, "deploy");
  EXPECT_EQ(s.artifact.size, 1234u);
  EXPECT_EQ(s.artifact.manifest_sha256, std::string(64, 'b'));
  EXPECT_EQ(s.signed_sha256, sha256_string(text));
  const DesiredState back = desired_from_json(desired_to_json(s));
  EXPECT_EQ(back.signed_sha256, s.signed_sha256);
  EXPECT_EQ(back.artifact.url, s.artifact.url);
}

TEST(Desired, NotAfterAllowsForClockSkew) {
  Key key;
  nlohmann::json doc = state_doc();
  const DesiredState none = desired_parse(envelope(key, doc.dump()), {key.pk});
  EXPECT_EQ(none.not_after, 0);
  EXPECT_FALSE(desired_expired(none, INT64_MAX / 2));  // without not_after it never expires
  doc["not_after"] = 1790000000;
  const DesiredState s = desired_parse(envelope(key, doc.dump()), {key.pk});
  EXPECT_EQ(s.not_after, 1790000000);
  EXPECT_EQ(desired_from_json(desired_to_json(s)).not_after, 1790000000);
  EXPECT_FALSE(desired_expired(s, 1790000000));
  EXPECT_FALSE(desired_expired(s, 1790000000 + DESIRED_CLOCK_SKEW_S));  // a device clock that runs ahead
  EXPECT_TRUE(desired_expired(s, 1790000000 + DESIRED_CLOCK_SKEW_S + 1));
  for (const nlohmann::json& bad : {nlohmann::json(-5), nlohmann::json(0), nlohmann::json("1790000000"),
                                    nlohmann::json(1.5), nlohmann::json(1ull << 53)}) {
    doc["not_after"] = bad;
    EXPECT_NE(refusal(envelope(key, doc.dump()), {key.pk}).find("not_after"), std::string::npos) << bad.dump();
  }
}

TEST(Desired, RefusesUnknownKeysAndBadSignatures) {
  Key key;
  Key other;
  const std::string text = state_doc().dump();
  EXPECT_NE(refusal(envelope(other, text), {key.pk}).find("not among this device's deploy keys"), std::string::npos);
  EXPECT_NE(refusal(envelope(key, text), {}).find("not among"), std::string::npos);
  // Signed without the domain prefix (as a manifest would be): not valid.
  EXPECT_NE(refusal(envelope(key, text, ""), {key.pk}).find("signature"), std::string::npos);
  // The signed text changed after signing.
  nlohmann::json outer = nlohmann::json::parse(envelope(key, text));
  outer["signed"] = state_doc().dump(1);
  EXPECT_NE(refusal(outer.dump(), {key.pk}).find("not valid"), std::string::npos);
  // A signature by another key under this key's id.
  outer = nlohmann::json::parse(envelope(key, text));
  outer["signature"] = other.sign(DESIRED_DOMAIN + text);
  EXPECT_NE(refusal(outer.dump(), {key.pk}).find("not valid"), std::string::npos);
  outer["signature"] = "zz";
  EXPECT_NE(refusal(outer.dump(), {key.pk}).find("128"), std::string::npos);
  outer = nlohmann::json::parse(envelope(key, text));
  outer["key_id"] = "ABC";
  EXPECT_NE(refusal(outer.dump(), {key.pk}).find("key_id"), std::string::npos);
}

TEST(Desired, RefusesMalformedEnvelopesAndStates) {
  Key key;
  EXPECT_NE(refusal("{not json", {key.pk}).find("not a JSON object"), std::string::npos);
  EXPECT_NE(refusal("[1]", {key.pk}).find("not a JSON object"), std::string::npos);
  nlohmann::json outer = nlohmann::json::parse(envelope(key, state_doc().dump()));
  outer.erase("signature");
  EXPECT_NE(refusal(outer.dump(), {key.pk}).find("'signature'"), std::string::npos);
  outer = nlohmann::json::parse(envelope(key, state_doc().dump()));
  outer["v"] = 2;
  EXPECT_NE(refusal(outer.dump(), {key.pk}).find("version 1"), std::string::npos);
  outer["v"] = 1;
  outer["signed"] = 5;
  EXPECT_NE(refusal(outer.dump(), {key.pk}).find("'signed'"), std::string::npos);

  const auto with = [&](const std::function<void(nlohmann::json&)>& edit) {
    nlohmann::json doc = state_doc();
    edit(doc);
    return refusal(envelope(key, doc.dump()), {key.pk});
  };
  EXPECT_NE(with([](nlohmann::json& d) { d.erase("version"); }).find("'version'"), std::string::npos);
  EXPECT_NE(with([](nlohmann::json& d) { d["version"] = 0; }).find("at least 1"), std::string::npos);
  EXPECT_NE(with([](nlohmann::json& d) { d["version"] = -3; }).find("non-negative"), std::string::npos);
  EXPECT_NE(with([](nlohmann::json& d) { d["version"] = "7"; }).find("non-negative"), std::string::npos);
  EXPECT_NE(with([](nlohmann::json& d) { d["action"] = "wipe"; }).find("neither deploy nor rollback"), std::string::npos);
  EXPECT_NE(with([](nlohmann::json& d) { d["artifact"].erase("manifest_sha256"); }).find("manifest_sha256"),
            std::string::npos);
  EXPECT_NE(with([](nlohmann::json& d) { d["artifact"]["sha256"] = "abc"; }).find("64 lower-case hex"), std::string::npos);
  EXPECT_NE(with([](nlohmann::json& d) { d["artifact"]["url"] = "ftp://x/a.tar"; }).find("https://"), std::string::npos);
  EXPECT_NE(with([](nlohmann::json& d) { d["artifact"] = "x"; }).find("'artifact'"), std::string::npos);
  EXPECT_NE(with([](nlohmann::json& d) { d["fleet"] = ""; }).find("'fleet'"), std::string::npos);
  EXPECT_NE(with([](nlohmann::json& d) { d["v"] = 3; }).find("version 1"), std::string::npos);
  EXPECT_EQ(desired_unverified_id(envelope(key, state_doc().dump())), "dep-1");
  EXPECT_EQ(desired_unverified_id("nonsense"), "");
}

TEST(Desired, ReadsTrustDirectories) {
  TempDir dir;
  EXPECT_TRUE(trust_keys_read((dir.path() / "missing").string()).empty());
  Key k1;
  Key k2;
  std::ofstream((dir.path() / "b.pub").string()) << hex_encode(k2.pk.data(), k2.pk.size()) << "\n";
  std::ofstream((dir.path() / "a.pub").string()) << hex_encode(k1.pk.data(), k1.pk.size()) << "\n";
  std::ofstream((dir.path() / "notes.txt").string()) << "ignored\n";
  const auto keys = trust_keys_read(dir.path().string());
  ASSERT_EQ(keys.size(), 2u);
  EXPECT_EQ(keys[0], k1.pk);
  EXPECT_EQ(keys[1], k2.pk);
  std::ofstream((dir.path() / "c.pub").string()) << "not hex\n";
  EXPECT_THROW(trust_keys_read(dir.path().string()), Error);
}

// --- archives ---------------------------------------------------------------------------------------

namespace {

class Tar {
 public:
  Tar& member(const std::string& name, const std::string& data, char type = '0', const std::string& link = "",
              bool ustar = true) {
    char h[512];
    std::memset(h, 0, sizeof(h));
    std::string n = name;
    std::string prefix;
    if (n.size() > 100) {
      const size_t split = n.rfind('/', 155);
      prefix = n.substr(0, split);
      n = n.substr(split + 1);
    }
    std::memcpy(h, n.data(), std::min<size_t>(n.size(), 100));
    std::snprintf(h + 100, 8, "%07o", type == '5' ? 0755 : 0644);
    std::snprintf(h + 108, 8, "%07o", 0);
    std::snprintf(h + 116, 8, "%07o", 0);
    std::snprintf(h + 124, 12, "%011llo", static_cast<unsigned long long>(type == '0' ? data.size() : 0));
    std::snprintf(h + 136, 12, "%011o", 0);
    h[156] = type;
    std::memcpy(h + 157, link.data(), std::min<size_t>(link.size(), 100));
    if (ustar) {
      std::memcpy(h + 257, "ustar\0", 6);
      std::memcpy(h + 263, "00", 2);
    } else {
      std::memcpy(h + 257, "ustar  \0", 8);
    }
    std::memcpy(h + 345, prefix.data(), std::min<size_t>(prefix.size(), 155));
    std::memset(h + 148, ' ', 8);
    unsigned sum = 0;
    for (const char c : h) sum += static_cast<uint8_t>(c);
    std::snprintf(h + 148, 8, "%06o", sum);
    bytes_.append(h, 512);
    if (type == '0') {
      bytes_ += data;
      bytes_.append((512 - data.size() % 512) % 512, '\0');
    }
    return *this;
  }
  std::string done() const { return bytes_ + std::string(1024, '\0'); }
  std::string raw() const { return bytes_; }

 private:
  std::string bytes_;
};

void write_file(const fs::path& path, const std::string& data) {
  std::ofstream out(path, std::ios::binary);
  out << data;
}

std::string extract_error(const std::string& tar, uint64_t max_bytes = 1 << 20) {
  TempDir dir;
  write_file(dir.path() / "a.tar", tar);
  try {
    archive_extract((dir.path() / "a.tar").string(), (dir.path() / "out").string(), max_bytes);
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ERROR_CODE_INTEGRITY) << e.what();
    return e.what();
  }
  return "";
}

}  // namespace

TEST(Archive, ExtractsRegularFilesAndDirectories) {
  TempDir dir;
  const std::string big(70000, 'x');
  write_file(dir.path() / "a.tar", Tar()
                                       .member("manifest.json", "{}")
                                       .member("golden/", "", '5')
                                       .member("golden/sample_0/input_0.npy", big)
                                       .member("deep/" + std::string(120, 'd') + "/f.bin", "long name")
                                       .done());
  const fs::path out = dir.path() / "out";
  archive_extract((dir.path() / "a.tar").string(), out.string(), 1 << 20);
  std::ifstream in(out / "golden" / "sample_0" / "input_0.npy", std::ios::binary);
  const std::string got((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(got, big);
  EXPECT_TRUE(fs::is_regular_file(out / "manifest.json"));
  EXPECT_TRUE(fs::is_regular_file(out / "deep" / std::string(120, 'd') / "f.bin"));
  struct stat st {};
  ASSERT_EQ(::stat(out.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0700u);
}

TEST(Archive, RefusesLinksAndSpecialFiles) {
  EXPECT_NE(extract_error(Tar().member("m", "x").member("link", "", '2', "/etc/passwd").done()).find("is a link"),
            std::string::npos);
  EXPECT_NE(extract_error(Tar().member("m", "x").member("hard", "", '1', "m").done()).find("is a link"),
            std::string::npos);
  EXPECT_NE(extract_error(Tar().member("fifo", "", '6').done()).find("type '6'"), std::string::npos);
  EXPECT_NE(extract_error(Tar().member("dev", "", '3').done()).find("type '3'"), std::string::npos);
  EXPECT_NE(extract_error(Tar().member("pax", "", 'x').done()).find("type 'x'"), std::string::npos);
}

TEST(Archive, RefusesEscapingAndDuplicateNames) {
  EXPECT_NE(extract_error(Tar().member("../escape", "x").done()).find("'..'"), std::string::npos);
  EXPECT_NE(extract_error(Tar().member("golden/../../escape", "x").done()).find("'..'"), std::string::npos);
  EXPECT_NE(extract_error(Tar().member("/etc/escape", "x").done()).find("absolute"), std::string::npos);
  EXPECT_NE(extract_error(Tar().member("./manifest.json", "x").done()).find("'.'"), std::string::npos);
  EXPECT_NE(extract_error(Tar().member("a//b", "x").done()).find("empty"), std::string::npos);
  EXPECT_NE(extract_error(Tar().member("m", "x").member("m", "y").done()).find("appears twice"), std::string::npos);
  EXPECT_NE(extract_error(Tar().member("d/", "", '5').member("d", "x").done()).find("appears twice"), std::string::npos);
  EXPECT_NE(extract_error(Tar().member("f", "x").member("f/g", "y").done()).find("not a directory"), std::string::npos);
  EXPECT_THROW(archive_member_name_check(std::string(256, 'a')), Error);
  EXPECT_NO_THROW(archive_member_name_check(std::string(255, 'a')));
  EXPECT_NO_THROW(archive_member_name_check("golden/sample_0/"));
}

TEST(Archive, RefusesOversizeTruncatedAndForeignArchives) {
  EXPECT_NE(extract_error(Tar().member("a", std::string(2000, 'x')).done(), 1500).find("deploy_max_bytes"),
            std::string::npos);
  EXPECT_NE(extract_error(Tar().member("a", std::string(1000, 'x')).member("b", std::string(1000, 'x')).done(), 1500)
                .find("deploy_max_bytes"),
            std::string::npos);
  const std::string whole = Tar().member("a", std::string(3000, 'x')).done();
  EXPECT_NE(extract_error(whole.substr(0, 1500)).find("ends in the middle"), std::string::npos);
  EXPECT_NE(extract_error(Tar().member("a", "x").raw()).find("end-of-archive"), std::string::npos);
  EXPECT_NE(extract_error(Tar().member("a", "x", '0', "", false).done()).find("ustar"), std::string::npos);
  std::string bad = Tar().member("a", "x").done();
  bad[0] = 'b';  // the checksum no longer matches
  EXPECT_NE(extract_error(bad).find("checksum"), std::string::npos);
  EXPECT_NE(extract_error(std::string(1024, '\0')).find("no member"), std::string::npos);
}

TEST(Archive, ADirectoryEntryAfterItsFilesIsNotADuplicate) {
  TempDir dir;
  // What `tar -c` of a directory listed file by file, then the directory itself, writes.
  write_file(dir.path() / "a.tar", Tar()
                                       .member("golden/sample_0/x.npy", "x")
                                       .member("golden/sample_0/", "", '5')
                                       .member("golden/", "", '5')
                                       .member("manifest.json", "{}")
                                       .done());
  const fs::path out = dir.path() / "out";
  archive_extract((dir.path() / "a.tar").string(), out.string(), 1 << 20);
  EXPECT_TRUE(fs::is_regular_file(out / "golden" / "sample_0" / "x.npy"));
  // A directory listed twice still is a duplicate, and so is a directory entry over a file.
  EXPECT_NE(extract_error(Tar().member("d/f", "x").member("d/", "", '5').member("d/", "", '5').done()).find("appears twice"),
            std::string::npos);
  EXPECT_NE(extract_error(Tar().member("d", "x").member("d/", "", '5').done()).find("appears twice"), std::string::npos);
}

TEST(Archive, RefusesTooManyMembersBeforeWritingAny) {
  Tar many;
  for (uint64_t i = 0; i <= ARCHIVE_MAX_MEMBERS; ++i) many.member("f" + std::to_string(i), "");
  TempDir dir;
  write_file(dir.path() / "a.tar", many.done());
  try {
    archive_extract((dir.path() / "a.tar").string(), (dir.path() / "out").string(), 1 << 20);
    FAIL() << "an archive of " << ARCHIVE_MAX_MEMBERS + 1 << " members was extracted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("more than " + std::to_string(ARCHIVE_MAX_MEMBERS) + " members"),
              std::string::npos)
        << e.what();
  }
  EXPECT_FALSE(fs::exists(dir.path() / "out"));  // refused from the headers, before anything was created
  Tar enough;
  for (uint64_t i = 0; i < ARCHIVE_MAX_MEMBERS; ++i) enough.member("f" + std::to_string(i), "");
  write_file(dir.path() / "b.tar", enough.done());
  const ArchiveSummary summary = archive_summarize((dir.path() / "b.tar").string(), 1 << 20);
  EXPECT_EQ(summary.members, ARCHIVE_MAX_MEMBERS);
}

TEST(Archive, ChecksFreeSpaceBeforeExtracting) {
  TempDir dir;
  write_file(dir.path() / "a.tar", Tar().member("a", std::string(3000, 'x')).member("b", "yy").done());
  const ArchiveSummary summary = archive_summarize((dir.path() / "a.tar").string(), 1 << 20);
  EXPECT_EQ(summary.members, 2u);
  EXPECT_EQ(summary.content_bytes, 3002u);
  EXPECT_NO_THROW(archive_space_check(dir.path().string(), 1 << 20));
  try {
    archive_space_check(dir.path().string(), UINT64_MAX / 2);
    FAIL() << "no file system has 8 EiB free";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ERROR_CODE_IO);
    EXPECT_NE(std::string(e.what()).find("not enough free space"), std::string::npos) << e.what();
  }
}

TEST(Archive, NeverWritesThroughAnExistingDestination) {
  TempDir dir;
  write_file(dir.path() / "a.tar", Tar().member("m", "x").done());
  fs::create_directories(dir.path() / "out");
  EXPECT_THROW(archive_extract((dir.path() / "a.tar").string(), (dir.path() / "out").string(), 1 << 20), Error);
  fs::create_directory_symlink(dir.path() / "elsewhere", dir.path() / "link");
  EXPECT_THROW(archive_extract((dir.path() / "a.tar").string(), (dir.path() / "link").string(), 1 << 20), Error);
}

// --- state.json and the boot choice ----------------------------------------------------------------

TEST(DeployState, TheFloorFileKeepsTheHighestVersion) {
  TempDir dir;
  const std::string path = (dir.path() / "floor").string();
  EXPECT_EQ(deploy_floor_read(path), 0u);  // missing
  deploy_floor_write(path, 17);
  EXPECT_EQ(deploy_floor_read(path), 17u);
  EXPECT_FALSE(fs::exists(path + ".tmp"));
  write_file(path, "{\"highest_version\": 23, garbage");  // damaged: what can still be read
  EXPECT_EQ(deploy_floor_read(path), 23u);
}

TEST(DeployState, RoundTripsAtomically) {
  TempDir dir;
  const std::string path = (dir.path() / "state.json").string();
  const DeployState fresh = deploy_state_read(path);
  EXPECT_EQ(fresh.highest_version, 0u);
  EXPECT_EQ(fresh.slots.at("a").status, "empty");
  EXPECT_FALSE(fresh.deployment.has_value());

  DeployState state;
  state.highest_version = 9;
  state.slots["b"] = SlotRecord{"good", std::string(64, 'c'), "digits", std::string(64, 'd'), 9};
  state.slots["b"].boot_attempts = 2;
  DeploymentRecord record;
  record.deployment_id = "dep-9";
  record.version = 9;
  record.action = "deploy";
  record.result = "in-progress";
  record.phase = "download";
  record.desired = {{"x", 1}};
  record.reported = false;
  record.attempts = {{"download", 2}, {"verify", 1}};
  state.deployment = record;
  deploy_state_write(path, state);
  EXPECT_FALSE(fs::exists(path + ".tmp"));
  const DeployState back = deploy_state_read(path);
  EXPECT_EQ(back.highest_version, 9u);
  EXPECT_EQ(back.slots.at("b").status, "good");
  EXPECT_EQ(back.slots.at("b").manifest_sha256, std::string(64, 'c'));
  EXPECT_EQ(back.slots.at("b").desired_version, 9u);
  EXPECT_EQ(back.slots.at("b").boot_attempts, 2u);
  ASSERT_TRUE(back.deployment.has_value());
  EXPECT_EQ(back.deployment->phase, "download");
  EXPECT_EQ(back.deployment->desired, nlohmann::json({{"x", 1}}));
  EXPECT_FALSE(back.deployment->reported);
  EXPECT_EQ(back.deployment->attempts, (std::map<std::string, uint32_t>{{"download", 2}, {"verify", 1}}));

  write_file(path, "{\"highest_version\": 1}");
  EXPECT_THROW(deploy_state_read(path), Error);
  write_file(path, "not json");
  EXPECT_THROW(deploy_state_read(path), Error);
}

TEST(DeployState, BootChoicePrefersAGoodVerifiedCurrentSlot) {
  DeployState state;
  std::vector<std::string> asked;
  const auto all = [&](const std::string& slot) {
    asked.push_back(slot);
    return true;
  };
  EXPECT_EQ(boot_choice(state, "", all), "");  // nothing good: the factory artifact
  EXPECT_TRUE(asked.empty());                  // empty slots are never opened
  state.slots["a"].status = "good";
  state.slots["b"].status = "good";
  EXPECT_EQ(boot_choice(state, "b", all), "b");
  EXPECT_EQ(boot_choice(state, "a", all), "a");
  EXPECT_EQ(boot_choice(state, "", all), "a");
  // current fails verification: the other good slot.
  EXPECT_EQ(boot_choice(state, "b", [](const std::string& slot) { return slot == "a"; }), "a");
  // current is bad (its self-test failed): never opened.
  state.slots["b"].status = "bad";
  asked.clear();
  EXPECT_EQ(boot_choice(state, "b", all), "a");
  EXPECT_EQ(asked, std::vector<std::string>{"a"});
  // Nothing verifies: the factory artifact.
  EXPECT_EQ(boot_choice(state, "a", [](const std::string&) { return false; }), "");
}

TEST(DeployState, ABrokenStateStillShowsItsHighestVersion) {
  TempDir dir;
  const std::string path = (dir.path() / "state.json.bad").string();
  EXPECT_EQ(deploy_state_version_floor(path), 0u);  // missing
  DeployState state;
  state.highest_version = 7;
  state.slots["b"] = SlotRecord{"good", std::string(64, 'c'), "digits", std::string(64, 'd'), 12};
  const std::string text = deploy_state_to_json(state).dump(2);
  write_file(path, text.substr(0, text.size() - 5));  // cut short: not JSON any more
  EXPECT_THROW(deploy_state_read(path), Error);
  EXPECT_EQ(deploy_state_version_floor(path), 12u);  // a slot's desired_version above highest_version
  write_file(path, "{\"v\": 1, \"highest_version\": 41, \"slots\": [garbage");
  EXPECT_EQ(deploy_state_version_floor(path), 41u);
  write_file(path, "\x01\x02 not a state at all");
  EXPECT_EQ(deploy_state_version_floor(path), 0u);
}

TEST(DeployState, ARetiredSlotIsKeptButNeverBooted) {
  TempDir dir;
  const std::string path = (dir.path() / "state.json").string();
  DeployState state;
  state.slots["a"] = SlotRecord{"retired", std::string(64, 'c'), "v2", std::string(64, 'd'), 2};
  state.slots["b"] = SlotRecord{"good", std::string(64, 'e'), "v1", std::string(64, 'f'), 3};
  deploy_state_write(path, state);
  const DeployState back = deploy_state_read(path);
  EXPECT_EQ(back.slots.at("a").status, "retired");  // not read back as bad
  std::vector<std::string> asked;
  const auto all = [&](const std::string& slot) {
    asked.push_back(slot);
    return true;
  };
  // current still names the retired slot (a crash before the flip): the good one is served.
  EXPECT_EQ(boot_choice(back, "a", all), "b");
  EXPECT_EQ(asked, std::vector<std::string>{"b"});
  // The good slot fails verification: the factory artifact, never the retired slot.
  asked.clear();
  EXPECT_EQ(boot_choice(back, "b", [&](const std::string& slot) {
              asked.push_back(slot);
              return false;
            }),
            "");
  EXPECT_EQ(asked, std::vector<std::string>{"b"});
}

TEST(DeployState, CurrentLinkFlipsAtomically) {
  TempDir dir;
  SlotLayout layout(dir.path().string());
  layout.layout_ensure();
  EXPECT_EQ(layout.current_slot(), "");
  layout.current_flip("a");
  EXPECT_EQ(layout.current_slot(), "a");
  EXPECT_EQ(fs::read_symlink(layout.current_path()).string(), "slots/a");
  layout.current_flip("b");
  EXPECT_EQ(layout.current_slot(), "b");
  EXPECT_FALSE(fs::exists(layout.root() + "/current.tmp"));
  EXPECT_EQ(slot_other("a"), "b");
  EXPECT_EQ(slot_other("b"), "a");
  EXPECT_EQ(slot_other(""), "a");
  struct stat st {};
  ASSERT_EQ(::stat(layout.slot_dir("a").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0700u);
}

// --- the download -----------------------------------------------------------------------------------

// A server that answers 200 with a large Content-Length and then sends one byte every 20 ms, in
// time for every read time-out but never done.
class TricklingServer {
 public:
  TricklingServer() {
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 || ::listen(fd_, 4) != 0) {
      throw std::runtime_error("cannot listen");
    }
    socklen_t len = sizeof(addr);
    ::getsockname(fd_, reinterpret_cast<sockaddr*>(&addr), &len);
    port_ = ntohs(addr.sin_port);
    thread_ = std::thread([this] {
      while (!stop_) {
        const int c = ::accept(fd_, nullptr, nullptr);
        if (c < 0) return;
        char buffer[4096];
        (void)::recv(c, buffer, sizeof(buffer), 0);
        const std::string head = "HTTP/1.1 200 OK\r\nContent-Length: " + std::to_string(kSize) + "\r\n\r\n";
        bool ok = ::send(c, head.data(), head.size(), MSG_NOSIGNAL) > 0;
        while (ok && !stop_) {
          ok = ::send(c, "x", 1, MSG_NOSIGNAL) == 1;
          std::this_thread::sleep_for(std::chrono::milliseconds(20));
        }
        ::close(c);
      }
    });
  }
  ~TricklingServer() {
    stop_ = true;
    ::shutdown(fd_, SHUT_RDWR);
    ::close(fd_);
    thread_.join();
  }
  static constexpr uint64_t kSize = 1 << 20;
  int port() const { return port_; }

 private:
  int fd_ = -1;
  int port_ = 0;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

TEST(Download, UrlsAreHttpOrHttps) {
  std::string origin;
  std::string path;
  download_url_split("https://cdn.example:8443/artifacts/a.tar", &origin, &path);
  EXPECT_EQ(origin, "https://cdn.example:8443");
  EXPECT_EQ(path, "/artifacts/a.tar");
  download_url_split("http://10.0.0.5/a.tar", &origin, &path);
  EXPECT_EQ(origin, "http://10.0.0.5");
  for (const char* bad : {"ftp://x/a.tar", "https://", "https://user@x/a.tar", "file:///a.tar", "HTTPS://x/a"}) {
    EXPECT_THROW(download_url_split(bad, &origin, &path), Error) << bad;
  }
}

TEST(Download, ATricklingServerStillMeetsTheDeadline) {
  TempDir dir;
  TricklingServer server;
  DownloadOptions o;
  o.url = "http://127.0.0.1:" + std::to_string(server.port()) + "/a.tar";
  o.part_path = (dir.path() / "a.tar.part").string();
  o.expected_size = TricklingServer::kSize;
  o.timeout_s = 0.5;
  o.io_timeout_s = 5.0;  // every byte comes in time: only deploy_timeout_s can stop it
  try {
    download_file(o);
    FAIL() << "the download finished";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("deploy_timeout_s"), std::string::npos) << e.what();
  }
  EXPECT_GT(fs::file_size(o.part_path), 0u);  // kept for a resume
  EXPECT_LT(fs::file_size(o.part_path), TricklingServer::kSize);
}
