"""edgesmith build --quantize int8: NNCF (openvino) and ONNX Runtime QDQ (ort) post-training
quantization behind the accuracy gate, on a digits CNN trained once (a few epochs) into a real
SQLite MLflow store for the whole module."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

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
    path = out / f"digits-{artifact['target']}-openvino-int8"  # a reduced precision is named, never the FP32 directory
    assert artifact["path"] == str(path)
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
    manifest = json.loads((out / f"digits-{artifact['target']}-ort-int8" / "manifest.json").read_text())
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

    tensors = Interpreter(model_path=str(out / "digits-android-arm64-tflite-tflite-int8" / "model.tflite")).get_tensor_details()
    assert sum(t["dtype"] == np.int8 for t in tensors) >= 8


# --- precision as part of selection (--precision auto), on the same trained model -------------------

def _host_has(*features: str) -> bool:
    from edgesmith.runtime import _core

    return not _core.cpu_features_missing(list(features))


@pytest.mark.timeout(600)
def test_auto_precision_with_the_registered_split_publishes_every_gated_candidate(tracking, tmp_path):
    """--precision auto --backend all on x86_64-avx2 (fp32, int8): the registered split calibrates and
    labels the gate; every int8 candidate carries its labelled gate, named with its precision."""
    out = tmp_path / "dist"
    result = json.loads(run_cli("build", f"models:/digits/{tracking['summary'].version}", "-t", "x86_64-avx2",
                                "--backend", "all", "--precision", "auto", "-o", str(out), "--json").stdout)
    (selection,) = result["selections"]
    pairs = {(c["backend"], c.get("precision")) for c in selection["candidates"]}
    assert pairs == {("openvino", "fp32"), ("tvm", "fp32"), ("ort", "fp32"), ("tflite", "fp32"),
                     ("openvino", "int8"), ("ort", "int8"), ("tflite", "int8")}
    int8 = [a for a in result["artifacts"] if a["precision"] == "int8"]
    assert {a["backend"] for a in int8} == {"openvino", "ort", "tflite"}
    for a in int8:
        assert Path(a["path"]).name == f"digits-x86_64-avx2-{a['backend']}-int8"
        gate = a["accuracy"]
        assert gate["precision"] == "int8" and gate["proof"] == "labelled" and gate["data"]["labelled"] is True
        assert gate["accuracy_drop"] <= 1.0 and gate["max_accuracy_drop"] == 1.0 and gate["min_agreement"] is None
        assert gate["accuracy_drop"] == pytest.approx(100 * (gate["reference_accuracy"] - gate["accuracy"]))
        assert a["quantization"]["int8_accuracy"] == gate["accuracy"]  # the INT8 record as before
    fp32 = [a for a in result["artifacts"] if a["precision"] == "fp32"]
    assert {a["backend"] for a in fp32} == {"openvino", "tvm", "ort", "tflite"} and all(a["accuracy"] is None for a in fp32)
    assert selection["chosen_precision"] in ("fp32", "int8")
    chosen = [c for c in selection["candidates"] if c["backend"] == selection["chosen"]
              and c.get("precision") == selection["chosen_precision"]]
    def effective(c):  # a reduced precision must win by more than the margin (toolchain/selection.py)
        return c["latency_us_p50"] * (1.05 if c.get("precision", "fp32") != "fp32" else 1)

    assert len(chosen) == 1 and effective(chosen[0]) == min(
        effective(c) for c in selection["candidates"] if c["latency_us_p50"])


@pytest.mark.timeout(600)
def test_unlabelled_gate_from_calibration_inputs_and_its_bounds(tracking, tmp_path):
    """Only --calib: int8 calibrates on its first half and is judged by top-1 agreement on the second;
    an impossible --min-agreement refuses it with the figures; too few inputs leave int8 out."""
    from conftest import DIGITS

    x = tracking["x"][:200]
    np.savez(tmp_path / "calib.npz", x=x)
    out = tmp_path / "dist"
    args = ["build", f"models:/digits/{tracking['summary'].version}", "-t", "x86_64-avx2", "--backend", "ort",
            "--precision", "int8", "--calib", str(tmp_path / "calib.npz")]
    # a registered model brings labels: use an ONNX file of it instead, which has none
    import onnx

    from edgesmith.toolchain.sources import load_source

    onnx.save(load_source(args[1]).onnx_model, str(tmp_path / "digits.onnx"))
    args[1] = str(tmp_path / "digits.onnx")
    (artifact,) = json.loads(run_cli(*args, "-o", str(out), "--json").stdout)["artifacts"]
    gate = artifact["accuracy"]
    assert gate["proof"] == "unlabelled" and gate["data"] == {
        "origin": f"file:{tmp_path / 'calib.npz'}[100:]", "samples": 100, "labelled": False,
        "sha256": hashlib.sha256(np.ascontiguousarray(x[100:]).tobytes()).hexdigest()}
    assert gate["top1_agreement"] >= 0.99 and gate["min_agreement"] == 0.99 and gate["accuracy"] is None
    assert artifact["quantization"] is None  # no labels, no accuracy figures to record
    assert gate["calibration"] == {"origin": f"file:{tmp_path / 'calib.npz'}[:100]", "samples": 100,
                                   "sha256": hashlib.sha256(np.ascontiguousarray(x[:100]).tobytes()).hexdigest()}
    assert Path(artifact["path"]).name == "digits-x86_64-avx2-ort-int8"

    # calibrated on zeros (every activation range collapses), judged on real inputs: refused with the figures
    np.savez(tmp_path / "poor.npz", x=np.concatenate([np.zeros_like(x[:100]), x[100:]]))
    refused = run_cli(*args[:-1], str(tmp_path / "poor.npz"), "-o", str(tmp_path / "d2"), check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "agrees with FP32 on the top-1 class of" in refused.stderr and "below --min-agreement 0.99" in refused.stderr
    assert not (tmp_path / "d2").exists() or not any((tmp_path / "d2").iterdir())
    bad = run_cli(*args, "--min-agreement", "1.5", "-o", str(tmp_path / "d2"), check=False)
    assert bad.returncode == 1 and "--min-agreement 1.5 is not a share" in bad.stderr
    np.savez(tmp_path / "few.npz", x=x[:100])
    few = run_cli(*args[:-1], str(tmp_path / "few.npz"), "-o", str(tmp_path / "d3"), check=False)
    assert few.returncode == 1 and "int8 needs held-out inputs" in few.stderr and "--calib has 100" in few.stderr
    assert not (tmp_path / "d3").exists() or not any((tmp_path / "d3").iterdir())
    small = run_cli("build", DIGITS, "--input-shape", "1,1,8,8", "-t", "x86_64-avx2", "--precision", "auto",
                    "--eval", str(tmp_path / "calib.npz"), "-o", str(tmp_path / "d4"), check=False)
    assert small.returncode == 1 and "has no array 'y'" in small.stderr


@pytest.mark.timeout(300)
def test_a_precision_the_target_does_not_list_is_one_sentence(tmp_path):
    from conftest import DIGITS

    result = run_cli("build", DIGITS, "--input-shape", "1,1,8,8", "-t", "x86_64-avx2", "--precision", "bf16",
                     "-o", str(tmp_path), check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    (line,) = [l for l in result.stderr.splitlines() if l.strip()]
    assert "target x86_64-avx2 does not list precision 'bf16'; its precisions are fp32, int8" in line
    result = run_cli("build", DIGITS, "--input-shape", "1,1,8,8", "--precision", "fp8", "-o", str(tmp_path), check=False)
    assert result.returncode == 1 and "--precision 'fp8' is not known; use auto, fp32, bf16, fp16, int8" in result.stderr


@pytest.mark.timeout(300)
def test_bf16_without_data_is_gated_on_the_builds_own_samples_or_skipped_by_name(tmp_path):
    """x86_64-avx512 lists bf16: on a CPU with AVX512_BF16 the candidate is built, gated on the build's
    own samples (the weaker, synthetic proof) and needs avx512_bf16 on the device; elsewhere it is
    skipped with the feature named. Never assumes this host's ISA."""
    from conftest import DIGITS

    from edgesmith.runtime.manifest import Manifest

    out = tmp_path / "dist"
    result = json.loads(run_cli("build", DIGITS, "--input-shape", "1,1,8,8", "-t", "x86_64-avx512", "--backend", "openvino",
                                "--precision", "auto", "-o", str(out), "--json").stdout)
    (selection,) = result["selections"]
    (bf16,) = [c for c in selection["candidates"] if c.get("precision") == "bf16"]
    assert any(n["precision"] == "int8" and "--calib" in n["error"] for n in result["notes"])  # int8 left out, by name
    if not _host_has("avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_bf16"):
        assert bf16["status"] == "skipped" and "avx512_bf16" in bf16["error"]
        return
    assert bf16["status"] == "passed", bf16
    assert bf16["gate"].startswith("synthetic gate on 64 inputs: top-1 agreement")
    # --precision bf16 forces it: the manifest pins bf16, records the weaker proof, needs the feature
    forced = json.loads(run_cli("build", DIGITS, "--input-shape", "1,1,8,8", "-t", "x86_64-avx512", "--backend", "openvino",
                                "--precision", "bf16", "-o", str(tmp_path / "forced"), "--json").stdout)
    (artifact,) = forced["artifacts"]
    manifest = Manifest.from_bytes((Path(artifact["path"]) / "manifest.json").read_bytes())
    assert manifest.backend.precision == "bf16" and manifest.backend.options["config"]["INFERENCE_PRECISION_HINT"] == "bf16"
    assert "avx512_bf16" in manifest.target.cpu_features
    gate = manifest.accuracy
    assert gate.proof == "synthetic" and not gate.data.labelled and gate.data.samples == 64
    assert gate.data.origin == "build samples (synthetic N(0,1)) x8 + synthetic N(0,1) x56"
    assert gate.top1_agreement >= 0.99 and gate.max_rel_err <= gate.rel_err_bound == 5e-2
    from edgesmith.runtime import Session

    assert Session(artifact["path"]).self_test()["passed"]
