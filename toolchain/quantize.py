"""INT8 post-training quantizers: the stage between export and compile for ``int8`` candidates.

Calibration inputs go to the backend's own quantizer (NNCF for OpenVINO, ONNX Runtime's
``quantize_static`` QDQ model for ONNX-consuming backends). Which inputs calibrate and how the
compiled INT8 payload is judged is the accuracy budget's business (toolchain/accuracy.py).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from edgesmith.toolchain.accuracy import Dataset
from edgesmith.toolchain.errors import UserError, first_line

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
