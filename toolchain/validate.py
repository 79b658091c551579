"""Compare an artifact's outputs with the reference's, and refuse models validation can't judge.

Pass/fail and the error figures come from the C++ core's one comparison rule
(``csrc/runtime/compare.h``, bound as ``_core.compare_arrays``), the rule the device's self-test
and ``edgesmith prove`` apply: NaN matches only NaN, +inf only +inf and -inf only -inf, otherwise
``|y - ref| <= atol + rtol * |ref|``; error figures are taken over pairs where both values are
finite. What only the toolchain needs (top-1 agreement, input sensitivity) stays here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edgesmith.runtime.artifact import _core
from edgesmith.toolchain.errors import UserError, ValidationError


@dataclass
class Comparison:
    samples: int
    max_abs_err: float  # over pairs where both values are finite
    max_rel_err: float  # over finite pairs whose reference is not 0
    top1_agreement: float | None
    worst_output: str  # the output with the most elements outside the tolerance (else the largest error)
    passed: bool
    elements: int = 0  # element pairs compared, over every sample and output
    bad_elements: int = 0  # pairs that break the rule (NaN/inf mismatches included)

    def summary(self, atol: float, rtol: float) -> str:
        """What failed, for an error message: counts over all samples and outputs, and the error."""
        return (f"{self.bad_elements} of {self.elements} values (all samples and outputs) are outside atol={atol:g}, "
                f"rtol={rtol:g} (NaN and inf must match exactly), max abs error over finite values {self.max_abs_err:.3g}")


def compare_arrays(got: np.ndarray, expected: np.ndarray, atol: float, rtol: float) -> dict[str, Any]:
    """The core's rule on one pair of arrays: {shapes_match, passed, elements, bad_elements,
    max_abs_err, max_rel_err}. Dtypes may differ (a float16 output against a float32 reference)."""
    return _core().compare_arrays(np.asarray(got), np.asarray(expected), float(atol), float(rtol))


def input_sensitivity(references: list[list[np.ndarray]]) -> float:
    """Largest change of any output between the first sample and the others, over the elements that
    are finite in both (a manifest holds finite numbers only; whether NaN and inf match is the
    comparison rule's business, which requires them to match exactly)."""
    first = references[0]
    diffs = []
    for ref in references[1:]:
        for r, f in zip(ref, first):
            a, b = r.astype(np.float64), f.astype(np.float64)
            finite = np.isfinite(a) & np.isfinite(b)
            diffs.append(float(np.max(np.abs(a[finite] - b[finite]), initial=0.0)))
    return max(diffs, default=0.0)


def passes_blind(references: list[list[np.ndarray]], atol: float, rtol: float) -> bool:
    """Would an artifact that ignores its input (always answering sample 0's outputs) pass validation?"""
    first = references[0]
    return all(compare_arrays(f, r, atol, rtol)["passed"] for ref in references[1:] for r, f in zip(ref, first))


def require_input_dependence(references: list[list[np.ndarray]], atol: float, rtol: float, allow_constant: bool) -> None:
    """Refuse to validate a model whose outputs don't move beyond the tolerance when the input changes."""
    if passes_blind(references, atol, rtol) and not allow_constant:
        raise UserError(f"the model's outputs are the same (within atol={atol:g}, rtol={rtol:g}) for every sample input, so validation "
                        "would prove nothing (constant weights?); use a model with real weights, or pass --allow-constant-output for latency-only work")


def _is_classifier(output: np.ndarray) -> bool:
    return output.ndim == 2 and output.shape[1] > 1 and np.issubdtype(output.dtype, np.floating)


def compare(outputs: list[list[np.ndarray]], references: list[list[np.ndarray]], output_names: list[str],
            atol: float, rtol: float) -> Comparison:
    """Check every sample's outputs against the reference's by the one comparison rule (module doc).

    A different number of outputs or a different shape is a ValidationError naming the output.
    """
    max_abs = max_rel = 0.0
    elements = bad = 0
    worst, worst_key = (output_names[0] if output_names else ""), (-1, -1.0)
    agree = total = 0
    for got_sample, ref_sample in zip(outputs, references):
        if len(got_sample) != len(ref_sample):
            raise ValidationError(f"the artifact returned {len(got_sample)} outputs, the reference {len(ref_sample)}")
        for name, got, ref in zip(output_names, got_sample, ref_sample):
            got, ref = np.asarray(got), np.asarray(ref)
            result = compare_arrays(got, ref, atol, rtol)
            if not result["shapes_match"]:
                raise ValidationError(f"output {name!r} has shape {list(got.shape)}, the reference {list(ref.shape)}")
            elements += result["elements"]
            bad += result["bad_elements"]
            max_abs = max(max_abs, result["max_abs_err"])
            max_rel = max(max_rel, result["max_rel_err"])
            if (result["bad_elements"], result["max_abs_err"]) > worst_key:
                worst, worst_key = name, (result["bad_elements"], result["max_abs_err"])
            if _is_classifier(ref):
                agree += int(np.sum(np.argmax(got.astype(np.float64), axis=1) == np.argmax(ref.astype(np.float64), axis=1)))
                total += ref.shape[0]
    return Comparison(samples=len(outputs), max_abs_err=max_abs, max_rel_err=max_rel,
                      top1_agreement=(agree / total) if total else None, worst_output=worst, passed=bad == 0,
                      elements=elements, bad_elements=bad)
