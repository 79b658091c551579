"""LiteRT (TFLite) backend: PyTorch or ONNX → ``model.tflite`` with litert-torch, run by the C++ runtime.

The converter starts from a ``torch.export`` program: a PyTorch source is exported directly, an
ONNX source is first turned into a PyTorch module by onnx2torch (chosen over onnx2tf by
bench/onnx_to_tflite_coverage.py; docs/tflite.md), and an operator either converter lacks is a
``CompileError`` naming it. The
conversion runs in the isolated converter environment (``edgesmith tools install litert``, see
``toolchain/tools.py``). The device runs the flatbuffer with the ``tflite`` plugin
(csrc/backends/tflite: LiteRT's C API, XNNPACK on the CPU), so a build for this machine validates it
through ``edgesmith.runtime.Session`` and proves it with ``edgesmith-run``; an Arm Linux target's is
proven under qemu with the aarch64 runtime bundle. The flatbuffer is ISA-independent: for a target
this machine does not run, the host's LiteRT interpreter (the same XNNPACK kernels) validates it;
Android targets get no proof here (no Android userland).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Literal

import numpy as np

from edgesmith.toolchain import tools

from edgesmith.toolchain.backends.base import BackendSettings, CompileRequest, CompileResult, Execution, Runner
from edgesmith.toolchain.errors import BackendUnavailable, CompileError, UserError, first_line
from edgesmith.toolchain.targets import Target, host_isa, runs_natively

NAME = "tflite"
FORMAT = "tflite"
PACKAGE = "ai-edge-litert"
DEVICE_RUNTIME = True  # the C++ runtime (Session, edgesmith-run) runs this payload
# fp16: the FP32 flatbuffer, run by XNNPACK in fp16 (the plugin's FORCE_FP16 flag) on Armv8.2 cores.
# int8: PT2E post-training quantization in the converter environment.
PRECISIONS = ("fp32", "fp16", "int8")
# The flatbuffer carries no machine code: an aarch64 target without a userland here (Android) has its
# fp16 gate run by the Linux aarch64 runtime under qemu, the same plugin and XNNPACK kernels.
PORTABLE_PAYLOAD = True
ENTRY = "model.tflite"


class Settings(BackendSettings):
    """``[tflite]``: the delegate the interpreter uses."""

    delegate: Literal["xnnpack", "none"] = "xnnpack"
_CONVERTER = Path(__file__).with_name("_litert_convert.py")


def version() -> str:
    try:
        from importlib.metadata import version as dist_version

        import ai_edge_litert  # noqa: F401
    except Exception as e:
        raise BackendUnavailable(f"the tflite backend needs ai-edge-litert, which does not import ({first_line(e)}); install ai-edge-litert==2.3.0") from None
    if tools.tool_python("litert") is None:
        raise BackendUnavailable("the tflite backend's converter environment is not installed; run `edgesmith tools install litert`")
    pins = dict(pin.split("==") for pin in tools.TOOLS["litert"])
    return f"litert-torch {pins['litert-torch']}, onnx2torch {pins['onnx2torch']}, ai-edge-litert {dist_version('ai-edge-litert')}"


def _natural_key(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def compile(request: CompileRequest, calibration=None) -> CompileResult:
    import torch

    source = request.source
    if request.precision not in PRECISIONS:
        raise UserError(f"the tflite backend builds {', '.join(PRECISIONS)}, not {request.precision}; use another backend")
    if source.module is None:  # ONNX: onnx2torch runs in the converter environment
        model_path = request.work_dir / "model.onnx"
        model_path.write_bytes(source.onnx_bytes)
    else:
        model_path = request.work_dir / "model.pt2"
        try:
            torch.export.save(torch.export.export(source.module, source.example_inputs), str(model_path))
        except Exception as e:
            raise CompileError(f"torch.export failed, so the tflite backend cannot convert the model: {first_line(e)}") from None
    python = tools.tool_python("litert")
    out_path = request.out_dir / ENTRY
    calib_args = []
    if calibration is not None:  # INT8: PT2E post-training quantization inside the converter environment
        calib_args = [str(request.work_dir / "calib.npy")]
        np.save(calib_args[0], calibration.x[:, None], allow_pickle=False)
    result = subprocess.run([str(python), str(_CONVERTER), str(model_path), str(out_path), *calib_args],
                            capture_output=True, text=True, timeout=1800)
    if result.returncode < 0:  # killed by a signal: LiteRT aborted running the flatbuffer once (_litert_convert.py)
        raise CompileError(f"LiteRT crashed (signal {-result.returncode}) running the flatbuffer litert-torch converted "
                           f"from {source.ref}, so the tflite backend cannot build it; try another backend")
    if result.returncode != 0:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        said = next((line.removeprefix("edgesmith: ") for line in reversed(lines) if line.startswith("edgesmith: ")), None)
        if said is not None:  # the converter's own sentence (an operator it lacks)
            raise CompileError(f"the tflite backend cannot convert {source.ref}: {said}; try another target's backend")
        # the exception's own line, not the notes printed after it (JAX's "removed its internal frames")
        errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception): ", line)]
        said = (errors or lines or ["no message"])[-1]
        raise CompileError(f"litert-torch could not convert the model: {said}; try another target's backend")
    signature = json.loads(result.stdout.strip().splitlines()[-1])
    options = {"delegate": request.target.tflite.delegate,
               "signature": "serving_default",
               "input_names": sorted(signature["inputs"], key=_natural_key),
               "output_names": sorted(signature["outputs"], key=_natural_key)}
    if signature.get("older_converters"):
        options["onnx2torch_older_converters"] = signature["older_converters"]
    if request.precision == "fp16":
        if request.target.tflite.delegate != "xnnpack":
            raise UserError(f"an fp16 LiteRT artifact needs the xnnpack delegate (LiteRT's builtin kernels compute in f32); "
                            f"set [tflite] delegate = \"xnnpack\" in {request.target.source or request.target.name}")
        options["inference_precision"] = "fp16"
    return CompileResult(format=FORMAT, entry=ENTRY, options=options)


def compile_int8(request: CompileRequest, calibration) -> CompileResult:
    """INT8 flatbuffer: litert-torch's PT2E post-training quantization (_litert_convert.py)."""
    result = compile(request, calibration)
    result.options["quantization"] = (f"litert-torch {tools.TOOLS['litert'][1].split('==')[1]} PT2E post-training "
                                      "quantization (symmetric, per-channel weights, static activations)")
    return result


