// The CPU-feature check Session applies before loading an artifact (csrc/runtime/cpu_features.h).
#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <vector>

#include "runtime/cpu_features.h"
#include "runtime/isa.h"

namespace edgesmith {
namespace {

bool contains(const std::vector<std::string>& list, const std::string& item) {
  return std::find(list.begin(), list.end(), item) != list.end();
}

TEST(CpuFeatures, HostFeaturesAreKnownAndPresent) {
  const std::vector<std::string> host = cpu_features_host();
  ASSERT_FALSE(host.empty());
  for (const std::string& feature : host) {
    EXPECT_TRUE(cpu_feature_known(feature)) << feature;
    EXPECT_TRUE(cpu_feature_present(feature)) << feature;
  }
  EXPECT_TRUE(cpu_features_missing(host).empty());
  // The baseline of each ISA edgesmith targets.
  if (host_isa() == "x86_64") {
    EXPECT_TRUE(contains(host, "sse2"));
  } else if (host_isa() == "aarch64") {
    EXPECT_TRUE(contains(host, "asimd"));
  }
}

TEST(CpuFeatures, UnknownNamesCountAsMissing) {
  EXPECT_FALSE(cpu_feature_known("warp-drive"));
  EXPECT_FALSE(cpu_feature_present("warp-drive"));
  const std::vector<std::string> missing = cpu_features_missing({"warp-drive"});
  ASSERT_EQ(missing.size(), 1u);
  EXPECT_EQ(missing[0], "warp-drive (unknown to this runtime)");
}

TEST(CpuFeatures, MissingKeepsOrderAndSkipsPresent) {
  const std::vector<std::string> host = cpu_features_host();
  // Every checkable feature the host lacks is reported, in the order asked.
  const std::vector<std::string> wanted = host_isa() == "x86_64"
                                              ? std::vector<std::string>{"avx512f", "sse2", "fma4", "xop"}
                                              : std::vector<std::string>{"sve2", "asimd", "mte"};
  std::vector<std::string> expected;
  for (const std::string& feature : wanted) {
    if (!contains(host, feature)) expected.push_back(feature);
  }
  EXPECT_EQ(cpu_features_missing(wanted), expected);
}

}  // namespace
}  // namespace edgesmith

TEST(CpuFeatures, ModelIsPrintableBoundedAndNeverEmpty) {
  const std::string model = edgesmith::cpu_model();
  ASSERT_FALSE(model.empty());
  EXPECT_LE(model.size(), 64u);
  for (const char c : model) EXPECT_TRUE(c >= ' ' && c < 127) << model;
  EXPECT_NE(model.front(), ' ');
  EXPECT_NE(model.back(), ' ');
  EXPECT_EQ(model.find("  "), std::string::npos) << model;
}

