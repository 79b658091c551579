"""The tflite backend from ONNX sources: onnx2torch → litert-torch in the converter environment.

- an ONNX export of the digits CNN builds a .tflite artifact for android-arm64-tflite whose outputs
  match ONNX Runtime's (checked here again, outside edgesmith's own validation);
- an operator onnx2torch has no converter for removes the tflite candidate with a note naming the
  operator, and the target's other candidate still builds.

Needs the LiteRT converter environment (`edgesmith tools install litert`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import build_json, run_cli

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


@pytest.fixture(autouse=True)
def _converter_environment():
    from edgesmith.toolchain import tools

    if tools.tool_python("litert") is None:
        pytest.fail("the LiteRT converter environment is not installed (or out of date); run `edgesmith tools install litert`")


def _digits_onnx(tmp_path: Path) -> Path:
    import torch

    from edgesmith.toolchain.models.digits import digits_cnn

    path = tmp_path / "digits.onnx"
    torch.onnx.export(digits_cnn(), (torch.zeros(1, 1, 8, 8),), str(path), input_names=["image"],
                      output_names=["logits"], dynamo=False)
    return path


def test_onnx_digits_builds_tflite_matching_onnxruntime(tmp_path):
    import onnxruntime as ort
    from ai_edge_litert.interpreter import Interpreter

    model = _digits_onnx(tmp_path)
    result = build_json(str(model), "-t", "android-arm64-tflite", "-o", str(tmp_path / "dist"))
    assert result["failures"] == [] and result["notes"] == []
    (art,) = result["artifacts"]
    assert (art["target"], art["backend"]) == ("android-arm64-tflite", "tflite")
    assert art["validation"]["status"] == "passed", art["validation"]
    manifest = json.loads((Path(art["path"]) / "manifest.json").read_text())
    assert manifest["model"]["source"]["kind"] == "onnx"
    assert "onnx2torch 1.5.15" in manifest["backend"]["version"]
    flatbuffer = Path(art["path"]) / manifest["payload"]["entry"]
    assert flatbuffer.read_bytes()[4:8] == b"TFL3"

    runner = Interpreter(model_path=str(flatbuffer)).get_signature_runner("serving_default")
    (in_name,), (out_name,) = manifest["backend"]["options"]["input_names"], manifest["backend"]["options"]["output_names"]
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((16, 1, 1, 8, 8)).astype(np.float32)
    for sample in x:
        expected = session.run(None, {"image": sample})[0]
        got = runner(**{in_name: sample})[out_name]
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)


def _conv_shrink(tmp_path: Path) -> Path:
    """Conv → Shrink (opset 17): ONNX Runtime runs it, onnx2torch 1.5.15 has no Shrink converter."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(1).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("Shrink", ["c"], ["y"], lambd=0.5, bias=0.1)],
        "convshrink", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    path = tmp_path / "convshrink.onnx"
    onnx.save(model, path)
    return path


def test_operator_onnx2torch_lacks_is_a_note_and_other_candidates_build(tmp_path):
    targets = tmp_path / "targets"
    targets.mkdir()
    (targets / "x86_64-litert.toml").write_text(
        'extends = "_linux-x86_64"\ndescription = "x86-64 with LiteRT first, ONNX Runtime second (test)"\n'
        'threads = 2\nbackends = ["tflite", "ort"]\n')
    env = {"EDGESMITH_TARGETS_PATH": str(targets)}
    out = tmp_path / "dist"
    result = run_cli("build", str(_conv_shrink(tmp_path)), "-t", "x86_64-litert", "-o", str(out), "--json", env=env)
    built = json.loads(result.stdout)
    assert built["failures"] == []
    assert [(a["backend"], a["validation"]["status"]) for a in built["artifacts"]] == [("ort", "passed")]
    (note,) = built["notes"]
    assert (note["backend"], note["status"]) == ("tflite", "failed")
    # one sentence naming the operator and the converter
    assert "no converter for the ONNX operator Shrink" in note["error"] and "onnx2torch" in note["error"], note
    assert "\n" not in note["error"] and "Traceback" not in result.stderr
    assert "note: x86_64-litert/tflite failed" in " ".join(result.stderr.split())
    assert sorted(p.name for p in out.iterdir()) == ["convshrink-x86_64-litert-ort"]


def test_onnx_digits_int8_through_pt2e(tmp_path):
    """--quantize int8 takes the same converter path for an ONNX source (litert-torch's PT2E)."""
    import onnxruntime as ort

    model = _digits_onnx(tmp_path)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((160, 1, 8, 8)).astype(np.float32)  # the gate wants >= 64 to score
    y = np.array([session.run(None, {"image": sample[None]})[0].argmax() for sample in x])
    np.savez(tmp_path / "calib.npz", x=x[:32])
    np.savez(tmp_path / "eval.npz", x=x[32:], y=y[32:])
    result = build_json(str(model), "-t", "android-arm64-tflite", "--quantize", "int8", "--calib", str(tmp_path / "calib.npz"),
                        "--eval", str(tmp_path / "eval.npz"), "-o", str(tmp_path / "dist"))
    (art,) = result["artifacts"]
    assert art["validation"]["status"] == "passed"
    assert "PT2E" in art["quantization"]["method"] and art["quantization"]["int8_accuracy"] >= 0.9
