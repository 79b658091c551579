#include <gtest/gtest.h>

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <string>

#include "common/error.h"
#include "runtime/plugin.h"
#include "test_support.h"

namespace edgesmith {
namespace {

namespace fs = std::filesystem;

std::string load_error(const std::string& name) {
  try {
    plugin_load(name);
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ERROR_CODE_BACKEND) << e.what();
    return e.what();
  }
  ADD_FAILURE() << "backend " << name << " loaded but should not have";
  return {};
}

TEST(Plugin, MissingPluginIsNamedWithTheSearchPath) {
  setenv(BACKEND_PATH_ENV, "/nonexistent/a:/nonexistent/b", 1);
  const std::string message = load_error("nosuchbackend");
  EXPECT_NE(message.find("backend 'nosuchbackend' is not built into this runtime"), std::string::npos) << message;
  EXPECT_NE(message.find("/nonexistent/a, /nonexistent/b"), std::string::npos) << message;
  EXPECT_NE(message.find("libedgesmith_backend_nosuchbackend.so"), std::string::npos) << message;
}

TEST(Plugin, UnloadablePluginReportsDlerror) {
  test::TempDir dir;
  test::file_write(dir.path() / "libedgesmith_backend_broken.so", "not an ELF file");
  setenv(BACKEND_PATH_ENV, dir.path().c_str(), 1);
  const std::string message = load_error("broken");
  EXPECT_NE(message.find("backend 'broken' is not available: "), std::string::npos) << message;
  EXPECT_NE(message.find("libedgesmith_backend_broken.so"), std::string::npos) << message;
}

TEST(Plugin, BadNamesAreRefused) {
  EXPECT_NE(load_error("../evil").find("is not a plugin name"), std::string::npos);
  EXPECT_NE(load_error("").find("is not a plugin name"), std::string::npos);
}

// The one sentence a plugin of another ABI gets.
std::string abi_refusal(const std::string& name, const std::string& speaks) {
  return "backend '" + name + "' plugin " + test::test_backend_dir() + "/libedgesmith_backend_" + name +
         ".so speaks " + speaks + ", this runtime speaks " + std::to_string(EDGESMITH_PLUGIN_API_VERSION) +
         "; rebuild the plugin against edgesmith's plugin_api.h";
}

TEST(Plugin, PluginOfAnOlderAbiIsRefusedNamingBothVersions) {
  setenv(BACKEND_PATH_ENV, test::test_backend_dir().c_str(), 1);
  ASSERT_EQ(EDGESMITH_PLUGIN_API_VERSION, 2);
  EXPECT_EQ(load_error("testabi1"), abi_refusal("testabi1", "plugin ABI 1"));
}

TEST(Plugin, PluginOfANewerAbiIsRefusedNamingBothVersions) {
  setenv(BACKEND_PATH_ENV, test::test_backend_dir().c_str(), 1);
  EXPECT_EQ(load_error("testabi3"), abi_refusal("testabi3", "plugin ABI 3 to 4"));
}

TEST(Plugin, LegacyEntryPointIsRefusedAsAbi1) {
  // Exports only edgesmith_backend_open_v1 and edgesmith_backend_formats_v1: never called.
  setenv(BACKEND_PATH_ENV, test::test_backend_dir().c_str(), 1);
  EXPECT_EQ(load_error("testlegacy"), abi_refusal("testlegacy", "plugin ABI 1"));
}

TEST(Plugin, HollowTableIsRefused) {
  setenv(BACKEND_PATH_ENV, test::test_backend_dir().c_str(), 1);
  EXPECT_EQ(load_error("testhollow"),
            "backend 'testhollow' plugin " + test::test_backend_dir() +
                "/libedgesmith_backend_testhollow.so has an incomplete plugin ABI 2 table; rebuild the "
                "plugin against edgesmith's plugin_api.h");
}

TEST(Plugin, RefusalIsNotCached) {
  setenv(BACKEND_PATH_ENV, test::test_backend_dir().c_str(), 1);
  EXPECT_EQ(load_error("testabi1"), load_error("testabi1"));
}

TEST(Plugin, LibraryWithoutTheBaseIsNoPlugin) {
  // Any shared library that exports neither entry point: dlopen finds libstdc++ by its soname.
  try {
    plugin_load_file("plain", "libstdc++.so.6");
    ADD_FAILURE() << "libstdc++ loaded as a plugin";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ERROR_CODE_BACKEND);
    EXPECT_EQ(std::string(e.what()),
              "backend 'plain' plugin libstdc++.so.6 does not export edgesmith_plugin_base, so it is "
              "not an edgesmith backend plugin; rebuild it against edgesmith's plugin_api.h");
  }
}

