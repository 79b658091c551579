"""``edgesmith prove``: run an artifact on its own ISA with the device runtime, against its golden outputs.

The runner is ``edgesmith-run`` (C++, no Python) — natively for the host's ISA, or the aarch64
build of it under ``qemu-aarch64-static`` for Arm targets. The golden outputs in the artifact are
ONNX Runtime's outputs for the golden inputs, so a proven artifact matches ONNX Runtime when run
by the same code the device runs.

Under qemu the runner emulates the target's core (``-cpu``, the target's ``qemu_cpu``) and loads
Debian's multiarch arm64 libc/libstdc++ (``libc6:arm64``, ``libstdc++6:arm64``). It never uses the
cross-compiler's sysroot (``-L /usr/aarch64-linux-gnu``): there every dynamically linked program
spins forever at its first ``pthread_create``. ``-L`` points instead at a small per-CPU prefix
holding only an aarch64 ``/proc/cpuinfo`` and the cores' ``midr_el1``: qemu looks guest paths up there
first and falls back to the real root, so the engines (OpenVINO's Arm plugin, cpuinfo readers)
see the emulated core rather than the host's x86 ``/proc/cpuinfo``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgesmith.runtime.keys import edgesmith_home
from edgesmith.runtime.manifest import Proof
from edgesmith.toolchain.errors import UserError
from edgesmith.toolchain.targets import Target, proof_status

QEMU = "qemu-aarch64-static"
PROOF_TIMEOUT_S = 300


@dataclass(frozen=True)
class QemuCpu:
    midr: int  # MIDR_EL1: implementer, variant, part, revision
    features: tuple[str, ...]  # /proc/cpuinfo "Features", i.e. the AT_HWCAP flags qemu gives the guest


_ARMV8_0 = ("fp", "asimd", "aes", "pmull", "sha1", "sha2", "crc32", "cpuid")
_ARMV8_2 = ("fp", "asimd", "aes", "pmull", "sha1", "sha2", "crc32", "atomics", "fphp", "asimdhp", "cpuid",
            "asimdrdm", "lrcpc", "dcpop", "asimddp")
# What qemu-aarch64 7.2 emulates per -cpu model, read under it with getauxval(AT_HWCAP) and
# `mrs midr_el1`; oldest first, so the default model for a target is the oldest one that fits.
QEMU_CPUS = {
    "cortex-a53": QemuCpu(0x410FD034, _ARMV8_0),
    "cortex-a57": QemuCpu(0x411FD070, _ARMV8_0),
    "cortex-a72": QemuCpu(0x410FD083, _ARMV8_0),
    "cortex-a76": QemuCpu(0x414FD0B1, _ARMV8_2),
    "neoverse-n1": QemuCpu(0x414FD0C1, _ARMV8_2),
}


@dataclass
class Runner:
    exe: Path  # edgesmith-run
    env: dict[str, str]
    how: str  # "native" | "qemu-aarch64"
    cpu: str | None = None  # the emulated CPU model (qemu only)

    def command(self) -> list[str]:
        """The command that starts ``edgesmith-run``; under qemu it writes the CPU's -L prefix first."""
        if self.cpu is None:
            return [str(self.exe)]
        return [QEMU, "-cpu", self.cpu, "-L", str(qemu_prefix(self.cpu)), str(self.exe)]


def aarch64_bundle() -> Path:
    """Where scripts/build_aarch64_runtime.sh installs the aarch64 runtime (edgesmith-run + libs)."""
    return Path(os.environ.get("EDGESMITH_AARCH64_RUNTIME") or edgesmith_home() / "runners" / "aarch64-linux")


def _native_runner() -> Runner:
    exe = Path(sys.executable).parent / "edgesmith-run"
    if not exe.is_file():
        found = shutil.which("edgesmith-run")
        if found is None:
            raise UserError("edgesmith-run is not installed next to this Python; reinstall edgesmith (`make` or `pip install -e .`)")
        exe = Path(found)
    from edgesmith.runtime import _core

    env = {"EDGESMITH_BACKEND_PATH": str(Path(_core.__file__).parent / "backends")}
    return Runner(exe, env, "native")


