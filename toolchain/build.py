"""``edgesmith build``: model source → (compile → validate → package + sign) per target.

The reference outputs (ONNX Runtime) are computed once per source; every candidate of a target (a
backend x precision pair) then compiles into a staging directory, is run on the same samples where
this machine can run it, and is published only when it is within the target's tolerance (fp32) or
the accuracy budget (bf16, fp16, int8; toolchain/accuracy.py). Which candidate is published is
toolchain/selection.py's rule.
"""

from __future__ import annotations

import datetime as dt
import math
import platform
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import Callable, Literal

import numpy as np

from edgesmith.runtime.errors import Error as RuntimeErrorBase
from edgesmith.runtime.manifest import (AccuracyGate, BackendInfo, BuildInfo, Executed, Golden, GoldenSample, HostInfo,
                                        Manifest, ModelInfo, Payload, Proof, Quantization, Selection, SourceInfo, TensorSpec,
                                        Validation)
from edgesmith.toolchain import accuracy, reference
from edgesmith.toolchain.backends import get_backend
from edgesmith.toolchain.backends.base import CompileRequest, Execution
from edgesmith.toolchain.errors import BackendUnavailable, CompileError, UserError, ValidationError, first_line
from edgesmith.toolchain.monitoring import monitoring_spec
from edgesmith.toolchain.prove import prove, run_batch, runner_for
from edgesmith.toolchain.package import file_entries, publish, sign_and_check, staging_dir
from edgesmith.toolchain.signing import SigningKey, ephemeral_key
from edgesmith.toolchain.sources import ModelSource, tensor_spec
from edgesmith.toolchain.selection import RULE, Candidate, label, select, serving_latency_us, time_candidates
from edgesmith.toolchain.targets import FLOAT_REDUCED, PRECISIONS, Target, host_isa, missing_cpu_features
from edgesmith.toolchain.validate import compare, input_sensitivity, require_input_dependence

GOLDEN_DIR = "golden"


@dataclass
class BuildOptions:
    out_dir: Path
    # "auto": every precision the target lists is a candidate behind the accuracy budget (the CLI's
    # default); one precision forces it (the Python API's default is fp32)
    precision: str = "fp32"
    tuning_db: Path | None = None
    samples_path: Path | None = None
    num_samples: int = 8
    allow_constant_output: bool = False
    model_version: str = "1"
    # Golden samples kept in the artifact: the self-test's and proof's cases, and the inputs an agent's
    # synthetic load replays, so they are the samples the monitoring reference was measured on.
    golden_samples: int = 8
    # --quantize int8 is --precision int8; calibration/evaluation data and the accuracy budget
    # (toolchain/accuracy.py)
    quantize: str | None = None
    calib_path: Path | None = None
    eval_path: Path | None = None
    max_accuracy_drop: float = accuracy.DEFAULT_MAX_DROP
    min_agreement: float = accuracy.DEFAULT_MIN_AGREEMENT

    def __post_init__(self) -> None:
        if self.quantize is not None:
            if self.quantize != "int8":
                raise UserError(f"--quantize {self.quantize!r} is not known; use int8 (the same as --precision int8)")
            if self.precision not in ("auto", "fp32", "int8"):
                raise UserError(f"--quantize int8 is --precision int8; drop --precision {self.precision}")
            self.precision = "int8"
        if self.precision != "auto" and self.precision not in PRECISIONS:
            raise UserError(f"--precision {self.precision!r} is not known; use auto, {', '.join(PRECISIONS)}")
        if not (0.0 <= self.min_agreement <= 1.0):  # NaN fails too
            raise UserError(f"--min-agreement {self.min_agreement} is not a share; give e.g. 0.99")
        if not math.isfinite(self.max_accuracy_drop):
            raise UserError(f"--max-accuracy-drop {self.max_accuracy_drop} is not a number of points; give e.g. 1.0")

    @property
    def budget(self) -> accuracy.Budget:
        return accuracy.Budget(self.max_accuracy_drop, self.min_agreement)


