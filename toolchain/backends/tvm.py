"""Apache TVM backend: ONNX → Relax → ``tvm.compile`` → one shared library (``model.so``).

Cross-ISA targets are linked with the target file's ``tvm.cross_compiler``. A MetaSchedule
tuning database (a work directory with ``database_workload.json`` and
``database_tuning_record.json``) is applied when one is given, else the one ``edgesmith tune``
cached for this workload, target and TVM version (toolchain/tune.py); the manifest's
``backend.options.tuning`` records which, its hash and how many workloads it matched.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import field_validator

from edgesmith.toolchain.backends.base import BackendSettings, CompileRequest, CompileResult, Execution, Runner
from edgesmith.toolchain.errors import BackendUnavailable, CompileError, UserError, first_line
from edgesmith.toolchain.targets import Target, host_isa, missing_cpu_features, runs_natively

NAME = "tvm"
FORMAT = "tvm-relax-so"
PACKAGE = "apache-tvm"
DEVICE_RUNTIME = True  # the C++ runtime (Session, edgesmith-run) runs this payload
PRECISIONS = ("fp32",)  # INT8 is refused with its figures (compile_int8); no bf16/fp16 schedules here
ENTRY = "model.so"


class Settings(BackendSettings):
    """``[tvm]``: the TVM target as a JSON-style table, and the linker for another ISA."""

    target: dict[str, Any]
    cross_compiler: str | None = None
    cross_compiler_package: str | None = None

    @field_validator("target")
    @classmethod
    def _target_is_llvm_dict(cls, value: dict[str, Any]) -> dict[str, Any]:
        if value.get("kind") != "llvm":
            raise ValueError("only kind = \"llvm\" CPU targets are supported")
        if value.get("mcpu") == "native":
            raise ValueError("mcpu = \"native\" is not allowed: name the CPU (e.g. \"cortex-a72\")")
        return value


def version() -> str:
    try:
        import tvm
    except Exception as e:  # ImportError, or a broken libtvm
        raise BackendUnavailable(f"the tvm backend needs Apache TVM, which does not import ({first_line(e)}); "
                                 "install apache-tvm==0.27.0.post1 and apache-tvm-ffi==0.1.14.post1") from None
    return tvm.__version__


def _unsupported_operators(source) -> list[str]:
    from tvm.relax.frontend.onnx import onnx_frontend

    known = set(onnx_frontend._get_convert_map())
    return sorted(source.operators() - known)


def _tvm_target(target: Target):
    import tvm

    try:
        return tvm.target.Target(dict(target.tvm.target))
    except Exception as e:
        raise UserError(f"target file {target.source}: key 'tvm.target' is not a valid TVM target ({first_line(e)})") from None


def _plain(value):
    """tvm-ffi containers (Map, Array, String) as plain JSON-able Python values."""
    if hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (str, bytes)):
        return str(value)
    if hasattr(value, "__iter__"):
        return [_plain(v) for v in value]
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    return str(value)


def _check_tuning_db(path: Path) -> None:
    missing = [f for f in ("database_workload.json", "database_tuning_record.json") if not (path / f).is_file()]
    if missing:
        raise UserError(f"tuning database {path} lacks {', '.join(missing)}; pass the work directory of a MetaSchedule tuning run")


def _apply_tuning(mod, tvm_target, tuning_db: Path | None):
    """The module to compile and the manifest's ``tuning`` record: the given database, else the one
    `edgesmith tune` cached for this workload, target and TVM version (toolchain/tune.py). A database
    that matches nothing, is corrupt or does not apply is ignored with a warning on stderr."""
    from edgesmith.toolchain import tune

    prepared = tune.prepare(mod, tvm_target)
    db = tuning_db if tuning_db is not None else tune.lookup(prepared, tvm_target)
    if db is None:
        return mod, None
    applied = tune.apply_database(prepared, tvm_target, db)
    if applied.warning:
        print(f"warning: {applied.warning}", file=sys.stderr, flush=True)
    if applied.info is None or applied.info["workloads_matched"] == 0:
        return mod, applied.info
    return applied.mod, applied.info


def compile(request: CompileRequest) -> CompileResult:
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    target = request.target
    cross = target.tvm.cross_compiler if target.isa != host_isa() else None
    if cross and shutil.which(cross) is None:
        package = target.tvm.cross_compiler_package or cross
        raise BackendUnavailable(f"cross compiler {cross} for {target.name} is not installed; install it with `apt-get install {package}`")
    unsupported = _unsupported_operators(request.source)
    if unsupported:
        raise CompileError(f"the tvm backend cannot compile operator(s) {', '.join(unsupported)} (TVM {tvm.__version__} Relax ONNX frontend); "
                           f"try another backend of {target.name}: {', '.join(b for b in target.backends if b != NAME) or 'none listed'}")
    if request.precision != "fp32":
        raise UserError(f"the tvm backend builds fp32 only, not {request.precision}; use --backend openvino")

    tvm_target = _tvm_target(target)
    if request.tuning_db is not None:
        _check_tuning_db(request.tuning_db)
    try:
        shapes = {s.name: s.shape for s in request.source.inputs}
        mod = from_onnx(request.source.onnx_model, shape_dict=shapes, keep_params_in_input=False)
        mod, tuning = _apply_tuning(mod, tvm_target, request.tuning_db)
        executable = tvm.compile(mod, target=tvm_target)
        fcompile = tvm.support.cc.cross_compiler(cross) if cross else None
        executable.export_library(str(request.out_dir / ENTRY), fcompile=fcompile)
    except UserError:
        raise
    except Exception as e:
        raise CompileError(f"TVM failed to compile the model for {target.name}: {first_line(e)}; try another backend of the target") from None
    options = {"target": _plain(tvm_target.export()), "tuning_db": str(request.tuning_db) if request.tuning_db else None,
               "cross_compiler": cross, "tuning": tuning}
    return CompileResult(format=FORMAT, entry=ENTRY, options=options)


def compile_int8(request: CompileRequest, calibration) -> CompileResult:
    """Refused, with the measurement that says why (bench/int8.py): TVM 0.27's Relax ONNX frontend
    imports ONNX Runtime's QDQ model, but as dequantize → FP32 kernels, so it runs slower than FP32
    (ResNet-18 on 1×64×64, untuned, 2 threads: Relax QDQ 245 ms vs Relax FP32 225 ms in bench/int8.py)."""
    raise UserError("the tvm backend does not build INT8: TVM 0.27's Relax ONNX frontend imports a QDQ model but computes it "
                    "as dequantize + FP32 kernels, slower than FP32 (a ResNet-18 on 1x64x64 here, untuned, 2 threads: "
                    "245-350 ms against 216-225 ms); use --backend openvino or ort with --quantize int8")


def executes_here(target: Target) -> Execution:
    if runs_natively(target):
        return Execution(True, "native")
    if target.isa == host_isa():
        missing = ", ".join(missing_cpu_features(target))
        return Execution(False, reason=f"this machine lacks {missing}; `edgesmith prove` runs the library on a CPU that has them")
    return Execution(False, reason=f"this machine cannot execute {target.isa} code; `edgesmith prove` runs the library on its ISA")


def load(out_dir: Path, result: CompileResult, target: Target) -> Runner:
    import tvm
    from tvm import relax

    library = tvm.runtime.load_module(str(out_dir / result.entry))
    vm = relax.VirtualMachine(library, tvm.cpu())
    main = vm["main"]

    def run(inputs: list[np.ndarray]) -> list[np.ndarray]:
        out = main(*[tvm.runtime.tensor(np.asarray(x, order="C")) for x in inputs])
        outputs = out if isinstance(out, (list, tuple)) or type(out).__name__ == "Array" else [out]
        return [o.numpy() for o in outputs]

    return run
