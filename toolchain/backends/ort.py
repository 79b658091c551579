"""ONNX Runtime backend: ONNX → ORT's offline graph optimizations → ``model.onnx`` (or ``model.ort``).

ORT optimizes a graph at three levels. *Basic* (constant folding, redundant-node removal,
semantics-preserving fusions) and *extended* (fusions into ORT's CPU contrib operators, such as
Conv+activation → FusedConv) give a graph that any CPU build of ORT runs on any ISA, so they are
applied here, once, at build time. The *layout* level (NCHWc blocking, sized for the building
machine's SIMD width) would bake this machine's ISA into the graph: it is left to the device,
which applies it at load time for the CPU it really has (``runtime_optimization_level``).

The optimized graph is saved as ONNX by default. ORT format (``payload = "ort"``, a FlatBuffer)
loads a few milliseconds faster, but ORT does not apply the layout level to ORT-format models at
load time, so it runs slower: measured here with 2 threads, SqueezeNet 5.4-5.9 ms (.ort) vs
4.1 ms (.onnx), EdgeNet 0.77 vs 0.47 ms; load 5-11 vs 11-26 ms. Either payload is
ISA-independent: for a target of another ISA this host's ORT validates it, and ``edgesmith prove``
runs it on its ISA.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import numpy as np

from edgesmith.toolchain.backends.base import BackendSettings, CompileRequest, CompileResult, Execution, Runner
from edgesmith.toolchain.errors import BackendUnavailable, CompileError, UserError, first_line
from edgesmith.toolchain.targets import Target, host_isa, runs_natively

NAME = "ort"
FORMAT = "onnx"  # model.onnx; "onnxruntime-ort" (model.ort) when Settings.payload is "ort"
PACKAGE = "onnxruntime"
DEVICE_RUNTIME = True  # the C++ runtime (Session, edgesmith-run) runs this payload
PRECISIONS = ("fp32", "int8")
ENTRIES = {"ort": ("onnxruntime-ort", "model.ort"), "onnx": ("onnx", "model.onnx")}


class Settings(BackendSettings):
    """``[ort]``: what the build bakes in and how the device's session runs it."""

    # Target-independent levels only ("layout"/"all" would bake the build machine's ISA in).
    optimization_level: Literal["basic", "extended"] = "extended"
    # Applied again by the device's ORT when it loads the payload; "all" adds the layout level for
    # the device's own CPU.
    runtime_optimization_level: Literal["disable", "basic", "extended", "all"] = "all"
    payload: Literal["onnx", "ort"] = "onnx"
    # Whether idle intra-op workers spin between calls (lower latency for back-to-back calls, a
    # busy core between them).
    intra_op_spinning: bool = True


def version() -> str:
    try:
        import onnxruntime
    except Exception as e:
        raise BackendUnavailable(f"the ort backend needs ONNX Runtime, which does not import ({first_line(e)}); install onnxruntime==1.32.0") from None
    return onnxruntime.__version__


_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def session_options(options: dict, threads: int | None):
    """Python ``SessionOptions`` equal to what the C++ plugin builds from ``backend.options``."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[options["runtime_optimization_level"]])
    if threads:
        so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if options["intra_op_spinning"] else "0")
    so.add_session_config_entry("session.load_model_format", "ORT" if options["payload"] == "ort" else "ONNX")
    return so


def compile(request: CompileRequest) -> CompileResult:
    import onnxruntime as ort

    settings = request.target.ort
    if request.precision not in PRECISIONS:
        raise UserError(f"the ort backend builds {', '.join(PRECISIONS)}, not {request.precision}; use --backend openvino")
    fmt, entry = ENTRIES[settings.payload]
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[settings.optimization_level])
    so.optimized_model_filepath = str(request.out_dir / entry)
    so.add_session_config_entry("session.save_model_format", "ORT" if settings.payload == "ort" else "ONNX")
    so.intra_op_num_threads = 1
    so.log_severity_level = 3  # errors only
    try:
        ort.InferenceSession(request.source.onnx_bytes, so, providers=["CPUExecutionProvider"])
    except Exception as e:
        others = ", ".join(b for b in request.target.backends if b != NAME) or "none listed"
        raise CompileError(f"ONNX Runtime cannot load the model: {first_line(e)}; try another backend of {request.target.name}: {others}") from None
    if not (request.out_dir / entry).is_file():
        raise CompileError(f"ONNX Runtime did not write the optimized model {entry}; try another backend of the target")
    options = {"optimization_level": settings.optimization_level,
               "runtime_optimization_level": settings.runtime_optimization_level,
               "payload": settings.payload, "intra_op_spinning": settings.intra_op_spinning,
               "intra_op_threads": request.target.threads, "execution_provider": "CPUExecutionProvider"}
    return CompileResult(format=fmt, entry=entry, options=options)


def compile_int8(request: CompileRequest, calibration) -> CompileResult:
    """ONNX Runtime's static QDQ model (toolchain/quantize.py), optimized and saved like an FP32 one."""
    import copy

    from edgesmith.toolchain.quantize import qdq_onnx

    source = copy.copy(request.source)
    source.onnx_model, method = qdq_onnx(request.source.onnx_bytes, request.source.inputs[0].name, calibration, request.work_dir)
    result = compile(dataclasses.replace(request, source=source))
    result.options["quantization"] = method
    return result


def executes_here(target: Target) -> Execution:
    if runs_natively(target):
        return Execution(True, "native")
    # The optimized graph carries no machine code: this host's ORT runs the same graph and weights.
    return Execution(True, "host-engine", reason=f"graph checked with the {host_isa()} ONNX Runtime; the {target.isa} one runs in `edgesmith prove`")


def load(out_dir: Path, result: CompileResult, target: Target) -> Runner:
    import onnxruntime as ort

    threads = target.threads if runs_natively(target) else None  # the target's count means nothing here
    session = ort.InferenceSession(str(out_dir / result.entry), session_options(result.options, threads),
                                   providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]

    def run(inputs: list[np.ndarray]) -> list[np.ndarray]:
        return session.run(outputs, {n: np.asarray(x, order="C") for n, x in zip(names, inputs)})

    return run