def qemu_cpu_for(target: Target) -> tuple[str | None, str]:
    """The qemu CPU model an aarch64 target's proof emulates, or None and why there is none."""
    wanted = set(target.cpu_features)
    if target.qemu_cpu is None:
        fitting = [name for name, cpu in QEMU_CPUS.items() if wanted <= set(cpu.features)]
        if not fitting:
            return None, (f"no qemu CPU model known to edgesmith has all of {', '.join(sorted(wanted))}; "
                          f"set qemu_cpu in {target.source or target.name} to a model from `{QEMU} -cpu help` and add it to QEMU_CPUS")
        return fitting[0], ""
    cpu = QEMU_CPUS.get(target.qemu_cpu)
    if cpu is None:
        return None, (f"qemu_cpu {target.qemu_cpu!r} of {target.name} is not one edgesmith can describe to the guest; "
                      f"use one of {', '.join(QEMU_CPUS)}")
    missing = sorted(wanted - set(cpu.features))
    if missing:
        return None, (f"qemu_cpu {target.qemu_cpu!r} of {target.name} lacks {', '.join(missing)}, which its cpu_features list; "
                      f"use a model that has them ({', '.join(n for n, c in QEMU_CPUS.items() if wanted <= set(c.features))})")
    return target.qemu_cpu, ""


def _write_if_changed(path: Path, text: str) -> None:
    # Concurrent proofs share the prefix: replace files atomically, never truncate one in place.
    if path.is_file() and path.read_text() == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        f.write(text)
    os.replace(f.name, path)


def qemu_prefix(name: str) -> Path:
    """A qemu ``-L`` prefix describing CPU model ``name`` to the guest: ``proc/cpuinfo`` and
    ``sys/devices/system/cpu/cpuN/regs/identification/midr_el1``, one entry per host CPU (the
    emulated threads run on those), laid out as Linux on that core writes them."""
    cpu = QEMU_CPUS[name]
    prefix = edgesmith_home() / "cache" / "qemu-prefix" / name
    midr = cpu.midr
    block = (f"Features\t: {' '.join(cpu.features)}\n"
             f"CPU implementer\t: 0x{midr >> 24 & 0xFF:02x}\n"
             f"CPU architecture: 8\n"
             f"CPU variant\t: 0x{midr >> 20 & 0xF:x}\n"
             f"CPU part\t: 0x{midr >> 4 & 0xFFF:03x}\n"
             f"CPU revision\t: {midr & 0xF}\n\n")
    count = os.cpu_count() or 1
    _write_if_changed(prefix / "proc" / "cpuinfo", "".join(f"processor\t: {i}\n{block}" for i in range(count)))
    cpus = prefix / "sys" / "devices" / "system" / "cpu"
    for i in range(count):
        _write_if_changed(cpus / f"cpu{i}" / "regs" / "identification" / "midr_el1", f"0x{midr:016x}\n")
    return prefix


def _qemu_runner(target: Target) -> tuple[Runner | None, str]:
    exe = aarch64_bundle() / "bin" / "edgesmith-run"
    if not exe.is_file():
        return None, (f"the aarch64 runtime is not built ({aarch64_bundle()} is missing); "
                      "run `edgesmith tools install aarch64-runtime`")
    cpu, why = qemu_cpu_for(target)
    if cpu is None:
        return None, why
    return Runner(exe, {}, "qemu-aarch64", cpu), "qemu-aarch64"


def runner_for(target: Target) -> tuple[Runner | None, str]:
    """The runner that executes this target's artifacts (of every backend) here, or None and the reason."""
    possible, how = proof_status(target)
    if not possible:
        return None, how
    if how == "native":
        return _native_runner(), "native"
    return _qemu_runner(target)