@dataclass
class ReferenceRun:
    """Sample inputs and ONNX Runtime's outputs for them: what every artifact is compared with."""

    samples: list[list[np.ndarray]]
    outputs: list[list[np.ndarray]]
    output_specs: list[TensorSpec]
    sensitivity: float
    version: str
    origin: str = "synthetic N(0,1)"  # where the sample inputs came from (manifest source.samples)
    data: accuracy.Data | None = None  # reduced precisions: calibration, the gate sets, what is left out


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
        samples = reference.load_samples(options.samples_path, source.inputs, 1 if options.allow_constant_output else 2)
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
    specs = [tensor_spec(name, arr.dtype.name if arr.dtype.kind != "O" else "string", list(arr.shape), "output", source.ref)
             for name, arr in zip(model.output_names, outputs[0])]
    data = None
    if options.precision != "fp32":
        data = accuracy.prepare(source, samples, outputs, origin, options.calib_path, options.eval_path, options.budget,
                                need_int8=options.precision == "int8")
    elif options.calib_path or options.eval_path:
        raise UserError("--calib and --eval are data for the accuracy budget of reduced precisions; drop them, or "
                        "use --precision auto (or bf16, fp16, int8)")
    return ReferenceRun(samples, outputs, specs, sensitivity, reference.version(), origin, data)


Mode = Literal["auto", "all", "forced"]


@dataclass
class BackendPlan:
    """Which candidates (backend x precision) a build tries for a target, and what it publishes:
    ``auto`` the best one (docs/selection.md), ``all`` every one that passes, ``forced`` the one
    asked for (one backend at one precision)."""

    mode: Mode
    backends: list[str]
    precisions: list[str] = field(default_factory=lambda: ["fp32"])
    left_out: dict[str, str] = field(default_factory=dict)  # precisions the target lists but this build cannot try

    def candidates(self) -> list[tuple[str, str]]:
        """(backend, precision) pairs, precision by precision in the target's order; a backend is a
        candidate at the precisions it builds (``PRECISIONS``), except a forced pair, which is tried
        as asked so its backend says why it cannot."""
        if self.mode == "forced":
            return [(self.backends[0], self.precisions[0])]
        return [(b, p) for p in self.precisions for b in self.backends if p in get_backend(b).PRECISIONS]


def choose_backends(target: Target, backend: str | None, precision: str = "fp32",
                    data: accuracy.Data | None = None) -> BackendPlan:
    """``auto`` (the default), ``all``, or one backend the target lists; at ``precision``, or at
    every precision the target lists (``auto``) that the build's data allows."""
    if backend not in (None, "auto", "all") and backend not in target.backends:
        raise UserError(f"target {target.name} does not list backend {backend!r}; its backends are: "
                        f"{', '.join(target.backends)} (or use auto or all)")
    left_out: dict[str, str] = {}
    if precision == "auto":
        precisions = []
        for p in target.precisions:
            why = (data.left_out.get(p) if data is not None else None) if p != "fp32" else None
            if why:
                left_out[p] = why
            else:
                precisions.append(p)
    else:
        target.check_precision(precision)
        precisions = [precision]
    backends = list(target.backends) if backend in (None, "auto", "all") else [backend]
    mode: Mode = "all" if backend == "all" else "auto"
    if backend not in (None, "auto", "all"):
        supported = [p for p in precisions if p in get_backend(backend).PRECISIONS]
        if precision != "auto" or len(supported) <= 1:
            mode, precisions = "forced", (supported or precisions)[:1]
        else:
            precisions = supported
    plan = BackendPlan(mode, backends, precisions, left_out)
    if not plan.candidates():
        raise UserError(f"no backend of target {target.name} ({', '.join(target.backends)}) builds {precision}; pick "
                        "another --precision, or a target one of whose backends builds it")
    return plan


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
                np.save(staging / paths[f"{kind}s"][-1], np.asarray(array, order="C"), allow_pickle=False)
        samples.append(GoldenSample(**paths))
    return samples


def _gate_target(backend, target: Target) -> Target | None:
    """The target whose qemu runner executes a bf16/fp16 gate: the target itself when its artifacts
    are proven under qemu; for an ISA-independent payload the C++ runtime runs (a LiteRT flatbuffer)
    on an aarch64 target with no userland here (Android), the same target proven by the Linux aarch64
    runtime, which runs the same plugin and kernels on an emulated core with the arithmetic."""
    if not getattr(backend, "DEVICE_RUNTIME", False) or target.isa != "aarch64":
        return None
    if target.proof == "qemu-aarch64":
        return target
    if getattr(backend, "PORTABLE_PAYLOAD", False):
        return target.model_copy(update={"proof": "qemu-aarch64"})
    return None


