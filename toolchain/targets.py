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
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from edgesmith.toolchain.errors import UserError

Precision = Literal["fp32", "bf16", "fp16", "int8"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16", "int8")
# Reduced float precisions run on hardware arithmetic the CPU must have (precision_features); int8
# runs on every CPU edgesmith targets (faster with VNNI/dot-product instructions, never wrong without).
FLOAT_REDUCED = ("bf16", "fp16")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Tolerance(_Strict):
    atol: float = Field(ge=0)
    rtol: float = Field(ge=0)


class Tolerances(_Strict):
    """Per precision: fp32 is the element-wise bound against ONNX Runtime; for a reduced precision
    (bf16, fp16, int8) ``rtol`` bounds each output's largest error relative to that output's spread
    over the gate's inputs (docs/selection.md, the accuracy budget)."""

    fp32: Tolerance
    fp16: Tolerance
    bf16: Tolerance | None = None
    int8: Tolerance | None = None


def _registered_backend(name: str) -> str:
    from edgesmith.toolchain import backends

    if name not in backends.BACKENDS:
        raise ValueError(f"backend {name!r} is not registered; registered backends: {', '.join(backends.registered())}")
    return name


class Target(BaseModel):
    """One hardware target. Besides the keys below, a target file holds one table per backend it
    lists (``[tvm]``, ``[openvino]``, ...), validated by that backend's ``Settings`` model and
    reached as ``target.<backend>``."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str
    description: str
    isa: Literal["x86_64", "aarch64"]
    os: Literal["linux", "android"]
    cpu_features: list[str] = []
    threads: int = Field(ge=1, le=256)
    backends: list[Annotated[str, AfterValidator(_registered_backend)]] = Field(min_length=1)
    proof: Literal["native", "qemu-aarch64", "none"]
    qemu_cpu: str | None = Field(default=None, description="the qemu-aarch64 CPU model (`-cpu`) proofs run on; default: the "
                                 "first model in edgesmith.toolchain.prove.QEMU_CPUS having every cpu_features flag")
    tolerance: Tolerances
    precisions: list[Precision] = Field(
        default=["fp32"], description="the precisions this target's hardware runs fast, each a candidate of "
        "`--precision auto`; fp32 (the reference) always included")
    precision_features: dict[Precision, list[str]] = Field(
        default={}, description="CPU features an artifact of that precision needs beyond cpu_features (all of them); "
        "required for bf16 and fp16")
    source: str = Field(default="", description="the file this target was read from")

    @model_validator(mode="after")
    def _backend_tables(self) -> Target:
        from edgesmith.toolchain import backends

        extra = self.__pydantic_extra__
        for key in extra:
            if key not in backends.BACKENDS:
                raise ValueError(f"unknown key {key!r}: neither a target key nor a registered backend's table "
                                 f"({', '.join(backends.registered())})")
        # Tables of backends the target does not list (e.g. inherited from a base) are checked too.
        for name in dict.fromkeys([*self.backends, *extra]):
            settings = backends.get_backend(name).Settings
            try:
                extra[name] = settings.model_validate(extra.get(name, {}))
            except ValidationError as e:
                err = e.errors()[0]
                key = ".".join([name, *(str(p) for p in err["loc"])])
                raise ValueError(f"key '{key}': {err['msg'].removeprefix('Value error, ')}") from None
        if self.proof == "qemu-aarch64" and self.isa != "aarch64":
            raise ValueError("proof = \"qemu-aarch64\" needs isa = \"aarch64\"")
        self._check_precisions()
        return self

    def _check_precisions(self) -> None:
        if "fp32" not in self.precisions:
            raise ValueError(f"key 'precisions' must include fp32, the reference every other precision is gated "
                             f"against (it lists {', '.join(self.precisions)})")
        if len(set(self.precisions)) != len(self.precisions):
            raise ValueError(f"key 'precisions' lists a precision twice ({', '.join(self.precisions)})")
        for precision in self.precisions:
            if precision in FLOAT_REDUCED and not self.precision_features.get(precision):
                example = "avx512_bf16 on x86" if precision == "bf16" else "asimdhp and fphp on Armv8.2+"
                raise ValueError(f"key 'precisions' lists {precision}, but precision_features.{precision} names no CPU "
                                 f"features, and {precision} arithmetic needs hardware support (e.g. {example}); "
                                 f"add them or drop {precision}")
            from edgesmith.toolchain import backends

            if not any(precision in backends.get_backend(b).PRECISIONS for b in self.backends):
                raise ValueError(f"key 'precisions' lists {precision}, but none of the target's backends "
                                 f"({', '.join(self.backends)}) builds it")
            if precision != "fp32" and getattr(self.tolerance, precision) is None:
                raise ValueError(f"key 'precisions' lists {precision}, but there is no tolerance.{precision} table "
                                 "(its error bound relative to each output's spread)")

    def for_precision(self, precision: Precision) -> Target:
        """This target as an artifact of ``precision`` needs it: the precision's CPU features added
        to ``cpu_features`` (so the device refuses the artifact on a CPU without them, and
        ``runs_natively`` answers for the precision)."""
        extra = [f for f in self.precision_features.get(precision, []) if f not in self.cpu_features]
        if not extra:
            return self
        return self.model_copy(update={"cpu_features": [*self.cpu_features, *extra]})

    def check_precision(self, precision: str) -> None:
        """One sentence for a precision this target does not list."""
        if precision not in self.precisions:
            raise UserError(f"target {self.name} does not list precision {precision!r}; its precisions are "
                            f"{', '.join(self.precisions)} (or use --precision auto)")

    def __getattr__(self, name: str) -> Any:
        # A registered backend's table that this target neither lists nor inherits reads as None.
        try:
            return super().__getattr__(name)
        except AttributeError:
            from edgesmith.toolchain import backends

            if name in backends.BACKENDS:
                return None
            raise

    def tolerance_for(self, precision: Precision) -> Tolerance:
        """The element-wise tolerance of ``precision`` (fp32's for int8 when the file gives none)."""
        return getattr(self.tolerance, precision) or self.tolerance.fp32

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
        key = ".".join(str(p) for p in err["loc"])
        where = f"key '{key}': " if key else ""
        message = err["msg"].removeprefix("Value error, ")
        raise UserError(f"target file {path}: {where}{message}; fix the file (keys are documented in targets/README.md)") from None


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
    """The CPU features of this machine, as the device runtime sees them (the C++ core's cpuid /
    getauxval check, the one Session applies before loading an artifact)."""
    from edgesmith.runtime import _core

    return set(_core.cpu_features_host())


def missing_cpu_features(target: Target) -> list[str]:
    """The target's ``cpu_features`` this machine lacks (names the runtime cannot check included)."""
    from edgesmith.runtime import _core

    return list(_core.cpu_features_missing(list(target.cpu_features)))


def host_isa() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def runs_natively(target: Target) -> bool:
    """True when this machine can execute code built for the target."""
    return target.os == "linux" and target.isa == host_isa() and not missing_cpu_features(target)


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
        missing = missing_cpu_features(target)
        why = f"host lacks {', '.join(missing)}" if target.isa == host_isa() else f"host is {host_isa()}"
        return False, f"native only ({why})"
    if target.proof == "qemu-aarch64":
        if runs_natively(target):
            return True, "native"
        # Debian's multiarch arm64 runtime, not the cross sysroot (/usr/aarch64-linux-gnu): under
        # qemu-user that one hangs every dynamically linked program at its first pthread_create.
        runtime = (Path("/lib/ld-linux-aarch64.so.1"), Path("/usr/lib/aarch64-linux-gnu/libstdc++.so.6"))
        if shutil.which("qemu-aarch64-static") and all(p.exists() for p in runtime):
            return True, "qemu-aarch64"
        return False, ("needs qemu-user-static and the arm64 multiarch runtime (dpkg --add-architecture arm64 && apt-get update && "
                       "apt-get install qemu-user-static libc6:arm64 libstdc++6:arm64)")
    return False, "no emulator for this target"
