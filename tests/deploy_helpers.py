"""Helpers for the deployment tests: small signed artifacts (real manifest, real signature, file
hashes that match) made without a compiler, so the central side's tests need no build."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
from pathlib import Path

from edgesmith.runtime.manifest import (BackendInfo, BuildInfo, FileEntry, Golden, GoldenSample, HostInfo,
                                        LatencyBuckets, Manifest, ModelInfo, Monitoring, OutputMonitor, Payload,
                                        Proof, SourceInfo, TensorSpec, Validation)
from edgesmith.toolchain.capture.store import CaptureStore
from edgesmith.toolchain.signing import SigningKey, sign_manifest

from conftest import EDGESMITH


def make_artifact(directory: Path, key: SigningKey, version: str = "1", model_uri: str | None = None,
                  payload: bytes = b"payload", backend: str = "openvino", isa: str = "x86_64",
                  output_shape: tuple[int, ...] = (1, 2), reference: list[float] | None = None) -> Path:
    """An artifact directory for model ``tiny`` version ``version`` (payload bytes differ per version);
    ``backend``, ``isa`` (target ``<isa>-avx2``) and ``output_shape`` make siblings that differ there;
    ``reference``: the build's share per class of output ``y`` (drift is measured against it)."""
    directory.mkdir(parents=True)
    (directory / "golden" / "sample_0").mkdir(parents=True)
    contents = {"model.xml": payload + version.encode(), "model.bin": b"\0" * 64,
                "golden/sample_0/input_0.npy": b"in", "golden/sample_0/output_0.npy": b"out"}
    for path, data in contents.items():
        (directory / path).write_bytes(data)
    files = [FileEntry(path=p, size=len(d), sha256=hashlib.sha256(d).hexdigest()) for p, d in sorted(contents.items())]
    source = SourceInfo(kind="registry" if model_uri else "onnx", ref=model_uri or "tiny.onnx", sha256="0" * 64,
                        model_uri=model_uri)
    manifest = Manifest(
        name=f"tiny-v{version}-{isa}-avx2-{backend}",
        model=ModelInfo(name="tiny", version=version, source=source, onnx_sha256="1" * 64, opset=17),
        target={"name": f"{isa}-avx2", "isa": isa, "threads": 2, "cpu_features": [],
                "description": "test", "tolerance": {"fp32": {"atol": 1e-4, "rtol": 1e-3}}},
        backend=BackendInfo(name=backend, version="2026.4.1", precision="fp32", options={}),
        payload=Payload(format="openvino-ir", entry="model.xml"),
        files=files,
        inputs=[TensorSpec(name="x", dtype="float32", shape=[1, 4])],
        outputs=[TensorSpec(name="y", dtype="float32", shape=list(output_shape))],
        golden=Golden(samples=[GoldenSample(inputs=["golden/sample_0/input_0.npy"],
                                            outputs=["golden/sample_0/output_0.npy"])], atol=1e-5, rtol=1e-4),
        monitoring=Monitoring(outputs=[OutputMonitor(name="y", kind="classes", classes=2, reference=reference)],
                              latency=LatencyBuckets(start_us=1.0, factor=2.0, count=40)),
        validation=Validation(status="passed", reference="onnxruntime", executed=None, samples=1, max_abs_err=0.0,
                              max_rel_err=0.0, top1_agreement=1.0, atol=1e-5, rtol=1e-4, input_sensitivity=0.5),
        proof=Proof(status="not-run", isa="x86_64", reason="test"),
        build=BuildInfo(created_at="2026-01-01T00:00:00+00:00", duration_s=1.0,
                        host=HostInfo(isa="x86_64", cpu="test", os="linux"), toolchain={}),
    )
    data = manifest.to_bytes()
    (directory / "manifest.json").write_bytes(data)
    (directory / "manifest.sig").write_bytes(sign_manifest(data, key))
    return directory