TEST(Plugin, LoadsOnceAndCaches) {
  setenv(BACKEND_PATH_ENV, test::test_backend_dir().c_str(), 1);
  const BackendPlugin& first = plugin_load("testecho");
  ASSERT_NE(first.api, nullptr);
  EXPECT_EQ(first.api->api_version, static_cast<uint32_t>(EDGESMITH_PLUGIN_API_VERSION));
  EXPECT_EQ(first.api->struct_size, sizeof(EdgesmithPluginApi));
  EXPECT_EQ(first.name, "testecho");
  EXPECT_EQ(first.formats, std::vector<std::string>{"testecho"});  // the plugin's own declaration
  setenv(BACKEND_PATH_ENV, "/nonexistent", 1);
  EXPECT_EQ(&plugin_load("testecho"), &first);  // cached: the path is not searched again
}

TEST(Plugin, SearchDirsEndWithTheBuiltInOnes) {
  setenv(BACKEND_PATH_ENV, "/x:/y", 1);
  const auto dirs = plugin_search_dirs();
  ASSERT_GE(dirs.size(), 3u);
  EXPECT_EQ(dirs[0], "/x");
  EXPECT_EQ(dirs[1], "/y");
  EXPECT_NE(dirs[2].find("backends"), std::string::npos);
  unsetenv(BACKEND_PATH_ENV);
}

TEST(Plugin, RelativeBackendPathEntriesAreRefused) {
  setenv(BACKEND_PATH_ENV, "/x:relative/dir", 1);
  try {
    plugin_search_dirs();
    ADD_FAILURE() << "a relative entry was searched";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("relative directory 'relative/dir'"), std::string::npos) << e.what();
  }
  unsetenv(BACKEND_PATH_ENV);
  EXPECT_THROW(plugin_search_configure(PluginSearchPolicy{false, {"backends"}}), Error);
}

TEST(Plugin, PolicyCanIgnoreTheEnvironment) {
  setenv(BACKEND_PATH_ENV, "/from/env", 1);
  plugin_search_configure(PluginSearchPolicy{false, {"/from/flag"}});
  const auto dirs = plugin_search_dirs();
  EXPECT_EQ(dirs[0], "/from/flag");
  for (const std::string& dir : dirs) EXPECT_NE(dir, "/from/env");
  const std::string message = load_error("nosuchbackend2");
  EXPECT_NE(message.find("pass --backend-path"), std::string::npos) << message;
  plugin_search_configure(PluginSearchPolicy{});
  EXPECT_EQ(plugin_search_dirs()[0], "/from/env");
  unsetenv(BACKEND_PATH_ENV);
}

TEST(Plugin, DirectoriesOthersCanWriteAreRefused) {
  test::TempDir dir;
  const fs::path plugin = dir.path() / "libedgesmith_backend_testecho2.so";
  fs::copy_file(fs::path(test::test_backend_dir()) / "libedgesmith_backend_testecho.so", plugin);
  fs::permissions(dir.path(), fs::perms::owner_all | fs::perms::group_read | fs::perms::group_exec |
                                  fs::perms::others_read | fs::perms::others_exec);
  setenv(BACKEND_PATH_ENV, dir.path().c_str(), 1);
  fs::permissions(dir.path(), fs::perms::others_write, fs::perm_options::add);
  std::string message = load_error("testecho2");
  EXPECT_NE(message.find("the plugin directory"), std::string::npos) << message;
  EXPECT_NE(message.find("can be written by every user"), std::string::npos) << message;
  EXPECT_NE(message.find("chmod go-w " + dir.path().string()), std::string::npos) << message;
  fs::permissions(dir.path(), fs::perms::others_write, fs::perm_options::remove);
  fs::permissions(plugin, fs::perms::group_write, fs::perm_options::add);
  message = load_error("testecho2");
  EXPECT_NE(message.find("the plugin '"), std::string::npos) << message;
  EXPECT_NE(message.find("its group"), std::string::npos) << message;
  fs::permissions(plugin, fs::perms::group_write, fs::perm_options::remove);
  if (geteuid() == 0) {  // only root can give a file away
    ASSERT_EQ(chown(dir.path().c_str(), 4242, 4242), 0);
    message = load_error("testecho2");
    EXPECT_NE(message.find("is owned by uid 4242"), std::string::npos) << message;
    ASSERT_EQ(chown(dir.path().c_str(), 0, 0), 0);
  }
  EXPECT_EQ(plugin_load("testecho2").name, "testecho2");  // the same directory, made private
  unsetenv(BACKEND_PATH_ENV);
}

}  // namespace
}  // namespace edgesmith
