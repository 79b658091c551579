"""The ONNX Runtime backend `ort`: offline-optimized payload, the C++ plugin through Session and
edgesmith-run compared with ONNX Runtime's Python API on the original graph, a corrupted payload,
and the rpi4 artifact proven under qemu-aarch64 with the aarch64 bundle's plugin."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import DIGITS, build_json

EDGESMITH_RUN = Path(sys.executable).parent / "edgesmith-run"


def test_ort_and_litert_are_the_last_candidates_of_the_linux_targets():
    from edgesmith.toolchain.targets import get_target

    for name, first in (("x86_64-avx2", "openvino"), ("x86_64-avx512", "openvino"), ("rpi4-aarch64", "tvm"),
                        ("rpi5-aarch64", "tvm"), ("jetson-orin-cpu", "tvm")):
        target = get_target(name)
        assert target.backends[0] == first and target.backends[-2:] == ["ort", "tflite"], (name, target.backends)
        assert target.ort.optimization_level in ("basic", "extended")  # never the ISA-specific layout level
    assert "ort" not in get_target("android-arm64-tflite").backends


def test_layout_level_cannot_be_baked_in(tmp_path):
    from edgesmith.toolchain.errors import UserError
    from edgesmith.toolchain.targets import load_target_file

    path = tmp_path / "my-box.toml"
    path.write_text('extends = "_linux-x86_64"\ndescription = "x"\nthreads = 2\n[ort]\noptimization_level = "all"\n')
    with pytest.raises((UserError, ValueError), match="ort.optimization_level"):
        load_target_file(path)


@pytest.fixture(scope="module")
def host_ort(tmp_path_factory) -> dict:
    """The digits CNN for x86_64-avx2 with the ort backend, built once with the CLI."""
    home = tmp_path_factory.mktemp("ort-home")
    out = tmp_path_factory.mktemp("ort-dist")
    result = build_json(DIGITS, "--input-shape", "1,1,8,8", "-t", "x86_64-avx2", "--backend", "ort", "-o", str(out),
                        env={"EDGESMITH_HOME": str(home)})
    assert result["failures"] == [], result["failures"]
    (artifact,) = result["artifacts"]
    key = bytes.fromhex((home / "keys" / "default.pub").read_text().strip())
    return {"path": Path(artifact["path"]), "artifact": artifact, "home": home, "key": key,
            "pub": home / "keys" / "default.pub"}


def _reference(inputs: list[np.ndarray]) -> list[np.ndarray]:
    """ONNX Runtime's Python API on the unoptimized ONNX export of the same source."""
    import onnxruntime as ort

    from edgesmith.toolchain.sources import load_source

    source = load_source(DIGITS, [1, 1, 8, 8])
    session = ort.InferenceSession(source.onnx_bytes, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: inputs[0]})


def _samples(count: int = 4) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.standard_normal((1, 1, 8, 8)).astype(np.float32) for _ in range(count)]


@pytest.mark.integration
def test_manifest_records_the_offline_optimization(host_ort):
    import onnx
    import onnxruntime

    manifest = json.loads((host_ort["path"] / "manifest.json").read_text())
    assert manifest["backend"]["name"] == "ort" and manifest["backend"]["version"] == onnxruntime.__version__
    assert manifest["payload"] == {"format": "onnx", "entry": "model.onnx"}
    options = manifest["backend"]["options"]
    assert options["optimization_level"] == "extended" and options["runtime_optimization_level"] == "all"
    assert options["intra_op_threads"] == 2
    assert manifest["validation"]["status"] == "passed" and manifest["validation"]["executed"]["how"] == "native"
    assert manifest["proof"]["status"] == "proven" and manifest["proof"]["how"] == "native"
    model = onnx.load(str(host_ort["path"] / "model.onnx"))
    ops = {(node.domain, node.op_type) for node in model.graph.node}
    # Extended fusions are in (Conv+Relu -> FusedConv), the host-specific NCHWc layout is not.
    assert ("com.microsoft", "FusedConv") in ops, ops
    assert not any(domain == "com.microsoft.nchwc" for domain, _ in ops), ops


@pytest.mark.integration
def test_session_matches_onnxruntime_python(host_ort):
    from edgesmith.runtime import Session

    session = Session(host_ort["path"], trusted_keys=[host_ort["key"]])
    assert session.backend == f"onnxruntime {__import__('onnxruntime').__version__}"
    manifest = json.loads((host_ort["path"] / "manifest.json").read_text())
    atol, rtol = manifest["golden"]["atol"], manifest["golden"]["rtol"]
    for x in _samples():
        (got,) = session.run([x])
        (want,) = _reference([x])
        assert got.shape == want.shape == (1, 10) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=atol, rtol=rtol)
    assert session.self_test()["passed"] is True


@pytest.mark.integration
def test_edgesmith_run_matches_onnxruntime_python(host_ort, tmp_path):
    x = _samples(1)[0]
    np.save(tmp_path / "x.npy", x)
    result = subprocess.run([str(EDGESMITH_RUN), str(host_ort["path"]), "--input", str(tmp_path / "x.npy"),
                             "--output", str(tmp_path / "y.npy"), "--key", str(host_ort["pub"])],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), _reference([x])[0], atol=1e-4, rtol=1e-3)
    golden = subprocess.run([str(EDGESMITH_RUN), str(host_ort["path"]), "--golden", "--json", "--key", str(host_ort["pub"])],
                            capture_output=True, text=True, timeout=120)
    assert golden.returncode == 0 and json.loads(golden.stdout)["passed"] is True, golden.stdout + golden.stderr


@pytest.mark.integration
def test_corrupted_payload_is_a_clear_load_error(host_ort, tmp_path):
    """A payload that is signed but not a model (e.g. a bad build) fails at load with one sentence."""
    from edgesmith.runtime import Session
    from edgesmith.runtime.errors import BackendError
    from edgesmith.runtime.manifest import Manifest
    from edgesmith.toolchain.package import file_entries, sign_and_check
    from edgesmith.toolchain.signing import ephemeral_key

    broken = tmp_path / "broken"
    shutil.copytree(host_ort["path"], broken)
    model = broken / "model.onnx"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 3])  # truncated
    manifest = Manifest.from_bytes((broken / "manifest.json").read_bytes())
    manifest.files = file_entries(broken)
    key = ephemeral_key()
    sign_and_check(broken, manifest, key)
    with pytest.raises(BackendError) as caught:
        Session(broken, trusted_keys=[key.public_key])
    message = str(caught.value)
    assert "ONNX Runtime could not load model.onnx" in message and "\n" not in message, message


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_rpi4_artifact_is_proven_under_qemu(tmp_path):
    from edgesmith.toolchain.prove import aarch64_bundle

    plugin = aarch64_bundle() / "lib" / "edgesmith" / "backends" / "libedgesmith_backend_ort.so"
    assert plugin.is_file(), f"{plugin} is missing; run `edgesmith tools install aarch64-runtime`"
    result = build_json(DIGITS, "--input-shape", "1,1,8,8", "-t", "rpi4-aarch64", "--backend", "ort",
                        "-o", str(tmp_path))
    (artifact,) = result["artifacts"]
    assert artifact["validation"]["status"] == "passed" and artifact["validation"]["executed"]["how"] == "host-engine"
    proof = artifact["proof"]
    assert proof["status"] == "proven" and proof["how"] == "qemu-aarch64" and proof["samples"] == 8, proof
    assert "cortex-a72" in proof["runner"]