def make_echo_artifact(directory: Path, key: SigningKey, version: str = "1", fail: str | None = None,
                       wrong_golden: bool = False, mode: str = "double", shape: tuple[int, ...] = (1, 4)) -> Path:
    """An artifact of model ``tiny`` version ``version`` that real agents load and self-test without
    an engine: the test-only ``testecho`` backend (tests/cpp/testecho_backend.cc, y = 2x), found
    through the agent's --backend-path (the ``backend_dir`` fixture of test_session_core). ``fail`` goes
    to the backend's options ("abort": the self-test crashes the process); ``wrong_golden`` stores
    golden outputs the backend does not produce (the self-test fails). ``mode`` "negate-double" makes
    y = -2x (a candidate whose top-1 never agrees with y = 2x); ``shape`` is the input's and output's."""
    import io

    import numpy as np

    directory.mkdir(parents=True)
    count = int(np.prod(shape))
    x = (np.arange(count, dtype=np.float32) + float(version)).reshape(shape)
    expected = (-2 if mode == "negate-double" else 2) * x + (1.0 if wrong_golden else 0.0)

    def npy(array) -> bytes:
        buffer = io.BytesIO()
        np.save(buffer, array)
        return buffer.getvalue()

    contents = {"model.bin": b"testecho payload v" + version.encode(),
                "golden/sample_0/input_0.npy": npy(x), "golden/sample_0/output_0.npy": npy(expected)}
    for path, data in contents.items():
        (directory / path).parent.mkdir(parents=True, exist_ok=True)
        (directory / path).write_bytes(data)
    files = [FileEntry(path=p, size=len(d), sha256=hashlib.sha256(d).hexdigest()) for p, d in sorted(contents.items())]
    from edgesmith.runtime.artifact import _core

    isa = _core().host_isa()
    options = {"mode": mode, **({"fail": fail} if fail else {})}
    manifest = Manifest(
        name=f"tiny-v{version}-host-testecho",
        model=ModelInfo(name="tiny", version=version, source=SourceInfo(kind="onnx", ref="tiny.onnx", sha256="0" * 64),
                        onnx_sha256="1" * 64, opset=17),
        target={"name": "host", "isa": isa, "threads": 1, "cpu_features": [], "description": "test",
                "tolerance": {"fp32": {"atol": 1e-4, "rtol": 1e-3}}},
        backend=BackendInfo(name="testecho", version="1.0", precision="fp32", options=options),
        payload=Payload(format="testecho", entry="model.bin"),
        files=files,
        inputs=[TensorSpec(name="x", dtype="float32", shape=list(shape))],
        outputs=[TensorSpec(name="y", dtype="float32", shape=list(shape))],
        golden=Golden(samples=[GoldenSample(inputs=["golden/sample_0/input_0.npy"],
                                            outputs=["golden/sample_0/output_0.npy"])], atol=1e-5, rtol=1e-4),
        monitoring=Monitoring(outputs=[OutputMonitor(name="y", kind="classes", classes=shape[-1])],
                              latency=LatencyBuckets(start_us=1.0, factor=2.0, count=40)),
        validation=Validation(status="passed", reference="onnxruntime", executed=None, samples=1, max_abs_err=0.0,
                              max_rel_err=0.0, top1_agreement=1.0, atol=1e-5, rtol=1e-4, input_sensitivity=0.5),
        proof=Proof(status="not-run", isa=isa, reason="test"),
        build=BuildInfo(created_at="2026-01-01T00:00:00+00:00", duration_s=1.0,
                        host=HostInfo(isa=isa, cpu="test", os="linux"), toolchain={}),
    )
    data = manifest.to_bytes()
    (directory / "manifest.json").write_bytes(data)
    (directory / "manifest.sig").write_bytes(sign_manifest(data, key))
    return directory


class CaptureReceiver:
    """`edgesmith capture serve` in a subprocess, on a free loopback port."""

    def __init__(self, directory: Path, artifacts: Path):
        self.dir = directory
        self.proc = subprocess.Popen([EDGESMITH, "capture", "serve", "--dir", str(directory), "--listen", "127.0.0.1:0",
                                      "--store", str(artifacts)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.url = json.loads(self.proc.stdout.readline())["receiver"]

    def shas(self, device: str, fleet: str = "plant-a") -> list[str]:
        return [s["sha256"] for s in CaptureStore(self.dir).samples(fleet) if s["device"] == device]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)