def _runner(staging: Path, result, backend, target: Target, how: str, public_key: bytes):
    """The device's own Session for payloads the C++ runtime runs natively here; the device runtime
    under qemu for a reduced-precision gate of another ISA (:func:`_emulated`); otherwise the
    engine's Python API (an ISA-independent payload checked by this host's build of the engine)."""
    if how == "qemu-aarch64":
        return _emulated(staging, _gate_target(backend, target) or target, public_key)
    if how == "native" and getattr(backend, "DEVICE_RUNTIME", False):
        from edgesmith.runtime import Session

        return Session(staging, threads=target.threads, trusted_keys=[public_key]).run
    return backend.load(staging, result, target)


class _emulated:
    """Runs samples through ``edgesmith-run --batch`` under qemu, in one process per batch: called
    one sample at a time it would load the engine under emulation once per sample. ``batch`` is
    what the gate calls; calling it with one sample works too."""

    def __init__(self, staging: Path, target: Target, public_key: bytes):
        self.staging, self.target, self.keys = staging, target, [public_key]

    def batch(self, samples: list[list[np.ndarray]]) -> list[list[np.ndarray]]:
        runner, why = runner_for(self.target)
        if runner is None:
            raise UserError(f"{self.staging.name}: cannot run {self.target.isa} code here ({why})")
        return run_batch(self.staging, runner, self.keys, samples)

    def __call__(self, sample: list[np.ndarray]) -> list[np.ndarray]:
        return self.batch([sample])[0]


def _run_all(run, samples: list[list[np.ndarray]]) -> list[list[np.ndarray]]:
    return run.batch(samples) if hasattr(run, "batch") else [run(sample) for sample in samples]


def _validate(staging: Path, result, backend, target: Target, ref: ReferenceRun, tolerance, name: str,
              public_key: bytes) -> Validation:
    """Run the staged artifact on the reference samples and compare with ONNX Runtime."""
    execution = backend.executes_here(target)
    common = dict(reference=f"onnxruntime {ref.version}", samples=len(ref.samples), atol=tolerance.atol,
                  rtol=tolerance.rtol, input_sensitivity=ref.sensitivity)
    if not execution.possible:
        return Validation(status="pending-proof", executed=None, max_abs_err=None, max_rel_err=None,
                          top1_agreement=None, reason=execution.reason, **common)
    try:
        run = _runner(staging, result, backend, target, execution.how, public_key)
        outputs = [run(sample) for sample in ref.samples]
    except RuntimeErrorBase as e:  # the device runtime's own sentence (e.g. a converter changed an output's dtype)
        raise ValidationError(f"{name}: the device runtime cannot run what the {backend.NAME} backend produced ({first_line(e)}); "
                              "try another backend") from None
    cmp = compare(outputs, ref.outputs, [s.name for s in ref.output_specs], tolerance.atol, tolerance.rtol)
    if not cmp.passed:
        raise ValidationError(f"{name}: output {cmp.worst_output!r} differs from ONNX Runtime: {cmp.summary(tolerance.atol, tolerance.rtol)}; "
                              "the backend miscompiles this model, try another backend")
    return Validation(status="passed", executed=Executed(isa=host_isa(), how=execution.how), max_abs_err=cmp.max_abs_err,
                      max_rel_err=cmp.max_rel_err, top1_agreement=cmp.top1_agreement, reason=execution.reason, **common)


