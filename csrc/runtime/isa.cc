#include "runtime/isa.h"

#include <sys/utsname.h>

#include <array>
#include <cstdint>
#include <fstream>

#include "common/error.h"

namespace edgesmith {

namespace {

// ELF e_machine values (elf.h) and the ISA names edgesmith targets use for them.
struct ElfMachine {
  uint16_t machine;
  const char* isa;
};

constexpr ElfMachine ELF_MACHINES[] = {
    {3, "x86"},      {8, "mips"},       {20, "ppc"},       {21, "ppc64"}, {40, "arm"},
    {62, "x86_64"},  {183, "aarch64"},  {243, "riscv64"},  {258, "loongarch64"},
};

constexpr size_t ELF_HEADER_PREFIX = 20;  // e_ident[16], e_type[2], e_machine[2]
constexpr uint16_t ELF_TYPE_DYN = 3;

}  // namespace

std::string isa_normalize(const std::string& isa) {
  if (isa == "arm64") return "aarch64";
  if (isa == "amd64" || isa == "x64") return "x86_64";
  if (isa == "i386" || isa == "i686") return "x86";
  return isa;
}

std::string host_isa() {
  struct utsname name {};
  if (uname(&name) != 0) return "unknown";
  return isa_normalize(name.machine);
}

bool payload_is_shared_library(const std::string& path) {
  const std::string name = path.substr(path.find_last_of('/') + 1);
  const size_t so = name.find(".so");
  if (so != std::string::npos && (so + 3 == name.size() || name[so + 3] == '.')) return true;
  std::ifstream in(path, std::ios::binary);
  char magic[4] = {};
  return in.read(magic, sizeof(magic)) && magic[0] == 0x7f && magic[1] == 'E' && magic[2] == 'L' &&
         magic[3] == 'F';
}

std::string elf_isa(const std::string& path, const std::string& blame) {
  const std::string foreign = blame + " is not an ELF shared library (truncated or foreign); "
                                      "rebuild the artifact";
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(ERROR_CODE_IO, blame + " cannot be opened; check its permissions", blame);
  std::array<unsigned char, ELF_HEADER_PREFIX> header{};
  in.read(reinterpret_cast<char*>(header.data()), header.size());
  if (in.gcount() != static_cast<std::streamsize>(header.size()) || header[0] != 0x7f ||
      header[1] != 'E' || header[2] != 'L' || header[3] != 'F') {
    throw Error(ERROR_CODE_UNSUPPORTED, foreign, blame);
  }
  const bool little = header[5] == 1;
  if (header[5] != 1 && header[5] != 2) throw Error(ERROR_CODE_UNSUPPORTED, foreign, blame);
  const auto half = [&](size_t offset) {
    return little ? static_cast<uint16_t>(header[offset] | (header[offset + 1] << 8))
                  : static_cast<uint16_t>((header[offset] << 8) | header[offset + 1]);
  };
  if (half(16) != ELF_TYPE_DYN) throw Error(ERROR_CODE_UNSUPPORTED, foreign, blame);
  const uint16_t machine = half(18);
  for (const ElfMachine& known : ELF_MACHINES) {
    if (known.machine == machine) return known.isa;
  }
  return "elf-machine-" + std::to_string(machine);
}

}  // namespace edgesmith