def executes_here(target: Target) -> Execution:
    if runs_natively(target):
        return Execution(True, "native")
    # The flatbuffer carries no machine code: this host's LiteRT runs the same graph and kernels.
    proof = "on-device proof needs a phone" if target.os == "android" else f"the {target.isa} runtime runs it in `edgesmith prove`"
    return Execution(True, "host-engine", reason=f"flatbuffer run by the {host_isa()} LiteRT interpreter; {proof}")


def load(out_dir: Path, result: CompileResult, target: Target) -> Runner:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(out_dir / result.entry), num_threads=2)
    runner = interpreter.get_signature_runner(result.options["signature"])
    input_names, output_names = result.options["input_names"], result.options["output_names"]
    # An INT8 flatbuffer (--quantize int8) takes and returns integer tensors: (de)quantize at the edge.
    in_details, out_details = runner.get_input_details(), runner.get_output_details()

    def quantize(x: np.ndarray, detail: dict) -> np.ndarray:
        if not np.issubdtype(detail["dtype"], np.integer) or np.issubdtype(x.dtype, np.integer):
            return np.asarray(x, order="C")
        scale, zero = detail["quantization"]
        info = np.iinfo(detail["dtype"])
        return np.clip(np.round(x / scale) + zero, info.min, info.max).astype(detail["dtype"])

    def dequantize(y: np.ndarray, detail: dict) -> np.ndarray:
        if not np.issubdtype(y.dtype, np.integer) or detail["quantization"][0] == 0:
            return np.asarray(y)
        scale, zero = detail["quantization"]
        return ((y.astype(np.float32) - zero) * np.float32(scale)).astype(np.float32)

    def run(inputs: list[np.ndarray]) -> list[np.ndarray]:
        outputs = runner(**{name: quantize(x, in_details[name]) for name, x in zip(input_names, inputs)})
        return [dequantize(outputs[name], out_details[name]) for name in output_names]

    return run