def _gate_execution(backend, target: Target, precision: str):
    """How this machine runs a reduced-precision candidate for its accuracy gate, or BackendUnavailable
    (the candidate is skipped) when nothing here runs its arithmetic: a bf16/fp16 payload in an
    engine on a CPU without that arithmetic silently computes in f32, so its gate would prove nothing."""
    execution = backend.executes_here(target)
    if precision in FLOAT_REDUCED and execution.how != "native":
        # The device runtime under qemu, emulating a core that has the arithmetic, is the only honest
        # place left: it runs the payload's own kernels.
        emulated = _gate_target(backend, target)
        if emulated is not None:
            runner, why = runner_for(emulated)
            if runner is not None and runner.how == "qemu-aarch64":
                return Execution(True, "qemu-aarch64")
        why = (f"this machine lacks {', '.join(missing_cpu_features(target))}" if target.isa == host_isa()
               else f"this machine runs {host_isa()}, not {target.isa}, and cannot emulate it")
        raise BackendUnavailable(f"the {precision} candidate's accuracy cannot be measured here ({why}, and an engine "
                                 f"without {precision} arithmetic computes in f32); build on a machine with "
                                 f"{', '.join(target.precision_features.get(precision, []))}")
    if not execution.possible:
        raise BackendUnavailable(f"a {precision} artifact must pass the accuracy budget, which runs it, and this machine "
                                 f"cannot ({execution.reason}); build it on a machine that runs {target.isa} payloads")
    return execution


def _validate_reduced(staging: Path, result, backend, target: Target, precision: str, ref: ReferenceRun, tolerance,
                      name: str, public_key: bytes) -> tuple[Validation, AccuracyGate, list[list[np.ndarray]]]:
    """A bf16, fp16 or int8 payload is judged by the accuracy budget against the FP32 model
    (toolchain/accuracy.py), not element-wise. Returns the payload's own outputs for the golden
    inputs too: they become the golden outputs."""
    execution = _gate_execution(backend, target, precision)
    data = ref.data
    gate_set = data.gate_for(precision)
    run = _runner(staging, result, backend, target, execution.how, public_key)
    names = [s.name for s in ref.output_specs]
    same = gate_set.samples is ref.samples
    gate_outputs = _run_all(run, gate_set.samples if same else [*gate_set.samples, *ref.samples])
    gate_outputs, golden = (gate_outputs, gate_outputs) if same else (gate_outputs[:len(gate_set.samples)],
                                                                      gate_outputs[len(gate_set.samples):])
    gate = gate_set.judge(name, precision, gate_outputs, data.budget, target.tolerance_for(precision).rtol, names,
                          execution.how, data.calibration if precision == "int8" else None)
    cmp = compare(golden, ref.outputs, names, tolerance.atol, tolerance.rtol)
    ran_on = target.isa if execution.how == "qemu-aarch64" else host_isa()  # the emulated ISA under qemu
    validation = Validation(status="passed", executed=Executed(isa=ran_on, how=execution.how),
                            reference=f"onnxruntime {ref.version} (FP32 model); passed the {precision} accuracy budget",
                            samples=len(gate_set.samples), max_abs_err=cmp.max_abs_err, max_rel_err=cmp.max_rel_err,
                            top1_agreement=gate.top1_agreement, atol=tolerance.atol, rtol=tolerance.rtol,
                            input_sensitivity=ref.sensitivity,
                            reason=f"{precision}: judged by the accuracy budget ({accuracy.summary(gate)}); "
                                   f"max_abs_err/max_rel_err are the golden inputs' {precision}-vs-FP32 differences, "
                                   "for information")
    return validation, gate, golden


def _own_golden(staging: Path, manifest: Manifest, outputs: list[list[np.ndarray]], tolerance) -> None:
    """Golden outputs of a reduced-precision artifact are its own outputs here; a device's kernels
    may round differently, so its self-test allows as much as the precision moved them from FP32."""
    for sample, arrays in zip(manifest.golden.samples, outputs):
        for path, array in zip(sample.outputs, arrays):
            np.save(staging / path, np.asarray(array, order="C"), allow_pickle=False)
    manifest.golden.atol = max(tolerance.atol, float(manifest.validation.max_abs_err or 0.0))
    manifest.files = file_entries(staging)


@dataclass
class StagedArtifact:
    """A candidate compiled, validated and proven in its hidden staging directory, signed with the
    build's throwaway staging key; :func:`finish` signs it with the real key and publishes it."""

    target: Target
    backend: str
    path: Path  # the staging directory, beside ``final``
    final: Path
    manifest: Manifest
    staging_key: SigningKey
    device_runtime: bool
    duration_s: float
    stages: dict[str, float]
    precision: str = "fp32"

    @property
    def label(self) -> str:
        return label(self.backend, self.precision)


