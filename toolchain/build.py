"""``edgesmith build``: model source → (compile → validate → package + sign) per target.

The reference outputs (ONNX Runtime) are computed once per source; every (target, backend) pair
then compiles into a staging directory, is run on the same samples where this machine can run it,
and is published only when it is within the target's tolerance.
"""

from __future__ import annotations

import datetime as dt
import platform
import statistics
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

from edgesmith.runtime.manifest import (BackendInfo, BuildInfo, Executed, Golden, GoldenSample, HostInfo, Manifest,
                                        ModelInfo, Payload, Proof, Quantization, Selection, SelectionCandidate, SourceInfo,
                                        TensorSpec, Validation)
from edgesmith.toolchain import quantize, reference
from edgesmith.toolchain.backends import get_backend
from edgesmith.toolchain.backends.base import CompileRequest
from edgesmith.toolchain.errors import BackendUnavailable, UserError, ValidationError, first_line
from edgesmith.toolchain.monitoring import monitoring_spec
from edgesmith.toolchain.prove import prove
from edgesmith.toolchain.package import file_entries, publish, sign_and_check, staging_dir
from edgesmith.toolchain.signing import SigningKey, ephemeral_key
from edgesmith.toolchain.sources import ModelSource
from edgesmith.toolchain.targets import Precision, Target, host_isa, missing_cpu_features
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


Mode = Literal["auto", "all", "forced"]


@dataclass
class BackendPlan:
    """Which of a target's backends a build tries, and what it publishes: ``auto`` the best one
    (docs/selection.md), ``all`` every one that passes, ``forced`` the one asked for."""

    mode: Mode
    backends: list[str]


def choose_backends(target: Target, backend: str | None) -> BackendPlan:
    """``auto`` (the default), ``all``, or one backend the target lists."""
    if backend is None or backend == "auto":
        return BackendPlan("auto", list(target.backends))
    if backend == "all":
        return BackendPlan("all", list(target.backends))
    if backend not in target.backends:
        raise UserError(f"target {target.name} does not list backend {backend!r}; its backends are: "
                        f"{', '.join(target.backends)} (or use auto or all)")
    return BackendPlan("forced", [backend])


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


def stage_one(source: ModelSource, ref: ReferenceRun, target: Target, backend_name: str, options: BuildOptions,
              stack: ExitStack, status: Callable[[str], None] = lambda _: None) -> StagedArtifact:
    """Compile, validate and prove one candidate in a staging directory that ``stack`` removes when
    it closes (unless it was published first); if any step fails it is removed at once.

    The device code that validates and proves it (Session, edgesmith-run) refuses unsigned
    artifacts, so the staging directory is signed with a throwaway key that exists only in this
    process; :func:`finish` signs the manifest with the real key after every check passed.
    """
    started = time.perf_counter()
    backend = get_backend(backend_name)
    backend_version = backend.version()
    tolerance = target.tolerance_for(options.precision)
    require_input_dependence(ref.outputs, tolerance.atol, tolerance.rtol, options.allow_constant_output)
    name = f"{source.name}-{target.name}-{backend_name}"
    final = options.out_dir / name
    stages: dict[str, float] = {}
    with ExitStack() as own:
        staging = own.enter_context(staging_dir(final))
        work = own.enter_context(tempfile.TemporaryDirectory(prefix="edgesmith-"))
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
                                duration_s=time.perf_counter() - started, stages=stages)
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
        timing = time_candidates([staged], status).get(backend_name)
        return finish(source, staged, key, timing.p50_us if timing else None, None, status)


# --- timing and selection (docs/selection.md) --------------------------------------------------------

TIMING_BLOCKS = 5  # blocks per candidate (fewer for slow models, see _block_plan)
TIMING_BLOCK_S = 0.2  # a block's target length
TIMING_BUDGET_S = 1.5  # all of one candidate's blocks
TIMING_MAX_RUNS = 200  # runs per block
TIMING_MIN_RUNS = 3
TIMING_WARMUP = 3  # runs before each block, not timed: the engine's threads wake up, caches refill
TIMING_PAUSE_S = 0.05  # between blocks, so the previous engine's spinning worker threads go idle


