"""ONNX Runtime as the reference every backend is compared against, and the sample inputs."""

from __future__ import annotations

import numpy as np

from edgesmith.runtime.manifest import TensorSpec
from edgesmith.toolchain.errors import UserError


class ReferenceModel:
    """One ONNX Runtime CPU session over an in-memory ONNX model."""

    def __init__(self, onnx_model):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(onnx_model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        except Exception as e:
            first = str(e).strip().splitlines()[0]
            if "NOT_IMPLEMENTED" in first or "is not a registered function/op" in first:
                raise UserError(f"ONNX Runtime cannot load the model ({first}); every artifact is validated against ONNX "
                                "Runtime, so edgesmith cannot build a model with an operator it lacks") from None
            raise UserError(f"ONNX Runtime cannot load the model ({first}); the ONNX graph is invalid") from None
        self.input_names = [i.name for i in self._session.get_inputs()]
        self.output_names = [o.name for o in self._session.get_outputs()]

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        try:
            outputs = self._session.run(None, dict(zip(self.input_names, inputs)))
        except Exception as e:  # the model fails on these inputs (inconsistent shapes, a kernel's own check)
            text = str(e).strip()
            first = text.splitlines()[0] if text else type(e).__name__
            raise UserError(f"ONNX Runtime fails running the model on the sample inputs ({first[:400]}); check that the "
                            "samples fit the model (shapes, values), or the model itself") from None
        return [np.asarray(o) for o in outputs]


def version() -> str:
    import onnxruntime as ort

    return ort.__version__


def make_samples(specs: list[TensorSpec], count: int, seed: int = 0) -> list[list[np.ndarray]]:
    """Seeded sample inputs: standard normal floats, small non-negative integers, random bools."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(count):
        sample = []
        for spec in specs:
            dtype = np.dtype(spec.dtype)
            if dtype.kind == "f":
                sample.append(rng.standard_normal(spec.shape).astype(dtype))
            elif dtype.kind in "iu":
                sample.append(rng.integers(0, 4, spec.shape).astype(dtype))
            elif dtype.kind == "b":
                sample.append(rng.integers(0, 2, spec.shape).astype(bool))
            else:
                raise UserError(f"input {spec.name!r} has dtype {spec.dtype}, which edgesmith cannot make samples for")
        samples.append(sample)
    return samples


def load_samples(path, specs: list[TensorSpec], minimum: int = 2) -> list[list[np.ndarray]]:
    """Samples from an .npz whose arrays are named like the inputs and stack samples on axis 0
    (a 0-d input's array has shape ``(N,)``). ``minimum`` is 2 unless the outputs may be constant."""
    try:
        data = np.load(path)
    except Exception as e:
        raise UserError(f"--samples {path} is not a readable .npz file ({e})") from None
    missing = [s.name for s in specs if s.name not in data.files]
    if missing:
        raise UserError(f"--samples {path} lacks arrays for inputs {', '.join(missing)}; it has {', '.join(data.files)}")
    flat = [s.name for s in specs if data[s.name].ndim == 0]
    if flat:
        raise UserError(f"--samples {path}: array {flat[0]!r} has no sample axis; stack the samples on axis 0 "
                        f"(shape (N, *input shape), so (N,) for a 0-d input)")
    counts = {len(data[s.name]) for s in specs}
    if len(counts) != 1:
        raise UserError(f"--samples {path}: every input array needs the same number of samples on axis 0")
    samples = []
    for k in range(counts.pop()):
        sample = []
        for spec in specs:
            arr = np.asarray(data[spec.name][k], dtype=spec.dtype)
            if list(arr.shape) != spec.shape:
                raise UserError(f"--samples {path}: sample {k} of {spec.name!r} has shape {list(arr.shape)}, the model takes {spec.shape}")
            sample.append(np.asarray(arr, order="C"))
        samples.append(sample)
    if len(samples) < minimum:
        raise UserError(f"--samples {path} holds {len(samples)} sample(s); give at least {minimum} so validation can tell "
                        "the outputs depend on the input (or pass --allow-constant-output)")
    return samples
