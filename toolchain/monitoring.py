"""What the device runtime should summarise for drift monitoring, derived from the reference run.

Classifier outputs are counted per arg-max class; other outputs go into a histogram whose edges are
quantiles of the reference outputs, so at build time every bin holds about the same share of
values and drift later shows up as mass moving between bins.
"""

from __future__ import annotations

import numpy as np

from edgesmith.runtime.contract import MAX_CLASSES
from edgesmith.runtime.manifest import Monitoring, OutputMonitor, TensorSpec

HISTOGRAM_BINS = 16


def is_classifier(spec: TensorSpec) -> bool:
    return len(spec.shape) == 2 and spec.shape[1] > 1 and np.dtype(spec.dtype).kind == "f"


def histogram_edges(values: np.ndarray, bins: int = HISTOGRAM_BINS) -> list[float]:
    finite = values[np.isfinite(values)].astype(np.float64)
    if finite.size == 0:
        return [-1.0, 1.0]
    edges = np.unique(np.quantile(finite, np.linspace(0.0, 1.0, bins + 1)))
    if edges.size < 2:  # a constant output: one bin around it
        edges = np.array([edges[0] - 0.5, edges[0] + 0.5])
    return [float(e) for e in edges]


def class_shares(outputs: np.ndarray, classes: int) -> list[float]:
    """Share of rows whose arg-max is each class (NaNs ignored, as the runtime counts them)."""
    rows = outputs.reshape(-1, outputs.shape[-1]).astype(np.float64)
    rows = rows[~np.all(np.isnan(rows), axis=1)]
    if rows.size == 0:
        return [0.0] * classes
    counts = np.bincount(np.nanargmax(rows, axis=1), minlength=classes)[:classes]
    return [float(c) for c in counts / len(rows)]


def bin_shares(values: np.ndarray, edges: list[float]) -> list[float]:
    """Share of finite values per bin, then below the first edge, then at/above the last (the
    runtime's layout: bins are [e_k, e_k+1))."""
    finite = values[np.isfinite(values)].astype(np.float64)
    if finite.size == 0:
        return [0.0] * (len(edges) + 1)
    index = np.searchsorted(np.asarray(edges), finite, side="right") - 1
    bins = len(edges) - 1
    counts = np.bincount(np.clip(index, 0, bins - 1)[(index >= 0) & (index < bins)], minlength=bins)
    under, over = int(np.sum(index < 0)), int(np.sum(index >= bins))
    return [float(c) / finite.size for c in [*counts, under, over]]


def monitoring_spec(output_specs: list[TensorSpec], reference_outputs: list[list[np.ndarray]]) -> Monitoring:
    """The summaries the runtime keeps per output, with the reference run's shares to measure drift against."""
    monitors = []
    for i, spec in enumerate(output_specs):
        values = np.concatenate([sample[i].reshape(-1, *sample[i].shape[1:]) for sample in reference_outputs])
        if is_classifier(spec) and spec.shape[1] <= MAX_CLASSES:  # more classes than a device may report: binned
            monitors.append(OutputMonitor(name=spec.name, kind="classes", classes=spec.shape[1],
                                          reference=class_shares(values, spec.shape[1])))
        else:
            edges = histogram_edges(values.ravel())
            monitors.append(OutputMonitor(name=spec.name, kind="histogram", edges=edges,
                                          reference=bin_shares(values.ravel(), edges)))
    return Monitoring(outputs=monitors)
