"""edgesmith.runtime.Session and edgesmith-run over the C++ core, with the test-only `testecho`
backend plugin (tests/cpp/testecho_backend.cc: y = 2x, m = n), so no engine is needed.

The plugin is built by CMake into build/cpp-tests/test-backends (what `make cpp-test` uses) and
found through EDGESMITH_BACKEND_PATH, exactly as a device finds an installed backend.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from edgesmith.runtime import Session, errors
from edgesmith.runtime.artifact import _core
from edgesmith.toolchain.signing import SigningKey, generate_key, load_signing_key, sign_manifest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parent.parent
CPP_BUILD = REPO / "build" / "cpp-tests"
BACKEND_DIR = CPP_BUILD / "test-backends"
EDGESMITH_RUN = Path(sys.executable).parent / "edgesmith-run"


@pytest.fixture(scope="session")
def backend_dir() -> Path:
    """Build (incrementally) the testecho plugin in `make cpp-test`'s build (scripts/cpp-build.sh)."""
    subprocess.run(["bash", str(REPO / "scripts" / "cpp-build.sh"), "edgesmith_backend_testecho"],
                   check=True, capture_output=True, timeout=900)
    assert (BACKEND_DIR / "libedgesmith_backend_testecho.so").is_file()
    return BACKEND_DIR


@pytest.fixture(autouse=True)
def _plugin_path(backend_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGESMITH_BACKEND_PATH", str(backend_dir))


@pytest.fixture
def key(tmp_path: Path) -> SigningKey:
    return load_signing_key(generate_key("test", tmp_path / "keys"))


def _x(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, 3)).astype(np.float32)


def _n(seed: int = 0) -> np.ndarray:
    return np.arange(4, dtype=np.int64) + seed


