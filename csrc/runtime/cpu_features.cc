#include "runtime/cpu_features.h"

#include <cstdint>
#include <cstdio>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#elif defined(__aarch64__)
#include <sys/auxv.h>
#endif

namespace edgesmith {

namespace {

struct FeatureBit {
  const char* name;
  uint32_t word;  // which register / hwcap word the bit lives in (see the tables)
  uint32_t bit;
};

#if defined(__x86_64__) || defined(__i386__)

// Words: 0 = cpuid(1).ecx, 1 = cpuid(1).edx, 2 = cpuid(7,0).ebx, 3 = cpuid(7,0).ecx,
// 4 = cpuid(7,0).edx, 5 = cpuid(7,1).eax, 6 = cpuid(0x80000001).ecx. Bits from Intel SDM vol. 2A,
// "CPUID", and AMD's APM vol. 3 for the 0x80000001 leaf.
constexpr FeatureBit FEATURES[] = {
    {"sse3", 0, 0},         {"ssse3", 0, 9},        {"fma", 0, 12},
    {"sse4_1", 0, 19},      {"sse4_2", 0, 20},      {"popcnt", 0, 23},
    {"aes", 0, 25},         {"avx", 0, 28},         {"f16c", 0, 29},
    {"sse", 1, 25},         {"sse2", 1, 26},        {"bmi1", 2, 3},
    {"avx2", 2, 5},         {"bmi2", 2, 8},         {"avx512f", 2, 16},
    {"avx512dq", 2, 17},    {"avx512ifma", 2, 21},  {"avx512cd", 2, 28},
    {"sha_ni", 2, 29},      {"avx512bw", 2, 30},    {"avx512vl", 2, 31},
    {"avx512vbmi", 3, 1},   {"avx512_vbmi2", 3, 6}, {"gfni", 3, 8},
    {"vaes", 3, 9},         {"avx512_vnni", 3, 11}, {"avx512_bitalg", 3, 12},
    {"avx512_vpopcntdq", 3, 14}, {"avx512_vp2intersect", 4, 8}, {"amx_bf16", 4, 22},
    {"avx512_fp16", 4, 23}, {"amx_tile", 4, 24},  {"amx_int8", 4, 25},
    {"avx_vnni", 5, 4},     {"avx512_bf16", 5, 5},  {"amx_fp16", 5, 21},
    {"avx_ifma", 5, 23},    {"sse4a", 6, 6},        {"xop", 6, 11},
    {"fma4", 6, 16},
};
constexpr size_t WORDS = 7;

// XCR0 state components the OS must enable: SSE|AVX for 256-bit, plus opmask|ZMM for AVX-512,
// plus tile config/data for AMX.
constexpr uint64_t XCR0_AVX = 0x6;
constexpr uint64_t XCR0_AVX512 = 0xe0;
constexpr uint64_t XCR0_AMX = 0x60000;

struct HostWords {
  uint32_t words[WORDS] = {};
  uint64_t xcr0 = 0;
};

HostWords host_words() {
  HostWords host;
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (__get_cpuid(1, &a, &b, &c, &d)) {
    host.words[0] = c;
    host.words[1] = d;
    if ((c >> 27) & 1u) {  // OSXSAVE: xgetbv is usable
      uint32_t lo = 0, hi = 0;
      __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
      host.xcr0 = (static_cast<uint64_t>(hi) << 32) | lo;
    }
  }
  if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
    host.words[2] = b;
    host.words[3] = c;
    host.words[4] = d;
  }
  if (__get_cpuid_count(7, 1, &a, &b, &c, &d)) host.words[5] = a;
  if (__get_cpuid(0x80000001, &a, &b, &c, &d)) host.words[6] = c;
  return host;
}

bool os_enables(const char* name, uint64_t xcr0) {
  const bool avx512 = std::strncmp(name, "avx512", 6) == 0;
  const bool amx = std::strncmp(name, "amx", 3) == 0;
  const bool avx = avx512 || std::strncmp(name, "avx", 3) == 0 || !std::strcmp(name, "fma") ||
                   !std::strcmp(name, "fma4") || !std::strcmp(name, "xop") ||
                   !std::strcmp(name, "f16c") || !std::strcmp(name, "vaes");
  if (avx && (xcr0 & XCR0_AVX) != XCR0_AVX) return false;
  if (avx512 && (xcr0 & XCR0_AVX512) != XCR0_AVX512) return false;
  if (amx && (xcr0 & XCR0_AMX) != XCR0_AMX) return false;
  return true;
}

#elif defined(__aarch64__)

// Words: 0 = AT_HWCAP, 1 = AT_HWCAP2. Bits from the kernel's arch/arm64/include/uapi/asm/hwcap.h,
// names as /proc/cpuinfo prints them.
constexpr FeatureBit FEATURES[] = {
    {"fp", 0, 0},          {"asimd", 0, 1},      {"evtstrm", 0, 2},   {"aes", 0, 3},
    {"pmull", 0, 4},       {"sha1", 0, 5},       {"sha2", 0, 6},      {"crc32", 0, 7},
    {"atomics", 0, 8},     {"fphp", 0, 9},       {"asimdhp", 0, 10},  {"cpuid", 0, 11},
    {"asimdrdm", 0, 12},   {"jscvt", 0, 13},     {"fcma", 0, 14},     {"lrcpc", 0, 15},
    {"dcpop", 0, 16},      {"sha3", 0, 17},      {"sm3", 0, 18},      {"sm4", 0, 19},
    {"asimddp", 0, 20},    {"sha512", 0, 21},    {"sve", 0, 22},      {"asimdfhm", 0, 23},
    {"dit", 0, 24},        {"uscat", 0, 25},     {"ilrcpc", 0, 26},   {"flagm", 0, 27},
    {"ssbs", 0, 28},       {"sb", 0, 29},        {"paca", 0, 30},     {"pacg", 0, 31},
    {"dcpodp", 1, 0},      {"sve2", 1, 1},       {"sveaes", 1, 2},    {"svepmull", 1, 3},
    {"svebitperm", 1, 4},  {"svesha3", 1, 5},    {"svesm4", 1, 6},    {"flagm2", 1, 7},
    {"frint", 1, 8},       {"svei8mm", 1, 9},    {"svef32mm", 1, 10}, {"svef64mm", 1, 11},
    {"svebf16", 1, 12},    {"i8mm", 1, 13},      {"bf16", 1, 14},     {"dgh", 1, 15},
    {"rng", 1, 16},        {"bti", 1, 17},       {"mte", 1, 18},
};
constexpr size_t WORDS = 2;

struct HostWords {
  uint32_t words[WORDS] = {};
  uint64_t xcr0 = 0;
};

HostWords host_words() {
  HostWords host;
  host.words[0] = static_cast<uint32_t>(getauxval(AT_HWCAP));
  host.words[1] = static_cast<uint32_t>(getauxval(AT_HWCAP2));
  return host;
}

bool os_enables(const char*, uint64_t) { return true; }  // the kernel reports usable features only

#else

constexpr FeatureBit FEATURES[] = {{"", 0, 0}};
constexpr size_t WORDS = 1;
struct HostWords {
  uint32_t words[WORDS] = {};
  uint64_t xcr0 = 0;
};
HostWords host_words() { return {}; }
bool os_enables(const char*, uint64_t) { return false; }

#endif

const FeatureBit* feature_find(const std::string& name) {
  for (const FeatureBit& feature : FEATURES) {
    if (feature.name[0] != '\0' && name == feature.name) return &feature;
  }
  return nullptr;
}

const HostWords& host() {
  static const HostWords words = host_words();
  return words;
}

bool bit_present(const FeatureBit& feature) {
  return feature.word < WORDS && ((host().words[feature.word] >> feature.bit) & 1u) != 0 &&
         os_enables(feature.name, host().xcr0);
}

}  // namespace

