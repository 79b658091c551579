"""The device side of edgesmith (edgesmith.runtime) imports and runs an artifact without pydantic,
typer or rich: those are toolchain dependencies a device does not install."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import DIGITS, build_json

pytestmark = pytest.mark.integration

TOOLCHAIN_ONLY = ("pydantic", "pydantic_core", "typer", "rich", "click")

DEVICE_SCRIPT = textwrap.dedent("""
    import sys

    blocked = sys.argv[3].split(",")
    for name in blocked:
        sys.modules[name] = None  # `import name` now raises ImportError, as on a device without it

    import numpy as np

    import edgesmith.runtime
    import edgesmith.runtime.artifact
    import edgesmith.runtime.errors
    import edgesmith.runtime.keys
    import edgesmith.runtime.session
    from edgesmith.runtime import Session
    from edgesmith.runtime.keys import load_public_key

    session = Session(sys.argv[1], trusted_keys=[load_public_key(sys.argv[2])])
    assert session.self_test()["passed"]
    spec = session.inputs[0]
    x = np.random.default_rng(0).standard_normal(spec.shape).astype(spec.dtype)
    (y,) = session.run([x])
    assert y.shape == tuple(session.outputs[0].shape)
    assert session.stats()["runs"] == 1
    loaded = sorted(name for name in blocked if sys.modules.get(name) is not None)
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in blocked and sys.modules[m] is not None)
    print("device-ok", loaded, leaked)
""")


def _run_device(artifact: Path, pub: Path, blocked: tuple[str, ...]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", DEVICE_SCRIPT, str(artifact), str(pub), ",".join(blocked)],
                          capture_output=True, text=True, timeout=300, env={**os.environ})


def test_runtime_runs_an_artifact_without_toolchain_packages(tmp_path: Path) -> None:
    home = tmp_path / "home"
    out = tmp_path / "dist"
    result = build_json(DIGITS, "--input-shape", "1,1,8,8", "-t", "x86_64-avx2", "--backend", "openvino",
                        "-o", str(out), env={"EDGESMITH_HOME": str(home)})
    assert not result["failures"], result["failures"]
    (built,) = result["artifacts"]
    artifact = Path(built["path"])
    assert json.loads((artifact / "manifest.json").read_text())["payload"]["format"] == "openvino-ir"

    run = _run_device(artifact, home / "keys" / "default.pub", TOOLCHAIN_ONLY)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "device-ok [] []"


def test_blocking_really_blocks(tmp_path: Path) -> None:
    """The block used above makes an import of a blocked module fail (so the test above can fail)."""
    code = "import sys\nsys.modules['pydantic'] = None\nimport edgesmith.runtime.manifest\n"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "ModuleNotFoundError" in run.stderr and "pydantic" in run.stderr
