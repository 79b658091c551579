"""The C++ core's artifact checks (csrc/artifact/) seen through edgesmith.runtime.artifact.

Artifacts are built here by hand, following docs/artifact.md, and signed with the real Python
signer (edgesmith.toolchain.signing), so these tests also pin the Python signer and the C++
verifier to the same format.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgesmith.runtime import artifact
from edgesmith.runtime import errors
from edgesmith.toolchain.signing import SigningKey, generate_key, load_signing_key, sign_manifest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent

ARTIFACT_NAME = "tiny-x86_64-avx2-openvino"
PAYLOAD_FILES = ["golden/sample_0/input_0.npy", "golden/sample_0/output_0.npy", "model.bin", "model.xml"]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_payload(directory: Path) -> None:
    rng = np.random.default_rng(0)
    (directory / "golden" / "sample_0").mkdir(parents=True)
    (directory / "model.xml").write_text('<?xml version="1.0"?>\n<net name="tiny" version="11"/>\n')
    (directory / "model.bin").write_bytes(rng.integers(0, 256, size=4096, dtype=np.uint8).tobytes())
    np.save(directory / "golden" / "sample_0" / "input_0.npy", rng.standard_normal((1, 4)).astype(np.float32))
    np.save(directory / "golden" / "sample_0" / "output_0.npy", rng.standard_normal((1, 2)).astype(np.float32))


def _manifest_for(directory: Path) -> dict[str, Any]:
    files = []
    for rel in sorted(PAYLOAD_FILES):
        data = (directory / rel).read_bytes()
        files.append({"path": rel, "size": len(data), "sha256": _sha256(data)})
    return {
        "schema_version": 1,
        "name": ARTIFACT_NAME,
        "model": {
            "name": "tiny",
            "version": "1",
            "source": {"kind": "onnx", "ref": "tiny.onnx", "sha256": "0" * 64},
            "onnx_sha256": "0" * 64,
            "opset": 17,
        },
        "target": {"name": "x86_64-avx2", "isa": "x86_64", "threads": 4, "description": "any AVX2 x86-64 CPU",
                   "cpu_features": ["avx2", "fma"]},
        "backend": {"name": "openvino", "version": "2026.4.1", "precision": "fp32",
                    "options": {"config": {"INFERENCE_NUM_THREADS": 4, "PERFORMANCE_HINT": "LATENCY"}}},
        "payload": {"format": "openvino-ir", "entry": "model.xml"},
        "files": files,
        "inputs": [{"name": "x", "dtype": "float32", "shape": [1, 4]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": [1, 2]}],
        "golden": {
            "samples": [{"inputs": ["golden/sample_0/input_0.npy"], "outputs": ["golden/sample_0/output_0.npy"]}],
            "atol": 1e-5,
            "rtol": 1e-4,
        },
        "monitoring": {
            "outputs": [{"name": "y", "kind": "histogram", "classes": None, "edges": [-1.0, 0.0, 0.5, 2.0]}],
            "latency": {"start_us": 1.0, "factor": 2 ** 0.25, "count": 96},
        },
        "proof": {"status": "not-run", "isa": "x86_64", "how": None, "runner": None, "samples": 0,
                  "max_abs_err": None, "reason": "the C++ reader ignores this key"},
        "validation": {"status": "passed", "reference": "onnxruntime 1.32.0", "samples": 1},
        "build": {"created_at": "2025-01-01T00:00:00Z", "duration_s": 1.0},
    }


def _sign(directory: Path, manifest: dict[str, Any], key: SigningKey) -> bytes:
    text = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    (directory / "manifest.json").write_bytes(text)
    (directory / "manifest.sig").write_bytes(sign_manifest(text, key))
    return text


def _build(directory: Path, key: SigningKey) -> Path:
    _write_payload(directory)
    _sign(directory, _manifest_for(directory), key)
    return directory


@pytest.fixture
def key(tmp_path: Path) -> SigningKey:
    return load_signing_key(generate_key("test", tmp_path / "keys"))


@pytest.fixture
def art(tmp_path: Path, key: SigningKey) -> Path:
    return _build(tmp_path / ARTIFACT_NAME, key)


def _all_files(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())


def _expect_integrity(directory: Path, key: SigningKey, rel: str) -> errors.IntegrityError:
    with pytest.raises(errors.IntegrityError) as info:
        artifact.verify(directory, [key.public_key])
    assert info.value.path == rel, str(info.value)
    assert rel in str(info.value)
    return info.value


# --- the intact artifact ---------------------------------------------------------------------


def test_intact_artifact_verifies(art: Path, key: SigningKey) -> None:
    result = artifact.verify(art, [key.public_key])
    assert result.key_id == key.key_id
    assert result.file_count == len(PAYLOAD_FILES)
    assert result.path == art
    assert result.manifest == json.loads((art / "manifest.json").read_text())


def test_core_version_is_the_package_version() -> None:
    # A core left over from an older build (pyproject bumped, `make rebuild` not run) fails here.
    assert artifact.core_version() == importlib.metadata.version("edgesmith")


def test_cmake_fallback_version_is_pyproject_version() -> None:
    """A plain CMake build (the cross-compiled device core) stamps the fallback version."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    fallback = re.search(r'set\(EDGESMITH_VERSION_FALLBACK "([^"]+)"\)\s*endif', (REPO / "CMakeLists.txt").read_text())
    assert fallback is not None, "CMakeLists.txt no longer sets EDGESMITH_VERSION_FALLBACK for plain CMake builds"
    assert fallback.group(1) == project


# --- rules 1-5: the signature ----------------------------------------------------------------


def test_every_flipped_byte_of_every_file_is_caught(art: Path, key: SigningKey) -> None:
    files = _all_files(art)
    assert set(files) == {*PAYLOAD_FILES, "manifest.json", "manifest.sig"}
    for rel in files:
        original = (art / rel).read_bytes()
        for position in sorted({0, len(original) // 2, len(original) - 1}):
            for mask in (0x01, 0x80, 0xFF):
                damaged = bytearray(original)
                damaged[position] ^= mask
                (art / rel).write_bytes(bytes(damaged))
                _expect_integrity(art, key, rel)
        (art / rel).write_bytes(original)
    artifact.verify(art, [key.public_key])


def test_another_key_is_not_trusted(art: Path, key: SigningKey, tmp_path: Path) -> None:
    other = load_signing_key(generate_key("other", tmp_path / "keys"))
    with pytest.raises(errors.IntegrityError) as info:
        artifact.verify(art, [other.public_key])
    assert info.value.path == "manifest.sig"
    assert key.key_id in str(info.value)
    artifact.verify(art, [other.public_key, key.public_key])


def test_no_trusted_keys_means_no_trust(art: Path) -> None:
    with pytest.raises(errors.IntegrityError) as info:
        artifact.verify(art)
    assert info.value.path == "manifest.sig"


def test_signature_made_for_other_bytes(art: Path, key: SigningKey) -> None:
    # A well-formed manifest.sig from another manifest: manifest_sha256 no longer matches.
    other = bytearray((art / "manifest.json").read_bytes())
    other[-2:-1] = b" "
    (art / "manifest.sig").write_bytes(sign_manifest(bytes(other), key))
    _expect_integrity(art, key, "manifest.json")


def test_signature_swapped_in_from_other_manifest(art: Path, key: SigningKey) -> None:
    # Right manifest_sha256, wrong signature bytes: rule 5 blames manifest.sig.
    sig = json.loads((art / "manifest.sig").read_text())
    other = json.loads(sign_manifest(b"{}", key))
    sig["signature"] = other["signature"]
    (art / "manifest.sig").write_text(json.dumps(sig))
    _expect_integrity(art, key, "manifest.sig")


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"\x00\x01\x02garbage",
        b"[]",
        b'{"algorithm": "ed25519"}',
        b'{"algorithm": "rsa", "key_id": "", "public_key": "", "manifest_sha256": "", "signature": ""}',
        os.urandom(300),
    ],
)
def test_garbage_signature(art: Path, key: SigningKey, garbage: bytes) -> None:
    (art / "manifest.sig").write_bytes(garbage)
    _expect_integrity(art, key, "manifest.sig")


def test_signature_with_wrong_key_id(art: Path, key: SigningKey) -> None:
    sig = json.loads((art / "manifest.sig").read_text())
    sig["key_id"] = "0123456789abcdef"
    (art / "manifest.sig").write_text(json.dumps(sig))
    error = _expect_integrity(art, key, "manifest.sig")
    assert "key_id" in str(error)


@pytest.mark.parametrize("rel", ["manifest.json", "manifest.sig"])
def test_missing_manifest_files(art: Path, key: SigningKey, rel: str) -> None:
    (art / rel).unlink()
    _expect_integrity(art, key, rel)


def test_malformed_trusted_key_is_a_value_error(art: Path) -> None:
    with pytest.raises(errors.ValueError):
        artifact.verify(art, [b"\x00" * 31])


def test_missing_directory_is_a_runtime_error(tmp_path: Path, key: SigningKey) -> None:
    with pytest.raises(errors.RuntimeError):
        artifact.verify(tmp_path / "nope", [key.public_key])


# --- rule 6: the manifest's schema -----------------------------------------------------------


def test_signed_manifest_of_unknown_schema_version(art: Path, key: SigningKey) -> None:
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["schema_version"] = 2
    _sign(art, manifest, key)
    with pytest.raises(errors.ManifestError) as info:
        artifact.verify(art, [key.public_key])
    assert info.value.path == "manifest.json"
    assert "schema_version is 2" in str(info.value)


# --- rules 7 and 8: the files ----------------------------------------------------------------


@pytest.mark.parametrize("rel", PAYLOAD_FILES)
def test_missing_payload_file(art: Path, key: SigningKey, rel: str) -> None:
    (art / rel).unlink()
    _expect_integrity(art, key, rel)


@pytest.mark.parametrize("rel", ["notes.txt", "golden/extra.npy", "golden/deeper/still/x.bin", ".hidden"])
def test_extra_file(art: Path, key: SigningKey, rel: str) -> None:
    (art / rel).parent.mkdir(parents=True, exist_ok=True)
    (art / rel).write_bytes(b"not covered by the signature")
    error = _expect_integrity(art, key, rel)
    assert "not listed" in str(error)


def test_extra_symlink_counts_as_extra_file(art: Path, key: SigningKey) -> None:
    (art / "alias.bin").symlink_to(art / "model.bin")
    _expect_integrity(art, key, "alias.bin")


def test_truncated_file(art: Path, key: SigningKey) -> None:
    data = (art / "model.bin").read_bytes()
    (art / "model.bin").write_bytes(data[:-1])
    error = _expect_integrity(art, key, "model.bin")
    assert f"{len(data) - 1} bytes" in str(error) and str(len(data)) in str(error)


def _sign_with_extra_entry(art: Path, key: SigningKey, path: str, data: bytes) -> None:
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["files"].append({"path": path, "size": len(data), "sha256": _sha256(data)})
    _sign(art, manifest, key)


def test_dotdot_path(art: Path, key: SigningKey) -> None:
    data = b"outside the artifact"
    (art.parent / "outside.bin").write_bytes(data)
    _sign_with_extra_entry(art, key, "../outside.bin", data)
    _expect_integrity(art, key, "../outside.bin")


def test_dotdot_path_that_comes_back_inside(art: Path, key: SigningKey) -> None:
    data = (art / "model.bin").read_bytes()
    _sign_with_extra_entry(art, key, "golden/../model.bin", data)
    _expect_integrity(art, key, "golden/../model.bin")


def test_absolute_path(art: Path, key: SigningKey) -> None:
    data = b"outside the artifact"
    outside = art.parent / "outside.bin"
    outside.write_bytes(data)
    _sign_with_extra_entry(art, key, str(outside), data)
    _expect_integrity(art, key, str(outside))


def test_symlink_escaping_the_artifact(art: Path, key: SigningKey, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere" / "model.bin"
    outside.parent.mkdir()
    shutil.move(art / "model.bin", outside)
    (art / "model.bin").symlink_to(outside)
    error = _expect_integrity(art, key, "model.bin")
    assert "outside the artifact" in str(error)


def test_directory_symlink_escaping_the_artifact(art: Path, key: SigningKey, tmp_path: Path) -> None:
    shutil.move(art / "golden", tmp_path / "golden")
    (art / "golden").symlink_to(tmp_path / "golden", target_is_directory=True)
    _expect_integrity(art, key, "golden/sample_0/input_0.npy")


def test_dangling_symlink(art: Path, key: SigningKey) -> None:
    (art / "model.bin").unlink()
    (art / "model.bin").symlink_to(art / "nowhere.bin")
    _expect_integrity(art, key, "model.bin")


# --- the C++ reader and hashing against Python -----------------------------------------------


def _python_view(manifest: dict[str, Any]) -> dict[str, Any]:
    """The subset of a manifest the C++ reader returns, as json.loads sees it."""
    def pick(obj: dict[str, Any], *keys: str) -> dict[str, Any]:
        return {k: obj[k] for k in keys}

    def monitor(item: dict[str, Any]) -> dict[str, Any]:
        return pick(item, "name", "kind", "classes" if item["kind"] == "classes" else "edges")

    given = manifest["monitoring"].get("latency", {})
    latency = {k: given.get(k, default) for k, default in (("start_us", 1.0), ("factor", 2 ** 0.25), ("count", 96))}
    target = {**pick(manifest["target"], "name", "isa", *(["threads"] if manifest["target"].get("threads") is not None else [])),
              "cpu_features": manifest["target"].get("cpu_features", [])}

    return {
        "schema_version": manifest["schema_version"],
        "name": manifest["name"],
        "payload": pick(manifest["payload"], "format", "entry"),
        "files": [pick(f, "path", "size", "sha256") for f in manifest["files"]],
        "inputs": [pick(t, "name", "dtype", "shape") for t in manifest["inputs"]],
        "outputs": [pick(t, "name", "dtype", "shape") for t in manifest["outputs"]],
        "golden": {
            "samples": [pick(s, "inputs", "outputs") for s in manifest["golden"]["samples"]],
            "atol": manifest["golden"]["atol"],
            "rtol": manifest["golden"]["rtol"],
        },
        "monitoring": {"outputs": [monitor(m) for m in manifest["monitoring"]["outputs"]], "latency": latency},
        "target": target,
        "backend": {"name": manifest["backend"]["name"], "options_json": None},
    }


def _view_matches(view: dict[str, Any], manifest: dict[str, Any]) -> None:
    """The C++ reader's view equals the manifest's; backend options are compared as parsed JSON."""
    options = view["backend"]["options_json"]
    view = {**view, "backend": {**view["backend"], "options_json": None}}
    assert view == _python_view(manifest)
    assert json.loads(options) == manifest["backend"].get("options", {})


def test_cpp_reader_agrees_with_json_loads(art: Path) -> None:
    loaded = json.loads((art / "manifest.json").read_text())
    _view_matches(artifact.read_manifest(art), loaded)
    _view_matches(artifact.read_manifest(art / "manifest.json"), loaded)


def test_fixture_follows_the_pydantic_schema(art: Path) -> None:
    """The hand-built manifest here is what edgesmith.runtime.manifest accepts (minus the keys
    the C++ reader does not read, which this fixture fills only loosely)."""
    from edgesmith.runtime.manifest import Golden, Monitoring, Proof

    loaded = json.loads((art / "manifest.json").read_text())
    for model, key in ((Golden, "golden"), (Monitoring, "monitoring"), (Proof, "proof")):
        # Validated and dumped back unchanged: no key dropped, renamed or coerced on the way.
        assert model.model_validate(loaded[key]).model_dump(mode="json", exclude_unset=True) == loaded[key], key
    # ...and a section it must refuse is refused.
    with pytest.raises(pydantic.ValidationError, match="samples"):
        Golden.model_validate({**loaded["golden"], "samples": []})


def test_read_manifest_names_the_key(tmp_path: Path) -> None:
    directory = tmp_path / "a"
    directory.mkdir()
    _write_payload(directory)
    manifest = _manifest_for(directory)
    manifest["files"][1]["sha256"] = "XYZ"
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(errors.ManifestError) as info:
        artifact.read_manifest(directory)
    assert "files[1].sha256" in str(info.value)
    assert info.value.path == "manifest.json"


@pytest.mark.parametrize("size", [0, 1, 63, 64, 65, (1 << 20) - 1, 1 << 20, 3 * (1 << 20) + 17])
def test_sha256_file_agrees_with_hashlib(tmp_path: Path, size: int) -> None:
    data = np.random.default_rng(size).integers(0, 256, size=size, dtype=np.uint8).tobytes()
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert artifact.sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_sha256_of_missing_file_is_a_runtime_error(tmp_path: Path) -> None:
    with pytest.raises(errors.RuntimeError):
        artifact.sha256_file(tmp_path / "nope.bin")


# --- fuzzing the manifest reader -------------------------------------------------------------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)


def _locations(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path inside a JSON value (the root excluded)."""
    out = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    for k, v in items:
        out.append((*prefix, k))
        out.extend(_locations(v, (*prefix, k)))
    return out


@st.composite
def _mutated_manifests(draw: st.DrawFn, base: dict[str, Any]) -> dict[str, Any]:
    manifest = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        locations = _locations(manifest)
        if not locations:
            break
        where = draw(st.sampled_from(locations))
        parent = manifest
        for k in where[:-1]:
            parent = parent[k]
        op = draw(st.sampled_from(["replace", "delete", "add"]))
        if op == "replace":
            parent[where[-1]] = draw(_json_values)
        elif op == "delete":
            del parent[where[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=6))] = draw(_json_values)
        else:
            parent.append(draw(_json_values))
    return manifest


def _check_fuzzed_view(view: dict[str, Any], manifest: dict[str, Any]) -> None:
    # Integers beyond 64 bits in backend.options are read by nlohmann as doubles, so options are
    # only compared when they survive a float round trip.
    options = json.loads(view["backend"]["options_json"])
    stripped = {**view, "backend": {**view["backend"], "options_json": None}}
    assert stripped == _python_view(manifest)
    if "options" in manifest["backend"] and json.dumps(manifest["backend"]["options"]) == json.dumps(options):
        assert options == manifest["backend"]["options"]


@pytest.fixture(scope="module")
def fuzz_artifact(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SigningKey, dict[str, Any]]:
    root = tmp_path_factory.mktemp("fuzz")
    key = load_signing_key(generate_key("fuzz", root / "keys"))
    directory = _build(root / ARTIFACT_NAME, key)
    return directory, key, json.loads((directory / "manifest.json").read_text())


_FUZZ = settings(max_examples=300, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@_FUZZ
@given(data=st.binary(max_size=2048))
def test_fuzz_random_bytes(fuzz_artifact, data: bytes) -> None:
    directory, _, _ = fuzz_artifact
    path = directory.parent / "random.json"
    path.write_bytes(data)
    try:
        artifact.read_manifest(path)
    except errors.ManifestError as exc:
        assert exc.path == "manifest.json"


@_FUZZ
@given(data=st.data())
def test_fuzz_byte_splice(fuzz_artifact, data: st.DataObject) -> None:
    directory, _, _ = fuzz_artifact
    text = (directory / "manifest.json").read_bytes()
    start = data.draw(st.integers(0, len(text)))
    end = data.draw(st.integers(start, min(len(text), start + 16)))
    spliced = text[:start] + data.draw(st.binary(max_size=16)) + text[end:]
    path = directory.parent / "spliced.json"
    path.write_bytes(spliced)
    try:
        artifact.read_manifest(path)
    except errors.ManifestError:
        pass


@_FUZZ
@given(data=st.data())
def test_fuzz_json_mutations(fuzz_artifact, data: st.DataObject) -> None:
    """A mutated manifest, read raw and re-signed, only ever fails with ManifestError/IntegrityError."""
    directory, key, base = fuzz_artifact
    manifest = data.draw(_mutated_manifests(base))
    path = directory.parent / "mutated.json"
    path.write_text(json.dumps(manifest))
    try:
        view = artifact.read_manifest(path)
    except errors.ManifestError:
        pass
    else:
        _check_fuzzed_view(view, manifest)

    original = ((directory / "manifest.json").read_bytes(), (directory / "manifest.sig").read_bytes())
    _sign(directory, manifest, key)
    try:
        result = artifact.verify(directory, [key.public_key])
    except (errors.ManifestError, errors.IntegrityError):
        pass
    else:
        assert result.manifest == manifest
    finally:
        (directory / "manifest.json").write_bytes(original[0])
        (directory / "manifest.sig").write_bytes(original[1])
