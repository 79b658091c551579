"""Shared fixtures. Every test gets its own EDGESMITH_HOME (keys), while tool environments
(the LiteRT converter, installed once by `make test`'s bootstrap) stay where bootstrap put them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EDGESMITH = str(Path(sys.executable).parent / "edgesmith")
DIGITS = "edgesmith.toolchain.models.digits:digits_cnn"

_home = os.environ.get("EDGESMITH_HOME") or str(REPO / ".edgesmith")
os.environ.setdefault("EDGESMITH_TOOLS_DIR", str(Path(_home) / "tools"))
os.environ.setdefault("EDGESMITH_AARCH64_RUNTIME", str(Path(_home) / "runners" / "aarch64-linux"))


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


@pytest.fixture(scope="session")
def session_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("session-home")


@pytest.fixture(scope="session")
def digits_artifacts(tmp_path_factory, session_home) -> dict:
    """The demo CNN built once for the host (tvm, openvino), rpi4 (tvm) and android (tflite)."""
    out = tmp_path_factory.mktemp("dist")
    env = {"EDGESMITH_HOME": str(session_home)}
    result = build_json(DIGITS, "--input-shape", "1,1,8,8", "-t", "x86_64-avx2", "-t", "rpi4-aarch64",
                        "-t", "android-arm64-tflite", "--backend", "all", "-o", str(out), env=env)
    by_key = {(a["target"], a["backend"]): a for a in result["artifacts"]}
    return {"dir": out, "home": session_home, "artifacts": by_key, "failures": result["failures"],
            "pub": session_home / "keys" / "default.pub"}


EDGENET = "edgesmith.toolchain.models.edgenet:edgenet"


@pytest.fixture(scope="session")
def edgenet_artifacts(tmp_path_factory, session_home) -> dict:
    """EdgeNet (3×96×96, residual and depthwise-separable blocks) built once for the host with tvm
    and openvino, validated on synthetic images like those its BatchNorm statistics came from; plus
    the ONNX graph the same PyTorch source path exports, for ONNX Runtime comparisons."""
    import time

    import numpy as np

    from edgesmith.toolchain.models.edgenet import synthetic_images
    from edgesmith.toolchain.sources import load_source

    root = tmp_path_factory.mktemp("edgenet")
    samples = root / "samples.npz"
    np.savez(samples, input=synthetic_images(8, seed=100).numpy()[:, None])  # 8 samples of 1×3×96×96
    started = time.perf_counter()
    result = build_json(EDGENET, "--input-shape", "1,3,96,96", "-t", "x86_64-avx2", "--backend", "all",
                        "--samples", str(samples), "-o", str(root / "dist"), env={"EDGESMITH_HOME": str(session_home)})
    build_s = time.perf_counter() - started
    return {"artifacts": {(a["target"], a["backend"]): a for a in result["artifacts"]}, "failures": result["failures"],
            "home": session_home, "pub": session_home / "keys" / "default.pub", "build_s": build_s,
            "onnx": load_source(EDGENET, [1, 3, 96, 96]).onnx_model}


@pytest.fixture(scope="session")
def digits_host_openvino(tmp_path_factory, session_home) -> dict:
    """The demo CNN built once for the host with OpenVINO only (what the agent tests serve)."""
    out = tmp_path_factory.mktemp("dist-host-openvino")
    result = build_json(DIGITS, "--input-shape", "1,1,8,8", "-t", "x86_64-avx2", "--backend", "openvino",
                        "-o", str(out), env={"EDGESMITH_HOME": str(session_home)})
    (artifact,) = result["artifacts"]
    return {"path": Path(artifact["path"]), "pub": session_home / "keys" / "default.pub"}
