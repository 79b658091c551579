"""``edgesmith build``: model source → (compile → validate → package + sign) per target.

The reference outputs (ONNX Runtime) are computed once per source; every (target, backend) pair
then compiles into a staging directory, is run on the same samples where this machine can run it,
and is published only when it is within the target's tolerance.
"""

from __future__ import annotations

import datetime as dt
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import Callable

import numpy as np

from edgesmith.runtime.manifest import (BackendInfo, BuildInfo, Executed, Golden, GoldenSample, HostInfo, Manifest,
                                        ModelInfo, Payload, Proof, Quantization, SourceInfo, TensorSpec, Validation)
from edgesmith.toolchain import quantize, reference
from edgesmith.toolchain.backends import get_backend
from edgesmith.toolchain.backends.base import CompileRequest
from edgesmith.toolchain.errors import UserError, ValidationError
from edgesmith.toolchain.monitoring import monitoring_spec
from edgesmith.toolchain.prove import prove
from edgesmith.toolchain.package import file_entries, publish, sign_and_check, staging_dir
from edgesmith.toolchain.signing import SigningKey, ephemeral_key
from edgesmith.toolchain.sources import ModelSource
from edgesmith.toolchain.targets import Precision, Target, host_isa
from edgesmith.toolchain.validate import compare, input_sensitivity, require_input_dependence

GOLDEN_DIR = "golden"


@dataclass
class BuildOptions:
    out_dir: Path
    precision: Precision = "fp32"
    tuning_db: Path | None = None
    samples_path: Path | None = None
    num_samples: int = 8
    allow_constant_output: bool = False
    model_version: str = "1"
    # Golden samples kept in the artifact: the self-test's and proof's cases, and the inputs an agent's
    # synthetic load replays, so they are the samples the monitoring reference was measured on.
    golden_samples: int = 8
    # --quantize int8: calibration/evaluation data and the accuracy gate's bound (toolchain/quantize.py)
    quantize: str | None = None
    calib_path: Path | None = None
    eval_path: Path | None = None
    max_accuracy_drop: float = 1.0


@dataclass
class ReferenceRun:
    """Sample inputs and ONNX Runtime's outputs for them: what every artifact is compared with."""

    samples: list[list[np.ndarray]]
    outputs: list[list[np.ndarray]]
    output_specs: list[TensorSpec]
    sensitivity: float
    version: str
    origin: str = "synthetic N(0,1)"  # where the sample inputs came from (manifest source.samples)
    quantization: "quantize.Plan | None" = None  # --quantize: data, FP32 accuracy, the gate's bound


@dataclass
class BuiltArtifact:
    target: str
    backend: str
    path: Path
    manifest: Manifest
    size_bytes: int
    duration_s: float
    stages: dict[str, float] = field(default_factory=dict)


def run_reference(source: ModelSource, options: BuildOptions) -> ReferenceRun:
    origin = "synthetic N(0,1)"
    if options.samples_path is not None:
        samples = reference.load_samples(options.samples_path, source.inputs)
        origin = f"file:{options.samples_path}"
    elif source.samples:  # real held-out inputs that came with the source (a registered test split)
        samples, origin = source.samples, source.samples_origin
    else:
        if options.num_samples < 2:
            raise UserError("--num-samples must be at least 2, so validation can tell the outputs depend on the input")
        samples = reference.make_samples(source.inputs, options.num_samples)
    model = reference.ReferenceModel(source.onnx_model)
    outputs = [model.run(sample) for sample in samples]
    sensitivity = input_sensitivity(outputs)
    specs = [TensorSpec(name=name, dtype=arr.dtype.name, shape=list(arr.shape))
             for name, arr in zip(model.output_names, outputs[0])]
    plan = None
    if options.quantize:
        plan = quantize.prepare(source, options.quantize, options.calib_path, options.eval_path, options.max_accuracy_drop)
    return ReferenceRun(samples, outputs, specs, sensitivity, reference.version(), origin, plan)


def choose_backends(target: Target, backend: str | None) -> list[str]:
    """The target's default backend, the one asked for, or all of them (``all``)."""
    if backend is None:
        return [target.backends[0]]
    if backend == "all":
        return list(target.backends)
    if backend not in target.backends:
        raise UserError(f"target {target.name} does not list backend {backend!r}; its backends are: {', '.join(target.backends)}")
    return [backend]


