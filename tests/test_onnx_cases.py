"""ONNX's own operator test cases (``onnx.backend.test.case.node.collect_testcases()``) through
``edgesmith build`` and ``Session``, as a user would run them: each case here once ended in an internal
error, a manifest that was not JSON, or ``--json`` output that was not JSON (issue 17)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cases() -> dict:
    from onnx.backend.test.case.node import collect_testcases

    return {case.name: case for case in collect_testcases()}


def _save(case, directory: Path, copies: int = 1) -> tuple[Path, Path, list[np.ndarray]]:
    """The case's model, its first data set's inputs as --samples (``copies`` samples on axis 0), and
    its expected outputs."""
    import onnx

    inputs, outputs = case.data_sets[0]
    model = directory / f"{case.name}.onnx"
    onnx.save(case.model, str(model))
    names = [i.name for i in case.model.graph.input]
    samples = directory / f"{case.name}.npz"
    np.savez(samples, **{n: np.stack([np.asarray(a)] * copies) for n, a in zip(names, inputs)})
    return model, samples, [np.asarray(o) for o in outputs]


def _build(model: Path, samples: Path | None, out: Path, *extra: str, check: bool = True) -> tuple[dict, str]:
    args = ["build", str(model), "-t", "host", "--allow-constant-output", "--json", "-o", str(out), *extra]
    if samples is not None:
        args += ["--samples", str(samples)]
    result = run_cli(*args, check=check)
    assert "Traceback" not in result.stderr, result.stderr
    return json.loads(result.stdout), result.stderr  # stdout is the JSON and nothing else


def _session(artifact: dict, home_keys: Path):
    from edgesmith.runtime import Session

    return Session(artifact["path"], trusted_keys=[bytes.fromhex(home_keys.read_text().strip())])


@pytest.fixture
def home_key(_isolated_home) -> Path:
    return Path(_isolated_home) / "keys" / "default.pub"


def test_json_stays_json_when_a_compiler_prints(cases, tmp_path):
    """TVM's ONNX frontend prints `Error converting operator TopK` on stdout (k is not a constant):
    with --json that goes to stderr, and stdout parses."""
    model, samples, _ = _save(cases["test_top_k"], tmp_path)
    report, stderr = _build(model, samples, tmp_path / "dist", "--backend", "tvm", check=False)
    assert report["artifacts"] == [] and "TopK k must be a constant" in report["failures"][0]["error"]
    assert "Error converting operator TopK" in stderr


def test_non_finite_outputs_leave_the_manifest_json(cases, tmp_path, home_key):
    """fmod with zeros and infinities outputs NaN and inf: the manifest holds finite numbers only
    (JSON has no NaN), and the artifact reproduces the case's expected outputs, NaN for NaN."""
    model, samples, expected = _save(cases["test_mod_float_edge_cases_fmod_0_float64"], tmp_path, copies=2)
    report, _ = _build(model, samples, tmp_path / "dist", "--backend", "ort")
    (artifact,) = report["artifacts"]
    text = (Path(artifact["path"]) / "manifest.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"manifest.json holds {c}"))
    assert math.isfinite(artifact["validation"]["input_sensitivity"])
    got = _session(artifact, home_key).run([np.asarray(a) for a in cases["test_mod_float_edge_cases_fmod_0_float64"].data_sets[0][0]])
    np.testing.assert_array_equal(got[0], expected[0])
    assert artifact["proof"]["status"] == "proven"


def test_manifest_refuses_non_finite_numbers():
    from pydantic import ValidationError

    from edgesmith.runtime.manifest import Validation

    fields = dict(status="passed", executed=None, reference="onnxruntime", samples=2, max_abs_err=0.0, max_rel_err=0.0,
                  top1_agreement=None, atol=1e-4, rtol=1e-3)
    Validation(**fields, input_sensitivity=0.5)
    with pytest.raises(ValidationError, match="finite"):
        Validation(**fields, input_sensitivity=float("nan"))


@pytest.mark.parametrize("case", ["test_triu_out_pos", "test_sce_mean_weight_ii"])
def test_scalar_and_integer_tensors_end_to_end(cases, tmp_path, home_key, case):
    """A 0-d input (Trilu's k), int64 labels and a 0-d output (the mean loss): built by every backend
    that compiles them, proven by edgesmith-run's golden self-test, and Session returns the case's
    expected outputs with their 0-d shapes."""
    model, samples, expected = _save(cases[case], tmp_path)
    report, _ = _build(model, samples, tmp_path / "dist", "--backend", "all", check=False)
    built = {a["backend"]: a for a in report["artifacts"]}
    assert {"openvino", "ort"} <= set(built), report["failures"]
    assert all("internal error" not in f["error"] for f in report["failures"]), report["failures"]
    inputs = [np.asarray(a) for a in cases[case].data_sets[0][0]]
    for backend, artifact in built.items():
        assert artifact["proof"]["status"] == "proven", (backend, artifact["proof"])
        got = _session(artifact, home_key).run(inputs)
        for g, e in zip(got, expected, strict=True):
            assert g.shape == e.shape and g.dtype == e.dtype, (backend, g.shape, e.shape, g.dtype, e.dtype)
            np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5, err_msg=backend)


@pytest.mark.parametrize("case, where, dtype", [
    ("test_cast_FLOAT8E5M2FNUZ_to_FLOAT", "input 'input'", "float8_e5m2fnuz"),
    ("test_cast_FLOAT_to_INT4", "output 'output'", "int4"),
])
def test_unsupported_dtypes_are_one_sentence(cases, tmp_path, case, where, dtype):
    import onnx

    model = tmp_path / f"{case}.onnx"
    onnx.save(cases[case].model, str(model))
    result = run_cli("build", str(model), "-t", "host", "--allow-constant-output", "-o", str(tmp_path / "dist"), check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith(f"error: {where} of {model} has dtype {dtype}, which edgesmith does not take; it takes bool,")
    assert not (tmp_path / "dist").exists() or not any((tmp_path / "dist").iterdir())


def test_samples_without_a_sample_axis_are_one_sentence(cases, tmp_path):
    model, _, _ = _save(cases["test_triu_out_pos"], tmp_path)
    flat = tmp_path / "flat.npz"
    inputs = cases["test_triu_out_pos"].data_sets[0][0]
    np.savez(flat, x=np.asarray(inputs[0]), k=np.asarray(inputs[1]))
    result = run_cli("build", str(model), "-t", "host", "--samples", str(flat), "-o", str(tmp_path / "dist"), check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "array 'k' has no sample axis; stack the samples on axis 0" in result.stderr
