"""`edgesmith build` end to end with real compilers, validated against ONNX Runtime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import DIGITS, build_json, run_cli

pytestmark = pytest.mark.integration

ELF_MACHINE = {62: "x86_64", 183: "aarch64"}


def elf_machine(path: Path) -> str:
    header = path.read_bytes()[:20]
    assert header[:4] == b"\x7fELF", f"{path} is not an ELF file"
    return ELF_MACHINE.get(int.from_bytes(header[18:20], "little"), "other")


def manifest(path: str | Path) -> dict:
    return json.loads((Path(path) / "manifest.json").read_text())


def test_host_builds_validate_within_tolerance(digits_artifacts):
    assert digits_artifacts["failures"] == []
    for backend in ("tvm", "openvino"):
        art = digits_artifacts["artifacts"][("x86_64-avx2", backend)]
        v = art["validation"]
        assert v["status"] == "passed" and v["executed"]["how"] == "native"
        assert v["max_abs_err"] <= v["atol"] + v["rtol"] * 10
        assert v["top1_agreement"] == 1.0
        assert v["samples"] == 8 and v["input_sensitivity"] > 0
        m = manifest(art["path"])
        assert m["backend"]["name"] == backend and m["target"]["name"] == "x86_64-avx2"
        assert m["inputs"] == [{"name": "input", "dtype": "float32", "shape": [1, 1, 8, 8]}]
        assert m["outputs"][0]["shape"] == [1, 10]
        assert m["model"]["source"]["kind"] == "pytorch"
    so = Path(digits_artifacts["artifacts"][("x86_64-avx2", "tvm")]["path"]) / "model.so"
    assert elf_machine(so) == "x86_64"


def test_rpi4_tvm_artifact_is_an_aarch64_library_pending_proof(digits_artifacts):
    art = digits_artifacts["artifacts"][("rpi4-aarch64", "tvm")]
    assert elf_machine(Path(art["path"]) / "model.so") == "aarch64"
    assert art["validation"]["status"] == "pending-proof"
    assert art["validation"]["executed"] is None
    m = manifest(art["path"])
    assert m["backend"]["options"]["target"]["mcpu"] == "cortex-a72"
    assert m["backend"]["options"]["cross_compiler"] == "aarch64-linux-gnu-g++"


def test_rpi4_openvino_ir_is_checked_by_the_host_engine(digits_artifacts):
    v = digits_artifacts["artifacts"][("rpi4-aarch64", "openvino")]["validation"]
    assert v["status"] == "passed" and v["executed"]["how"] == "host-engine"


def test_openvino_keeps_fp32_weights(digits_artifacts):
    path = Path(digits_artifacts["artifacts"][("x86_64-avx2", "openvino")]["path"]) / "model.xml"
    xml = path.read_text()
    assert 'element_type="f16"' not in xml and 'element_type="f32"' in xml


def test_tflite_artifact_for_android(digits_artifacts):
    art = digits_artifacts["artifacts"][("android-arm64-tflite", "tflite")]
    assert (Path(art["path"]) / "model.tflite").read_bytes()[4:8] == b"TFL3"
    assert art["validation"]["status"] == "passed" and art["validation"]["top1_agreement"] == 1.0


def test_golden_files_match_manifest_and_reference(digits_artifacts):
    art = digits_artifacts["artifacts"][("x86_64-avx2", "openvino")]
    m = manifest(art["path"])
    import onnxruntime as ort
    from edgesmith.toolchain.sources import load_source

    source = load_source(DIGITS, [1, 1, 8, 8])
    session = ort.InferenceSession(source.onnx_bytes, providers=["CPUExecutionProvider"])
    assert len(m["golden"]["samples"]) == 8  # every build sample (the default 8)
    for sample in m["golden"]["samples"]:
        x = np.load(Path(art["path"]) / sample["inputs"][0])
        y = np.load(Path(art["path"]) / sample["outputs"][0])
        assert list(x.shape) == m["inputs"][0]["shape"] and list(y.shape) == m["outputs"][0]["shape"]
        np.testing.assert_allclose(session.run(None, {"input": x})[0], y, rtol=1e-5, atol=1e-6)


def test_monitoring_spec_in_manifest(digits_artifacts, tmp_path):
    art = Path(digits_artifacts["artifacts"][("x86_64-avx2", "tvm")]["path"])
    m = manifest(art)
    (monitor,) = m["monitoring"]["outputs"]
    assert {k: monitor[k] for k in ("name", "kind", "classes", "edges")} == {
        "name": m["outputs"][0]["name"], "kind": "classes", "classes": 10, "edges": None}
    # The reference shares are the golden outputs' arg-max classes among the build's samples.
    shares = monitor["reference"]
    assert len(shares) == 10 and abs(sum(shares) - 1) < 1e-9 and all(s * 8 == round(s * 8) for s in shares)
    for sample in m["golden"]["samples"]:
        assert shares[int(np.argmax(np.load(art / sample["outputs"][0])))] > 0
    assert m["monitoring"]["latency"]["count"] > 0
    # A non-classifier output gets a histogram whose edges are quantiles of the reference outputs.
    path = _conv_model(tmp_path, "convrelu", "Relu")
    built = build_json(str(path), "-t", "x86_64-avx2", "--backend", "openvino", "-o", str(tmp_path / "dist"))
    monitor = manifest(built["artifacts"][0]["path"])["monitoring"]["outputs"][0]
    assert monitor["kind"] == "histogram" and len(monitor["edges"]) >= 3
    assert monitor["edges"] == sorted(monitor["edges"])
    # Quantile edges: the reference spreads over the bins (plus the maximum, at the last edge, in overflow).
    assert len(monitor["reference"]) == len(monitor["edges"]) + 1 and abs(sum(monitor["reference"]) - 1) < 1e-9


# The default, --backend auto (every candidate built, the best one published), is tested in test_selection.py.


def _onnx_file(tmp_path: Path, name: str, nodes, inputs, outputs, initializers=()) -> Path:
    graph = helper.make_graph(nodes, name, inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


def _conv_model(tmp_path: Path, name: str, activation: str, weight_scale: float = 1.0) -> Path:
    rng = np.random.default_rng(1)
    w = numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) * weight_scale).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node(activation, ["c"], ["y"])]
    return _onnx_file(tmp_path, name, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [w])


def test_onnx_file_source_builds(tmp_path):
    path = _conv_model(tmp_path, "convrelu", "Relu")
    result = build_json(str(path), "-t", "x86_64-avx2", "--backend", "tvm", "-o", str(tmp_path / "dist"))
    art = result["artifacts"][0]
    assert art["validation"]["status"] == "passed" and art["validation"]["top1_agreement"] is None
    assert manifest(art["path"])["model"]["source"]["kind"] == "onnx"


def test_unsupported_operator_names_operator_and_suggests_backend(tmp_path):
    path = _conv_model(tmp_path, "convcelu", "Celu")
    out = tmp_path / "dist"
    result = run_cli("build", str(path), "-t", "x86_64-avx2", "--backend", "tvm", "-o", str(out), check=False)
    assert result.returncode == 1
    assert "Celu" in result.stderr and "openvino" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists() or list(out.iterdir()) == []  # nothing half-written
    # ...and the suggested backend does compile it.
    ok = build_json(str(path), "-t", "x86_64-avx2", "--backend", "openvino", "-o", str(out))
    assert ok["artifacts"][0]["validation"]["status"] == "passed"


def test_constant_output_model_is_refused_unless_allowed(tmp_path):
    path = _conv_model(tmp_path, "zeros", "Relu", weight_scale=0.0)
    out = tmp_path / "dist"
    result = run_cli("build", str(path), "-t", "x86_64-avx2", "-o", str(out), check=False)
    assert result.returncode == 1 and "for every sample input" in result.stderr
    assert not out.exists() or list(out.iterdir()) == []
    ok = build_json(str(path), "-t", "x86_64-avx2", "--backend", "openvino", "-o", str(out), "--allow-constant-output")
    assert ok["artifacts"][0]["validation"]["input_sensitivity"] == 0.0


@pytest.mark.slow
def test_onnx_light_squeezenet_needs_allow_constant_output(tmp_path):
    light = Path(onnx.__file__).parent / "backend/test/data/light/light_squeezenet.onnx"
    out = tmp_path / "dist"
    refused = run_cli("build", str(light), "-t", "x86_64-avx2", "-o", str(out), check=False)
    assert refused.returncode == 1 and "constant weights" in refused.stderr
    # TVM only: with these all-constant weights the activations overflow and OpenVINO's softmax
    # disagrees with ONNX Runtime's (which validation rightly rejects).
    ok = build_json(str(light), "-t", "x86_64-avx2", "--backend", "tvm", "-o", str(out), "--allow-constant-output", "--num-samples", "2")
    assert ok["artifacts"][0]["validation"]["status"] == "passed"


@pytest.mark.slow  # two candidates, the fp16 one gated and proven under qemu: ~40 s
def test_fp16_for_rpi5_is_gated_and_proven_under_qemu_and_refused_on_a_cortex_a72(tmp_path):
    """rpi5-aarch64 lists fp16 (Cortex-A76, Armv8.2): the fp16 candidate runs its accuracy gate in the
    device runtime under qemu -cpu cortex-a76 (this x86 host has no fp16 arithmetic), is proven there,
    pins f16 and needs asimdhp/fphp, so a Cortex-A72 (rpi4) refuses it."""
    from edgesmith.toolchain.prove import _qemu_runner, run_golden

    result = build_json(DIGITS, "--input-shape", "1,1,8,8", "-t", "rpi5-aarch64", "--backend", "openvino",
                        "--precision", "fp16", "-o", str(tmp_path))
    (art,) = result["artifacts"]
    m = manifest(art["path"])
    assert m["backend"]["precision"] == "fp16" and 'element_type="f16"' in (Path(art["path"]) / "model.xml").read_text()
    assert m["backend"]["options"]["config"]["INFERENCE_PRECISION_HINT"] == "f16"
    assert {"asimdhp", "fphp"} <= set(m["target"]["cpu_features"])
    gate = m["accuracy"]
    assert gate["executed"] == "qemu-aarch64" and gate["proof"] == "synthetic" and gate["top1_agreement"] >= 0.99
    assert 0 < gate["max_rel_err"] <= gate["rel_err_bound"]  # really fp16 arithmetic: not bit-equal to FP32
    assert m["proof"]["status"] == "proven" and "-cpu cortex-a76" in m["proof"]["runner"]
    from edgesmith.toolchain.targets import get_target

    runner, _ = _qemu_runner(get_target("rpi4-aarch64"))
    assert runner.cpu == "cortex-a72"
    from edgesmith.runtime.keys import trusted_public_keys

    refused = run_golden(Path(art["path"]), runner, trusted_public_keys())
    assert refused["exit_code"] == 1 and "needs CPU features this CPU lacks" in refused["error"] and "asimdhp" in refused["error"]


def test_rebuild_replaces_artifact_atomically(tmp_path):
    args = (DIGITS, "--input-shape", "1,1,8,8", "-t", "x86_64-avx2", "--backend", "openvino", "-o", str(tmp_path))
    first = build_json(*args)["artifacts"][0]
    second = build_json(*args, "--model-version", "2")["artifacts"][0]
    assert first["path"] == second["path"]
    assert manifest(second["path"])["model"]["version"] == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == [Path(first["path"]).name]  # no staging leftovers
