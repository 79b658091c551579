"""Output drift: what devices' outputs look like now against the shares the build recorded.

A birth carries, per monitored output, the reference shares of the build's reference run
(``metrics.outputs[].reference``, from the manifest): per class for classifiers, per histogram bin
then below-first-edge then at/above-last-edge for other outputs. Telemetry windows carry the counts
in the same layout; the recent windows' counts are summed and compared with two measures:

    PSI = sum_i (p_i - q_i) * ln(p_i / q_i)
    JS  = 1/2 * KL(p || m) + 1/2 * KL(q || m),  m = (p + q) / 2,  KL in bits (so 0 <= JS <= 1)

where p is the observed share and q the reference share. Both are smoothed with EPSILON per bin
(then renormalised) so an empty bin on either side gives a large but finite value. Written with
numpy rather than scipy: scipy is not a dependency of the toolchain and these are two lines each.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EPSILON = 1e-4
MIN_SAMPLES = 100  # below this many counted values a share is noise, not drift


def _shares(values: np.ndarray) -> np.ndarray:
    p = values / values.sum()
    p = p + EPSILON
    return p / p.sum()


def psi(observed: np.ndarray, reference: np.ndarray) -> float:
    p, q = _shares(observed), _shares(reference)
    return float(np.sum((p - q) * np.log(p / q)))


def jensen_shannon(observed: np.ndarray, reference: np.ndarray) -> float:
    p, q = _shares(observed), _shares(reference)
    m = (p + q) / 2
    return float(0.5 * np.sum(p * np.log2(p / m)) + 0.5 * np.sum(q * np.log2(q / m)))


@dataclass(frozen=True)
class Drift:
    psi: float
    js: float
    samples: int

    def as_dict(self) -> dict[str, float | int]:
        return {"psi": self.psi, "js": self.js, "samples": self.samples}


def measure(counts: list[int] | np.ndarray, reference: list[float] | None, min_samples: int = MIN_SAMPLES) -> Drift | None:
    """Drift of summed counts against a reference; None without a reference, with a layout that does
    not match it, or with too few samples to say."""
    if reference is None:
        return None
    observed = np.asarray(counts, dtype=np.float64)
    expected = np.asarray(reference, dtype=np.float64)
    if observed.shape != expected.shape or expected.sum() <= 0:
        return None
    samples = int(observed.sum())
    if samples < max(min_samples, 1):
        return None
    return Drift(psi=psi(observed, expected), js=jensen_shannon(observed, expected), samples=samples)