def stage_one(source: ModelSource, ref: ReferenceRun, target: Target, backend_name: str, options: BuildOptions,
              stack: ExitStack, status: Callable[[str], None] = lambda _: None,
              precision: str | None = None) -> StagedArtifact:
    """Compile, validate and prove one candidate (``backend_name`` at ``precision``, default the
    options' forced one) in a staging directory that ``stack`` removes when it closes (unless it was
    published first); if any step fails it is removed at once.

    A reduced-precision candidate's target is ``target.for_precision(precision)``: the manifest then
    names the CPU features its arithmetic needs, and the device refuses it on a CPU without them.

    The device code that validates and proves it (Session, edgesmith-run) refuses unsigned
    artifacts, so the staging directory is signed with a throwaway key that exists only in this
    process; :func:`finish` signs the manifest with the real key after every check passed.
    """
    started = time.perf_counter()
    precision = precision or (options.precision if options.precision != "auto" else "fp32")
    backend = get_backend(backend_name)
    backend_version = backend.version()
    tolerance = target.tolerance_for("fp32")  # element-wise against ONNX Runtime; reduced precisions have the budget
    require_input_dependence(ref.outputs, tolerance.atol, tolerance.rtol, options.allow_constant_output)
    reduced = precision != "fp32"
    target.check_precision(precision)
    if reduced and ref.data is None:
        raise UserError(f"a {precision} candidate needs the accuracy budget's data; build with --precision {precision} or auto")
    target = target.for_precision(precision)
    if reduced and (precision != "int8" or hasattr(backend, "compile_int8")):
        _gate_execution(backend, target, precision)  # before compiling: skipped at once when nothing here runs it
    # The name says what the artifact is: a reduced precision never takes (and never replaces) the
    # FP32 artifact's directory.
    name = f"{source.name}-{target.name}-{backend_name}" + (f"-{precision}" if reduced else "")
    final = options.out_dir / name
    stages: dict[str, float] = {}
    with ExitStack() as own:
        staging = own.enter_context(staging_dir(final))
        work = own.enter_context(tempfile.TemporaryDirectory(prefix="edgesmith-"))
        status(f"{name}: compiling with {backend_name} {backend_version}")
        t0 = time.perf_counter()
        request = CompileRequest(source=source, target=target, precision=precision, out_dir=staging,
                                 work_dir=Path(work), tuning_db=options.tuning_db)
        if precision == "int8":
            compile_int8 = getattr(backend, "compile_int8", None)
            if compile_int8 is None:
                raise UserError(f"the {backend_name} backend has no INT8 path; use --backend openvino or ort with --precision int8")
            status(f"{name}: quantizing to INT8 on {len(ref.data.calibration.x)} calibration samples")
            result = compile_int8(request, ref.data.calibration)
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
                                precision=precision),
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
        if reduced:
            gate_set = ref.data.gate_for(precision)
            status(f"{name}: {precision} accuracy budget on {gate_set.describe()}")
            manifest.validation, manifest.accuracy, own_golden = _validate_reduced(
                staging, result, backend, target, precision, ref, tolerance, name, staging_key.public_key)
            if precision == "int8":
                manifest.quantization = accuracy.quantization_record(
                    manifest.accuracy, ref.data.calibration, gate_set, result.options.get("quantization", backend.NAME))
            _own_golden(staging, manifest, own_golden, tolerance)
            sign_and_check(staging, manifest, staging_key)
        else:
            status(f"{name}: validating on {len(ref.samples)} samples against ONNX Runtime")
            manifest.validation = _validate(staging, result, backend, target, ref, tolerance, name, staging_key.public_key)
        stages["validate_s"] = time.perf_counter() - t0

        device_runtime = bool(getattr(backend, "DEVICE_RUNTIME", False))
        if device_runtime:
            status(f"{name}: proving on {target.isa} with edgesmith-run")
            t0 = time.perf_counter()
            manifest.proof = prove(staging, target, backend_name, [staging_key.public_key])
            stages["prove_s"] = time.perf_counter() - t0
            if manifest.proof.status == "failed":
                raise ValidationError(f"{name}: the device runtime's run on {target.isa} ({manifest.proof.how}) failed: {manifest.proof.reason}")
        else:
            manifest.proof = Proof(status="not-run", isa=target.isa, reason=f"the C++ runtime does not run {result.format} payloads")
        staged = StagedArtifact(target=target, backend=backend_name, path=staging, final=final, manifest=manifest,
                                staging_key=staging_key, device_runtime=device_runtime,
                                duration_s=time.perf_counter() - started, stages=stages, precision=precision)
        stack.enter_context(own.pop_all())  # the work directory goes with the staging one, when the caller is done
    return staged