def _versions(backend_pkg: str | None) -> dict[str, str]:
    names = ["edgesmith", "numpy", "onnx", "onnxruntime", "torch", "pydantic"]
    if backend_pkg:
        names.append(backend_pkg)
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = dist_version(name)
        except PackageNotFoundError:
            pass
    return versions


def _host_cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _save_golden(staging: Path, ref: ReferenceRun, count: int) -> list[GoldenSample]:
    """The first ``count`` samples and ONNX Runtime's outputs, for self-test and proof on the device."""
    samples = []
    for k in range(min(count, len(ref.samples))):
        folder = f"{GOLDEN_DIR}/sample_{k}"
        (staging / folder).mkdir(parents=True)
        paths: dict[str, list[str]] = {"inputs": [], "outputs": []}
        for kind, arrays in (("input", ref.samples[k]), ("output", ref.outputs[k])):
            for i, array in enumerate(arrays):
                paths[f"{kind}s"].append(f"{folder}/{kind}_{i}.npy")
                np.save(staging / paths[f"{kind}s"][-1], np.ascontiguousarray(array), allow_pickle=False)
        samples.append(GoldenSample(**paths))
    return samples


def _runner(staging: Path, result, backend, target: Target, how: str, public_key: bytes):
    """The device's own Session for payloads the C++ runtime runs natively here; otherwise the
    engine's Python API (an ISA-independent payload checked by this host's build of the engine)."""
    if how == "native" and getattr(backend, "DEVICE_RUNTIME", False):
        from edgesmith.runtime import Session

        return Session(staging, threads=target.threads, trusted_keys=[public_key]).run
    return backend.load(staging, result, target)


def _validate(staging: Path, result, backend, target: Target, ref: ReferenceRun, tolerance, name: str,
              public_key: bytes) -> Validation:
    """Run the staged artifact on the reference samples and compare with ONNX Runtime."""
    execution = backend.executes_here(target)
    common = dict(reference=f"onnxruntime {ref.version}", samples=len(ref.samples), atol=tolerance.atol,
                  rtol=tolerance.rtol, input_sensitivity=ref.sensitivity)
    if not execution.possible:
        return Validation(status="pending-proof", executed=None, max_abs_err=None, max_rel_err=None,
                          top1_agreement=None, reason=execution.reason, **common)
    run = _runner(staging, result, backend, target, execution.how, public_key)
    outputs = [run(sample) for sample in ref.samples]
    cmp = compare(outputs, ref.outputs, [s.name for s in ref.output_specs], tolerance.atol, tolerance.rtol)
    if not cmp.passed:
        raise ValidationError(f"{name}: output {cmp.worst_output!r} differs from ONNX Runtime: {cmp.summary(tolerance.atol, tolerance.rtol)}; "
                              "the backend miscompiles this model, try another backend")
    return Validation(status="passed", executed=Executed(isa=host_isa(), how=execution.how), max_abs_err=cmp.max_abs_err,
                      max_rel_err=cmp.max_rel_err, top1_agreement=cmp.top1_agreement, reason=execution.reason, **common)


def _validate_int8(staging: Path, result, backend, target: Target, ref: ReferenceRun, tolerance, name: str,
                   public_key: bytes) -> tuple[Validation, Quantization, list[list[np.ndarray]]]:
    """INT8 payloads are judged by the task, not element-wise: the accuracy gate on the labelled
    held-out inputs (toolchain/quantize.py), then top-1 agreement with FP32. Returns the payload's
    own outputs for the golden inputs too: they become the golden outputs."""
    execution = backend.executes_here(target)
    if not execution.possible:
        raise UserError(f"{name}: an INT8 artifact must pass the accuracy gate, which runs it, and this machine cannot "
                        f"({execution.reason}); build it on a machine that runs {target.isa} payloads")
    plan = ref.quantization
    run = _runner(staging, result, backend, target, execution.how, public_key)
    record = plan.gate(name, [run(sample) for sample in plan.evaluation.samples()], result.options.get("quantization", backend.NAME))
    golden = [run(sample) for sample in ref.samples]
    cmp = compare(golden, ref.outputs, [s.name for s in ref.output_specs], tolerance.atol, tolerance.rtol)
    validation = Validation(status="passed", executed=Executed(isa=host_isa(), how=execution.how),
                            reference=f"onnxruntime {ref.version} (FP32 model); passed the INT8 accuracy gate",
                            samples=len(plan.evaluation.x), max_abs_err=cmp.max_abs_err, max_rel_err=cmp.max_rel_err,
                            top1_agreement=record.top1_agreement, atol=tolerance.atol, rtol=tolerance.rtol,
                            input_sensitivity=ref.sensitivity,
                            reason="INT8: judged by accuracy and top-1 agreement with FP32 on the evaluation inputs; "
                                   "max_abs_err/max_rel_err are the golden inputs' INT8-vs-FP32 differences, for information")
    return validation, record, golden


