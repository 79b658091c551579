"""Latency histograms as the device runtime keeps them: log-spaced buckets from the birth's layout.

Bucket k holds runs in ``[start_us * factor**k, start_us * factor**(k+1))``, with an underflow and
an overflow count. Windows merge by adding counts; the bucket and percentile rules are the C++
core's own (``stats_latency_bucket`` / ``stats_percentiles_us`` in ``csrc/runtime/stats.cc``,
bound in ``edgesmith.runtime._core``), so a merged window of one device gives the same p50 the
device reported.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from edgesmith.runtime.artifact import _core
from edgesmith.toolchain.fleet.protocol import LatencyLayout


def layout_key(layout: LatencyLayout) -> tuple[float, float, int]:
    return (layout.start_us, layout.factor, layout.count)


def bucket_index(latency_us: float, layout: LatencyLayout) -> int:
    """-1 for underflow, ``layout.count`` for overflow, else the bucket (the C++ rule)."""
    return _core().latency_bucket(float(latency_us), layout.start_us, layout.factor, layout.count)


def percentiles_us(slots: np.ndarray, layout: LatencyLayout, max_us: float, qs: Sequence[float]) -> list[float | None]:
    """Quantiles of ``[bucket counts..., underflow, overflow]`` by the device runtime's rule
    (``stats_percentiles_us`` in csrc/runtime/stats.cc, through the binding): the rank ``q * n``
    falls in the first non-empty bucket whose running total reaches it; the estimate is
    ``start_us * factor**(k + f)`` with ``f`` the rank's fraction of that bucket, capped at the
    maximum seen; a rank inside the underflow gives ``start_us``, one past the buckets the maximum.
    None for an empty histogram."""
    return _core().latency_percentiles([int(c) for c in np.asarray(slots).tolist()], layout.start_us, layout.factor,
                                       layout.count, float(max_us), [float(q) for q in qs])


@dataclass
class LatencyHistogram:
    """Counts in one layout; ``add`` merges a window's counts in."""

    layout: LatencyLayout
    counts: list[int] = field(default_factory=list)
    underflow: int = 0
    overflow: int = 0
    sum_us: float = 0.0
    max_us: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * self.layout.count

    @classmethod
    def of_samples(cls, samples_us: Iterable[float], layout: LatencyLayout) -> LatencyHistogram:
        hist = cls(layout)
        for value in samples_us:
            k = bucket_index(value, layout)
            if k < 0:
                hist.underflow += 1
            elif k >= layout.count:
                hist.overflow += 1
            else:
                hist.counts[k] += 1
            hist.sum_us += value
            hist.max_us = max(hist.max_us, value)
        return hist

    @property
    def total(self) -> int:
        return self.underflow + self.overflow + sum(self.counts)

    def add(self, counts: list[int], underflow: int, overflow: int, sum_us: float, max_us: float) -> bool:
        """Merge one window; False (nothing merged) when its bucket count differs from the layout's."""
        if len(counts) != len(self.counts):
            return False
        self.counts = [a + b for a, b in zip(self.counts, counts)]
        self.underflow += underflow
        self.overflow += overflow
        self.sum_us += sum_us
        self.max_us = max(self.max_us, max_us)
        return True

    def percentile_us(self, q: float) -> float | None:
        """The q-quantile (0..1) interpolated log-linearly inside its bucket, capped at the maximum
        seen; None for an empty histogram."""
        return self.percentiles_us((q,))[0]

    def percentiles_us(self, qs: Sequence[float]) -> list[float | None]:
        return percentiles_us(np.asarray([*self.counts, self.underflow, self.overflow], dtype=np.int64),
                              self.layout, self.max_us, qs)

    def quantiles(self) -> dict[str, float | None]:
        p50, p95, p99 = self.percentiles_us((0.50, 0.95, 0.99))
        return {"p50_us": p50, "p95_us": p95, "p99_us": p99}
