"""The TVM and OpenVINO backend plugins (csrc/backends/) on real artifacts of the demo CNN (the
tflite plugin's own tests, with the same three ways in, are tests/test_tflite_runtime.py).

Three ways in, from the outside to the inside:
- ``edgesmith.runtime.Session`` (the plugins installed with the package) against the golden outputs,
  also from several Python threads at once;
- ``edgesmith-run ARTIFACT --golden --json`` (what `edgesmith prove` runs on a device);
- ``edgesmith_backend_check`` (tests/cpp/backends), built here with CMake, which dlopens one plugin
  alone and hammers it from several C++ threads, and checks load failures (truncated payload,
  another ISA's library, a payload of the other backend).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from conftest import DIGITS, build_backend_check, run_backend_check, build_json

pytestmark = pytest.mark.integration

BACKENDS = ("tvm", "openvino")
EDGESMITH_RUN = Path(sys.executable).parent / "edgesmith-run"


@pytest.fixture(scope="module")
def host_artifacts(tmp_path_factory) -> dict:
    """digits CNN for x86_64-avx2 with both plugin backends, built once with the CLI."""
    home = tmp_path_factory.mktemp("backends-home")
    out = tmp_path_factory.mktemp("backends-dist")
    result = build_json(DIGITS, "--input-shape", "1,1,8,8", "-t", "x86_64-avx2", "--backend", "all",
                        "-o", str(out), env={"EDGESMITH_HOME": str(home)})
    by_backend = {a["backend"]: Path(a["path"]) for a in result["artifacts"] if a["backend"] in BACKENDS}
    missing = [b for b in BACKENDS if b not in by_backend]
    assert not missing, f"build made no {missing} artifact: {result['failures']}"
    return {"paths": by_backend, "pub": home / "keys" / "default.pub"}


def _golden(path: Path) -> list[tuple[list[np.ndarray], list[np.ndarray]]]:
    manifest = json.loads((path / "manifest.json").read_text())
    return [([np.load(path / p) for p in s["inputs"]], [np.load(path / p) for p in s["outputs"]])
            for s in manifest["golden"]["samples"]]


def _tolerance(path: Path) -> tuple[float, float]:
    golden = json.loads((path / "manifest.json").read_text())["golden"]
    return golden["atol"], golden["rtol"]


def _session(host_artifacts, backend: str):
    from edgesmith.runtime import Session

    key = bytes.fromhex(host_artifacts["pub"].read_text().strip())
    return Session(host_artifacts["paths"][backend], trusted_keys=[key])


@pytest.mark.timeout(600)
@pytest.mark.parametrize("backend", BACKENDS)
def test_session_matches_golden(host_artifacts, backend):
    session = _session(host_artifacts, backend)
    assert session.backend.startswith(backend + " ")
    atol, rtol = _tolerance(host_artifacts["paths"][backend])
    for inputs, expected in _golden(host_artifacts["paths"][backend]):
        outputs = session.run(inputs)
        for got, want in zip(outputs, expected, strict=True):
            np.testing.assert_allclose(got, want, atol=atol, rtol=rtol)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("backend", BACKENDS)
def test_session_concurrent_callers(host_artifacts, backend):
    """run() from 6 threads at once: every result is its own sample's, none mixed up."""
    session = _session(host_artifacts, backend)
    samples = _golden(host_artifacts["paths"][backend])
    atol, rtol = _tolerance(host_artifacts["paths"][backend])

    def call(k: int) -> bool:
        inputs, expected = samples[k % len(samples)]
        outputs = session.run(inputs)
        return all(np.allclose(g, w, atol=atol, rtol=rtol) for g, w in zip(outputs, expected, strict=True))

    with ThreadPoolExecutor(max_workers=6) as pool:
        assert all(pool.map(call, range(120)))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("backend", BACKENDS)
def test_edgesmith_run_golden(host_artifacts, backend):
    assert EDGESMITH_RUN.exists(), "edgesmith-run is not installed next to this Python; run `make bootstrap`"
    result = subprocess.run([str(EDGESMITH_RUN), str(host_artifacts["paths"][backend]), "--golden", "--json",
                             "--key", str(host_artifacts["pub"])], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["passed"] is True
    assert report["backend"].startswith(backend + " ")


# --- the plugins alone, through the C++ test driver -------------------------------------------

@pytest.fixture(scope="module")
def backend_check(tmp_path_factory) -> dict:
    """Build the plugins and edgesmith_backend_check from this checkout (no Python module)."""
    return build_backend_check(tmp_path_factory.mktemp("backend-check-build"), BACKENDS)


def _check(backend_check, backend: str, artifact: Path, *args: str) -> tuple[int, dict]:
    return run_backend_check(backend_check, backend, artifact, *args)


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("backend", BACKENDS)
def test_plugin_golden_and_concurrency(backend_check, host_artifacts, backend):
    code, report = _check(backend_check, backend, host_artifacts["paths"][backend],
                          "--concurrency", "8", "--iterations", "40")
    assert code == 0, report
    assert report["max_abs_err"] <= 1e-4
    assert report["concurrent_runs"] == 320
    assert report["concurrent_mismatches"] == 0 and report["concurrent_failures"] == 0


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_plugin_load_failures(backend_check, host_artifacts, tmp_path):
    """A broken payload is a LOAD_FAILED (1) with one sentence; the wrong payload is INVALID (3)."""
    truncated = tmp_path / "truncated-tvm"
    shutil.copytree(host_artifacts["paths"]["tvm"], truncated)
    data = (truncated / "model.so").read_bytes()
    (truncated / "model.so").write_bytes(data[: len(data) // 3])
    code, report = _check(backend_check, "tvm", truncated)
    assert code == 2 and report["stage"] == "open" and report["status"] == 1
    assert report["message"].startswith("model.so is truncated") and "\n" not in report["message"]

    (truncated / "model.so").write_bytes(b"not a shared library\n" * 100)
    code, report = _check(backend_check, "tvm", truncated)
    assert code == 2 and report["status"] == 1
    assert report["message"].startswith("TVM could not load model.so") and "\n" not in report["message"]

    broken_ir = tmp_path / "broken-openvino"
    shutil.copytree(host_artifacts["paths"]["openvino"], broken_ir)
    (broken_ir / "model.xml").write_text((broken_ir / "model.xml").read_text()[:300])
    code, report = _check(backend_check, "openvino", broken_ir)
    assert code == 2 and report["status"] == 1
    assert report["message"].startswith("OpenVINO could not load model.xml") and "\n" not in report["message"]

    code, report = _check(backend_check, "openvino", host_artifacts["paths"]["tvm"])
    assert code == 2 and report["status"] == 3


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_tvm_plugin_rejects_foreign_isa(backend_check, tmp_path):
    """An aarch64 model.so on this x86_64 host: named as such instead of dlopen's 'No such file'."""
    assert shutil.which("aarch64-linux-gnu-g++"), "the aarch64 cross compiler is missing; `make bootstrap` installs it"
    home = tmp_path / "home"
    result = build_json(DIGITS, "--input-shape", "1,1,8,8", "-t", "rpi4-aarch64", "--backend", "tvm",
                        "-o", str(tmp_path / "dist"), env={"EDGESMITH_HOME": str(home)})
    artifact = Path(result["artifacts"][0]["path"])
    code, report = _check(backend_check, "tvm", artifact)
    assert code == 2 and report["status"] == 1
    assert "aarch64 code" in report["message"]