@dataclass
class Timing:
    p50_us: float
    p95_us: float
    how: str
    seconds: float = 0.0  # wall time spent timing this candidate


def timeable(staged: StagedArtifact) -> bool:
    """The payload ran natively here, in the C++ runtime the device uses: its latency here means something."""
    executed = staged.manifest.validation.executed
    return staged.device_runtime and executed is not None and executed.how == "native"


def _block_plan(seconds_per_run: float) -> tuple[int, int]:
    runs = max(TIMING_MIN_RUNS, min(TIMING_MAX_RUNS, int(TIMING_BLOCK_S / max(seconds_per_run, 1e-9))))
    blocks = max(1, min(TIMING_BLOCKS, int(TIMING_BUDGET_S / (runs * seconds_per_run))))
    return runs, blocks


def time_candidates(staged: list[StagedArtifact], status: Callable[[str], None] = lambda _: None) -> dict[str, Timing]:
    """Median latency of each timeable candidate through the device runtime (Session, the target's
    threads), in blocks: one candidate's whole block, then the next one's, never interleaved calls,
    since an engine's worker threads keep spinning for a while after each call and would slow the
    other engine's. Blocks rotate through the candidates a few times; a candidate's figure is its
    best block's median (and that block's p95): shared cores only ever add time."""
    from edgesmith.runtime import Session

    runnable = [s for s in staged if timeable(s)]
    if not runnable:
        return {}
    status(f"{runnable[0].target.name}: timing {', '.join(s.backend for s in runnable)} through the device runtime")
    inputs = [np.load(runnable[0].path / p) for p in runnable[0].manifest.golden.samples[0].inputs]
    sessions, plans, best, spent = {}, {}, {}, {}
    for s in runnable:
        t0 = time.perf_counter()
        session = Session(s.path, threads=s.target.threads, trusted_keys=[s.staging_key.public_key])
        for _ in range(TIMING_WARMUP):
            t1 = time.perf_counter()
            session.run(inputs)
        sessions[s.backend], plans[s.backend] = session, _block_plan(time.perf_counter() - t1)
        spent[s.backend] = time.perf_counter() - t0
    rounds = max(blocks for _, blocks in plans.values())
    for k in range(rounds):
        for s in runnable[k % len(runnable):] + runnable[:k % len(runnable)]:
            runs, blocks = plans[s.backend]
            if k >= blocks:
                continue
            run = sessions[s.backend].run
            t_block = time.perf_counter()
            for _ in range(TIMING_WARMUP):
                run(inputs)
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                run(inputs)
                times.append(time.perf_counter() - t0)
            spent[s.backend] += time.perf_counter() - t_block
            median = statistics.median(times)
            if s.backend not in best or median < best[s.backend][0]:
                best[s.backend] = (median, float(np.percentile(times, 95)))
            time.sleep(TIMING_PAUSE_S)
    sessions.clear()
    return {s.backend: Timing(p50_us=round(best[s.backend][0] * 1e6, 2), p95_us=round(best[s.backend][1] * 1e6, 2),
                              how=f"native Session, {s.target.threads} threads, best of {plans[s.backend][1]} blocks "
                                  f"of {plans[s.backend][0]} runs", seconds=spent[s.backend])
            for s in runnable}


SERVING_GAP_S = 0.025  # between requests: an agent serving ~40 requests/s (its engine's threads fall idle)
SERVING_RUNS = 24


def serving_latency_us(staged: StagedArtifact, status: Callable[[str], None] = lambda _: None) -> float | None:
    """p50 of single requests ``SERVING_GAP_S`` apart through Session: an engine whose worker threads
    went idle between requests answers several times slower than in a back-to-back block (the
    digits CNN here: ~0.3-0.6 ms against ~0.03 ms), and that is what a device's agent measures, so it
    is the baseline the fleet monitor's latency alert compares a device's latency with."""
    if not timeable(staged):
        return None
    from edgesmith.runtime import Session

    status(f"{staged.manifest.name}: timing sporadic requests through the device runtime")
    session = Session(staged.path, threads=staged.target.threads, trusted_keys=[staged.staging_key.public_key])
    inputs = [np.load(staged.path / p) for p in staged.manifest.golden.samples[0].inputs]
    session.run(inputs)
    times = []
    for _ in range(SERVING_RUNS):
        time.sleep(SERVING_GAP_S)
        t0 = time.perf_counter()
        session.run(inputs)
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1e6, 2)


