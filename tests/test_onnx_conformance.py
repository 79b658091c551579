"""The ONNX conformance runner (bench/onnx_conformance.py) on a fixed sample of ONNX's operator
cases, and the pre-flight coverage check (`edgesmith check`, toolchain/coverage.py) it feeds.

The sample covers int64 and bool tensors, 0-d inputs and outputs, several outputs, NaN, an
operator TVM refuses (TopK with a non-constant k), a case ONNX Runtime itself cannot run (TopK on
uint64) and a dtype edgesmith refuses (int4): every case ONNX Runtime passes directly must come
out of edgesmith's build correct, with no internal error and no traceback, and every refusal must
be one sentence."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from conftest import run_cli

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent

SAMPLE = [
    "test_argmax_default_axis_example",  # int64 output
    "test_gather_0",  # int64 indices
    "test_and2d",  # bool inputs and output
    "test_isnan",  # NaN in, bool out
    "test_mod_float_edge_cases_fmod_0_float64",  # NaN and inf out, float64
    "test_triu_out_pos",  # a 0-d input
    "test_sce_mean_weight_ii",  # int64 labels, a 0-d output
    "test_split_equal_parts_1d_opset18",  # several outputs
    "test_top_k_uint64",  # ONNX Runtime has no uint64 TopK kernel: refused with a sentence
    "test_cast_FLOAT_to_INT4",  # an int4 output: refused with a sentence
]


@pytest.fixture(scope="module")
def runner():
    spec = importlib.util.spec_from_file_location("onnx_conformance", REPO / "bench" / "onnx_conformance.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cases(runner):
    return runner.all_cases()


def _check_records(runner, records: list[dict], names: list[str], backends: tuple[str, ...]) -> dict:
    assert [r["case"] for r in records] == names  # every case accounted for
    summary = runner.summarize(records, {}, backends)
    assert summary["problems"]["internal"] == [], summary["problems"]["internal"]
    assert summary["tracebacks"] == [], summary["tracebacks"]
    assert summary["ort_passed_not_built_correct"] == []
    for r in records:
        if r["ort_direct"]["passed"]:
            assert r["backends"]["ort"]["outcome"] == "correct", (r["case"], r["backends"]["ort"])
        for backend, result in r["backends"].items():
            if result["outcome"] == "refused":
                reason = result["reason"]
                assert reason and "\n" not in reason and "Traceback" not in reason, (r["case"], backend, reason)
    return summary


def test_sample_through_build_and_session(runner, cases):
    names, not_run = runner.select(cases, ",".join(SAMPLE))
    assert names == sorted(SAMPLE) and not_run == {}
    records = runner.run_cases(names, ("ort", "openvino"), jobs=1, timeout=300)
    summary = _check_records(runner, records, names, ("ort", "openvino"))
    by_case = {r["case"]: r for r in records}
    # the two refusals are edgesmith's sentences, not crashes
    assert not by_case["test_top_k_uint64"]["ort_direct"]["passed"]
    assert by_case["test_top_k_uint64"]["backends"]["ort"]["outcome"] == "refused"
    assert "has dtype int4, which edgesmith does not take" in by_case["test_cast_FLOAT_to_INT4"]["backends"]["ort"]["reason"]
    assert summary["rows"]["ort"]["ort_passed_and_correct"] == summary["rows"]["ort"]["ort_direct_passed"] >= 8


def test_tvm_refuses_top_k_with_a_sentence(runner):
    records = runner.run_cases(["test_top_k"], ("tvm", "ort"), jobs=1, timeout=300)
    _check_records(runner, records, ["test_top_k"], ("tvm", "ort"))
    (record,) = records
    assert record["backends"]["tvm"] == {"outcome": "refused", "reason": record["backends"]["tvm"]["reason"]}
    assert "TopK k must be a constant" in record["backends"]["tvm"]["reason"]
    assert record["single_op"]["features"]["nonconst:1"] == "input 1 'K' is not a constant"


def test_not_run_is_named(runner, cases):
    """Nothing is left out silently: every collected case is run or named under a reason."""
    names, not_run = runner.select(cases)
    listed = set(names) | {n for group in not_run.values() for n in group if not n.startswith("light/")}
    assert listed == {c.name for c in cases}
    assert any(why.startswith("expanded") for why in not_run)
    assert any(why.startswith("data/light") and len(group) == 9 for why, group in not_run.items())


def _top_k_model(path: Path, constant_k: bool) -> Path:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])
    k = helper.make_tensor_value_info("k", TensorProto.INT64, [1])
    outputs = [helper.make_tensor_value_info("values", TensorProto.FLOAT, [3, 2]),
               helper.make_tensor_value_info("indices", TensorProto.INT64, [3, 2])]
    node = helper.make_node("TopK", ["x", "k"], ["values", "indices"])
    if constant_k:
        graph = helper.make_graph([node], "topk", [x], outputs, initializer=[numpy_helper.from_array(np.array([2], np.int64), "k")])
    else:
        graph = helper.make_graph([node], "topk", [x, k], outputs)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def _check(model: Path, *extra: str) -> dict:
    result = run_cli("check", str(model), "-t", "host", "--json", *extra)
    assert "Traceback" not in result.stderr, result.stderr
    return {b["backend"]: b for b in json.loads(result.stdout)["backends"]}


def test_check_names_tvm_for_top_k_with_a_non_constant_k(tmp_path):
    report = _check(_top_k_model(tmp_path / "topk.onnx", constant_k=False))
    assert report["tvm"]["can_compile"] is False
    (gap,) = report["tvm"]["gaps"]
    assert gap["op"] == "TopK" and gap["opset"] == 13 and gap["source"] == "conformance"
    assert "input 1 'K' is not a constant" in gap["why"] and "TopK k must be a constant" in gap["why"]
    assert report["ort"]["can_compile"] is True and report["openvino"]["can_compile"] is True

    constant = _check(_top_k_model(tmp_path / "topk_const.onnx", constant_k=True))
    assert constant["tvm"]["can_compile"] is True  # the condition is the non-constant k, not TopK


def _custom_op_model(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("FooBar", ["r"], ["y"], domain="com.example")]
    graph = helper.make_graph(nodes, "custom", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.example", 1)])
    onnx.save(model, str(path))
    return path


def test_an_operator_no_backend_has_is_one_sentence(tmp_path):
    model = _custom_op_model(tmp_path / "custom.onnx")
    result = run_cli("build", str(model), "-t", "host", "-o", str(tmp_path / "dist"), check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith("error: operator com.example.FooBar (opset 1) is supported by none of the backends tried for ")
    assert "(openvino, tvm, ort" in line
    assert not (tmp_path / "dist").exists() or not any((tmp_path / "dist").iterdir())

    check = run_cli("check", str(model), "-t", "host", check=False)
    assert check.returncode == 1 and "Traceback" not in check.stderr
    assert "FooBar" in check.stdout and "supported by none of the backends" in check.stderr


def test_build_names_the_operator_when_it_drops_a_candidate(tmp_path, cases):
    """A candidate dropped for an operator carries the check's line for its backend."""
    import numpy as np
    import onnx

    case = next(c for c in cases if c.name == "test_top_k")
    model, samples = tmp_path / "top_k.onnx", tmp_path / "top_k.npz"
    onnx.save(case.model, str(model))
    np.savez(samples, **{v.name: np.stack([a]) for v, a in zip(case.model.graph.input, case.data_sets[0][0])})
    result = run_cli("build", str(model), "-t", "host", "-b", "tvm", "--samples", str(samples), "--allow-constant-output",
                     "--json", "-o", str(tmp_path / "dist"), check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    (failure,) = json.loads(result.stdout)["failures"]
    assert "TopK k must be a constant" in failure["error"]
    assert "(edgesmith check: tvm cannot compile TopK (opset 24): when input 1 'K' is not a constant" in failure["error"]
