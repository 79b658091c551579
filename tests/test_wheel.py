"""The wheel installs anywhere: `pip wheel .` (build isolation on, as a user runs it), installed into
fresh virtualenvs in a temporary directory, used from a directory outside the checkout.

- with the `toolchain` extra: `edgesmith build` of the demo CNN for the host with every backend, then
  the artifacts run through `edgesmith.runtime.Session` and `edgesmith-run`;
- with only the `runtime` extra (a device): the same artifacts run through Session and edgesmith-run.

Nothing may resolve into the checkout: not the package, not the target files, not a plugin or an
engine library (checked in the objects each process loaded); the plugins' RUNPATHs are relative to
themselves, and the wheel's binaries need nothing from the system beyond glibc and libstdc++.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import tomllib
import zipfile
from pathlib import Path

import pytest

from conftest import DIGITS, REPO

ENGINE_LIBRARY_DIRS = {"tvm": ["tvm/lib", "tvm_ffi/lib"], "openvino": ["openvino/libs"], "ort": ["onnxruntime/capi"],
                       "tflite": ["ai_edge_litert"]}
# What a binary of the wheel may need from the system: glibc and the GCC runtime, nothing else.
SYSTEM_LIBRARIES = {"libc.so.6", "libm.so.6", "libstdc++.so.6", "libgcc_s.so.1", "libdl.so.2",
                    "libpthread.so.0", "ld-linux-x86-64.so.2"}

# Run in each venv: Session on each artifact's first golden sample, then the shared objects the
# process mapped.
SESSION_SCRIPT = """
import json, sys
from pathlib import Path
import numpy as np
import edgesmith.runtime
from edgesmith.runtime import Session
from edgesmith.runtime.artifact import _core

report = {"package": list(edgesmith.runtime.__path__), "core": _core().__file__, "runs": {}}
for path in sys.argv[1:]:
    manifest = json.loads((Path(path) / "manifest.json").read_text())
    golden = manifest["golden"]
    sample = golden["samples"][0]
    outputs = Session(path).run([np.load(Path(path) / p) for p in sample["inputs"]])
    expected = [np.load(Path(path) / p) for p in sample["outputs"]]
    report["runs"][path] = all(np.allclose(o, e, rtol=golden["rtol"], atol=golden["atol"])
                               for o, e in zip(outputs, expected, strict=True))
report["mapped"] = sorted({line.split()[-1] for line in open("/proc/self/maps") if ".so" in line})
print(json.dumps(report))
"""


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, **kwargs)
    assert result.returncode == 0, f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def _clean_env(venv: Path, home: Path) -> dict[str, str]:
    """The environment of a user of `venv`: nothing pointing at the checkout or the test's venv."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("EDGESMITH_") and k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "LD_LIBRARY_PATH")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    env["EDGESMITH_HOME"] = str(home)
    return env


def _inside_checkout(paths) -> list[str]:
    repo = str(REPO.resolve())
    return [p for p in paths if os.path.realpath(p) == repo or os.path.realpath(p).startswith(repo + os.sep)]


def _runpath(binary: Path) -> list[str]:
    dynamic = _run(["readelf", "-d", str(binary)]).stdout
    match = re.search(r"\((?:RUNPATH|RPATH)\)\s+Library r(?:un)?path: \[(.*)\]", dynamic)
    return match.group(1).split(":") if match else []


def _needed(binary: Path) -> set[str]:
    return set(re.findall(r"\(NEEDED\)\s+Shared library: \[(.*)\]", _run(["readelf", "-d", str(binary)]).stdout))


def _site_packages(venv: Path) -> Path:
    (site,) = (venv / "lib").glob("python3.*/site-packages")
    return site


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheelhouse")
    started = time.monotonic()
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(out), str(REPO)], cwd=out)
    print(f"\npip wheel (isolated build, engines as build requirements): {time.monotonic() - started:.0f} s")
    (built,) = out.glob("edgesmith-*.whl")
    return built


def _venv(tmp_path_factory, wheel: Path, extra: str) -> Path:
    venv = tmp_path_factory.mktemp(f"venv-{extra}") / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    # The engines and torch come from the index / pip's cache; edgesmith only from this wheel.
    started = time.monotonic()
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-compile", f"{wheel}[{extra}]"],
         cwd=venv.parent)
    print(f"\npip install {wheel.name}[{extra}] into a fresh venv: {time.monotonic() - started:.0f} s")
    return venv


@pytest.fixture(scope="module")
def toolchain_venv(tmp_path_factory, wheel) -> Path:
    return _venv(tmp_path_factory, wheel, "toolchain")


@pytest.fixture(scope="module")
def runtime_venv(tmp_path_factory, wheel) -> Path:
    return _venv(tmp_path_factory, wheel, "runtime")


