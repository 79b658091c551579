// Which instruction set this machine runs, and which one an ELF shared library was built for.
// Both are checked before a payload is handed to dlopen(), so a foreign library is refused with a
// sentence instead of a loader error.
#pragma once

#include <string>

namespace edgesmith {

/// The host's ISA as edgesmith targets name it ("x86_64", "aarch64", ...), from uname().
std::string host_isa();

/// Canonical edgesmith name of an ISA spelling ("arm64" -> "aarch64", "amd64" -> "x86_64").
std::string isa_normalize(const std::string& isa);

/// Whether the payload entry at `path` is native code to be dlopen()ed: its name ends in ".so"
/// (or has a ".so." version suffix) or its first bytes are the ELF magic. Such a payload is checked
/// with elf_isa() before any plugin sees it, whichever backend runs it.
bool payload_is_shared_library(const std::string& path);

/// The ISA of the ELF shared library at `path` ("x86_64", "aarch64", "arm", "riscv64", ...).
/// A file that is not an ELF shared object throws Error(ERROR_CODE_UNSUPPORTED) whose message
/// names `blame` ("model.so is not an ELF shared library (truncated or foreign)").
std::string elf_isa(const std::string& path, const std::string& blame);

}  // namespace edgesmith
