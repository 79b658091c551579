"""Compare an artifact's outputs with the reference's, and refuse models validation can't judge."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgesmith.toolchain.errors import UserError, ValidationError


@dataclass
class Comparison:
    samples: int
    max_abs_err: float
    max_rel_err: float
    top1_agreement: float | None
    worst_output: str
    passed: bool


def input_sensitivity(references: list[list[np.ndarray]]) -> float:
    """Largest change of any output between the first sample and the others."""
    first = references[0]
    diffs = [float(np.max(np.abs(r.astype(np.float64) - f.astype(np.float64)), initial=0.0))
             for ref in references[1:] for r, f in zip(ref, first)]
    return max(diffs, default=0.0)


def passes_blind(references: list[list[np.ndarray]], atol: float, rtol: float) -> bool:
    """Would an artifact that ignores its input (always answering sample 0's outputs) pass validation?"""
    first = references[0]
    return all(np.all(np.abs(r.astype(np.float64) - f.astype(np.float64)) <= atol + rtol * np.abs(r.astype(np.float64)))
               for ref in references[1:] for r, f in zip(ref, first))


def require_input_dependence(references: list[list[np.ndarray]], atol: float, rtol: float, allow_constant: bool) -> None:
    """Refuse to validate a model whose outputs don't move beyond the tolerance when the input changes."""
    if passes_blind(references, atol, rtol) and not allow_constant:
        raise UserError(f"the model's outputs are the same (within atol={atol:g}, rtol={rtol:g}) for every sample input, so validation "
                        "would prove nothing (constant weights?); use a model with real weights, or pass --allow-constant-output for latency-only work")


def _is_classifier(output: np.ndarray) -> bool:
    return output.ndim == 2 and output.shape[1] > 1 and np.issubdtype(output.dtype, np.floating)


def compare(outputs: list[list[np.ndarray]], references: list[list[np.ndarray]], output_names: list[str],
            atol: float, rtol: float) -> Comparison:
    """Element-wise check ``|y - ref| <= atol + rtol * |ref|`` over every sample and output."""
    max_abs = max_rel = 0.0
    worst = output_names[0] if output_names else ""
    passed = True
    agree = total = 0
    for got_sample, ref_sample in zip(outputs, references):
        if len(got_sample) != len(ref_sample):
            raise ValidationError(f"the artifact returned {len(got_sample)} outputs, the reference {len(ref_sample)}")
        for name, got, ref in zip(output_names, got_sample, ref_sample):
            if got.shape != ref.shape:
                raise ValidationError(f"output {name!r} has shape {list(got.shape)}, the reference {list(ref.shape)}")
            g, r = got.astype(np.float64), ref.astype(np.float64)
            if not np.all(np.isfinite(g) == np.isfinite(r)):
                passed = False
                max_abs = float("inf")
                worst = name
                continue
            finite = np.isfinite(r)
            diff = np.abs(g[finite] - r[finite])
            abs_err = float(diff.max(initial=0.0))
            rel_err = float((diff / np.maximum(np.abs(r[finite]), 1e-12)).max(initial=0.0))
            if np.any(diff > atol + rtol * np.abs(r[finite])):
                passed = False
            if abs_err > max_abs:
                max_abs, worst = abs_err, name
            max_rel = max(max_rel, rel_err)
            if _is_classifier(ref):
                agree += int(np.sum(np.argmax(g, axis=1) == np.argmax(r, axis=1)))
                total += ref.shape[0]
    return Comparison(samples=len(outputs), max_abs_err=max_abs, max_rel_err=max_rel,
                      top1_agreement=(agree / total) if total else None, worst_output=worst, passed=passed)
