"""Hardware targets as data: one TOML file per target under ``targets/`` (see targets/README.md).

Files are validated when loaded; an invalid file is reported by file and key. Shared values come
from ``_base`` files through ``extends``.
"""

from __future__ import annotations

import difflib
import os
import platform
import shutil
import tomllib
from functools import cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgesmith.toolchain.errors import UserError

BackendName = Literal["tvm", "openvino", "tflite"]
Precision = Literal["fp32", "fp16"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Tolerance(_Strict):
    atol: float = Field(ge=0)
    rtol: float = Field(ge=0)


class Tolerances(_Strict):
    fp32: Tolerance
    fp16: Tolerance


class TvmSettings(_Strict):
    target: dict[str, Any]
    cross_compiler: str | None = None
    cross_compiler_package: str | None = None

    @field_validator("target")
    @classmethod
    def _target_is_llvm_dict(cls, value: dict[str, Any]) -> dict[str, Any]:
        if value.get("kind") != "llvm":
            raise ValueError("only kind = \"llvm\" CPU targets are supported")
        if value.get("mcpu") == "native":
            raise ValueError("mcpu = \"native\" is not allowed: name the CPU (e.g. \"cortex-a72\")")
        return value


class OpenVinoSettings(_Strict):
    device: str = "CPU"
    inference_precision: Literal["f32", "f16", "bf16"] = "f32"
    performance_hint: Literal["LATENCY", "THROUGHPUT"] = "LATENCY"


class TfliteSettings(_Strict):
    delegate: Literal["xnnpack", "none"] = "xnnpack"


class Target(_Strict):
    name: str
    description: str
    isa: Literal["x86_64", "aarch64"]
    os: Literal["linux", "android"]
    cpu_features: list[str] = []
    threads: int = Field(ge=1, le=256)
    backends: list[BackendName] = Field(min_length=1)
    proof: Literal["native", "qemu-aarch64", "none"]
    tolerance: Tolerances
    tvm: TvmSettings | None = None
    openvino: OpenVinoSettings | None = None
    tflite: TfliteSettings | None = None
    source: str = Field(default="", description="the file this target was read from")

    @model_validator(mode="after")
    def _backend_sections_present(self) -> Target:
        for backend in self.backends:
            if getattr(self, backend) is None and backend != "tflite":
                raise ValueError(f"backend {backend!r} is listed in 'backends' but the [{backend}] table is missing")
        if self.proof == "qemu-aarch64" and self.isa != "aarch64":
            raise ValueError("proof = \"qemu-aarch64\" needs isa = \"aarch64\"")
        return self

    def tolerance_for(self, precision: Precision) -> Tolerance:
        return getattr(self.tolerance, precision)

    def spec(self) -> dict[str, Any]:
        """The resolved spec as recorded in manifests and shown by ``edgesmith targets --json``."""
        return self.model_dump(mode="json", exclude_none=True, exclude={"source"})


def builtin_targets_dir() -> Path:
    # Installed: edgesmith/toolchain/../targets; editable checkout: repo/toolchain/../targets.
    return Path(__file__).resolve().parent.parent / "targets"


def target_dirs() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("EDGESMITH_TARGETS_PATH", "").split(os.pathsep) if p]
    return extra + [builtin_targets_dir()]


def _deep_merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"target file {path} is not valid TOML ({e}); fix the file") from None


def _find_file(name: str) -> Path | None:
    for directory in target_dirs():
        candidate = directory / f"{name}.toml"
        if candidate.is_file():
            return candidate
    return None


def _resolve_raw(path: Path, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    raw = _read_toml(path)
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if not isinstance(parent, str):
        raise UserError(f"target file {path}: key 'extends' must be a file name without .toml")
    if parent in seen:
        raise UserError(f"target file {path}: 'extends' forms a cycle ({' -> '.join(seen + (parent,))})")
    parent_path = _find_file(parent)
    if parent_path is None:
        raise UserError(f"target file {path}: 'extends = \"{parent}\"' names no file {parent}.toml in {', '.join(map(str, target_dirs()))}")
    return _deep_merge(_resolve_raw(parent_path, seen + (parent,)), raw)


def load_target_file(path: Path) -> Target:
    """Read, merge and validate one target file; errors name the file and the key."""
    path = Path(path)
    raw = _resolve_raw(path, (path.stem,))
    raw.setdefault("name", path.stem)
    raw["source"] = str(path)
    if raw["name"] != path.stem:
        raise UserError(f"target file {path}: key 'name' is {raw['name']!r} but must equal the file name {path.stem!r}")
    try:
        return Target.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise UserError(f"target file {path}: key '{key}': {err['msg']}; fix the file (keys are documented in targets/README.md)") from None


@cache
def _load_all(dirs: tuple[Path, ...]) -> dict[str, Target]:
    targets: dict[str, Target] = {}
    for directory in reversed(dirs):  # earlier directories override later ones
        for path in sorted(directory.glob("*.toml")):
            if not path.name.startswith("_"):
                targets[path.stem] = load_target_file(path)
    return dict(sorted(targets.items()))


def all_targets() -> dict[str, Target]:
    return _load_all(tuple(target_dirs()))


def host_cpu_features() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    features: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            features.update(value.split())
    return features


def host_isa() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def runs_natively(target: Target) -> bool:
    """True when this machine can execute code built for the target."""
    return target.os == "linux" and target.isa == host_isa() and set(target.cpu_features) <= host_cpu_features()


def host_target() -> Target:
    """The most specific Linux target this machine can run natively."""
    fitting = [t for t in all_targets().values() if runs_natively(t)]
    if not fitting:
        raise UserError(f"no target file fits this machine ({host_isa()}); add one under targets/ (see targets/README.md)")
    return max(fitting, key=lambda t: (len(t.cpu_features), t.name))


def get_target(name: str) -> Target:
    if name == "host":
        return host_target()
    targets = all_targets()
    if name in targets:
        return targets[name]
    close = difflib.get_close_matches(name, list(targets), n=3, cutoff=0.4)
    hint = f"did you mean {', '.join(close)}?" if close else "run `edgesmith targets` to list them."
    raise UserError(f"unknown target {name!r}; {hint}")


def proof_status(target: Target) -> tuple[bool, str]:
    """Can an artifact for this target be executed on this machine, and how (or why not)."""
    if target.proof == "native":
        if runs_natively(target):
            return True, "native"
        missing = sorted(set(target.cpu_features) - host_cpu_features())
        why = f"host lacks {', '.join(missing)}" if target.isa == host_isa() else f"host is {host_isa()}"
        return False, f"native only ({why})"
    if target.proof == "qemu-aarch64":
        if runs_natively(target):
            return True, "native"
        if shutil.which("qemu-aarch64-static") and Path("/usr/aarch64-linux-gnu").is_dir():
            return True, "qemu-aarch64"
        return False, "needs qemu-user-static and the aarch64 sysroot (apt-get install qemu-user-static g++-aarch64-linux-gnu)"
    return False, "no emulator for this target"
