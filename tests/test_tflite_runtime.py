"""The tflite backend plugin (csrc/backends/tflite: LiteRT's C API, XNNPACK) on real artifacts of
the demo CNN.

Three ways in, as tests/test_backends_native.py does for the other plugins:
- ``edgesmith.runtime.Session`` against the LiteRT Python interpreter (the wheel the plugin's
  libLiteRt.so comes from), also from several Python threads at once;
- ``edgesmith-run ARTIFACT --golden --json``, natively and from the aarch64 bundle under qemu;
- ``edgesmith_backend_check`` (tests/cpp/backends), which dlopens the plugin alone, hammers it from
  several C++ threads and checks its refusals (a truncated flatbuffer, a custom op without a kernel).

No builtin Linux target lists tflite, so the host and Raspberry Pi artifacts are built for two test
targets that extend the builtin ones (EDGESMITH_TARGETS_PATH).
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

EDGESMITH_RUN = Path(sys.executable).parent / "edgesmith-run"
HOST = "x86_64-avx2-tflite"
RPI4 = "rpi4-aarch64-tflite"
ANDROID = "android-arm64-tflite"
TEST_TARGETS = {
    HOST: 'extends = "x86_64-avx2"\ndescription = "test: x86_64-avx2 with the tflite backend"\nbackends = ["tflite"]\n',
    RPI4: 'extends = "rpi4-aarch64"\ndescription = "test: rpi4-aarch64 with the tflite backend"\nbackends = ["tflite"]\n',
}


@pytest.fixture(scope="module")
def targets_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tflite-targets")
    for name, text in TEST_TARGETS.items():
        (directory / f"{name}.toml").write_text(text)
    return directory


def _build(tmp_path_factory, targets_dir: Path, *targets: str) -> dict:
    home = tmp_path_factory.mktemp("tflite-home")
    out = tmp_path_factory.mktemp("tflite-dist")
    args = [arg for t in targets for arg in ("-t", t)]
    result = build_json(DIGITS, "--input-shape", "1,1,8,8", *args, "--backend", "tflite", "-o", str(out),
                        env={"EDGESMITH_HOME": str(home), "EDGESMITH_TARGETS_PATH": str(targets_dir)})
    assert not result["failures"], result["failures"]
    return {"artifacts": {a["target"]: a for a in result["artifacts"]}, "home": home,
            "pub": home / "keys" / "default.pub"}


@pytest.fixture(scope="module")
def built(tmp_path_factory, targets_dir) -> dict:
    """digits CNN as tflite for this machine (validated through Session, proven with edgesmith-run)
    and for Android (validated by the host's LiteRT interpreter, no proof)."""
    return _build(tmp_path_factory, targets_dir, HOST, ANDROID)


def _path(built: dict, target: str) -> Path:
    return Path(built["artifacts"][target]["path"])


def _golden(path: Path) -> list[tuple[list[np.ndarray], list[np.ndarray]]]:
    manifest = json.loads((path / "manifest.json").read_text())
    return [([np.load(path / p) for p in s["inputs"]], [np.load(path / p) for p in s["outputs"]])
            for s in manifest["golden"]["samples"]]


def _session(built: dict, target: str = HOST, **kwargs):
    from edgesmith.runtime import Session

    return Session(_path(built, target), trusted_keys=[bytes.fromhex(built["pub"].read_text().strip())], **kwargs)


@pytest.mark.timeout(900)
def test_host_build_validates_through_session_and_proves(built):
    art = built["artifacts"][HOST]
    assert (_path(built, HOST) / "model.tflite").read_bytes()[4:8] == b"TFL3"
    assert art["validation"]["status"] == "passed" and art["validation"]["executed"]["how"] == "native"
    assert art["proof"]["status"] == "proven" and art["proof"]["how"] == "native"
    assert art["proof"]["samples"] > 0 and art["proof"]["max_abs_err"] <= 1e-4
    assert art["latency_us"] is not None  # timed through the device runtime
    android = built["artifacts"][ANDROID]
    assert android["validation"]["executed"]["how"] == "host-engine"
    assert android["proof"]["status"] == "not-run"


@pytest.mark.timeout(600)
def test_session_matches_litert_interpreter(built):
    """The plugin's outputs against the LiteRT Python interpreter of the same wheel, same flatbuffer."""
    from ai_edge_litert.interpreter import Interpreter

    path = _path(built, HOST)
    options = json.loads((path / "manifest.json").read_text())["backend"]["options"]
    runner = Interpreter(model_path=str(path / "model.tflite"), num_threads=2).get_signature_runner(options["signature"])
    session = _session(built)
    assert session.backend.startswith("litert 2.3.0")
    for inputs, _ in _golden(path):
        expected = runner(**dict(zip(options["input_names"], inputs)))
        outputs = session.run(inputs)
        for got, name in zip(outputs, options["output_names"], strict=True):
            np.testing.assert_allclose(got, expected[name], atol=1e-6, rtol=1e-6)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("max_concurrency", [0, 4])
def test_session_concurrent_callers(built, max_concurrency):
    """run() from 6 threads at once, sharing one compiled model (the default) or up to 4 running
    at once: every result is its own sample's, none mixed up."""
    session = _session(built, max_concurrency=max_concurrency)
    samples = _golden(_path(built, HOST))

    def call(k: int) -> bool:
        inputs, expected = samples[k % len(samples)]
        outputs = session.run([np.ascontiguousarray(x) for x in inputs])
        return all(np.allclose(g, w, atol=1e-4, rtol=1e-3) for g, w in zip(outputs, expected, strict=True))

    with ThreadPoolExecutor(max_workers=6) as pool:
        assert all(pool.map(call, range(120)))


@pytest.mark.timeout(600)
def test_misaligned_inputs_are_staged(built):
    """Inputs not 64-byte aligned (a view one float into a buffer) give the same outputs."""
    session = _session(built)
    inputs, expected = _golden(_path(built, HOST))[0]
    backing = np.zeros(inputs[0].size + 16, dtype=np.float32)
    offset = next(k for k in range(16) if (backing[k:].ctypes.data % 64) != 0)
    shifted = backing[offset:offset + inputs[0].size].reshape(inputs[0].shape)
    shifted[...] = inputs[0]
    np.testing.assert_allclose(session.run([shifted])[0], expected[0], atol=1e-4, rtol=1e-3)


@pytest.mark.timeout(600)
def test_edgesmith_run_golden(built):
    assert EDGESMITH_RUN.exists(), "edgesmith-run is not installed next to this Python; run `make bootstrap`"
    result = subprocess.run([str(EDGESMITH_RUN), str(_path(built, HOST)), "--golden", "--json",
                             "--key", str(built["pub"])], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["passed"] is True and report["backend"].startswith("litert 2.3.0")


@pytest.mark.timeout(600)
def test_session_refuses_the_android_artifact_by_isa(built):
    """Session runs only artifacts built for this machine's ISA; the Android one is aarch64."""
    from edgesmith.runtime import errors

    with pytest.raises(errors.UnsupportedArtifactError, match="is built for aarch64"):
        _session(built, ANDROID)


def _resign(artifact: Path, home: Path) -> None:
    """Sign a tampered artifact again with the build's key, so only the payload is wrong."""
    from edgesmith.runtime.manifest import Manifest
    from edgesmith.toolchain.package import file_entries, sign_and_check
    from edgesmith.toolchain.signing import load_signing_key

    manifest = Manifest.from_bytes((artifact / "manifest.json").read_bytes())
    manifest.files = file_entries(artifact)
    sign_and_check(artifact, manifest, load_signing_key(home / "keys" / "default.key"))


@pytest.mark.timeout(600)
def test_session_refuses_a_corrupt_flatbuffer_by_name(built, tmp_path):
    from edgesmith.runtime import errors

    broken = tmp_path / "truncated"
    shutil.copytree(_path(built, HOST), broken)
    data = (broken / "model.tflite").read_bytes()
    (broken / "model.tflite").write_bytes(data[: len(data) // 3])
    _resign(broken, built["home"])
    from edgesmith.runtime import Session

    with pytest.raises(errors.Error, match="LiteRT could not read model.tflite: the flatbuffer is truncated or corrupt"):
        Session(broken, trusted_keys=[bytes.fromhex(built["pub"].read_text().strip())])


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_int8_flatbuffer_quantizes_at_the_edge(tmp_path_factory, targets_dir, tmp_path):
    """litert-torch's INT8 flatbuffer takes and returns int8 tensors: the plugin quantizes the float
    inputs and dequantizes the outputs with their scale and zero point, as the toolchain's Python
    runner does, so both give the same floats (gate and proof run through the plugin)."""
    from edgesmith.runtime import Session
    from edgesmith.toolchain.backends import tflite
    from edgesmith.toolchain.backends.base import CompileResult

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((32, 1, 8, 8)).astype(np.float32))
    np.savez(tmp_path / "eval.npz", x=rng.standard_normal((64, 1, 8, 8)).astype(np.float32), y=rng.integers(0, 10, 64))
    home = tmp_path_factory.mktemp("tflite-int8-home")
    result = build_json(DIGITS, "--input-shape", "1,1,8,8", "-t", HOST, "--backend", "tflite", "--quantize", "int8",
                        "--calib", str(tmp_path / "calib.npz"), "--eval", str(tmp_path / "eval.npz"),
                        "--max-accuracy-drop", "1.0", "-o", str(tmp_path / "dist"),
                        env={"EDGESMITH_HOME": str(home), "EDGESMITH_TARGETS_PATH": str(targets_dir)})
    art = result["artifacts"][0]
    assert art["validation"]["executed"]["how"] == "native" and art["proof"]["status"] == "proven"
    path = Path(art["path"])
    options = json.loads((path / "manifest.json").read_text())["backend"]["options"]
    python_runner = tflite.load(path, CompileResult(format="tflite", entry="model.tflite", options=options), None)
    session = Session(path, trusted_keys=[bytes.fromhex((home / "keys" / "default.pub").read_text().strip())])
    for k in range(4):
        x = (rng.standard_normal((1, 1, 8, 8)) * 2).astype(np.float32)
        np.testing.assert_allclose(session.run([x])[0], python_runner([x])[0], atol=1e-6, rtol=0)


# --- the plugin alone, through the C++ test driver -------------------------------------------

@pytest.fixture(scope="module")
def backend_check(tmp_path_factory) -> dict:
    return build_backend_check(tmp_path_factory.mktemp("tflite-check-build"), ("tflite",))


def _check(backend_check, artifact: Path, *args: str) -> tuple[int, dict]:
    return run_backend_check(backend_check, "tflite", artifact, *args)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_plugin_golden_and_concurrency(backend_check, built):
    """Host and Android flatbuffers through the plugin on this machine, 8 C++ threads at once."""
    for target in (HOST, ANDROID):
        code, report = _check(backend_check, _path(built, target), "--concurrency", "8", "--iterations", "40")
        assert code == 0, report
        assert report["max_abs_err"] <= 1e-4
        assert report["concurrent_runs"] == 320
        assert report["concurrent_mismatches"] == 0 and report["concurrent_failures"] == 0


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_plugin_threads_follow_the_setting(backend_check, built):
    """--threads N: one XNNPACK pool of N-1 workers besides the caller, so N threads in the process."""
    for threads in (1, 3):
        code, report = _check(backend_check, _path(built, HOST), "--threads", str(threads))
        assert code == 0, report
        assert report["process_threads"] == threads


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_plugin_delegate_setting(backend_check, built, tmp_path):
    """[tflite] delegate = "none": LiteRT's builtin kernels instead of XNNPACK; an unknown one is refused."""
    other = tmp_path / "builtin-kernels"
    shutil.copytree(_path(built, HOST), other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["backend"]["options"]["delegate"] = "none"
    (other / "manifest.json").write_text(json.dumps(manifest))
    code, report = _check(backend_check, other)
    assert code == 0 and report["max_abs_err"] <= 1e-4, report
    assert report["describe"].endswith("(CPU, builtin kernels)")
    manifest["backend"]["options"]["delegate"] = "gpu"
    (other / "manifest.json").write_text(json.dumps(manifest))
    code, report = _check(backend_check, other)
    assert code == 2 and report["status"] == 1 and "delegate is 'gpu', not xnnpack or none" in report["message"]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_plugin_refuses_corrupt_and_unsupported_flatbuffers(backend_check, built, tmp_path):
    """A LOAD_FAILED (1) with one sentence naming the problem, never a crash."""
    truncated = tmp_path / "truncated"
    shutil.copytree(_path(built, HOST), truncated)
    data = (truncated / "model.tflite").read_bytes()
    (truncated / "model.tflite").write_bytes(data[: len(data) // 3])
    code, report = _check(backend_check, truncated)
    assert code == 2 and report["stage"] == "open" and report["status"] == 1
    assert report["message"].startswith("LiteRT could not read model.tflite: the flatbuffer is truncated or corrupt")

    (truncated / "model.tflite").write_bytes(b"not a flatbuffer\n" * 100)
    code, report = _check(backend_check, truncated)
    assert code == 2 and report["status"] == 1
    assert "not a TFLite flatbuffer" in report["message"]

    # The first operator becomes a custom op LiteRT has no kernel for.
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    custom = tmp_path / "custom-op"
    shutil.copytree(_path(built, HOST), custom)
    model = flatbuffer_utils.read_model(str(custom / "model.tflite"))
    code_entry = model.operatorCodes[0]
    code_entry.builtinCode = code_entry.deprecatedBuiltinCode = schema.BuiltinOperator.CUSTOM
    code_entry.customCode = "EdgesmithMissingOp"
    flatbuffer_utils.write_model(model, str(custom / "model.tflite"))
    code, report = _check(backend_check, custom)
    assert code == 2 and report["stage"] == "open" and report["status"] == 1
    assert report["message"].startswith("LiteRT cannot run model.tflite: it uses the custom op EdgesmithMissingOp")
    assert "\n" not in report["message"]

    # Another backend's payload: INVALID (3).
    ort_like = tmp_path / "other-format"
    shutil.copytree(_path(built, HOST), ort_like)
    manifest = json.loads((ort_like / "manifest.json").read_text())
    manifest["payload"]["format"] = "onnx"
    (ort_like / "manifest.json").write_text(json.dumps(manifest))
    code, report = _check(backend_check, ort_like)
    assert code == 2 and report["status"] == 3


# --- Arm Linux and Android artifacts under qemu ------------------------------------------------

def _aarch64_bundle_run() -> Path:
    from edgesmith.toolchain.prove import aarch64_bundle

    exe = aarch64_bundle() / "bin" / "edgesmith-run"
    assert exe.is_file(), f"the aarch64 runtime is not built ({exe}); run `edgesmith tools install aarch64-runtime`"
    assert (aarch64_bundle() / "lib" / "edgesmith" / "backends" / "libedgesmith_backend_tflite.so").is_file(), \
        "the aarch64 bundle has no tflite plugin; run `edgesmith tools install aarch64-runtime` again"
    return exe


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_rpi4_artifact_proven_under_qemu(tmp_path_factory, targets_dir):
    """An rpi4 tflite artifact: validated by the host's LiteRT, proven by the aarch64 edgesmith-run
    under qemu-aarch64-static -cpu cortex-a72."""
    _aarch64_bundle_run()
    rpi4 = _build(tmp_path_factory, targets_dir, RPI4)["artifacts"][RPI4]
    assert rpi4["validation"]["status"] == "passed" and rpi4["validation"]["executed"]["how"] == "host-engine"
    proof = rpi4["proof"]
    assert proof["status"] == "proven", proof
    assert proof["how"] == "qemu-aarch64" and "-cpu cortex-a72" in proof["runner"]
    assert proof["samples"] > 0 and proof["max_abs_err"] <= 1e-4


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_android_artifact_runs_under_qemu(built):
    """The Android flatbuffer runs in the aarch64 runtime too (its proof stays not-run: no Android
    userland here, but the same plugin code runs on the phone's Linux kernel)."""
    from edgesmith.toolchain.prove import Runner, run_golden

    runner = Runner(_aarch64_bundle_run(), {}, "qemu-aarch64", "cortex-a72")
    report = run_golden(_path(built, ANDROID), runner, [bytes.fromhex(built["pub"].read_text().strip())])
    assert report["passed"] is True and report["exit_code"] == 0, report
    assert report["backend"].startswith("litert 2.3.0")


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_fp16_artifacts_gated_under_qemu_and_refused_without_fp16(tmp_path_factory):
    """`--precision fp16` for rpi5 (proven under qemu -cpu cortex-a76) and Android (its gate run by
    the Linux aarch64 runtime under qemu: the flatbuffer carries no machine code): XNNPACK computes
    in fp16 (its outputs move from FP32 by more than FP32 rounding), and a Cortex-A72, which lacks
    fp16 arithmetic, refuses both by CPU feature."""
    from edgesmith.toolchain.prove import Runner, run_golden

    exe = _aarch64_bundle_run()
    home = tmp_path_factory.mktemp("fp16-home")
    out = tmp_path_factory.mktemp("fp16-dist")
    result = build_json(DIGITS, "--input-shape", "1,1,8,8", "-t", "rpi5-aarch64", "-t", ANDROID, "--backend", "tflite",
                        "--precision", "fp16", "-o", str(out), env={"EDGESMITH_HOME": str(home)})
    assert not result["failures"], result["failures"]
    key = bytes.fromhex((home / "keys" / "default.pub").read_text().strip())
    by_target = {a["target"]: a for a in result["artifacts"]}
    assert set(by_target) == {"rpi5-aarch64", ANDROID}
    for target, artifact in by_target.items():
        path = Path(artifact["path"])
        assert path.name.endswith("-tflite-fp16")
        manifest = json.loads((path / "manifest.json").read_text())
        assert manifest["backend"]["precision"] == "fp16"
        assert manifest["backend"]["options"]["inference_precision"] == "fp16"
        assert {"asimdhp", "fphp"} <= set(manifest["target"]["cpu_features"])
        gate = manifest["accuracy"]
        assert gate["precision"] == "fp16" and gate["executed"] == "qemu-aarch64" and gate["proof"] == "synthetic"
        assert manifest["validation"]["executed"] == {"isa": "aarch64", "how": "qemu-aarch64"}
        # FP32 kernels would match ONNX Runtime to ~1e-6; fp16 arithmetic moves the scores far more.
        assert manifest["validation"]["max_abs_err"] > 1e-3, manifest["validation"]
        ran = run_golden(path, Runner(exe, {}, "qemu-aarch64", "cortex-a76"), [key])
        assert ran["passed"] is True and ran["backend"].endswith("(CPU, XNNPACK fp16)"), ran
        refused = run_golden(path, Runner(exe, {}, "qemu-aarch64", "cortex-a72"), [key])
        assert refused["passed"] is False and "asimdhp" in refused["error"] and "fphp" in refused["error"], refused
    assert by_target["rpi5-aarch64"]["proof"]["status"] == "proven"
