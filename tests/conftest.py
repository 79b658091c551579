"""Shared fixtures. Every test gets its own EDGESMITH_HOME (keys), while tool environments
(the LiteRT converter, installed once by `make test`'s bootstrap) stay where bootstrap put them.

`make test` runs the suite on two pytest-xdist workers, a test file per worker at a time
(``--dist loadfile``): module fixtures are built once. The expensive session fixtures are built
once per run too, by whichever worker asks first, under a file lock in a directory both workers
share (``_once``); the other worker waits and reads the result.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
from filelock import FileLock

REPO = Path(__file__).resolve().parent.parent
EDGESMITH = str(Path(sys.executable).parent / "edgesmith")
DIGITS = "edgesmith.toolchain.models.digits:digits_cnn"

_home = os.environ.get("EDGESMITH_HOME") or str(REPO / ".edgesmith")
os.environ.setdefault("EDGESMITH_TOOLS_DIR", str(Path(_home) / "tools"))
os.environ.setdefault("EDGESMITH_AARCH64_RUNTIME", str(Path(_home) / "runners" / "aarch64-linux"))
# Builds in tests are FP32 unless a test asks for another precision: with `--precision auto` (the
# CLI's default) the artifact a test gets would depend on the CPU (bf16 on AVX512_BF16/AMX hosts), and
# tests never assume the host's ISA. tests/test_precision.py builds with auto and forced precisions.
os.environ.setdefault("EDGESMITH_PRECISION", "fp32")


# The longest files, started first: with a file per worker at a time, one of them collected last (the
# wheel's build, the README's `make demo`) would run alone at the end while the other worker idles.
FIRST = ("test_wheel.py", "test_readme.py", "test_shadow_e2e.py", "test_emulation.py")


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(FIRST)))  # stable: the rest keep their order


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("EDGESMITH_HOME", str(home))
    monkeypatch.delenv("EDGESMITH_TARGETS_PATH", raising=False)
    from edgesmith.toolchain import targets

    targets._load_all.cache_clear()
    yield home


def run_cli(*args: str, env: dict | None = None, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the installed `edgesmith` console script, as a user would."""
    full_env = {**os.environ, **(env or {})}
    result = subprocess.run([EDGESMITH, *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"edgesmith {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def build_json(*args: str, env: dict | None = None) -> dict:
    return json.loads(run_cli("build", *args, "--json", env=env).stdout)


def build_backend_check(build: Path, backends: tuple[str, ...]) -> dict:
    """Build ``edgesmith_backend_check`` (tests/cpp/backends) and the plugins of ``backends`` from
    this checkout into ``build`` (no Python module); their paths: ``exe`` and ``plugins[backend]``."""
    assert shutil.which("cmake"), "cmake is missing; `make bootstrap` installs it"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    required = [f"-DEDGESMITH_WITH_{b.upper()}=ON" for b in backends]
    configure = subprocess.run(
        ["cmake", "-S", str(REPO), "-B", str(build), *generator, "-DCMAKE_BUILD_TYPE=Release",
         "-DEDGESMITH_BUILD_PYTHON=OFF", "-DEDGESMITH_BUILD_BACKEND_CHECK=ON",
         f"-DPython_EXECUTABLE={sys.executable}", *required],
        capture_output=True, text=True, timeout=300)
    assert configure.returncode == 0, configure.stdout + configure.stderr
    targets = ["edgesmith_backend_check", *(f"edgesmith_backend_{b}" for b in backends)]
    built = subprocess.run(["cmake", "--build", str(build), "--parallel", str(os.cpu_count() or 2),
                            "--target", *targets], capture_output=True, text=True, timeout=900)
    assert built.returncode == 0, built.stdout[-4000:] + built.stderr[-4000:]
    return {"exe": build / "bin" / "edgesmith_backend_check",
            "plugins": {b: build / "backends" / f"libedgesmith_backend_{b}.so" for b in backends}}


def run_backend_check(check: dict, backend: str, artifact: Path, *args: str) -> tuple[int, dict]:
    """Run the driver ``build_backend_check`` built on ``backend``'s plugin and ``artifact``: its exit
    code and its last JSON report line."""
    result = subprocess.run([str(check["exe"]), str(check["plugins"][backend]), str(artifact), *args],
                            capture_output=True, text=True, timeout=600)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, result.stdout + result.stderr
    return result.returncode, json.loads(lines[-1])


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL 15 server for this worker's whole run (tests/pg_server.py), started when a test
    first asks for it; each test takes a database of its own (``store_url``)."""
    from pg_server import PostgresServer

    server = PostgresServer().start()
    yield server
    server.stop()


# The store's tests whose behaviour depends on the database (transactions, concurrent writers,
# integer bounds, what text a column can hold) run on both: `@BOTH_STORES` on a test taking `store_url`.
BOTH_STORES = pytest.mark.parametrize("store_url", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture
def store_url(request, tmp_path):
    """The monitor's store: an SQLite file; or, for a test parametrized with "postgresql"
    (BOTH_STORES), a new database on the run's PostgreSQL 15 server."""
    if getattr(request, "param", "sqlite") == "sqlite":
        yield f"sqlite:///{tmp_path / 'monitor.db'}"
        return
    server = request.getfixturevalue("postgres_server")
    url = server.create_database()
    yield url
    server.drop_database(url)


@pytest.fixture(scope="session")
def shared_root(tmp_path_factory, worker_id) -> Path:
    """A directory every xdist worker of this run shares (the run's base temp directory)."""
    base = tmp_path_factory.getbasetemp()
    return base if worker_id == "master" else base.parent


def _once(root: Path, name: str, make: Callable[[Path], dict]) -> dict:
    """``make(directory)`` once per test run, whichever worker asks first; its JSON result is kept
    next to the directory, and a worker that finds it reads it instead of building again."""
    with FileLock(str(root / f"{name}.lock")):
        record = root / f"{name}.json"
        if record.is_file():
            return json.loads(record.read_text())
        directory = root / name
        shutil.rmtree(directory, ignore_errors=True)  # what an earlier failed attempt left
        directory.mkdir(parents=True)
        result = make(directory)
        record.write_text(json.dumps(result))
        return result


@pytest.fixture(scope="session")
def session_home(shared_root) -> Path:
    """One EDGESMITH_HOME (its default signing key) for the run's shared builds, on every worker."""
    home = shared_root / "session-home"
    home.mkdir(exist_ok=True)
    return home


def _artifacts_by_key(result: dict) -> dict:
    return {(a["target"], a["backend"]): a for a in result["artifacts"]}


@pytest.fixture(scope="session")
def digits_artifacts(shared_root, session_home) -> dict:
    """The demo CNN built once for the host (tvm, openvino), rpi4 (tvm) and android (tflite)."""
    def make(out: Path) -> dict:
        return build_json(DIGITS, "--input-shape", "1,1,8,8", "-t", "x86_64-avx2", "-t", "rpi4-aarch64",
                          "-t", "android-arm64-tflite", "--backend", "all", "-o", str(out),
                          env={"EDGESMITH_HOME": str(session_home)})

    result = _once(shared_root, "digits-dist", make)
    return {"dir": shared_root / "digits-dist", "home": session_home, "artifacts": _artifacts_by_key(result),
            "failures": result["failures"], "pub": session_home / "keys" / "default.pub"}


EDGENET = "edgesmith.toolchain.models.edgenet:edgenet"


@pytest.fixture(scope="session")
def edgenet_artifacts(shared_root, session_home) -> dict:
    """EdgeNet (3×96×96, residual and depthwise-separable blocks) built once for the host with tvm
    and openvino, validated on synthetic images like those its BatchNorm statistics came from; plus
    the ONNX graph the same PyTorch source path exports, for ONNX Runtime comparisons."""
    from edgesmith.toolchain.sources import load_source

    def make(root: Path) -> dict:
        import time

        import numpy as np

        from edgesmith.toolchain.models.edgenet import synthetic_images

        samples = root / "samples.npz"
        np.savez(samples, input=synthetic_images(8, seed=100).numpy()[:, None])  # 8 samples of 1×3×96×96
        started = time.perf_counter()
        result = build_json(EDGENET, "--input-shape", "1,3,96,96", "-t", "x86_64-avx2", "--backend", "all",
                            "--samples", str(samples), "-o", str(root / "dist"), env={"EDGESMITH_HOME": str(session_home)})
        return {**result, "build_s": time.perf_counter() - started}

    result = _once(shared_root, "edgenet", make)
    return {"artifacts": _artifacts_by_key(result), "failures": result["failures"],
            "home": session_home, "pub": session_home / "keys" / "default.pub", "build_s": result["build_s"],
            "onnx": load_source(EDGENET, [1, 3, 96, 96]).onnx_model}


@pytest.fixture(scope="session")
def digits_trained(shared_root) -> dict:
    """The digits CNN of examples/digits.toml trained once per run (4 epochs, a few seconds) into an
    SQLite MLflow registry: its tracking URI and ``models:/digits/<version>``. Reduced precisions need a
    trained model (untrained, INT8 agrees with FP32 on only ~92% of inputs). Builds from it log their
    runs into the same registry: count a module's own runs by their artifact, not all the model's."""
    def make(root: Path) -> dict:
        from edgesmith.toolchain.train.config import load_config
        from edgesmith.toolchain.train.run import train_and_register

        uri = f"sqlite:///{root / 'mlflow.db'}"
        config = load_config(REPO / "examples" / "digits.toml").with_overrides(epochs=4)
        summary = train_and_register(config, uri, alias="champion", progress=False)
        return {"uri": uri, "model_uri": f"models:/{summary.model_name}/{summary.version}", "run_id": summary.run_id,
                "test_accuracy": summary.test_accuracy}

    return _once(shared_root, "digits-trained", make)


@pytest.fixture(scope="session")
def digits_tuned(shared_root) -> dict:
    """One small `edgesmith tune` run of the demo CNN for the host (a dozen MetaSchedule trials) into a
    home of its own, shared by the run (tests/test_tune.py, and tests/test_emulation.py's Arm build with
    parallel loops): ``home`` and the CLI's JSON ``summary``. Tests read its database, never write it."""
    def make(root: Path) -> dict:
        home = root / "home"
        result = run_cli("tune", DIGITS, "--input-shape", "1,1,8,8", "-t", "host", "--trials", "12", "--json",
                         env={"EDGESMITH_HOME": str(home)})
        return {"home": str(home), "summary": json.loads(result.stdout)}

    record = _once(shared_root, "digits-tuned", make)
    return {"home": Path(record["home"]), "summary": record["summary"]}


@pytest.fixture(scope="session")
def digits_host_openvino(shared_root, session_home) -> dict:
    """The demo CNN built once for the host with OpenVINO only (what the agent tests serve)."""
    def make(out: Path) -> dict:
        return build_json(DIGITS, "--input-shape", "1,1,8,8", "-t", "x86_64-avx2", "--backend", "openvino",
                          "-o", str(out), env={"EDGESMITH_HOME": str(session_home)})

    (artifact,) = _once(shared_root, "dist-host-openvino", make)["artifacts"]
    return {"path": Path(artifact["path"]), "pub": session_home / "keys" / "default.pub"}