bool cpu_feature_known(const std::string& feature) { return feature_find(feature) != nullptr; }

bool cpu_feature_present(const std::string& feature) {
  const FeatureBit* found = feature_find(feature);
  return found != nullptr && bit_present(*found);
}

std::vector<std::string> cpu_features_missing(const std::vector<std::string>& features) {
  std::vector<std::string> missing;
  for (const std::string& feature : features) {
    if (!cpu_feature_known(feature)) {
      missing.push_back(feature + " (unknown to this runtime)");
    } else if (!cpu_feature_present(feature)) {
      missing.push_back(feature);
    }
  }
  return missing;
}

std::vector<std::string> cpu_features_host() {
  std::vector<std::string> present;
  for (const FeatureBit& feature : FEATURES) {
    if (feature.name[0] != '\0' && bit_present(feature)) present.emplace_back(feature.name);
  }
  return present;
}

namespace {

// Printable ASCII only, runs of blanks collapsed, trimmed, at most 64 characters: the brand string
// is the CPU's own bytes, and it goes into a message the monitor stores and shows.
std::string model_clean(const std::string& raw) {
  std::string out;
  for (const char c : raw) {
    if (c == '\0') break;
    const bool blank = c == ' ' || c == '\t';
    if (blank) {
      if (!out.empty() && out.back() != ' ') out.push_back(' ');
    } else if (c > ' ' && c < 127) {
      out.push_back(c);
    }
  }
  while (!out.empty() && out.back() == ' ') out.pop_back();
  if (out.size() > 64) out.resize(64);
  return out;
}

#if defined(__aarch64__)
// MIDR_EL1 implementer and part numbers (Arm's Technical Reference Manuals; the Linux kernel's
// arch/arm64/include/asm/cputype.h), for the cores edgesmith's targets name and their neighbours.
struct ArmPart {
  uint32_t implementer;
  uint32_t part;
  const char* name;
};
constexpr ArmPart ARM_PARTS[] = {
    {0x41, 0xd03, "Arm Cortex-A53"},  {0x41, 0xd04, "Arm Cortex-A35"},  {0x41, 0xd05, "Arm Cortex-A55"},
    {0x41, 0xd07, "Arm Cortex-A57"},  {0x41, 0xd08, "Arm Cortex-A72"},  {0x41, 0xd09, "Arm Cortex-A73"},
    {0x41, 0xd0a, "Arm Cortex-A75"},  {0x41, 0xd0b, "Arm Cortex-A76"},  {0x41, 0xd0c, "Arm Neoverse-N1"},
    {0x41, 0xd0d, "Arm Cortex-A77"},  {0x41, 0xd40, "Arm Neoverse-V1"}, {0x41, 0xd41, "Arm Cortex-A78"},
    {0x41, 0xd42, "Arm Cortex-A78AE"}, {0x41, 0xd44, "Arm Cortex-X1"},  {0x41, 0xd46, "Arm Cortex-A510"},
    {0x41, 0xd47, "Arm Cortex-A710"}, {0x41, 0xd49, "Arm Neoverse-N2"}, {0x41, 0xd4b, "Arm Cortex-A78C"},
    {0x41, 0xd4f, "Arm Neoverse-V2"}, {0x41, 0xd80, "Arm Cortex-A520"}, {0x41, 0xd81, "Arm Cortex-A720"},
    {0x61, 0x022, "Apple M1"},        {0x61, 0x023, "Apple M1"},
};

uint64_t midr() {
  if ((getauxval(AT_HWCAP) & (1ul << 11)) != 0) {  // HWCAP_CPUID: the kernel emulates mrs of ID registers
    uint64_t value = 0;
    __asm__ volatile("mrs %0, MIDR_EL1" : "=r"(value));
    return value;
  }
  uint64_t value = 0;  // older kernels: sysfs
  if (FILE* f = std::fopen("/sys/devices/system/cpu/cpu0/regs/identification/midr_el1", "r")) {
    if (std::fscanf(f, "%lx", &value) != 1) value = 0;
    std::fclose(f);
  }
  return value;
}
#endif

}  // namespace