def _int8_golden(staging: Path, manifest: Manifest, outputs: list[list[np.ndarray]], tolerance) -> None:
    """Golden outputs of an INT8 artifact are its own outputs here; a device's INT8 kernels may
    round differently, so its self-test allows as much as quantization moved them from FP32."""
    for sample, arrays in zip(manifest.golden.samples, outputs):
        for path, array in zip(sample.outputs, arrays):
            np.save(staging / path, np.ascontiguousarray(array), allow_pickle=False)
    manifest.golden.atol = max(tolerance.atol, float(manifest.validation.max_abs_err or 0.0))
    manifest.files = file_entries(staging)


def build_one(source: ModelSource, ref: ReferenceRun, target: Target, backend_name: str, options: BuildOptions,
              key: SigningKey, status: Callable[[str], None] = lambda _: None) -> BuiltArtifact:
    """Compile, validate, prove, package and sign one artifact; nothing is left on disk if any step fails.

    The device code that validates and proves it (Session, edgesmith-run) refuses unsigned
    artifacts, so the staging directory is first signed with a throwaway key that exists only in
    this process; ``key`` signs the manifest once, at the end, after validation and proof passed.
    """
    started = time.perf_counter()
    backend = get_backend(backend_name)
    backend_version = backend.version()
    tolerance = target.tolerance_for(options.precision)
    require_input_dependence(ref.outputs, tolerance.atol, tolerance.rtol, options.allow_constant_output)
    name = f"{source.name}-{target.name}-{backend_name}"
    final = options.out_dir / name
    stages: dict[str, float] = {}
    with staging_dir(final) as staging, tempfile.TemporaryDirectory(prefix="edgesmith-") as work:
        status(f"{name}: compiling with {backend_name} {backend_version}")
        t0 = time.perf_counter()
        request = CompileRequest(source=source, target=target, precision=options.precision, out_dir=staging,
                                 work_dir=Path(work), tuning_db=options.tuning_db)
        if ref.quantization is not None:
            compile_int8 = getattr(backend, "compile_int8", None)
            if compile_int8 is None:
                raise UserError(f"the {backend_name} backend has no INT8 path; use --backend openvino or ort with --quantize int8")
            status(f"{name}: quantizing to INT8 on {len(ref.quantization.calibration.x)} calibration samples")
            result = compile_int8(request, ref.quantization.calibration)
        else:
            result = backend.compile(request)
        stages["compile_s"] = time.perf_counter() - t0
        # Held-out real inputs are all kept as golden samples, so an agent's synthetic load replays
        # exactly what the monitoring reference was measured on.
        golden = _save_golden(staging, ref, len(ref.samples) if ref.origin.startswith("registry:") else options.golden_samples)
        manifest = Manifest(
            name=name,
            model=ModelInfo(name=source.name, version=source.registry.version if source.registry else options.model_version,
                            source=SourceInfo(kind=source.kind, ref=source.ref, sha256=source.sha256, samples=ref.origin,
                                              **_lineage(source)),
                            onnx_sha256=source.onnx_sha256, opset=source.opset),
            target=target.spec(),
            backend=BackendInfo(name=backend_name, version=backend_version, options=result.options,
                                precision="int8" if ref.quantization is not None else options.precision),
            payload=Payload(format=result.format, entry=result.entry),
            files=file_entries(staging),
            inputs=source.inputs,
            outputs=ref.output_specs,
            golden=Golden(samples=golden, atol=tolerance.atol, rtol=tolerance.rtol),
            monitoring=monitoring_spec(ref.output_specs, ref.outputs),
            validation=Validation(status="pending-proof", reference=f"onnxruntime {ref.version}", executed=None,
                                  samples=0, max_abs_err=None, max_rel_err=None, top1_agreement=None,
                                  atol=tolerance.atol, rtol=tolerance.rtol, input_sensitivity=ref.sensitivity),
            proof=Proof(status="not-run", isa=target.isa, reason="not run yet"),
            build=BuildInfo(created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), duration_s=0.0,
                            host=HostInfo(isa=host_isa(), cpu=_host_cpu(), os=sys.platform),
                            toolchain=_versions(backend.PACKAGE)),
        )
        staging_key = ephemeral_key()
        sign_and_check(staging, manifest, staging_key)

        t0 = time.perf_counter()
        if ref.quantization is not None:
            status(f"{name}: INT8 accuracy gate on {len(ref.quantization.evaluation.x)} held-out samples")
            manifest.validation, manifest.quantization, int8_golden = _validate_int8(
                staging, result, backend, target, ref, tolerance, name, staging_key.public_key)
            _int8_golden(staging, manifest, int8_golden, tolerance)
            sign_and_check(staging, manifest, staging_key)
        else:
            status(f"{name}: validating on {len(ref.samples)} samples against ONNX Runtime")
            manifest.validation = _validate(staging, result, backend, target, ref, tolerance, name, staging_key.public_key)
        stages["validate_s"] = time.perf_counter() - t0

        if getattr(backend, "DEVICE_RUNTIME", False):
            status(f"{name}: proving on {target.isa} with edgesmith-run")
            t0 = time.perf_counter()
            manifest.proof = prove(staging, target, backend_name, [staging_key.public_key])
            stages["prove_s"] = time.perf_counter() - t0
            if manifest.proof.status == "failed":
                raise ValidationError(f"{name}: the device runtime's run on {target.isa} ({manifest.proof.how}) failed: {manifest.proof.reason}")
        else:
            manifest.proof = Proof(status="not-run", isa=target.isa, reason=f"the C++ runtime does not run {result.format} payloads")

        duration = time.perf_counter() - started
        manifest.build.duration_s = round(duration, 3)
        sign_and_check(staging, manifest, key)
        size = sum(f.size for f in manifest.files)
        publish(staging, final)
    built = BuiltArtifact(target=target.name, backend=backend_name, path=final, manifest=manifest, size_bytes=size,
                          duration_s=duration, stages=stages)
    if source.registry is not None:
        _log_build(source, built, key, getattr(backend, "DEVICE_RUNTIME", False), status)
    return built


