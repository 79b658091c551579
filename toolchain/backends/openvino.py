"""OpenVINO backend: ONNX → OpenVINO IR (``model.xml`` + ``model.bin``).

Precision is explicit, never OpenVINO's own choice: on a CPU with AVX512_BF16 or AMX, OpenVINO's
CPU plugin runs bf16 unless told otherwise, and on Armv8.2 cores fp16, with no accuracy check. Every
artifact pins ``INFERENCE_PRECISION_HINT`` in its compile config: ``f32`` for fp32 and int8 (the
layers NNCF left unquantized stay f32), ``bf16`` for bf16 (FP32 weights in the IR, bf16 compute),
``f16`` for fp16 (FP16 weights in the IR, fp16 compute). The reduced ones are candidates only behind
the accuracy budget (docs/selection.md). Weights stay FP32 except for fp16 (``save_model`` would
otherwise compress them silently). The IR is ISA-independent: the device's OpenVINO compiles it for
its CPU with the artifact's hints, so here it is checked with the host's CPU plugin using the same hints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

from edgesmith.toolchain.backends.base import BackendSettings, CompileRequest, CompileResult, Execution, Runner
from edgesmith.toolchain.errors import BackendUnavailable, CompileError, UserError, first_line
from edgesmith.toolchain.targets import Target, host_isa, runs_natively

NAME = "openvino"
FORMAT = "openvino-ir"
PACKAGE = "openvino"
DEVICE_RUNTIME = True  # the C++ runtime (Session, edgesmith-run) runs this payload
PRECISIONS = ("fp32", "bf16", "fp16", "int8")
_HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}
ENTRY = "model.xml"


class Settings(BackendSettings):
    """``[openvino]``: the device and the compile hints used on the device and when validating."""

    device: str = "CPU"
    performance_hint: Literal["LATENCY", "THROUGHPUT"] = "LATENCY"


def version() -> str:
    try:
        import openvino
    except Exception as e:
        raise BackendUnavailable(f"the openvino backend needs OpenVINO, which does not import ({first_line(e)}); install openvino==2026.4.1") from None
    return openvino.__version__.split("-")[0]


def compile_config(target: Target, precision: str = "fp32") -> dict:
    """Properties for ``Core.compile_model``; the device runtime uses the same ones (recorded in
    ``backend.options.config``). The precision hint is the artifact's precision's, always pinned:
    a reduced one only ever comes from a candidate that passed the accuracy budget."""
    settings = target.openvino
    return {"INFERENCE_PRECISION_HINT": _HINTS[precision], "PERFORMANCE_HINT": settings.performance_hint,
            "INFERENCE_NUM_THREADS": target.threads}


def compile(request: CompileRequest) -> CompileResult:
    import openvino as ov

    onnx_path = request.work_dir / "model.onnx"
    onnx_path.write_bytes(request.source.onnx_bytes)
    try:
        model = ov.convert_model(str(onnx_path))
    except Exception as e:
        others = ", ".join(b for b in request.target.backends if b != NAME) or "none listed"
        raise CompileError(f"the openvino backend cannot convert the model: {first_line(e)}; try another backend of {request.target.name}: {others}") from None
    ov.save_model(model, str(request.out_dir / ENTRY), compress_to_fp16=request.precision == "fp16")
    options = {"device": request.target.openvino.device, "config": compile_config(request.target, request.precision),
               "weights": "fp16" if request.precision == "fp16" else "fp32"}
    return CompileResult(format=FORMAT, entry=ENTRY, options=options)


def compile_int8(request: CompileRequest, calibration) -> CompileResult:
    """INT8 IR: NNCF post-training quantization of the converted model (toolchain/quantize.py)."""
    import openvino as ov

    from edgesmith.toolchain.quantize import nncf_openvino

    onnx_path = request.work_dir / "model.onnx"
    onnx_path.write_bytes(request.source.onnx_bytes)
    try:
        model, method = nncf_openvino(onnx_path, calibration)
    except UserError:
        raise
    except Exception as e:
        raise CompileError(f"NNCF cannot quantize the model for openvino: {first_line(e)}; build it FP32 or try --backend ort") from None
    ov.save_model(model, str(request.out_dir / ENTRY), compress_to_fp16=False)
    options = {"device": request.target.openvino.device, "config": compile_config(request.target, "int8"), "weights": "int8",
               "quantization": method}
    return CompileResult(format=FORMAT, entry=ENTRY, options=options)


def executes_here(target: Target) -> Execution:
    if runs_natively(target):
        return Execution(True, "native")
    # The IR carries no machine code: the host's CPU plugin runs the same graph and weights.
    return Execution(True, "host-engine", reason=f"IR checked with the {host_isa()} CPU plugin; the {target.isa} plugin runs in `edgesmith prove`")


def load(out_dir: Path, result: CompileResult, target: Target) -> Runner:
    import openvino as ov

    core = ov.Core()
    config = dict(result.options["config"])
    if not runs_natively(target):
        config["INFERENCE_NUM_THREADS"] = 0  # the target's thread count means nothing on this host
    compiled = core.compile_model(core.read_model(str(out_dir / result.entry)), "CPU", config)
    request = compiled.create_infer_request()

    def run(inputs: list[np.ndarray]) -> list[np.ndarray]:
        results = request.infer([np.asarray(x, order="C") for x in inputs])
        return [np.array(results[output]) for output in compiled.outputs]

    return run