std::string cpu_model() {
  std::string model;
#if defined(__x86_64__) || defined(__i386__)
  unsigned top = 0, b = 0, c = 0, d = 0;
  __get_cpuid(0x80000000, &top, &b, &c, &d);
  if (top >= 0x80000004) {
    char brand[49] = {};
    for (unsigned i = 0; i < 3; ++i) {
      unsigned regs[4] = {};
      __get_cpuid(0x80000002 + i, &regs[0], &regs[1], &regs[2], &regs[3]);
      std::memcpy(brand + 16 * i, regs, sizeof(regs));
    }
    model = model_clean(brand);
  }
  if (model.empty()) model = "unknown x86-64 CPU";
#elif defined(__aarch64__)
  const uint64_t value = midr();
  const uint32_t implementer = static_cast<uint32_t>((value >> 24) & 0xff);
  const uint32_t part = static_cast<uint32_t>((value >> 4) & 0xfff);
  for (const ArmPart& known : ARM_PARTS) {
    if (known.implementer == implementer && known.part == part) model = known.name;
  }
  if (model.empty() && value != 0) {
    char text[64];
    std::snprintf(text, sizeof(text), "aarch64 implementer 0x%02x part 0x%03x", implementer, part);
    model = text;
  }
  if (model.empty()) model = "unknown aarch64 CPU";
#else
  model = "unknown CPU";
#endif
  return model;
}

}  // namespace edgesmith