def _lineage(source: ModelSource) -> dict:
    version = source.registry
    if version is None:
        return {}
    return {"model_uri": version.uri, "run_id": version.run_id, "dataset_digest": version.dataset_digest}


def _log_build(source: ModelSource, built: BuiltArtifact, key: SigningKey, device_runtime: bool, status) -> None:
    """Record the published artifact in MLflow, linked to its model version. The artifact is already
    complete and signed, so a tracking failure is reported, not turned into a build failure."""
    from edgesmith.toolchain.registry import log_build

    status(f"{built.manifest.name}: logging the build to MLflow")
    try:
        run_id = log_build(source.registry, built, key.public_key, device_runtime)
        if built.manifest.quantization is not None:
            _log_quantization(source.registry.tracking_uri, run_id, built.manifest.quantization)
    except Exception as e:
        print(f"warning: {built.manifest.name} was built, but logging it to MLflow failed ({type(e).__name__}: "
              f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})", file=sys.stderr)


def _log_quantization(tracking_uri: str, run_id: str, q: Quantization) -> None:
    """The INT8 gate's figures and calibration data on the build's MLflow run."""
    from edgesmith.toolchain.train import tracking

    client = tracking.connect(tracking_uri)
    for key, value in (("fp32_accuracy", q.fp32_accuracy), ("int8_accuracy", q.int8_accuracy),
                       ("accuracy_drop", q.accuracy_drop), ("int8_top1_agreement", q.top1_agreement),
                       ("calibration_samples", q.calibration.samples), ("evaluation_samples", q.evaluation.samples)):
        client.log_metric(run_id, key, value)
    for key, value in (("quantization", q.scheme), ("quantization_method", q.method),
                       ("max_accuracy_drop", q.max_accuracy_drop), ("calibration_sha256", q.calibration.sha256),
                       ("calibration_origin", q.calibration.origin), ("evaluation_origin", q.evaluation.origin)):
        client.log_param(run_id, key, value)
