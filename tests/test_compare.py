"""The toolchain's validation applies the one output comparison rule (csrc/runtime/compare.h) on
the cases of tests/data/compare_cases.json, which tests/cpp/test_compare.cc runs on the C++ core."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgesmith.runtime import errors
from edgesmith.toolchain.errors import ValidationError
from edgesmith.toolchain.validate import compare, compare_arrays, passes_blind

CASES = json.loads((Path(__file__).parent / "data" / "compare_cases.json").read_text())["cases"]


def _number(value: Any) -> float:
    return float(value)  # float() reads the cases file's "nan", "inf" and "-inf" too


def _array(spec: dict[str, Any]) -> np.ndarray:
    dtype = np.dtype(spec["dtype"])
    values = spec["values"]
    shape = spec.get("shape", [len(values)])
    if dtype.kind == "f":
        wide = np.array([_number(v) for v in values], dtype=np.float64)
        array = wide.astype(dtype)
        if dtype == np.float16:  # the file promises exact float16 values; check it keeps that promise
            assert np.array_equal(array.astype(np.float64), wide, equal_nan=True), spec
    else:
        array = np.array(values, dtype=dtype)
    return array.reshape(shape)


def test_the_cases_cover_the_rule() -> None:
    names = {c["name"] for c in CASES}
    assert len(names) == len(CASES) >= 20
    dtypes = {c[side]["dtype"] for c in CASES for side in ("got", "expected")}
    assert {"float16", "float32", "float64", "int32", "int64", "uint8"} <= dtypes
    assert any(c.get("shapes_match") is False for c in CASES)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_validation_follows_the_shared_cases(case: dict[str, Any]) -> None:
    got, expected = _array(case["got"]), _array(case["expected"])
    atol, rtol = _number(case["atol"]), _number(case["rtol"])
    if case.get("shapes_match", True) is False:
        with pytest.raises(ValidationError, match="shape"):
            compare([[got]], [[expected]], ["y"], atol, rtol)
        result = compare_arrays(got, expected, atol, rtol)
        assert result["shapes_match"] is False and result["passed"] is False
        return
    cmp = compare([[got]], [[expected]], ["y"], atol, rtol)
    assert cmp.passed is case["passed"]
    assert cmp.bad_elements == case["bad_elements"]
    assert cmp.elements == got.size
    assert cmp.max_abs_err == pytest.approx(case["max_abs_err"], rel=1e-12, abs=0.0)


def test_samples_and_outputs_add_up() -> None:
    y = np.array([[0.0, 1.0, 2.0]], dtype=np.float32)
    z = np.array([5.0, np.nan], dtype=np.float32)
    outputs = [[y, z], [y + np.float32(0.5), np.array([5.0, 1.0], np.float32)]]
    references = [[y, z], [y, np.array([5.0, np.nan], np.float32)]]
    cmp = compare(outputs, references, ["y", "z"], atol=0.25, rtol=0.0)
    assert not cmp.passed
    assert (cmp.samples, cmp.elements, cmp.bad_elements) == (2, 10, 4)
    assert cmp.worst_output == "y"  # three bad values against z's one (1.0 where NaN was expected)
    assert cmp.max_abs_err == 0.5
    assert cmp.top1_agreement == 1.0  # y is a (1, 3) classifier output: arg-max unchanged
    assert cmp.summary(0.25, 0.0).startswith("4 of 10 values")


def test_relative_error_skips_zero_references() -> None:
    result = compare_arrays(np.array([3.0, 1.0]), np.array([2.0, 0.0]), 0.0, 0.0)
    assert result["max_rel_err"] == 0.5 and result["max_abs_err"] == 1.0


def test_non_contiguous_arrays_are_read_in_logical_order() -> None:
    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    view = base.T  # Fortran order: compared element by element as the logical (4, 3) array
    assert compare_arrays(view, np.ascontiguousarray(view), 0.0, 0.0)["passed"]
    assert not compare_arrays(view, base.reshape(4, 3), 0.0, 0.0)["passed"]
    strided = np.arange(20, dtype=np.float64)[::2]
    assert compare_arrays(strided, np.arange(0, 20, 2, dtype=np.float64), 0.0, 0.0)["passed"]


def test_bad_tolerances_and_dtypes_are_value_errors() -> None:
    x = np.zeros(3, np.float32)
    with pytest.raises(errors.ValueError, match="atol"):
        compare_arrays(x, x, -1.0, 0.0)
    with pytest.raises(errors.ValueError, match="rtol"):
        compare_arrays(x, x, 0.0, float("nan"))
    with pytest.raises(errors.ValueError, match="complex64"):
        compare_arrays(x.astype(np.complex64), x, 0.0, 0.0)


def test_blind_check_uses_the_same_rule() -> None:
    # Sample 1's reference is NaN where sample 0's is a number: an input-blind artifact fails.
    references = [[np.array([1.0, 2.0])], [np.array([1.0, np.nan])]]
    assert not passes_blind(references, atol=10.0, rtol=0.0)
    assert passes_blind([[np.array([1.0, np.inf])], [np.array([1.5, np.inf])]], atol=1.0, rtol=0.0)