def _run(artifact: Path, runner: Runner, public_keys: list[bytes], args: list[str], what: str,
         timeout_s: float = PROOF_TIMEOUT_S) -> dict:
    """Run ``edgesmith-run ARTIFACT ARGS --json`` with the keys; return its JSON report (or one with
    ``error`` taken from its stderr)."""
    with tempfile.TemporaryDirectory(prefix="edgesmith-prove-") as keys_dir:
        key_args = []
        for i, key in enumerate(public_keys):
            path = Path(keys_dir) / f"key{i}.pub"
            path.write_text(key.hex() + "\n")
            key_args += ["--key", str(path)]
        try:
            result = subprocess.run([*runner.command(), str(artifact), *args, "--json", *key_args],
                                    capture_output=True, text=True, timeout=timeout_s,
                                    env={**os.environ, **runner.env})
        except subprocess.TimeoutExpired:
            raise UserError(f"{what} {artifact.name} ({runner.how}) took longer than {timeout_s:.0f} s; the runtime hung") from None
    report = None
    for line in reversed(result.stdout.strip().splitlines()):
        try:
            report = json.loads(line)
            break
        except json.JSONDecodeError:
            continue
    if report is None:
        errors = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
        detail = errors[-1][len("error:"):].strip() if errors else (result.stderr.strip().splitlines() or ["no output"])[-1]
        report = {"passed": False, "error": detail, "exit_code": result.returncode}
    report.setdefault("exit_code", result.returncode)
    return report


def run_golden(artifact: Path, runner: Runner, public_keys: list[bytes]) -> dict:
    """Run ``edgesmith-run ARTIFACT --golden --json``; return its JSON report."""
    return _run(artifact, runner, public_keys, ["--golden"], "proving")


BATCH_TIMEOUT_S = 1800  # an accuracy gate's inputs under emulation: seconds each for large models


def run_batch(artifact: Path, runner: Runner, public_keys: list[bytes],
              samples: list[list[np.ndarray]]) -> list[list[np.ndarray]]:
    """The artifact's outputs for ``samples``, computed by ``edgesmith-run --batch`` in one process
    (natively or under qemu): how a reduced-precision candidate for another ISA is run for its
    accuracy gate. Raises UserError with the runtime's own sentence when it fails."""
    with tempfile.TemporaryDirectory(prefix="edgesmith-batch-") as tmp:
        for k, sample in enumerate(samples):
            folder = Path(tmp) / f"sample_{k}"
            folder.mkdir()
            for i, array in enumerate(sample):
                np.save(folder / f"input_{i}.npy", np.asarray(array, order="C"), allow_pickle=False)
        report = _run(artifact, runner, public_keys, ["--batch", tmp], "running the gate inputs of", BATCH_TIMEOUT_S)
        if report["exit_code"] != 0 or report.get("batch", {}).get("samples") != len(samples):
            raise UserError(f"{artifact.name} did not run on {runner.how}"
                            f"{' -cpu ' + runner.cpu if runner.cpu else ''}: {report.get('error') or 'no outputs'}")
        outputs = []
        for k in range(len(samples)):
            folder = Path(tmp) / f"sample_{k}"
            outputs.append([np.load(p) for p in sorted(folder.glob("output_*.npy"), key=lambda p: int(p.stem.split("_")[1]))])
        return outputs


def prove(artifact: Path, target: Target, backend: str, public_keys: list[bytes]) -> Proof:
    """Run the artifact on its ISA; a Proof with status proven, failed, or not-run (and why).

    ``backend`` does not change how: every backend's artifacts run in the same runtime."""
    runner, how = runner_for(target)
    if runner is None:
        return Proof(status="not-run", isa=target.isa, reason=how)
    report = run_golden(artifact, runner, public_keys)
    passed = bool(report.get("passed")) and report["exit_code"] == 0
    reason = None if passed else report.get("error") or "outputs differ from the golden outputs beyond tolerance"
    described = report.get("runner")
    if described and runner.cpu:
        described = f"{described} under {QEMU} -cpu {runner.cpu}"
    return Proof(status="proven" if passed else "failed", isa=target.isa, how=runner.how,
                 runner=described, samples=int(report.get("samples", 0)),
                 max_abs_err=report.get("max_abs_err"), reason=reason)
