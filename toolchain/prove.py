"""``edgesmith prove``: run an artifact on its own ISA with the device runtime, against its golden outputs.

The runner is ``edgesmith-run`` (C++, no Python) — natively for the host's ISA, or the aarch64
build of it under ``qemu-aarch64-static`` for Arm targets. The golden outputs in the artifact are
ONNX Runtime's outputs for the golden inputs, so a proven artifact matches ONNX Runtime when run
by the same code the device runs.
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

from edgesmith.runtime.keys import edgesmith_home
from edgesmith.runtime.manifest import Proof
from edgesmith.toolchain.errors import UserError
from edgesmith.toolchain.targets import Target, proof_status

QEMU = "qemu-aarch64-static"
AARCH64_SYSROOT = "/usr/aarch64-linux-gnu"
PROOF_TIMEOUT_S = 600

# Backends whose engine cannot run under qemu-aarch64 user emulation here (Debian's qemu 7.2):
# OpenVINO's Arm CPU plugin spins forever inside compile_model, also in a 15-line runner that
# links nothing but OpenVINO, so the proof would only burn the timeout. Such artifacts need a device.
QEMU_UNSUPPORTED = {"openvino": "OpenVINO's Arm CPU plugin hangs in compile_model under qemu-aarch64 user emulation; prove it on a device"}


@dataclass
class Runner:
    command: list[str]
    env: dict[str, str]
    how: str  # "native" | "qemu-aarch64"


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
    return Runner([str(exe)], env, "native")


def _qemu_runner() -> Runner | None:
    exe = aarch64_bundle() / "bin" / "edgesmith-run"
    if not exe.is_file():
        return None
    return Runner([QEMU, "-L", AARCH64_SYSROOT, str(exe)], {}, "qemu-aarch64")


def runner_for(target: Target, backend: str | None = None) -> tuple[Runner | None, str]:
    """The runner that executes this target's (and backend's) artifacts here, or None and the reason."""
    possible, how = proof_status(target)
    if not possible:
        return None, how
    if how == "native":
        return _native_runner(), "native"
    if backend in QEMU_UNSUPPORTED:
        return None, QEMU_UNSUPPORTED[backend]
    runner = _qemu_runner()
    if runner is None:
        return None, (f"the aarch64 runtime is not built ({aarch64_bundle()} is missing); "
                      "run `edgesmith tools install aarch64-runtime`")
    return runner, how


def run_golden(artifact: Path, runner: Runner, public_keys: list[bytes]) -> dict:
    """Run ``edgesmith-run ARTIFACT --golden --json``; return its JSON report."""
    with tempfile.TemporaryDirectory(prefix="edgesmith-prove-") as keys_dir:
        key_args = []
        for i, key in enumerate(public_keys):
            path = Path(keys_dir) / f"key{i}.pub"
            path.write_text(key.hex() + "\n")
            key_args += ["--key", str(path)]
        try:
            result = subprocess.run([*runner.command, str(artifact), "--golden", "--json", *key_args],
                                    capture_output=True, text=True, timeout=PROOF_TIMEOUT_S,
                                    env={**os.environ, **runner.env})
        except subprocess.TimeoutExpired:
            raise UserError(f"proving {artifact.name} ({runner.how}) took longer than {PROOF_TIMEOUT_S} s; the runtime hung") from None
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


def prove(artifact: Path, target: Target, backend: str, public_keys: list[bytes]) -> Proof:
    """Run the artifact on its ISA; a Proof with status proven, failed, or not-run (and why)."""
    runner, how = runner_for(target, backend)
    if runner is None:
        return Proof(status="not-run", isa=target.isa, reason=how)
    report = run_golden(artifact, runner, public_keys)
    passed = bool(report.get("passed")) and report["exit_code"] == 0
    reason = None if passed else report.get("error") or "outputs differ from the golden outputs beyond tolerance"
    return Proof(status="proven" if passed else "failed", isa=target.isa, how=runner.how,
                 runner=report.get("runner"), samples=int(report.get("samples", 0)),
                 max_abs_err=report.get("max_abs_err"), reason=reason)
