"""What the device runtime should summarise for drift monitoring, derived from the reference run.

Classifier outputs are counted per arg-max class; other outputs go into a histogram whose edges are
quantiles of the reference outputs, so at build time every bin holds about the same share of
values and drift later shows up as mass moving between bins.
"""

from __future__ import annotations

import numpy as np

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


def monitoring_spec(output_specs: list[TensorSpec], reference_outputs: list[list[np.ndarray]]) -> Monitoring:
    monitors = []
    for i, spec in enumerate(output_specs):
        if is_classifier(spec):
            monitors.append(OutputMonitor(name=spec.name, kind="classes", classes=spec.shape[1]))
        else:
            values = np.concatenate([sample[i].ravel() for sample in reference_outputs])
            monitors.append(OutputMonitor(name=spec.name, kind="histogram", edges=histogram_edges(values)))
    return Monitoring(outputs=monitors)
