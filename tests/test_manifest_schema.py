"""One manifest schema: the pydantic model (edgesmith.runtime.manifest) is the source,
docs/manifest.schema.json is generated from it, and the C++ reader (csrc/artifact/manifest.cc,
through edgesmith.runtime.artifact.read_manifest) rejects whatever that schema rejects in every
field it reads, with a ManifestError naming the key.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from conftest import DIGITS, build_json

from edgesmith.runtime import artifact, errors
from edgesmith.runtime.manifest import (BackendInfo, BuildInfo, FileEntry, Golden, GoldenSample, HostInfo, LatencyBuckets,
                                        Manifest, ModelInfo, Monitoring, OutputMonitor, Payload, Proof, SourceInfo,
                                        TensorSpec, Validation, json_schema, json_schema_text)

REPO = Path(__file__).resolve().parent.parent
SCHEMA_FILE = REPO / "docs" / "manifest.schema.json"
VALIDATOR = jsonschema.Draft202012Validator(json_schema())
MISSING = object()  # a mutation that deletes the key

FILES = ["golden/sample_0/input_0.npy", "golden/sample_0/input_1.npy", "golden/sample_0/output_0.npy",
         "golden/sample_0/output_1.npy", "model.bin", "model.xml"]


def _valid_manifest() -> dict[str, Any]:
    """A manifest as the toolchain writes it: built from the pydantic models and dumped by to_bytes."""
    manifest = Manifest(
        name="tiny-x86_64-avx2-openvino",
        model=ModelInfo(name="tiny", version="1", source=SourceInfo(kind="onnx", ref="tiny.onnx", sha256="0" * 64),
                        onnx_sha256="1" * 64, opset=17),
        target={"name": "x86_64-avx2", "isa": "x86_64", "threads": 4, "cpu_features": ["avx2", "fma"],
                "description": "any AVX2 x86-64 CPU", "tolerance": {"fp32": {"atol": 1e-4, "rtol": 1e-3}}},
        backend=BackendInfo(name="openvino", version="2026.4.1", precision="fp32",
                            options={"config": {"INFERENCE_NUM_THREADS": 4}}),
        payload=Payload(format="openvino-ir", entry="model.xml"),
        files=[FileEntry(path=p, size=10 + i, sha256=f"{i:x}" * 64) for i, p in enumerate(FILES)],
        inputs=[TensorSpec(name="x", dtype="float32", shape=[1, 4]), TensorSpec(name="n", dtype="int64", shape=[3])],
        outputs=[TensorSpec(name="y", dtype="float32", shape=[1, 2]), TensorSpec(name="h", dtype="float16", shape=[5])],
        golden=Golden(samples=[GoldenSample(inputs=FILES[:2], outputs=FILES[2:4])], atol=1e-5, rtol=1e-4),
        monitoring=Monitoring(outputs=[OutputMonitor(name="y", kind="classes", classes=2),
                                       OutputMonitor(name="h", kind="histogram", edges=[-1.0, 0.0, 2.5])],
                              latency=LatencyBuckets(start_us=1.0, factor=2.0, count=40)),
        validation=Validation(status="passed", reference="onnxruntime 1.32.0", executed=None, samples=1, max_abs_err=0.0,
                              max_rel_err=0.0, top1_agreement=1.0, atol=1e-5, rtol=1e-4, input_sensitivity=0.5),
        proof=Proof(status="not-run", isa="x86_64", reason="test"),
        build=BuildInfo(created_at="2026-01-01T00:00:00+00:00", duration_s=1.0,
                        host=HostInfo(isa="x86_64", cpu="test", os="linux"), toolchain={"openvino": "2026.4.1"}),
    )
    return json.loads(manifest.to_bytes())


VALID = _valid_manifest()

# Every field the C++ reader reads, as a path into the manifest; list items by index.
READ_FIELDS: list[tuple[Any, ...]] = [
    ("schema_version",), ("name",),
    ("payload",), ("payload", "format"), ("payload", "entry"),
    ("files",), ("files", 0), ("files", 0, "path"), ("files", 0, "size"), ("files", 0, "sha256"),
    *[p for side in ("inputs", "outputs") for p in
      [(side,), (side, 0), (side, 0, "name"), (side, 0, "dtype"), (side, 0, "shape"), (side, 0, "shape", 1)]],
    ("golden",), ("golden", "samples"), ("golden", "samples", 0),
    ("golden", "samples", 0, "inputs"), ("golden", "samples", 0, "inputs", 0),
    ("golden", "samples", 0, "outputs"), ("golden", "samples", 0, "outputs", 1),
    ("golden", "atol"), ("golden", "rtol"),
    ("monitoring",), ("monitoring", "outputs"), ("monitoring", "outputs", 0),
    ("monitoring", "outputs", 0, "name"), ("monitoring", "outputs", 0, "kind"), ("monitoring", "outputs", 0, "classes"),
    ("monitoring", "outputs", 1, "kind"), ("monitoring", "outputs", 1, "edges"), ("monitoring", "outputs", 1, "edges", 0),
    ("monitoring", "latency"), ("monitoring", "latency", "start_us"), ("monitoring", "latency", "factor"),
    ("monitoring", "latency", "count"),
    ("target",), ("target", "name"), ("target", "isa"), ("target", "threads"),
    ("target", "cpu_features"), ("target", "cpu_features", 0),
    ("backend",), ("backend", "name"), ("backend", "options"),
]

# Applied to every field: missing, every JSON type, empty, negative, zero, fractional and huge numbers.
COMMON_VALUES: list[Any] = [MISSING, None, True, False, 0, 1, -1, 2.5, 2**64, "", "x", [], ["x"], [1], {}, {"x": 1}]

# Values aimed at one field's own rule (bad hex, wrong enum, bounds, ...).
FIELD_VALUES: dict[str, list[Any]] = {
    "schema_version": [2, 0, "1", 1.5],
    "sha256": ["a" * 63, "a" * 65, "A" * 64, "g" * 64, " " + "a" * 63],
    "format": ["OpenVINO-IR", "-ir", ".ir", "tvm relax", "ir/x", "ir_x", "ïr", "onnx", "c++-so", "x.y"],
    "dtype": ["float31", "Float32", "complex64", "object", "f4"],
    "kind": ["mean", "Classes", "histogram", "classes"],
    "size": [2**63, -2**63, 1e3],
    "shape": [[1, 0], [-1], [2**63], [2**63 - 1], [1.5]],
    "atol": [-1e-300, -0.0, 1e308, "0.1"],
    "rtol": [-1e-300, -0.0, 1e308, "0.1"],
    "classes": [4096, 4097, 2**24, 1.5],  # the telemetry contract's MAX_CLASSES
    "edges": [[1.0], [1.0, 1.0], [2.0, 1.0], list(range(1024)), list(range(1025)), [0, "1"], [0, None]],  # MAX_EDGES
    "start_us": [1e-9, 0.0, -1.0],
    "factor": [1.0, 1.0000001, 0.5, 3],
    "count": [4096, 4097, 1.0],
    "threads": [1024, 1025, 1.0],
    "cpu_features": [["avx2", ""], ["avx2", 3], "avx2"],
    "options": ["{}", [["a", 1]]],
}


# Values for one item of a list field (one shape dimension, one edge, one golden path, ...).
ITEM_VALUES: dict[str, list[Any]] = {
    "shape": [2**63, 2**63 - 1, 1.0],
    "edges": [1e308, -1e308, "1"],
    "cpu_features": ["AVX2", " "],
    "inputs": ["golden/nope.npy", "/abs.npy"],
    "outputs": ["golden/nope.npy", "model.bin"],
}


def _key(path: tuple[Any, ...]) -> str:
    """The key as the C++ reader names it: files[0].sha256."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _mutated(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    manifest = copy.deepcopy(VALID)
    parent = manifest
    for part in path[:-1]:
        parent = parent[part]
    if value is MISSING:
        if isinstance(path[-1], int):
            return manifest
        parent.pop(path[-1], None)
    elif isinstance(path[-1], int) and path[-1] >= len(parent):
        return manifest
    else:
        parent[path[-1]] = value
    return manifest