def finish(source: ModelSource, staged: StagedArtifact, key: SigningKey, latency_us: float | None,
           selection: Selection | None, status: Callable[[str], None] = lambda _: None) -> BuiltArtifact:
    """Record the measured latencies and the selection, sign with the real key, publish atomically."""
    manifest = staged.manifest
    manifest.build.latency_us = latency_us  # set even when None: new manifests say "not measured" explicitly
    manifest.build.serving_latency_us = serving_latency_us(staged, status) if latency_us is not None else None
    manifest.selection = selection
    manifest.build.duration_s = round(staged.duration_s, 3)
    sign_and_check(staged.path, manifest, key)
    size = sum(f.size for f in manifest.files)
    publish(staged.path, staged.final)
    built = BuiltArtifact(target=staged.target.name, backend=staged.backend, path=staged.final, manifest=manifest,
                          size_bytes=size, duration_s=staged.duration_s, stages=staged.stages)
    if source.registry is not None:
        _log_build(source, built, status)
    return built


def build_one(source: ModelSource, ref: ReferenceRun, target: Target, backend_name: str, options: BuildOptions,
              key: SigningKey, status: Callable[[str], None] = lambda _: None) -> BuiltArtifact:
    """Compile, validate, prove, time (where this machine runs it), package and sign one artifact;
    nothing is left on disk if any step fails."""
    with ExitStack() as stack:
        staged = stage_one(source, ref, target, backend_name, options, stack, status)
        timing = time_candidates([staged], status).get(staged.label)
        return finish(source, staged, key, timing.p50_us if timing else None, None, status)


def error_message(e: Exception) -> str:
    """One sentence for a candidate that failed: the user error, or an internal one to report."""
    if isinstance(e, UserError):
        return str(e)
    return (f"internal error in edgesmith ({type(e).__name__}: {first_line(e)}); nothing was written for this "
            "pair, please report it with the model")


@dataclass
class TargetBuild:
    """What building one target produced: every candidate, the published artifacts, the choice."""

    target: str
    mode: Mode
    candidates: list[Candidate]
    artifacts: list[BuiltArtifact] = field(default_factory=list)
    best: Candidate | None = None  # the rule's pick
    errors: list[tuple[str, str]] = field(default_factory=list)  # (candidate label, error) that fail the build
    left_out: dict[str, str] = field(default_factory=dict)  # precisions the target lists that were not tried, and why

    @property
    def chosen(self) -> str | None:
        return self.best.backend if self.best else None

    @property
    def chosen_precision(self) -> str | None:
        return self.best.precision if self.best else None

    @property
    def reason(self) -> str | None:
        return self.best.reason if self.best else None

    def selection(self) -> Selection | None:
        if self.mode == "forced" or self.best is None:
            return None
        return Selection(mode=self.mode, rule=RULE, chosen=self.chosen, chosen_precision=self.chosen_precision,
                         reason=self.reason, candidates=[c.record() for c in self.candidates])


