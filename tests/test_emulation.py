"""Arm artifacts proven under qemu-aarch64 user emulation, threads included.

The runner uses Debian's multiarch arm64 runtime (never the cross sysroot, whose libc hangs at the
first pthread_create under qemu-user), emulates the target's CPU model (``-cpu``, the target's
``qemu_cpu``) and shows the guest an aarch64 ``/proc/cpuinfo`` through a ``-L`` prefix.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import DIGITS, build_json, run_cli

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PARALLEL_LAUNCH = "__TVMBackendParallelLaunch"

# A dynamically linked aarch64 program (so the multiarch runtime is what loads it) reporting what
# the guest sees: MIDR_EL1 (readable at EL0 when HWCAP_CPUID is set), the dot-product flag,
# /proc/cpuinfo's first "CPU part", and whether a second thread ran.
PROBE_C = r"""
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/auxv.h>

static void* worker(void* arg) { *(int*)arg = 42; return NULL; }

int main(void) {
  unsigned long hwcap = getauxval(AT_HWCAP);
  uint64_t midr = 0;
  if (hwcap & HWCAP_CPUID) __asm__ volatile("mrs %0, midr_el1" : "=r"(midr));
  int value = 0;
  pthread_t thread;
  if (pthread_create(&thread, NULL, worker, &value) != 0 || pthread_join(thread, NULL) != 0) return 1;
  char part[64] = "";
  char line[256];
  FILE* f = fopen("/proc/cpuinfo", "r");
  while (f && fgets(line, sizeof line, f))
    if (strncmp(line, "CPU part", 8) == 0 && !part[0]) sscanf(strchr(line, ':') + 1, "%63s", part);
  if (f) fclose(f);
  printf("{\"midr\": %llu, \"asimddp\": %d, \"thread\": %d, \"cpuinfo_part\": \"%s\"}\n",
         (unsigned long long)midr, (hwcap & HWCAP_ASIMDDP) != 0, value, part);
  return 0;
}
"""


def _qemu_runner(target_name: str):
    from edgesmith.toolchain.prove import aarch64_bundle, runner_for
    from edgesmith.toolchain.targets import get_target

    runner, how = runner_for(get_target(target_name))
    assert runner is not None and how == "qemu-aarch64", (
        f"cannot run aarch64 code here ({how}); bootstrap installs qemu-user-static, the arm64 runtime and {aarch64_bundle()}")
    return runner


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("probe")
    (directory / "probe.c").write_text(PROBE_C)
    subprocess.run(["aarch64-linux-gnu-gcc", "-O1", "-pthread", "probe.c", "-o", "probe"], cwd=directory, check=True)
    return directory / "probe"


@pytest.mark.parametrize("target_name, qemu_cpu, part, asimddp", [
    ("rpi4-aarch64", "cortex-a72", 0xD08, False),
    ("rpi5-aarch64", "cortex-a76", 0xD0B, True),
    ("jetson-orin-cpu", "cortex-a76", 0xD0B, True),
])
def test_qemu_runner_emulates_the_targets_cpu(probe, target_name, qemu_cpu, part, asimddp):
    runner = _qemu_runner(target_name)
    assert runner.cpu == qemu_cpu
    command = [*runner.command()[:-1], str(probe)]  # the proof's qemu command with the probe instead of edgesmith-run
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["midr"] >> 4 & 0xFFF == part, seen
    assert bool(seen["asimddp"]) is asimddp, seen
    assert seen["cpuinfo_part"] == f"0x{part:03x}", seen  # the prefix's /proc/cpuinfo, not the host's x86 one
    assert seen["thread"] == 42


def test_qemu_cpu_must_have_the_targets_features(tmp_path):
    from edgesmith.toolchain.prove import qemu_cpu_for
    from edgesmith.toolchain.targets import load_target_file

    def target(extra: str):
        path = tmp_path / "arm-dotprod.toml"
        path.write_text(f'extends = "_linux-aarch64"\ndescription = "x"\nthreads = 4\ncpu_features = ["asimd", "asimddp"]\n{extra}')
        return load_target_file(path)

    cpu, why = qemu_cpu_for(target('qemu_cpu = "cortex-a72"\n'))
    assert cpu is None and "lacks asimddp" in why and "cortex-a76" in why
    cpu, why = qemu_cpu_for(target('qemu_cpu = "cortex-x9"\n'))
    assert cpu is None and "cortex-x9" in why and "cortex-a72" in why
    assert qemu_cpu_for(target("")) == ("cortex-a76", "")  # the oldest model that has asimddp


@pytest.mark.parametrize("backend", ["tvm", "openvino"])
def test_build_proves_rpi4_artifacts_under_qemu(digits_artifacts, backend):
    manifest = json.loads((Path(digits_artifacts["artifacts"][("rpi4-aarch64", backend)]["path"]) / "manifest.json").read_text())
    proof = manifest["proof"]
    assert proof["status"] == "proven" and proof["how"] == "qemu-aarch64" and proof["isa"] == "aarch64", proof
    assert proof["samples"] == 8 and proof["max_abs_err"] <= manifest["golden"]["atol"], proof
    assert proof["runner"].endswith("under qemu-aarch64-static -cpu cortex-a72"), proof


@pytest.mark.parametrize("backend", ["tvm", "openvino"])
def test_prove_cli_runs_rpi4_artifacts_under_qemu(digits_artifacts, backend):
    path = digits_artifacts["artifacts"][("rpi4-aarch64", backend)]["path"]
    env = {"EDGESMITH_HOME": str(digits_artifacts["home"])}
    record = json.loads(run_cli("prove", path, "--json", env=env).stdout)
    assert record["status"] == "proven" and record["how"] == "qemu-aarch64" and record["isa"] == "aarch64", record
    assert record["max_abs_err"] <= 1e-4 and "-cpu cortex-a72" in record["runner"], record
    assert "-cpu cortex-a72" in run_cli("prove", path, env=env).stdout


def test_artifact_needing_dotprod_runs_on_its_core_and_is_refused_on_an_older_one(tmp_path):
    env = {"EDGESMITH_HOME": str(tmp_path / "home")}
    result = build_json(DIGITS, "--input-shape", "1,1,8,8", "-t", "rpi5-aarch64", "--backend", "tvm",
                        "-o", str(tmp_path / "dist"), env=env)
    artifact = result["artifacts"][0]["path"]
    proof = result["artifacts"][0]["proof"]
    assert proof["status"] == "proven" and "-cpu cortex-a76" in proof["runner"], proof
    # The Raspberry Pi 4's runner emulates a Cortex-A72 (no dot product, no fp16): the core refuses.
    command = [*_qemu_runner("rpi4-aarch64").command(), artifact, "--golden", "--key", str(tmp_path / "home" / "keys" / "default.pub")]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "asimddp" in refused.stderr and "needs CPU features" in refused.stderr, refused.stderr


def _dynamic_symbols(library: Path) -> set[str]:
    out = subprocess.run(["aarch64-linux-gnu-nm", "-D", str(library)], capture_output=True, text=True, check=True).stdout
    return {line.split()[-1] for line in out.splitlines() if line.strip()}


def _guest_threads_started(command: list[str], log: Path) -> int:
    """Run ``command`` (a qemu command line) with qemu's syscall log; count the guest's thread clones."""
    qemu, rest = command[0], command[1:]
    result = subprocess.run([qemu, "-d", "strace", "-D", str(log), *rest], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return sum(1 for line in log.read_text().splitlines() if "clone(" in line and "CLONE_THREAD" in line)


@pytest.mark.timeout(900)
def test_tvm_artifact_with_parallel_loops_is_proven_with_its_thread_pool(digits_artifacts, digits_tuned, tmp_path):
    """The run's shared `edgesmith tune` database (conftest's digits_tuned): measured on this x86 host,
    as there is no Arm CPU here to time candidates on. Records match workloads (the TIR functions),
    not targets, and the schedules are target-independent TIR, so the aarch64 build applies them, with
    MetaSchedule's parallel loops: what this test needs, not speed."""
    from edgesmith.toolchain.targets import get_target

    threads = get_target("rpi4-aarch64").threads
    assert threads == 4
    database = Path(digits_tuned["summary"]["database"])
    env = {"EDGESMITH_HOME": str(tmp_path / "home")}
    result = build_json(DIGITS, "--input-shape", "1,1,8,8", "-t", "rpi4-aarch64", "--backend", "tvm",
                        "--tuning-db", str(database), "-o", str(tmp_path / "dist"), env=env)
    assert result["failures"] == [] and len(result["artifacts"]) == 1, result
    artifact = Path(result["artifacts"][0]["path"])

    # The tuned library has parallel loops (TVM's codegen then defines the launcher slot the runtime
    # fills at load); the untuned one from the same model has none.
    assert PARALLEL_LAUNCH in _dynamic_symbols(artifact / "model.so")
    untuned = Path(digits_artifacts["artifacts"][("rpi4-aarch64", "tvm")]["path"])
    assert PARALLEL_LAUNCH not in _dynamic_symbols(untuned / "model.so")

    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["target"]["threads"] == threads and manifest["backend"]["options"]["tuning_db"] == str(database)
    proof = manifest["proof"]
    assert proof["status"] == "proven" and proof["how"] == "qemu-aarch64" and "-cpu cortex-a72" in proof["runner"], proof
    record = json.loads(run_cli("prove", str(artifact), "--json", env=env).stdout)
    assert record["status"] == "proven" and record["max_abs_err"] <= 1e-4, record

    # The same run as the proof, with qemu's syscall log: at the target's thread count the pool
    # starts a worker per thread beyond the caller; with one thread it starts none of those.
    command = [*_qemu_runner("rpi4-aarch64").command(), str(artifact), "--golden", "--json",
               "--key", str(tmp_path / "home" / "keys" / "default.pub")]
    pooled = _guest_threads_started(command, tmp_path / "pooled.log")
    single = _guest_threads_started([*command, "--threads", "1"], tmp_path / "single.log")
    assert pooled - single >= threads - 1, (pooled, single)