def _mutations() -> list[tuple[tuple[Any, ...], Any]]:
    named = [p for p in READ_FIELDS if not isinstance(p[-1], int)]
    out = [(path, value) for path in READ_FIELDS for value in COMMON_VALUES]
    out += [(path, value) for path in named for value in FIELD_VALUES.get(path[-1], [])]
    out += [(path, value) for path in READ_FIELDS if isinstance(path[-1], int)
            for value in ITEM_VALUES.get(path[-2], [])]
    return out


def _cpp_error(manifest: dict[str, Any], tmp_path: Path) -> errors.ManifestError | None:
    (tmp_path / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    try:
        artifact.read_manifest(tmp_path / "manifest.json")
    except errors.ManifestError as e:
        return e
    return None


def test_committed_schema_is_current() -> None:
    assert SCHEMA_FILE.read_text() == json_schema_text(), (
        "docs/manifest.schema.json is stale; regenerate it: "
        "python -m edgesmith.runtime.manifest --schema > docs/manifest.schema.json")


def test_schema_cli_prints_the_committed_file() -> None:
    result = subprocess.run([sys.executable, "-m", "edgesmith.runtime.manifest", "--schema"],
                            capture_output=True, text=True, check=True, timeout=120)
    assert result.stdout == SCHEMA_FILE.read_text()


def test_schema_is_valid_draft_2020_12() -> None:
    jsonschema.Draft202012Validator.check_schema(json.loads(SCHEMA_FILE.read_text()))


def test_valid_manifest_passes_every_reader(tmp_path: Path) -> None:
    VALIDATOR.validate(VALID)
    assert Manifest.model_validate(VALID).model_dump(mode="json") == VALID
    assert _cpp_error(VALID, tmp_path) is None
    view = artifact.read_manifest(tmp_path / "manifest.json")
    assert view["target"]["cpu_features"] == ["avx2", "fma"] and view["target"]["threads"] == 4
    assert view["payload"] == VALID["payload"]


def test_cpp_reader_rejects_what_the_schema_rejects(tmp_path: Path) -> None:
    mutations = _mutations()
    rejected = 0
    problems = []
    for path, value in mutations:
        manifest = _mutated(path, value)
        schema_errors = list(VALIDATOR.iter_errors(manifest))
        # Unknown keys only: the reader ignores them on purpose (test_unknown_keys_...).
        if all(e.validator == "additionalProperties" for e in schema_errors):
            continue
        rejected += 1
        shown = "<missing>" if value is MISSING else json.dumps(value)[:40]
        error = _cpp_error(manifest, tmp_path)
        if error is None:
            problems.append(f"{_key(path)} = {shown}: the schema rejects it, the C++ reader accepts it")
            continue
        # A monitor's kind decides which key it needs, so the reader may name that key instead.
        blame = _key(path[:-1]) if path[-1] == "kind" else _key(path)
        if blame not in str(error):
            problems.append(f"{_key(path)} = {shown}: the C++ error does not name {blame}: {error}")
    assert not problems, "\n".join(problems)
    assert rejected > 500  # the mutations really exercise the schema (there are ~900)


def test_pydantic_rejects_what_the_schema_rejects() -> None:
    """The toolchain's reader of manifest.json agrees with the schema generated from its model."""
    accepted = []
    for path, value in _mutations():
        manifest = _mutated(path, value)
        if VALIDATOR.is_valid(manifest):
            continue
        try:
            Manifest.from_bytes(json.dumps(manifest).encode())
        except ValueError:
            continue
        accepted.append(f"{_key(path)} = {'<missing>' if value is MISSING else json.dumps(value)[:40]}")
    assert not accepted, "the schema rejects, Manifest.from_bytes accepts:\n" + "\n".join(accepted)
    assert Manifest.from_bytes(json.dumps(VALID).encode()).model_dump(mode="json") == VALID


@pytest.mark.parametrize("path, value", [
    (("payload", "format"), "executorch-pte"),  # any well-formed name: the registry decides what exists
    (("target", "threads"), None),  # null or absent: the device picks
    (("target", "threads"), MISSING),
    (("target", "cpu_features"), MISSING),
    (("target", "cpu_features"), []),
    (("backend", "options"), MISSING),
    (("monitoring", "latency"), MISSING),
    (("monitoring", "latency", "count"), MISSING),
    (("monitoring", "outputs", 0, "edges"), MISSING),
    (("target", "vendor_extension"), {"anything": 1}),
])
def test_optional_and_open_fields_are_accepted_by_both(tmp_path: Path, path: tuple[Any, ...], value: Any) -> None:
    manifest = _mutated(path, value)
    VALIDATOR.validate(manifest)
    assert _cpp_error(manifest, tmp_path) is None


@pytest.mark.parametrize("where", [(), ("payload",), ("files", 0), ("golden",), ("monitoring", "outputs", 1)])
def test_unknown_keys_schema_forbids_cpp_ignores(tmp_path: Path, where: tuple[Any, ...]) -> None:
    """docs/artifact.md: the C++ reader ignores unknown keys so older devices read newer manifests."""
    manifest = _mutated((*where, "added_in_a_later_version"), 1)
    assert not VALIDATOR.is_valid(manifest)
    assert _cpp_error(manifest, tmp_path) is None


@pytest.mark.parametrize("latency", [None, 123.4])
def test_selection_and_build_latency_are_read_by_all_three(tmp_path: Path, latency: float | None) -> None:
    """docs/selection.md: what `--backend auto` adds; absent (older artifacts) stays absent, null stays null."""
    manifest = copy.deepcopy(VALID)
    manifest["build"]["latency_us"] = latency
    manifest["selection"] = {
        "mode": "auto", "rule": "the fastest that passed", "chosen": "openvino", "reason": "fastest p50 here",
        "candidates": [
            {"backend": "openvino", "status": "passed", "latency_us_p50": 44.6, "latency_us_p95": 75.6,
             "timed_how": "native Session, 2 threads, best of 5 blocks of 200 runs", "error": None},
            {"backend": "tvm", "status": "failed", "latency_us_p50": None, "latency_us_p95": None, "timed_how": None,
             "error": "the tvm backend cannot compile operator(s) Celu"}]}
    VALIDATOR.validate(manifest)
    text = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    assert Manifest.from_bytes(text).to_bytes() == text
    assert _cpp_error(manifest, tmp_path) is None
    assert "latency_us" not in VALID["build"] and "selection" not in VALID
    assert Manifest.from_bytes(json.dumps(VALID).encode()).model_dump(mode="json") == VALID
    for path, value in ((("selection", "candidates", 0, "status"), "maybe"), (("selection", "candidates"), []),
                        (("selection", "mode"), "forced"), (("build", "latency_us"), -1.0), (("selection", "chosen"), "")):
        bad = copy.deepcopy(manifest)
        parent = bad
        for part in path[:-1]:
            parent = parent[part]
        parent[path[-1]] = value
        assert not VALIDATOR.is_valid(bad), path
        with pytest.raises(ValueError):
            Manifest.from_bytes(json.dumps(bad).encode())


@pytest.mark.integration
def test_a_built_manifest_follows_the_schema(tmp_path: Path) -> None:
    result = build_json(DIGITS, "--input-shape", "1,1,8,8", "-t", "x86_64-avx2", "--backend", "openvino",
                        "-o", str(tmp_path / "dist"), env={"EDGESMITH_HOME": str(tmp_path / "home")})
    (built,) = result["artifacts"]
    text = (Path(built["path"]) / "manifest.json").read_bytes()
    VALIDATOR.validate(json.loads(text))
    assert Manifest.from_bytes(text).to_bytes() == text  # strict read, byte-identical round trip
    assert artifact.read_manifest(built["path"])["target"]["cpu_features"] == json.loads(text)["target"]["cpu_features"]