RULE = ("Among the candidates that passed, the fastest p50 measured here through the device runtime (Session, the "
        "target's threads, best of blocks) wins; candidates not timed here follow the target's listed order, except "
        "that a TVM build ranks after every other backend unless its tuning database records a latency on this "
        "target that beats every other candidate's recorded latency.")


@dataclass
class Candidate:
    """One backend tried for a target: its staged artifact when it passed, its error otherwise."""

    backend: str
    status: Literal["passed", "failed", "skipped"]
    error: str | None = None
    staged: StagedArtifact | None = None
    timing: Timing | None = None

    def record(self) -> SelectionCandidate:
        t = self.timing
        return SelectionCandidate(backend=self.backend, status=self.status, error=self.error,
                                  latency_us_p50=t.p50_us if t else None, latency_us_p95=t.p95_us if t else None,
                                  timed_how=t.how if t else None)


def recorded_latency_us(staged: StagedArtifact) -> float | None:
    """A latency measured on the target's own device class and recorded in the payload's options:
    today a TVM tuning database's (``options.tuning``, written by toolchain/tune.py). ``measured_on``
    is the target's name when it was measured natively, ``rpc:<key>`` when measured on a device
    through an RPC tracker; the tuning cache is keyed by target, so either is this target's device."""
    tuning = staged.manifest.backend.options.get("tuning")
    if not isinstance(tuning, dict) or not isinstance(tuning.get("workloads_matched"), int) \
            or tuning["workloads_matched"] <= 0:
        return None
    latency, measured_on = tuning.get("latency_us"), tuning.get("measured_on")
    on_this_target = measured_on == staged.target.name or (isinstance(measured_on, str) and measured_on.startswith("rpc:"))
    if isinstance(latency, (int, float)) and not isinstance(latency, bool) and latency > 0 and on_this_target:
        return float(latency)
    return None


def _not_timed_why(target: Target, staged: StagedArtifact) -> str:
    if target.isa != host_isa():
        return f"{target.name} runs {target.isa} code and this machine is {host_isa()}"
    missing = missing_cpu_features(target) if target.os == "linux" else []
    if missing:
        return f"this machine lacks {', '.join(missing)}"
    if target.os != "linux":
        return f"{target.name} runs {target.os}, not this machine's OS"
    if not staged.device_runtime:
        return f"the C++ runtime does not run {staged.manifest.payload.format} payloads"
    return "its payload did not run natively here"


def select(target: Target, candidates: list[Candidate]) -> tuple[str, str] | None:
    """The chosen backend and why, by :data:`RULE`; None when no candidate passed."""
    passed = [c for c in candidates if c.status == "passed"]
    if not passed:
        return None
    timed = sorted((c for c in passed if c.timing), key=lambda c: c.timing.p50_us)
    untimed = [c for c in passed if not c.timing]
    untimed_note = "; not timed here: " + ", ".join(f"{c.backend} ({_not_timed_why(target, c.staged)})" for c in untimed) \
        if untimed else ""
    if timed:
        best = timed[0]
        others = ", ".join(f"{c.backend} {c.timing.p50_us:.1f} µs" for c in timed[1:])
        if not others:
            return best.backend, (f"{best.backend} is the only candidate timed here (p50 {best.timing.p50_us:.1f} µs)"
                                  f"{untimed_note}")
        return best.backend, f"fastest p50 here: {best.backend} {best.timing.p50_us:.1f} µs against {others}{untimed_note}"
    if len(passed) == 1:
        return passed[0].backend, (f"{passed[0].backend} is the only candidate that passed; not timed here "
                                   f"({_not_timed_why(target, passed[0].staged)})")
    recorded = {c.backend: recorded_latency_us(c.staged) for c in passed}
    for c in passed:
        others = [v for b, v in recorded.items() if b != c.backend]
        if c.backend == "tvm" and recorded[c.backend] is not None and all(v is not None for v in others) \
                and recorded[c.backend] < min(others):
            return c.backend, (f"not timed here ({_not_timed_why(target, c.staged)}); tvm's tuning database records "
                               f"{recorded[c.backend]:.1f} µs on {target.name}, below every other candidate's")
    ranked = [c for c in passed if c.backend != "tvm"] + [c for c in passed if c.backend == "tvm"]
    best = ranked[0]
    why = f"not timed here ({_not_timed_why(target, best.staged)}); {best.backend} is the first passing candidate in " \
          f"the target's order ({', '.join(target.backends)})"
    tvm = next((c for c in passed if c.backend == "tvm"), None)
    if tvm is not None and best is not tvm:
        tuned = recorded[tvm.backend] is not None
        why += (", and tvm's recorded tuning latency does not beat every other candidate's" if tuned
                else ", and tvm is untuned here (no tuning database measured on this target), so it ranks last")
    return best.backend, why


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
    chosen: str | None = None
    reason: str | None = None
    errors: list[tuple[str, str]] = field(default_factory=list)  # (backend, error) that fail the build

    def selection(self) -> Selection | None:
        if self.mode == "forced" or self.chosen is None:
            return None
        return Selection(mode=self.mode, rule=RULE, chosen=self.chosen, reason=self.reason,
                         candidates=[c.record() for c in self.candidates])