def write_echo_artifact(directory: Path, key: SigningKey, mutate: Callable[[dict], None] | None = None,
                        extra: dict[str, bytes] | None = None) -> Path:
    """A signed testecho artifact: inputs x float32 (2, 3), n int64 (4,) -> y = 2x, m = n."""
    files: dict[str, bytes] = {"model.bin": b"testecho payload", **(extra or {})}
    samples = []
    for s in range(2):
        arrays = {"input_0": _x(s), "input_1": _n(s), "output_0": 2 * _x(s), "output_1": _n(s)}
        for stem, array in arrays.items():
            path = directory / "golden" / f"sample_{s}" / f"{stem}.npy"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, array)
            files[path.relative_to(directory).as_posix()] = path.read_bytes()
        prefix = f"golden/sample_{s}/"
        samples.append({"inputs": [prefix + "input_0.npy", prefix + "input_1.npy"],
                        "outputs": [prefix + "output_0.npy", prefix + "output_1.npy"]})
    for rel, data in files.items():
        (directory / rel).parent.mkdir(parents=True, exist_ok=True)
        (directory / rel).write_bytes(data)
    manifest: dict[str, Any] = {
        "schema_version": 1,
        "name": "echo-host-testecho",
        "target": {"name": "host", "isa": _core().host_isa(), "threads": 2},
        "backend": {"name": "testecho", "version": "1.0", "precision": "fp32", "options": {"mode": "double"}},
        "payload": {"format": "testecho", "entry": "model.bin"},
        "files": [{"path": rel, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                  for rel, data in sorted(files.items())],
        "inputs": [{"name": "x", "dtype": "float32", "shape": [2, 3]},
                   {"name": "n", "dtype": "int64", "shape": [4]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": [2, 3]},
                    {"name": "m", "dtype": "int64", "shape": [4]}],
        "golden": {"samples": samples, "atol": 1e-5, "rtol": 1e-4},
        "monitoring": {"outputs": [{"name": "y", "kind": "classes", "classes": 3},
                                   {"name": "m", "kind": "histogram", "edges": [0.0, 1.0, 2.0, 3.0]}],
                       "latency": {"start_us": 1.0, "factor": 2.0, "count": 40}},
        "proof": {"status": "not-run", "isa": _core().host_isa()},
    }
    if mutate:
        mutate(manifest)
    text = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    (directory / "manifest.json").write_bytes(text)
    (directory / "manifest.sig").write_bytes(sign_manifest(text, key))
    return directory


@pytest.fixture
def echo(tmp_path: Path, key: SigningKey) -> Path:
    return write_echo_artifact(tmp_path / "echo", key)


@pytest.fixture
def session(echo: Path, key: SigningKey) -> Session:
    return Session(echo, trusted_keys=[key.public_key])


# --- Session ---------------------------------------------------------------------------------


def test_run_list_and_dict(session: Session) -> None:
    assert [i.name for i in session.inputs] == ["x", "n"]
    assert session.outputs[0].dtype == "float32" and session.outputs[0].shape == [2, 3]
    assert session.backend == "testecho 1.0"
    assert session.manifest["name"] == "echo-host-testecho"
    y, m = session.run([_x(), _n()])
    np.testing.assert_array_equal(y, 2 * _x())
    np.testing.assert_array_equal(m, _n())
    out = session.run({"n": _n(1), "x": _x(1)})
    assert list(out) == ["y", "m"]
    np.testing.assert_array_equal(out["y"], 2 * _x(1))
    y[0, 0] = 123.0  # outputs are owned by the caller
    assert session.run([_x(), _n()])[0][0, 0] != 123.0


def test_input_mismatches_are_typed_and_named(session: Session) -> None:
    with pytest.raises(errors.InputError, match="missing 'n'; unknown 'z'"):
        session.run({"x": _x(), "z": _n()})
    with pytest.raises(errors.InputError, match=r"the model takes 2 inputs \(x, n\), 1 was given"):
        session.run([_x()])
    with pytest.raises(errors.InputError, match="input 'x' has dtype float64, the model takes float32"):
        session.run([_x().astype(np.float64), _n()])
    with pytest.raises(errors.InputError, match="input 'n' has dtype int32, the model takes int64"):
        session.run([_x(), _n().astype(np.int32)])
    with pytest.raises(errors.InputError, match="input 'x' has dtype complex64"):
        session.run([_x().astype(np.complex64), _n()])
    with pytest.raises(errors.InputError, match=r"input 'x' has shape \(3, 2\), the model takes \(2, 3\)"):
        session.run([_x().reshape(3, 2), _n()])
    with pytest.raises(ValueError):  # still a builtin ValueError for callers that catch that
        session.run([_x()[None], _n()])
    stats = session.stats()
    # Recorded by the C++ session: everything but the dict's names and the complex dtype, which
    # the binding refuses before the call.
    assert stats["errors"] == 5 and stats["runs"] == 0


def test_nan_inputs_are_counted_and_still_run(session: Session) -> None:
    x = _x()
    x[0, 1] = x[1, 2] = np.nan
    y, _ = session.run([x, _n()])
    assert np.isnan(y[0, 1])
    stats = session.stats()
    assert stats["runs"] == 1
    assert stats["nan_input_runs"] == 1 and stats["nan_input_values"] == 2


def test_non_contiguous_inputs_are_copied(session: Session) -> None:
    wide = np.arange(12, dtype=np.float32).reshape(2, 6)
    strided = wide[:, ::2]
    fortran = np.asfortranarray(_x())
    assert not strided.flags.c_contiguous and not fortran.flags.c_contiguous
    for x in (strided, fortran):
        np.testing.assert_array_equal(session.run([x, _n()])[0], 2 * x)
    np.testing.assert_array_equal(wide, np.arange(12, dtype=np.float32).reshape(2, 6))  # untouched


def test_threads_match_serial(session: Session) -> None:
    inputs = [(_x(t), _n(t)) for t in range(8)]
    expected = [session.run(list(i)) for i in inputs]
    failures: list[str] = []

    def worker(t: int) -> None:
        for _ in range(200):
            y, m = session.run(list(inputs[t]))
            if not (np.array_equal(y, expected[t][0]) and np.array_equal(m, expected[t][1])):
                failures.append(f"thread {t}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert session.stats()["runs"] == 8 + 8 * 200


def test_stats_follow_monitoring(session: Session) -> None:
    x = np.array([[0, 5, 1], [9, 0, 0]], dtype=np.float32)  # arg-max classes 1 and 0
    session.run([x, np.array([-1, 0, 2, 7], dtype=np.int64)])
    stats = session.stats()
    assert stats["outputs"]["y"]["kind"] == "classes"
    assert stats["outputs"]["y"]["counts"] == [1, 1, 0]
    m = stats["outputs"]["m"]
    assert (m["counts"], m["underflow"], m["overflow"]) == ([1, 0, 1], 1, 1)
    latency = stats["latency"]
    assert latency["count"] == 40 and len(latency["buckets"]) == 40
    assert sum(latency["buckets"]) + latency["underflow"] + latency["overflow"] == 1
    assert 0 < latency["p50_us"] <= latency["p99_us"] <= latency["max_us"] * 1.0001


def test_self_test(session: Session, tmp_path: Path, key: SigningKey) -> None:
    result = session.self_test()
    assert result["passed"] and result["samples"] == 2 and result["max_abs_err"] == 0.0
    assert session.stats()["runs"] == 0
    identity = write_echo_artifact(tmp_path / "identity", key,
                                   lambda m: m["backend"].update(options={}))
    failed = Session(identity, trusted_keys=[key.public_key]).self_test()
    assert not failed["passed"] and "output 'y'" in failed["details"][0]["message"]


def test_default_keys(echo: Path, key: SigningKey, _isolated_home: Path) -> None:
    with pytest.raises(errors.ValueError, match="no trusted public keys"):
        Session(echo)
    (_isolated_home / "trusted").mkdir()
    (_isolated_home / "trusted" / "signer.pub").write_text(key.public_key.hex() + "\n")
    assert Session(echo).key_id == key.key_id


# --- refused before anything is loaded -------------------------------------------------------


def test_tampered_artifact_refused_before_load(tmp_path: Path, key: SigningKey) -> None:
    # The backend does not exist: an IntegrityError (not BackendError) shows verify ran first.
    art = write_echo_artifact(tmp_path / "a", key, lambda m: m["backend"].update(name="nothere"))
    (art / "model.bin").write_bytes(b"testecho payload, changed")
    with pytest.raises(errors.IntegrityError) as info:
        Session(art, trusted_keys=[key.public_key])
    assert info.value.path == "model.bin"


def _elf_header(machine: int) -> bytes:
    header = bytearray(64)
    header[0:4] = b"\x7fELF"
    header[4], header[5] = 2, 1  # 64-bit, little-endian
    header[16:18] = (3).to_bytes(2, "little")  # ET_DYN
    header[18:20] = machine.to_bytes(2, "little")
    return bytes(header)


def _tvm_payload(manifest: dict) -> None:
    manifest["payload"] = {"format": "tvm-relax-so", "entry": "model.so"}
    manifest["backend"]["name"] = "nothere"  # would be a BackendError if dlopen were reached


def test_foreign_isa_elf_refused_before_dlopen(tmp_path: Path, key: SigningKey) -> None:
    host = _core().host_isa()
    other, machine = ("x86_64", 62) if host == "aarch64" else ("aarch64", 183)
    art = write_echo_artifact(tmp_path / "a", key, _tvm_payload, {"model.so": _elf_header(machine)})
    with pytest.raises(errors.UnsupportedArtifactError) as info:
        Session(art, trusted_keys=[key.public_key])
    assert info.value.path == "model.so"
    assert f"model.so is an {other} shared library, this machine is {host}" in str(info.value)
    assert "edgesmith prove" in str(info.value)

    art = write_echo_artifact(tmp_path / "b", key, _tvm_payload, {"model.so": b"\x7fELF\x02"})
    with pytest.raises(errors.UnsupportedArtifactError,
                       match=r"model.so is not an ELF shared library \(truncated or foreign\)"):
        Session(art, trusted_keys=[key.public_key])


def test_other_target_isa_foreign_format_and_missing_backend_refused(tmp_path: Path, key: SigningKey) -> None:
    other = "x86_64" if _core().host_isa() == "aarch64" else "aarch64"
    art = write_echo_artifact(tmp_path / "a", key, lambda m: m["target"].update(isa=other))
    with pytest.raises(errors.UnsupportedArtifactError, match=f"is built for {other}"):
        Session(art, trusted_keys=[key.public_key])
    art = write_echo_artifact(tmp_path / "b", key, lambda m: m["payload"].update(format="tflite"))
    with pytest.raises(errors.UnsupportedArtifactError,
                       match="backend 'testecho' of this runtime runs testecho payloads, and echo-host-testecho's payload is tflite"):
        Session(art, trusted_keys=[key.public_key])
    art = write_echo_artifact(tmp_path / "c", key, lambda m: (m["payload"].update(format="tensorrt-plan"), m["backend"].update(name="tensorrt")))
    with pytest.raises(errors.BackendError, match="backend 'tensorrt' is not built into this runtime"):
        Session(art, trusted_keys=[key.public_key])


def test_missing_cpu_features_refused_before_loading(tmp_path: Path, key: SigningKey) -> None:
    # Features some CPUs have and others lack (fma4/xop: old AMD only; vp2intersect: Tiger Lake).
    candidates = (["avx512f", "avx512bw", "avx512_vp2intersect", "fma4", "xop"] if _core().host_isa() == "x86_64"
                  else ["sve2", "mte", "sve", "i8mm"])
    have = set(_core().cpu_features_host())
    lacking = [f for f in candidates if f not in have]
    assert lacking, f"this CPU has all of {candidates}; add a feature it lacks to the test"
    features = ["sse2" if _core().host_isa() == "x86_64" else "asimd", *lacking]
    art = write_echo_artifact(tmp_path / "a", key, lambda m: m["target"].update(cpu_features=features))
    with pytest.raises(errors.UnsupportedArtifactError) as info:
        Session(art, trusted_keys=[key.public_key])
    message = str(info.value)
    assert "needs CPU features this CPU lacks: " + ", ".join(lacking) in message and "\n" not in message
    # Features the CPU has pass; a name the runtime cannot check is refused, never assumed present.
    art = write_echo_artifact(tmp_path / "b", key, lambda m: m["target"].update(cpu_features=sorted(have)[:3]))
    Session(art, trusted_keys=[key.public_key])
    art = write_echo_artifact(tmp_path / "c", key, lambda m: m["target"].update(cpu_features=["warp-drive"]))
    with pytest.raises(errors.UnsupportedArtifactError, match=r"warp-drive \(unknown to this runtime\)"):
        Session(art, trusted_keys=[key.public_key])


def test_backend_errors_name_the_backend(tmp_path: Path, key: SigningKey) -> None:
    art = write_echo_artifact(tmp_path / "a", key, lambda m: m["backend"].update(name="nothere"))
    with pytest.raises(errors.BackendError, match="backend 'nothere' is not built into this runtime"):
        Session(art, trusted_keys=[key.public_key])
    art = write_echo_artifact(tmp_path / "b", key, lambda m: m["backend"]["options"].update(fail="open"))
    with pytest.raises(errors.BackendError, match="testecho was told to fail"):
        Session(art, trusted_keys=[key.public_key])
    art = write_echo_artifact(tmp_path / "c", key, lambda m: m["backend"]["options"].update(fail="run"))
    failing = Session(art, trusted_keys=[key.public_key])
    with pytest.raises(errors.BackendError, match="testecho was told to fail"):
        failing.run([_x(), _n()])
    assert failing.stats()["errors"] == 1


# --- edgesmith-run ---------------------------------------------------------------------------


def _run_tool(*args: str, key: SigningKey) -> subprocess.CompletedProcess:
    pub = Path(str(key.path).removesuffix(".key") + ".pub")
    return subprocess.run([str(EDGESMITH_RUN), *args, "--key", str(pub)], capture_output=True,
                          text=True, timeout=120, env={**os.environ})


def test_edgesmith_run_golden(echo: Path, key: SigningKey, tmp_path: Path) -> None:
    result = _run_tool(str(echo), "--golden", "--json", key=key)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["passed"] and report["samples"] == 2 and report["max_abs_err"] == 0.0
    assert report["runner"].startswith("edgesmith-run ")
    assert report["backend"] == "testecho 1.0" and report["isa"] == _core().host_isa()
    text = _run_tool(str(echo), "--golden", key=key)
    assert "sample 1: max abs err 0  pass" in text.stdout

    identity = write_echo_artifact(tmp_path / "identity", key, lambda m: m["backend"].update(options={}))
    failed = _run_tool(str(identity), "--golden", key=key)
    assert failed.returncode == 1 and "FAIL" in failed.stdout


def test_edgesmith_run_inputs_outputs_bench(echo: Path, key: SigningKey, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", _x(5))
    np.save(tmp_path / "n.npy", _n(5))
    result = _run_tool(str(echo), "--input", f"n={tmp_path / 'n.npy'}", "--input", f"x={tmp_path / 'x.npy'}",
                       "--output-dir", str(tmp_path / "out"), "--bench", "20", "--json", key=key)
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "y.npy"), 2 * _x(5))
    bench = json.loads(result.stdout)["bench"]
    assert bench["runs"] == 20 and 0 < bench["p50_ms"] <= bench["p99_ms"]
    assert bench["throughput_per_s"] > 0 and bench["peak_rss_mb"] > 0


def test_edgesmith_run_errors(echo: Path, key: SigningKey, tmp_path: Path) -> None:
    usage = _run_tool(str(echo), "--bench", "many", key=key)
    assert usage.returncode == 2 and usage.stderr.startswith("error: --bench takes an integer")
    np.save(tmp_path / "x64.npy", _x().astype(np.float64))
    np.save(tmp_path / "n.npy", _n())
    wrong = _run_tool(str(echo), "--input", str(tmp_path / "x64.npy"), "--input", str(tmp_path / "n.npy"), key=key)
    assert wrong.returncode == 1
    assert wrong.stderr.strip() == "error: input 'x' has dtype float64, the model takes float32"
    (echo / "model.bin").write_bytes(b"changed")
    tampered = _run_tool(str(echo), "--golden", key=key)
    assert tampered.returncode == 1 and tampered.stderr.startswith("error: model.bin: ")
