"""edgesmith build --quantize int8: NNCF (openvino) and ONNX Runtime QDQ (ort) post-training
quantization behind the accuracy gate, on a digits CNN trained once (a few epochs) into a real
SQLite MLflow store for the whole module."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from conftest import REPO, run_cli

EXAMPLE = REPO / "examples" / "digits.toml"

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    import mlflow

    from edgesmith.toolchain.train.config import load_config
    from edgesmith.toolchain.train.run import train_and_register

    store = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{store / 'mlflow.db'}"
    summary = train_and_register(load_config(EXAMPLE).with_overrides(epochs=4), uri, alias="champion", progress=False)
    mlflow.set_tracking_uri(uri)
    test = np.load(mlflow.artifacts.download_artifacts(run_id=summary.run_id, artifact_path="data/test.npz",
                                                       dst_path=str(store / "data")))
    return {"uri": uri, "summary": summary, "x": test["x"], "y": test["y"]}


@pytest.fixture
def tracking(registry, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
    return registry


@pytest.mark.timeout(300)
def test_openvino_int8_passes_the_gate_runs_in_session_and_is_recorded(tracking, tmp_path):
    import mlflow

    from edgesmith.runtime import Session
    from edgesmith.toolchain.reference import ReferenceModel
    from edgesmith.toolchain.sources import load_source

    s = tracking["summary"]
    out = tmp_path / "dist"
    result = json.loads(run_cli("build", f"models:/digits/{s.version}", "-t", "host", "--backend", "openvino",
                                "--quantize", "int8", "-o", str(out), "--json").stdout)
    (artifact,) = result["artifacts"]
    path = out / f"digits-{artifact['target']}-openvino"
    manifest = json.loads((path / "manifest.json").read_text())
    q = manifest["quantization"]
    assert manifest["backend"]["precision"] == "int8" and q["scheme"] == "int8" and q["method"].startswith("nncf ")
    # calibration and evaluation are disjoint slices of the registered held-out split
    n = len(tracking["y"])
    cut = n // 3
    assert q["calibration"]["origin"] == f"registry:{s.run_id}/data/test.npz[:{cut}]" and q["calibration"]["samples"] == cut
    assert q["evaluation"]["origin"].endswith(f"[{cut}:]") and q["evaluation"]["samples"] == n - cut
    assert q["calibration"]["sha256"] == hashlib.sha256(np.ascontiguousarray(tracking["x"][:cut]).tobytes()).hexdigest()
    assert q["accuracy_drop"] <= 1.0 and q["int8_accuracy"] >= 0.9
    assert q["accuracy_drop"] == pytest.approx(100 * (q["fp32_accuracy"] - q["int8_accuracy"]))
    assert artifact["validation"]["top1_agreement"] == q["top1_agreement"]

    # the device's Session runs the INT8 IR and agrees with the FP32 model on the held-out inputs
    session = Session(path)  # trusts the key the build made in this test's EDGESMITH_HOME
    x_eval, y_eval = tracking["x"][cut:], tracking["y"][cut:]
    fp32 = ReferenceModel(load_source(f"models:/digits/{s.version}").onnx_model)
    int8_pred = np.array([session.run([x_eval[k:k + 1]])[0].argmax() for k in range(len(x_eval))])
    fp32_pred = np.array([fp32.run([x_eval[k:k + 1]])[0].argmax() for k in range(len(x_eval))])
    assert np.mean(int8_pred == fp32_pred) >= 0.97
    assert np.mean(int8_pred == y_eval) == pytest.approx(q["int8_accuracy"])
    assert session.self_test()["passed"]

    client = mlflow.MlflowClient(tracking["uri"], tracking["uri"])
    (run,) = client.search_runs([client.get_run(s.run_id).info.experiment_id], "tags.`edgesmith.kind` = 'build'")
    assert run.data.params["precision"] == "int8"
    assert run.data.params["calibration_sha256"] == q["calibration"]["sha256"]
    assert run.data.metrics["fp32_accuracy"] == pytest.approx(q["fp32_accuracy"])
    assert run.data.metrics["int8_accuracy"] == pytest.approx(q["int8_accuracy"])
    assert run.data.metrics["accuracy_drop"] == pytest.approx(q["accuracy_drop"])
    assert run.data.metrics["calibration_samples"] == cut


@pytest.mark.timeout(300)
def test_ort_qdq_int8_from_calib_and_eval_files(tracking, tmp_path):
    x, y = tracking["x"], tracking["y"]
    np.savez(tmp_path / "calib.npz", x=x[:100])
    np.savez(tmp_path / "eval.npz", x=x[100:], y=y[100:])
    out = tmp_path / "dist"
    result = json.loads(run_cli("build", f"models:/digits/{tracking['summary'].version}", "-t", "host", "--backend", "ort",
                                "--quantize", "int8", "--calib", str(tmp_path / "calib.npz"), "--eval",
                                str(tmp_path / "eval.npz"), "-o", str(out), "--json").stdout)
    (artifact,) = result["artifacts"]
    q = artifact["quantization"]
    assert q["method"].startswith("onnxruntime ") and "QDQ" in q["method"]
    assert q["calibration"] == {"origin": f"file:{tmp_path / 'calib.npz'}", "samples": 100,
                                "sha256": hashlib.sha256(np.ascontiguousarray(x[:100]).tobytes()).hexdigest()}
    assert q["evaluation"]["samples"] == len(y) - 100 and q["accuracy_drop"] <= 1.0
    assert artifact["proof"]["status"] == "proven"
    manifest = json.loads((out / f"digits-{artifact['target']}-ort" / "manifest.json").read_text())
    assert manifest["backend"]["options"]["quantization"] == q["method"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("args", [["--max-accuracy-drop", "-1"], ["--calib", "{zeros}"]], ids=["bound", "poor-calibration"])
def test_the_gate_refuses_with_both_figures_and_writes_nothing(tracking, tmp_path, args):
    np.savez(tmp_path / "zeros.npz", x=np.zeros((2, 1, 8, 8), np.float32))  # every activation range collapses to 0
    args = [a.replace("{zeros}", str(tmp_path / "zeros.npz")) for a in args]
    out = tmp_path / "dist"
    result = run_cli("build", f"models:/digits/{tracking['summary'].version}", "-t", "host", "--backend", "openvino",
                     "--quantize", "int8", *args, "-o", str(out), check=False)
    assert result.returncode == 1
    (line,) = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert "INT8 accuracy" in line and "below FP32's" in line and "nothing was written" in line
    bound = "-1" if "--max-accuracy-drop" in args else "1"
    assert f"--max-accuracy-drop {bound};" in line
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.timeout(120)
@pytest.mark.parametrize("x, what", [(np.zeros((4, 1, 8, 9), np.float32), "shape [4, 1, 8, 9]"),
                                     (np.zeros((4, 1, 8, 8), np.float64), "dtype float64")], ids=["shape", "dtype"])
def test_calibration_data_of_the_wrong_shape_or_dtype_is_one_sentence(tracking, tmp_path, x, what):
    np.savez(tmp_path / "calib.npz", x=x)
    out = tmp_path / "dist"
    result = run_cli("build", f"models:/digits/{tracking['summary'].version}", "-t", "host", "--backend", "openvino",
                     "--quantize", "int8", "--calib", str(tmp_path / "calib.npz"), "-o", str(out), check=False)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    (line,) = [l for l in result.stderr.splitlines() if l.strip()]
    assert line.startswith("error: --calib ") and what in line and "x of shape [N, 1, 8, 8] float32" in line
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.timeout(120)
def test_quantize_without_data_and_a_backend_without_int8_are_refused(tracking, tmp_path):
    from conftest import DIGITS

    result = run_cli("build", DIGITS, "--input-shape", "1,1,8,8", "-t", "host", "--backend", "openvino", "--quantize", "int8",
                     "-o", str(tmp_path), check=False)
    assert result.returncode == 1 and "needs calibration inputs: pass --calib FILE.npz" in result.stderr
    result = run_cli("build", f"models:/digits/{tracking['summary'].version}", "-t", "host", "--backend", "tvm",
                     "--quantize", "int8", "-o", str(tmp_path / "dist"), check=False)
    assert result.returncode == 1 and "tvm" in result.stderr and "INT8" in result.stderr
    assert not (tmp_path / "dist").exists() or not any((tmp_path / "dist").iterdir())


@pytest.mark.slow  # litert-torch's conversion in its own environment: ~30 s
@pytest.mark.timeout(300)
def test_litert_int8_from_the_registered_pytorch_model(tracking, tmp_path):
    out = tmp_path / "dist"
    result = json.loads(run_cli("build", f"models:/digits/{tracking['summary'].version}", "-t", "android-arm64-tflite",
                                "--quantize", "int8", "-o", str(out), "--json").stdout)
    (artifact,) = result["artifacts"]
    q = artifact["quantization"]
    assert q["method"].startswith("litert-torch ") and q["accuracy_drop"] <= 1.0 and q["top1_agreement"] >= 0.97
    assert artifact["validation"]["executed"]["how"] == "host-engine"

    # the flatbuffer really is integer: weights and activations are INT8 tensors (an FP32 one has none)
    from ai_edge_litert.interpreter import Interpreter

    tensors = Interpreter(model_path=str(out / "digits-android-arm64-tflite-tflite" / "model.tflite")).get_tensor_details()
    assert sum(t["dtype"] == np.int8 for t in tensors) >= 8
