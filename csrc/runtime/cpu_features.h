// Which CPU features this machine has, checked before an artifact's code is loaded: a target's
// `cpu_features` (named as Linux's /proc/cpuinfo names them: "avx2", "avx512f", "asimddp", ...)
// are what its compiled code may use, so running it on a CPU without one would die of SIGILL.
// x86-64 asks cpuid (and xgetbv: the OS must save the wider registers), aarch64 asks the kernel's
// getauxval(AT_HWCAP/AT_HWCAP2), which is also what qemu-user's -cpu model changes.
#pragma once

#include <string>
#include <vector>

namespace edgesmith {

/// Whether `feature` names a feature this runtime can check on this machine's ISA.
bool cpu_feature_known(const std::string& feature);

/// Whether this CPU (and OS) has `feature`; false for unknown names.
bool cpu_feature_present(const std::string& feature);

/// The entries of `features` this machine lacks, in order; an unknown name counts as lacking,
/// spelled "<name> (unknown to this runtime)".
std::vector<std::string> cpu_features_missing(const std::vector<std::string>& features);

/// Every feature this runtime checks that the CPU has (for diagnostics and `edgesmith targets`).
std::vector<std::string> cpu_features_host();

/// The CPU's model, as a device reports it in its birth message (runtime.cpu) so measurements on
/// devices (shadow latency) can say what they ran on: on x86-64 cpuid's brand string ("Intel(R)
/// Xeon(R) Processor"), on aarch64 the core named from MIDR_EL1's implementer and part ("Arm
/// Cortex-A72"; read with `mrs` where the kernel emulates it, which is also what qemu-user's -cpu
/// model answers), else "<implementer> part 0x..."; never empty, printable ASCII, at most 64 characters.
std::string cpu_model();

}  // namespace edgesmith