def build_target(source: ModelSource, ref: ReferenceRun, target: Target, plan: BackendPlan, options: BuildOptions,
                 key: SigningKey, status: Callable[[str], None] = lambda _: None) -> TargetBuild:
    """Stage every candidate of ``plan``, time the ones this machine runs natively, choose, and
    publish: the chosen one (``auto``), every passing one (``all``) or the one asked for (``forced``).
    Candidates not published leave nothing behind: their staging directories go when this returns."""
    tolerance = target.tolerance_for("fp32")
    # the model's problem, not a backend's: one error rather than one per candidate
    require_input_dependence(ref.outputs, tolerance.atol, tolerance.rtol, options.allow_constant_output)
    result = TargetBuild(target=target.name, mode=plan.mode, candidates=[], left_out=dict(plan.left_out))
    with ExitStack() as stack:
        for backend, precision in plan.candidates():
            try:
                staged = stage_one(source, ref, target, backend, options, stack, status, precision=precision)
                result.candidates.append(Candidate(backend, "passed", staged=staged, precision=precision))
            except KeyboardInterrupt:
                raise
            except BackendUnavailable as e:
                result.candidates.append(Candidate(backend, "skipped", error=error_message(e), precision=precision))
            except Exception as e:  # one failing candidate must not stop the others
                result.candidates.append(Candidate(backend, "failed", error=error_message(e) + _coverage_note(source, backend, e),
                                                   precision=precision))
        _time(result.candidates, status)
        passed = [c for c in result.candidates if c.status == "passed"]
        result.best = select(target, result.candidates)
        # A failed candidate fails an `all` or forced build; a skipped one (its backend is not installed,
        # or nothing here can run its precision's gate) is a note unless it was the one asked for.
        if plan.mode == "forced" or not passed:
            result.errors = [(c.label, c.error or "") for c in result.candidates if c.status != "passed"]
        elif plan.mode == "all":
            result.errors = [(c.label, c.error or "") for c in result.candidates if c.status == "failed"]
        if plan.mode == "auto":
            _publish_best(source, target, result, key, status)
            return result
        selection = result.selection()
        for c in passed:
            try:
                result.artifacts.append(finish(source, c.staged, key, c.timing.p50_us if c.timing else None,
                                               selection, status))
            except KeyboardInterrupt:
                raise
            except Exception as e:
                result.errors.append((c.label, error_message(e)))
    return result


def _coverage_note(source: ModelSource, backend: str, error: Exception) -> str:
    """A candidate dropped because it cannot compile the model: the pre-flight check's line for its
    backend (what `edgesmith check` says), so the build names the operators and their conditions."""
    if not isinstance(error, CompileError):
        return ""
    from edgesmith.toolchain import coverage

    try:
        report = coverage.check_backend(source.onnx_model, backend)
    except Exception:  # the check is advice; the candidate's own error stands
        return ""
    return f" (edgesmith check: {report.summary()})" if report.gaps else ""


def _time(candidates: list[Candidate], status: Callable[[str], None]) -> None:
    """Time the passing candidates together (blocks rotating among them); if that fails, each on its
    own, so one candidate whose timing fails is marked failed instead of losing all of them."""
    passed = [c for c in candidates if c.status == "passed"]
    try:
        timings = time_candidates([c.staged for c in passed], status)
    except KeyboardInterrupt:
        raise
    except Exception:
        timings = {}
        for c in passed:
            try:
                timings.update(time_candidates([c.staged], status))
            except KeyboardInterrupt:
                raise
            except Exception as e:
                c.status, c.error = "failed", f"timing it through the device runtime failed: {error_message(e)}"
    for c in passed:
        c.timing = timings.get(c.label)
        if c.timing is not None:
            c.staged.duration_s += c.timing.seconds


def _publish_best(source: ModelSource, target: Target, result: TargetBuild, key: SigningKey,
                  status: Callable[[str], None]) -> None:
    """``auto``: publish the chosen candidate; if finishing it fails, mark it failed and publish the
    next one the rule picks, so a late failure of the best never costs a build that had another."""
    while result.best is not None:
        chosen = result.best
        try:
            result.artifacts.append(finish(source, chosen.staged, key, chosen.timing.p50_us if chosen.timing else None,
                                           result.selection(), status))
            return
        except KeyboardInterrupt:
            raise
        except Exception as e:
            chosen.status, chosen.error, chosen.timing, chosen.reason = "failed", error_message(e), None, None
            result.best = select(target, result.candidates)
    result.errors = [(c.label, c.error or "") for c in result.candidates if c.status != "passed"]


def _lineage(source: ModelSource) -> dict:
    version = source.registry
    if version is None:
        return {}
    return {"model_uri": version.uri, "run_id": version.run_id, "dataset_digest": version.dataset_digest}


def _log_build(source: ModelSource, built: BuiltArtifact, status) -> None:
    """Record the published artifact in MLflow, linked to its model version. The artifact is already
    complete and signed, so a tracking failure is reported, not turned into a build failure."""
    from edgesmith.toolchain.registry import log_build

    status(f"{built.manifest.name}: logging the build to MLflow")
    try:
        run_id = log_build(source.registry, built)
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
