"""Run a verified artifact on the device: the Python face of the C++ Session (``csrc/runtime/``).

    from edgesmith.runtime import Session

    session = Session("dist/digits-cnn-x86_64-avx2-openvino")
    (logits,) = session.run([x])                  # arrays in input order -> list in output order
    outputs = session.run({"input": x})           # by name -> {output name: array}
    session.stats()["latency"]["p95_us"]

Opening a Session verifies the artifact first (an artifact that fails any integrity rule is
never loaded), then refuses one built for another ISA *before* loading anything from it, then
loads the backend plugin named by the manifest (``libedgesmith_backend_<name>.so``).

Inputs must have exactly the model's dtype and shape: nothing is cast. A non-contiguous array is
copied to C order (that costs one copy; pass ``np.asarray(x, order="C")`` to avoid it). ``run`` is
safe to call from many threads; the GIL is released during inference.

Errors are :mod:`edgesmith.runtime.errors` classes: ``IntegrityError``/``ManifestError`` (the
artifact), ``UnsupportedArtifactError`` (other ISA, tflite), ``BackendError`` (plugin or engine),
``InputError`` (run's inputs).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.runtime import keys as runtime_keys
from edgesmith.runtime.artifact import _core
from edgesmith.runtime.errors import InputError
from edgesmith.runtime.errors import ValueError as EdgesmithValueError

__all__ = ["Session", "TensorInfo"]


@dataclass(frozen=True)
class TensorInfo:
    """One model input or output as the manifest declares it (``shape`` is a list, as in
    manifest.json; compare with an array's shape as ``tuple(info.shape)``)."""

    name: str
    dtype: str
    shape: list[int]


def _infos(items: list[dict[str, Any]]) -> tuple[TensorInfo, ...]:
    return tuple(TensorInfo(i["name"], i["dtype"], list(i["shape"])) for i in items)


class Session:
    """A verified artifact loaded into its backend, ready to run.

    ``trusted_keys`` are raw 32-byte Ed25519 public keys; ``None`` means the keys in
    ``<home>/keys/*.pub`` and ``<home>/trusted/*.pub`` (the edgesmith home:
    :func:`edgesmith.runtime.keys.edgesmith_home`); keys are only read, never created.
    ``threads`` = 0 uses the target's thread count. ``max_concurrency`` bounds the engine
    instances serving concurrent ``run`` callers (further callers wait); 0 = the backend's default
    (OpenVINO: the compiled model's optimal number of requests; TVM: one VM with its own thread
    pool for libraries with parallel loops, ``threads`` VMs for serial ones).
    """

    def __init__(self, path: str | os.PathLike[str], threads: int = 0,
                 trusted_keys: Sequence[bytes] | None = None, max_concurrency: int = 0):
        if trusted_keys is None:
            trusted_keys = runtime_keys.trusted_public_keys()
            if not trusted_keys:
                home = runtime_keys.edgesmith_home()
                raise EdgesmithValueError(
                    f"no trusted public keys in {home}/keys or {home}/trusted; copy the signer's "
                    f".pub file to {home}/trusted/ or pass trusted_keys=[...]"
                )
        self._core = _core().Session(os.fspath(path), [bytes(k) for k in trusted_keys],
                                     threads=threads, max_concurrency=max_concurrency)
        self.path = Path(self._core.path)
        self.inputs = _infos(self._core.inputs)
        self.outputs = _infos(self._core.outputs)
        self._input_names = [i.name for i in self.inputs]

    @property
    def manifest(self) -> dict[str, Any]:
        """The verified manifest.json (every key, parsed from the exact signed bytes)."""
        return json.loads(self._core.manifest_json)

    @property
    def key_id(self) -> str:
        """Id of the trusted key that signed the artifact."""
        return self._core.key_id

    @property
    def backend(self) -> str:
        """Engine name and version, e.g. ``openvino 2026.4.1``."""
        return self._core.backend

    def run(self, inputs: Sequence[Any] | Mapping[str, Any]) -> list[np.ndarray] | dict[str, np.ndarray]:
        """Run once. A list/tuple of arrays (input order) returns a list in output order; a dict
        ``{input name: array}`` returns ``{output name: array}``. Raises ``InputError`` for a
        missing or unknown name, or a dtype/shape that is not the model's."""
        if isinstance(inputs, Mapping):
            missing = [n for n in self._input_names if n not in inputs]
            extra = sorted(str(n) for n in inputs if n not in self._input_names)
            if missing or extra:
                parts = []
                if missing:
                    parts.append("missing " + ", ".join(repr(n) for n in missing))
                if extra:
                    parts.append("unknown " + ", ".join(repr(n) for n in extra))
                raise InputError(
                    f"inputs do not match the model's ({', '.join(self._input_names)}): "
                    + "; ".join(parts)
                )
            arrays = self._core.run([inputs[n] for n in self._input_names])
            return {info.name: array for info, array in zip(self.outputs, arrays, strict=True)}
        if isinstance(inputs, (np.ndarray, str, bytes)):
            raise InputError("run() takes a list of arrays in input order, or a dict {name: array}")
        return self._core.run(list(inputs))

    def stats(self) -> dict[str, Any]:
        """Counters since the session opened: ``runs``, ``errors``, ``nan_input_runs``,
        ``nan_input_values``, ``latency`` (the manifest's log buckets, under/overflow, mean/max and
        p50/p95/p99 estimated from the buckets, in µs) and ``outputs`` ({name: {kind, counts,
        underflow, overflow, nan}} per the manifest's ``monitoring``)."""
        return self._core.stats()

    def self_test(self) -> dict[str, Any]:
        """Run every golden sample and compare with the expected outputs (manifest tolerance):
        ``{passed, samples, max_abs_err, atol, rtol, details: [...]}``. Not counted in stats."""
        return self._core.self_test()

    def __repr__(self) -> str:
        return f"Session({str(self.path)!r}, backend={self.backend!r})"
