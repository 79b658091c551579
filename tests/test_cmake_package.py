"""The CMake package for C++ users: `cmake --install` of the core, then find_package(edgesmith) from a
separate project (tests/cpp/consumer) that verifies a real artifact through edgesmith::core."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import DIGITS, REPO, run_cli

pytestmark = pytest.mark.integration


def _run(*cmd: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=900)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def consumer(tmp_path_factory) -> Path:
    """The core installed into a fresh prefix and the consumer built against that prefix only."""
    tmp = tmp_path_factory.mktemp("cmake-package")
    prefix = tmp / "prefix"
    # `make cpp-test`'s build of the core (scripts/cpp-build.sh; up to date after `make test`'s own
    # step, so nothing compiles here), installed into a fresh prefix.
    _run("bash", str(REPO / "scripts" / "cpp-build.sh"), "--install", str(prefix))
    assert (prefix / "lib" / "cmake" / "edgesmith" / "edgesmithConfig.cmake").is_file()
    assert (prefix / "lib" / "libedgesmith_core.a").is_file()

    # The consumer sees the installed tree only, never the checkout's sources.
    source = tmp / "consumer-src"
    shutil.copytree(REPO / "tests" / "cpp" / "consumer", source)
    consumer_build = tmp / "consumer-build"
    configure = _run("cmake", "-S", str(source), "-B", str(consumer_build), "-DCMAKE_BUILD_TYPE=Release",
                     f"-DCMAKE_PREFIX_PATH={prefix}")
    assert str(REPO / "csrc") not in (consumer_build / "CMakeCache.txt").read_text(), configure.stdout
    _run("cmake", "--build", str(consumer_build))
    return consumer_build / "edgesmith_consumer"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> tuple[Path, Path]:
    home = tmp_path_factory.mktemp("consumer-home")
    out = tmp_path_factory.mktemp("consumer-dist")
    result = run_cli("build", DIGITS, "--input-shape", "1,1,8,8", "-t", "host", "--backend", "openvino",
                     "-o", str(out), "--json", env={"EDGESMITH_HOME": str(home)})
    (built,) = json.loads(result.stdout)["artifacts"]
    return Path(built["path"]), home / "keys" / "default.pub"


@pytest.mark.timeout(900)
def test_consumer_verifies_artifact_with_installed_core(consumer, artifact):
    path, pub = artifact
    result = subprocess.run([str(consumer), str(path), str(pub)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((path / "manifest.json").read_text())
    assert result.stdout.startswith(f"verified {manifest['name']} for {manifest['target']['name']} (openvino), "
                                    f"{len(manifest['files'])} files, key "), result.stdout


@pytest.mark.timeout(900)
def test_consumer_rejects_changed_artifact(consumer, artifact, tmp_path):
    path, pub = artifact
    changed = tmp_path / "changed"
    shutil.copytree(path, changed)
    with (changed / "model.bin").open("ab") as f:
        f.write(b"\0")
    result = subprocess.run([str(consumer), str(changed), str(pub)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stdout
    assert result.stderr.startswith("integrity: model.bin:"), result.stderr