@pytest.fixture(scope="module")
def outside(tmp_path_factory, toolchain_venv) -> dict:
    """The demo CNN built for the host with every backend by the venv's `edgesmith`, in a directory
    outside the checkout."""
    work = tmp_path_factory.mktemp("outside")
    home = work / "home"
    env = _clean_env(toolchain_venv, home)
    result = _run(["edgesmith", "build", DIGITS, "--input-shape", "1,1,8,8", "-t", "host", "--backend", "all", "--precision", "fp32",
                   "-o", "dist", "--json"], cwd=work, env=env)
    built = json.loads(result.stdout)
    assert built["failures"] == []
    return {"work": work, "home": home, "paths": [str(work / a["path"]) for a in built["artifacts"]],
            "backends": sorted(a["backend"] for a in built["artifacts"])}


def test_engine_pins_agree():
    """The plugins are compiled against the engines in build-system.requires and load the ones the
    extras install: the versions must be the same, or the plugins' ABI is a guess."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    engines = ("apache-tvm==", "apache-tvm-ffi==", "openvino==", "onnxruntime==", "ai-edge-litert==")
    def pins(requirements):
        return sorted(r for r in requirements if r.startswith(engines))
    build = pins(project["build-system"]["requires"])
    assert len(build) == 5, build
    extras = project["project"]["optional-dependencies"]
    assert pins(extras["runtime"]) == build
    assert pins(extras["toolchain"]) == build


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_wheel_ships_targets_plugins_and_relative_runpaths(wheel, tmp_path):
    names = zipfile.ZipFile(wheel).namelist()
    assert "edgesmith/targets/x86_64-avx2.toml" in names
    assert "edgesmith/targets/_linux-x86_64.toml" in names
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp_path)
    for backend, dirs in ENGINE_LIBRARY_DIRS.items():
        plugin = tmp_path / "edgesmith" / "runtime" / "backends" / f"libedgesmith_backend_{backend}.so"
        assert plugin.is_file(), sorted(names)
        # site-packages/edgesmith/runtime/backends -> site-packages: the engines' wheels.
        assert _runpath(plugin) == ["$ORIGIN"] + [f"$ORIGIN/../../../{d}" for d in dirs]
    (core,) = (tmp_path / "edgesmith" / "runtime").glob("_core.*.so")
    (run,) = (tmp_path).glob("edgesmith-*.data/scripts/edgesmith-run")
    for binary in (core, run):
        assert _runpath(binary) == [], binary
        # libsodium is linked in: the wheel needs no system package beyond glibc and libstdc++.
        assert _needed(binary) <= SYSTEM_LIBRARIES, (binary, _needed(binary))


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_toolchain_venv_builds_and_runs_outside_checkout(toolchain_venv, outside):
    site = _site_packages(toolchain_venv)
    env = _clean_env(toolchain_venv, outside["home"])
    assert outside["backends"] == ["openvino", "ort", "tvm"]

    where = _run(["python", "-c", "import edgesmith.toolchain, edgesmith.toolchain.targets as t; "
                  "print(edgesmith.toolchain.__file__); print(t.builtin_targets_dir())"],
                 cwd=outside["work"], env=env).stdout.split()
    assert where == [str(site / "edgesmith" / "toolchain" / "__init__.py"), str(site / "edgesmith" / "targets")]

    _check_session_and_runner(toolchain_venv, outside, env)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_runtime_extra_runs_artifacts(runtime_venv, outside):
    """A device's install: the wheel and its engines, no torch/ONNX toolchain."""
    env = _clean_env(runtime_venv, outside["home"])
    missing = _run(["python", "-c", "import importlib.util as u; print([m for m in ('torch', 'onnx') if u.find_spec(m)])"],
                   env=env).stdout.strip()
    assert missing == "[]"
    _check_session_and_runner(runtime_venv, outside, env)


def _check_session_and_runner(venv: Path, outside: dict, env: dict[str, str]) -> None:
    site = _site_packages(venv)
    report = json.loads(_run(["python", "-c", SESSION_SCRIPT, *outside["paths"]], cwd=outside["work"], env=env).stdout)
    assert report["runs"] == {p: True for p in outside["paths"]}
    assert report["core"].startswith(str(site / "edgesmith" / "runtime")), report["core"]
    assert report["package"] == [str(site / "edgesmith" / "runtime")]
    for backend in outside["backends"]:
        assert str(site / "edgesmith" / "runtime" / "backends" / f"libedgesmith_backend_{backend}.so") in report["mapped"]
    assert _inside_checkout(report["mapped"]) == [], report["mapped"]

    for path in outside["paths"]:
        result = _run([str(venv / "bin" / "edgesmith-run"), path, "--golden", "--json"], cwd=outside["work"],
                      env={**env, "LD_DEBUG": "files"})
        assert json.loads(result.stdout)["passed"] is True
        loaded = re.findall(r"calling init: (\S+)", result.stderr)
        plugins = [os.path.realpath(p) for p in loaded if "libedgesmith_backend_" in p]
        assert len(plugins) == 1 and plugins[0].startswith(str(site) + os.sep), loaded
        assert _inside_checkout(loaded) == [], loaded
