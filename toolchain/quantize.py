"""INT8 post-training quantization behind an accuracy gate (``edgesmith build --quantize int8``).

The stage between export and compile: calibration inputs go to the backend's own quantizer (NNCF
for OpenVINO, ONNX Runtime's ``quantize_static`` QDQ model for ONNX-consuming backends), then the
compiled INT8 payload is judged by the task, not element-wise against FP32: top-1 accuracy of the
FP32 model (ONNX Runtime) and of the INT8 payload on the same labelled held-out inputs, and the
top-1 agreement between them. A drop beyond ``max_accuracy_drop`` points refuses the artifact.

Data: ``--calib FILE.npz`` (``x``) and ``--eval FILE.npz`` (``x``, ``y``), samples on axis 0 with
the model input's shape after it. A registered model (``models:/``) brings its held-out test split:
its first third (at most 300 inputs) calibrates, the rest evaluates, so the gate never scores
inputs the quantizer has seen.
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgesmith.runtime.manifest import Quantization, QuantizationData, TensorSpec
from edgesmith.toolchain.errors import UserError, first_line

METHODS = ("int8",)
MAX_CALIBRATION = 300  # NNCF's default subset size; more adds time, not accuracy, on small models
DEFAULT_MAX_DROP = 1.0


@dataclass
class Dataset:
    x: np.ndarray  # samples on axis 0, each shaped like the model input without its batch axis of 1
    y: np.ndarray | None
    origin: str

    @property
    def digest(self) -> str:
        return hashlib.sha256(np.ascontiguousarray(self.x).tobytes()).hexdigest()

    def samples(self) -> list[list[np.ndarray]]:
        """One single-input sample per row, with the model's batch axis of 1."""
        return [[np.ascontiguousarray(self.x[k:k + 1])] for k in range(len(self.x))]

    def record(self) -> QuantizationData:
        return QuantizationData(origin=self.origin, samples=len(self.x), sha256=self.digest)


@dataclass
class Plan:
    """What every artifact of one ``--quantize int8`` build shares: data, and the FP32 model's
    predictions and accuracy on the evaluation inputs (ONNX Runtime, computed once)."""

    method: str
    calibration: Dataset
    evaluation: Dataset
    fp32_predictions: np.ndarray
    fp32_accuracy: float
    max_drop: float

    def gate(self, name: str, int8_outputs: list[list[np.ndarray]], method: str) -> Quantization:
        """Score the INT8 payload's outputs on the evaluation inputs; refuse it past the bound."""
        predictions = _top1(int8_outputs)
        accuracy = float(np.mean(predictions == self.evaluation.y))
        drop = 100.0 * (self.fp32_accuracy - accuracy)
        agreement = float(np.mean(predictions == self.fp32_predictions))
        if drop > self.max_drop:
            raise UserError(
                f"{name}: INT8 accuracy {100 * accuracy:.2f}% is {drop:.2f} points below FP32's {100 * self.fp32_accuracy:.2f}% "
                f"on {len(predictions)} held-out samples, beyond --max-accuracy-drop {self.max_drop:g}; nothing was written — "
                "calibrate on more representative data (--calib), or build FP32")
        return Quantization(scheme=self.method, method=method, calibration=self.calibration.record(),
                            evaluation=self.evaluation.record(), fp32_accuracy=self.fp32_accuracy, int8_accuracy=accuracy,
                            accuracy_drop=round(drop, 6), max_accuracy_drop=self.max_drop, top1_agreement=agreement)


def _top1(outputs: list[list[np.ndarray]]) -> np.ndarray:
    return np.array([int(np.argmax(sample[0])) for sample in outputs])


def _read_npz(path: Path, flag: str, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    try:
        data = np.load(path)
        arrays = {k: data[k] for k in data.files}
    except Exception as e:
        raise UserError(f"{flag} {path} is not a readable .npz file ({first_line(e)}); save it with numpy.savez(path, {'=..., '.join(keys)}=...)") from None
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise UserError(f"{flag} {path} has no array {' or '.join(repr(k) for k in missing)} (it has {', '.join(arrays) or 'none'}); "
                        f"save it with numpy.savez(path, {'=..., '.join(keys)}=...)")
    return arrays


def _check_x(x: np.ndarray, spec: TensorSpec, flag: str, path: Path) -> np.ndarray:
    want = [spec.shape[1:]] if spec.shape[0] == 1 else []
    if x.dtype.name != spec.dtype or list(x.shape[1:]) not in want or len(x) < 1:
        raise UserError(f"{flag} {path}: x has shape {list(x.shape)} and dtype {x.dtype.name}, but the model input {spec.name!r} "
                        f"needs N samples of shape {spec.shape[1:]} and dtype {spec.dtype}, i.e. x of shape [N, {', '.join(map(str, spec.shape[1:]))}] "
                        f"{spec.dtype}")
    return np.ascontiguousarray(x)


def load_calibration(path: Path, spec: TensorSpec) -> Dataset:
    x = _check_x(_read_npz(path, "--calib", ("x",))["x"], spec, "--calib", path)
    return Dataset(x=x[:MAX_CALIBRATION], y=None, origin=f"file:{path}")


def load_evaluation(path: Path, spec: TensorSpec, classes: int) -> Dataset:
    arrays = _read_npz(path, "--eval", ("x", "y"))
    x = _check_x(arrays["x"], spec, "--eval", path)
    y = arrays["y"]
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer) or (len(y) and (y.min() < 0 or y.max() >= classes)):
        raise UserError(f"--eval {path}: y must hold one integer class label in 0..{classes - 1} per sample of x "
                        f"(shape [{len(x)}]), it has shape {list(y.shape)} and dtype {y.dtype.name}")
    return Dataset(x=x, y=y.astype(np.int64), origin=f"file:{path}")