def build_target(source: ModelSource, ref: ReferenceRun, target: Target, plan: BackendPlan, options: BuildOptions,
                 key: SigningKey, status: Callable[[str], None] = lambda _: None) -> TargetBuild:
    """Stage every candidate of ``plan``, time the ones this machine runs natively, choose, and
    publish: the chosen one (``auto``), every passing one (``all``) or the one asked for (``forced``).
    Candidates not published leave nothing behind: their staging directories go when this returns."""
    tolerance = target.tolerance_for(options.precision)
    # the model's problem, not a backend's: one error rather than one per candidate
    require_input_dependence(ref.outputs, tolerance.atol, tolerance.rtol, options.allow_constant_output)
    result = TargetBuild(target=target.name, mode=plan.mode, candidates=[])
    with ExitStack() as stack:
        for backend in plan.backends:
            try:
                staged = stage_one(source, ref, target, backend, options, stack, status)
                result.candidates.append(Candidate(backend, "passed", staged=staged))
            except KeyboardInterrupt:
                raise
            except BackendUnavailable as e:
                result.candidates.append(Candidate(backend, "skipped", error=error_message(e)))
            except Exception as e:  # one failing candidate must not stop the others
                result.candidates.append(Candidate(backend, "failed", error=error_message(e)))
        _time(result.candidates, status)
        passed = [c for c in result.candidates if c.status == "passed"]
        choice = select(target, result.candidates)
        if choice is not None:
            result.chosen, result.reason = choice
        if plan.mode != "auto" or not passed:
            result.errors = [(c.backend, c.error or "") for c in result.candidates if c.status != "passed"]
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
                result.errors.append((c.backend, error_message(e)))
    return result


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
        c.timing = timings.get(c.backend)
        if c.timing is not None:
            c.staged.duration_s += c.timing.seconds


def _publish_best(source: ModelSource, target: Target, result: TargetBuild, key: SigningKey,
                  status: Callable[[str], None]) -> None:
    """``auto``: publish the chosen candidate; if finishing it fails, mark it failed and publish the
    next one the rule picks, so a late failure of the best never costs a build that had another."""
    while result.chosen is not None:
        chosen = next(c for c in result.candidates if c.backend == result.chosen)
        try:
            result.artifacts.append(finish(source, chosen.staged, key, chosen.timing.p50_us if chosen.timing else None,
                                           result.selection(), status))
            return
        except KeyboardInterrupt:
            raise
        except Exception as e:
            chosen.status, chosen.error, chosen.timing = "failed", error_message(e), None
            choice = select(target, result.candidates)
            result.chosen, result.reason = choice if choice is not None else (None, None)
    result.errors = [(c.backend, c.error or "") for c in result.candidates if c.status != "passed"]


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