def _registered_split(source) -> tuple[np.ndarray, np.ndarray, str] | None:
    """The registered run's held-out test split (x, y), as ``edgesmith train`` stores it."""
    import mlflow

    from edgesmith.toolchain.registry import samples_origin
    from edgesmith.toolchain.train import tracking

    version = source.registry
    if version is None or version.run_id is None:
        return None
    with tempfile.TemporaryDirectory(prefix="edgesmith-int8-") as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path=tracking.TEST_SPLIT, dst_path=tmp)
        except Exception:
            return None
        data = np.load(path)
        if "y" not in data.files:
            return None
        return data["x"], data["y"], samples_origin(version)


def prepare(source, method: str, calib_path: Path | None, eval_path: Path | None, max_drop: float) -> Plan:
    """Calibration and evaluation data for ``source``, and the FP32 model's accuracy on the latter."""
    from edgesmith.toolchain.reference import ReferenceModel

    if method not in METHODS:
        raise UserError(f"--quantize {method!r} is not known; use {', '.join(METHODS)}")
    if len(source.inputs) != 1:
        raise UserError(f"--quantize int8 takes models with one input; {source.ref} has {len(source.inputs)}")
    spec = source.inputs[0]
    model = ReferenceModel(source.onnx_model)
    probe = model.run([np.zeros(spec.shape, spec.dtype)])[0]
    if probe.ndim != 2 or probe.shape[0] != 1 or probe.shape[1] < 2:
        raise UserError(f"the accuracy gate of --quantize int8 needs a classifier (first output of shape [1, classes]); "
                        f"{source.ref}'s first output has shape {list(probe.shape)}")
    classes = probe.shape[1]
    calibration = load_calibration(calib_path, spec) if calib_path is not None else None
    evaluation = load_evaluation(eval_path, spec, classes) if eval_path is not None else None
    split = _registered_split(source) if (calibration is None or evaluation is None) else None
    if split is not None:
        x, y, origin = split
        x = _check_x(np.asarray(x, dtype=spec.dtype), spec, "the registered test split of", Path(source.ref))
        # calibrate on the first third, evaluate on the rest: the gate never scores calibration inputs
        cut = min(MAX_CALIBRATION, len(x) // 3) if calibration is None else 0
        if calibration is None:
            calibration = Dataset(x=x[:cut], y=None, origin=f"{origin}[:{cut}]")
        if evaluation is None:
            evaluation = Dataset(x=x[cut:], y=np.asarray(y[cut:], np.int64), origin=f"{origin}[{cut}:]")
    if calibration is None:
        raise UserError("--quantize int8 needs calibration inputs: pass --calib FILE.npz (x: N samples shaped like the model input), "
                        "or build a registered model (models:/NAME/VERSION) whose run stored its test split")
    if evaluation is None:
        raise UserError("--quantize int8 needs labelled held-out data for its accuracy gate: pass --eval FILE.npz (x and integer y), "
                        "or build a registered model (models:/NAME/VERSION) whose run stored its test split")
    fp32 = _top1([model.run(sample) for sample in evaluation.samples()])
    return Plan(method=method, calibration=calibration, evaluation=evaluation, fp32_predictions=fp32,
                fp32_accuracy=float(np.mean(fp32 == evaluation.y)), max_drop=max_drop)


# --- the quantizers; backends call these from their compile_int8 hooks ---

def nncf_openvino(onnx_path: Path, calibration: Dataset):
    """An OpenVINO model with NNCF post-training INT8 quantization (FakeQuantize nodes)."""
    try:
        import nncf
    except Exception as e:
        raise UserError(f"INT8 for openvino needs NNCF, which does not import ({first_line(e)}); install nncf==3.4.0") from None
    import openvino as ov

    model = ov.convert_model(str(onnx_path))
    name = model.inputs[0].get_any_name()
    data = nncf.Dataset(calibration.samples(), lambda sample: {name: sample[0]})
    # NNCF draws progress bars on stdout, which `edgesmith build --json` keeps for JSON
    with contextlib.redirect_stdout(sys.stderr):
        quantized = nncf.quantize(model, data, subset_size=len(calibration.x))
    return quantized, f"nncf {nncf.__version__} post-training quantization"


def qdq_onnx(onnx_bytes: bytes, input_name: str, calibration: Dataset, work_dir: Path):
    """ONNX Runtime's static QDQ model: per-channel INT8 weights, UINT8 activations (MinMax calibration)."""
    import onnx
    import onnxruntime
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._rows = iter(calibration.samples())

        def get_next(self):
            row = next(self._rows, None)
            return None if row is None else {input_name: row[0]}

    fp32, pre, qdq = work_dir / "fp32.onnx", work_dir / "fp32-pre.onnx", work_dir / "qdq.onnx"
    fp32.write_bytes(onnx_bytes)
    quant_pre_process(str(fp32), str(pre))
    quantize_static(str(pre), str(qdq), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return onnx.load(str(qdq)), f"onnxruntime {onnxruntime.__version__} quantize_static QDQ (per-channel s8 weights, u8 activations)"
