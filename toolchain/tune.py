"""TVM MetaSchedule tuning with a cached database (``edgesmith tune``), and the cache look-up
``edgesmith build`` does (toolchain/backends/tvm.py).

The cache lives under ``$EDGESMITH_HOME/tuning/<tvm version>/<target key>/<workload key>/``:

- ``database_workload.json`` / ``database_tuning_record.json``: MetaSchedule's JSON database,
  one line per record, appended as each measurement arrives (so Ctrl-C keeps what was measured);
- ``tuning.json``: what was tuned and how (trials, minutes, where it was measured, the best
  end-to-end latency when one was measured).

The workload key is the SHA-256 of the sorted structural hashes of the tunable tasks MetaSchedule
extracts from the Relax module (after the same passes the build runs before applying a database),
so two models with the same layers share a database and any change of a layer's shape misses.
The target key is the SHA-256 of the TVM target's exported JSON.

Throughput: the stock ``LocalBuilder`` starts new worker processes for every batch, and each one
imports TVM first (seconds on 2 cores); ``PersistentBuilder`` keeps its workers for the whole run
and links the shared library in the worker, so the runner only loads it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from edgesmith.toolchain.errors import CompileError, UserError, first_line

DB_FILES = ("database_workload.json", "database_tuning_record.json")
META = "tuning.json"


# ---------------------------------------------------------------------------------------------
# The Relax module as tuning and the build see it


def prepare(mod, tvm_target, prepack: bool = False):
    """The passes ``relax.pipeline.static_shape_tuning_pipeline`` runs before tuning / applying a
    database; tasks extracted from the result hash the same at tune and build time."""
    import tvm
    from tvm import relax
    from tvm.relax import transform

    passes = [transform.DecomposeOpsForInference(), transform.CanonicalizeBindings(), relax.pipeline.zero_pipeline()]
    if prepack:
        passes.append(transform.AttachAttrLayoutFreeBuffers())
    with tvm.target.Target(tvm_target):
        return tvm.transform.Sequential(passes)(mod)


def extract_tasks(prepared, tvm_target):
    from tvm.s_tir import meta_schedule as ms

    return list(ms.relax_integration.extract_tasks(prepared, tvm_target))


def task_hashes(tasks) -> list[str]:
    import tvm_ffi

    return sorted(f"{tvm_ffi.structural_hash(t.dispatched[0]) & (2**64 - 1):016x}" for t in tasks)


def workload_key(tasks) -> str:
    return hashlib.sha256("\n".join(task_hashes(tasks)).encode()).hexdigest()


def target_json(tvm_target) -> str:
    from edgesmith.toolchain.backends.tvm import _plain

    return json.dumps(_plain(tvm_target.export()), sort_keys=True)


def target_key(tvm_target) -> str:
    return hashlib.sha256(target_json(tvm_target).encode()).hexdigest()


def cache_root() -> Path:
    from edgesmith.runtime.keys import edgesmith_home

    return edgesmith_home() / "tuning"


def cache_dir(tasks, tvm_target, prepack: bool = False) -> Path:
    import tvm

    workload = workload_key(tasks)[:24] + ("-prepack" if prepack else "")
    return cache_root() / tvm.__version__ / target_key(tvm_target)[:24] / workload


def db_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    for name in DB_FILES:
        digest.update(name.encode() + b"\0")
        digest.update((path / name).read_bytes())
    return digest.hexdigest()


def read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / META).read_text())
        return meta if isinstance(meta, dict) else {}
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------------------------------------
# Applying a database (the build side)


@dataclass
class Applied:
    mod: Any  # the Relax module, scheduled from the database where it matched
    info: dict[str, Any] | None  # the manifest's backend.options["tuning"], None without a database
    warning: str | None = None


def lookup(prepared, tvm_target, prepack: bool = False) -> Path | None:
    """The cached database for this workload, target and TVM version, if one was tuned."""
    path = cache_dir(extract_tasks(prepared, tvm_target), tvm_target, prepack)
    return path if all((path / f).is_file() for f in DB_FILES) else None


def apply_database(prepared, tvm_target, db_path: Path, prepack: bool = False) -> Applied:
    """Schedule ``prepared`` from the database at ``db_path``. A database that does not load or
    does not apply is ignored with a warning (the caller builds untuned), never raised."""
    import tvm
    from tvm import relax
    from tvm.relax import transform
    from tvm.s_tir import meta_schedule as ms

    tasks = extract_tasks(prepared, tvm_target)
    try:
        sha = db_sha256(db_path)
        with _quiet_tvm_logs():
            database = ms.database.JSONDatabase(work_dir=str(db_path), allow_missing=False)
            matched = sum(1 for t in tasks if database.has_workload(t.dispatched[0])
                          and database.query_tuning_record(t.dispatched[0], tvm_target, t.task_name) is not None)
    except Exception as e:  # unreadable file, bad JSON, records that do not parse
        return Applied(prepared, None, f"tuning database {db_path} is corrupt ({first_line(e)}); building untuned")
    meta = read_meta(db_path)
    info = {"database": str(db_path), "sha256": sha, "workloads_matched": matched, "workloads_total": len(tasks),
            "latency_us": meta.get("latency_us"), "measured_on": meta.get("measured_on"), "trials": meta.get("trials")}
    if matched == 0:
        return Applied(prepared, info, f"tuning database {db_path} matched none of the model's {len(tasks)} workloads; "
                                       "building untuned (run `edgesmith tune` for this model and target)")
    import_cpu_tensor_intrinsics()  # replaying a tensorize step looks its intrinsic up
    try:
        with tvm.target.Target(tvm_target), _quiet_tvm_logs():
            passes = [transform.MetaScheduleApplyDatabase(str(db_path), enable_warning=False)]  # needs the target context
            if prepack:
                passes += [transform.SplitLayoutRewritePreproc(), transform.LiftTransformParams(), transform.FoldConstant()]
            mod = tvm.transform.Sequential(passes)(prepared)
    except Exception as e:
        return Applied(prepared, None, f"tuning database {db_path} does not apply to this model ({first_line(e)}); building untuned")
    return Applied(mod, info)


@contextlib.contextmanager
def _quiet_tvm_logs():
    """MetaSchedule logs every database it opens at INFO through Python logging; keep the CLI clean."""
    import logging

    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


# ---------------------------------------------------------------------------------------------
# Builder and runner


def _build_and_export(mod, target, params) -> str:
    """Runs in a builder worker: MetaSchedule's default build, without importing
    ``tvm.s_tir.tensor_intrin`` (the candidate is scheduled already: tensorized blocks carry their
    implementation, so the intrinsics registry is not consulted), linked into a .so right there."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    rt_mod = tvm_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)
    path = os.path.join(tempfile.mkdtemp(prefix="edgesmith-ms-"), "candidate.so")
    rt_mod.export_library(path)
    return path


def _worker_build(mod, target, params):
    return _build_and_export(mod, target, None)


def _warm_worker() -> None:
    from tvm.driver import build  # noqa: F401
    from tvm.s_tir import transform  # noqa: F401


def import_cpu_tensor_intrinsics() -> None:
    """Register the CPU tensor intrinsics (x86, Arm) MetaSchedule's schedule rules look up, without
    the GPU ones. ``import tvm.s_tir.tensor_intrin`` (done by every ``TuneContext`` and by the stock
    builder in each new worker) builds the CUDA/ROCm/Hexagon intrinsics first: 320 s of the 323 s it
    took here on a loaded 2-core machine (``python -X importtime``), never used for an llvm target."""
    import importlib
    import importlib.util
    import sys

    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package  # the package without its __init__ (which imports .cuda first)
    try:
        for sub in ("x86", "arm_cpu"):
            setattr(package, sub, importlib.import_module(f"{name}.{sub}"))
    except Exception:
        del sys.modules[name]
        raise


def persistent_builder(workers: int, timeout_sec: float = 600.0):
    """A MetaSchedule builder whose worker processes live for the whole tuning run."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

    @derived_object
    class PersistentBuilder(PyBuilder):
        def __init__(self) -> None:
            super().__init__()
            self.pool = PopenPoolExecutor(max_workers=workers, timeout=timeout_sec)
            # start and warm every worker now, so the first batch does not pay TVM's import
            list(self.pool.map_with_error_catching(lambda _: _warm_worker(), range(workers)))

        def build(self, build_inputs):
            results = []
            jobs = [(b.mod, b.target, None) for b in build_inputs]  # tuning builds take no params
            for r in self.pool.map_with_error_catching(lambda job: _worker_build(*job), jobs):
                if r.status == StatusKind.COMPLETE:
                    results.append(BuilderResult(r.value, None))
                elif r.status == StatusKind.TIMEOUT:
                    results.append(BuilderResult(None, f"PersistentBuilder: timeout after {timeout_sec} s"))
                else:
                    results.append(BuilderResult(None, f"PersistentBuilder: {r.value}"))
            return results

        def shutdown(self) -> None:
            self.pool.shutdown()

    return PersistentBuilder()


def stock_builder(timeout_sec: float = 300.0):
    """MetaSchedule's LocalBuilder (new worker processes per batch), for comparisons."""
    from tvm.s_tir import meta_schedule as ms

    return ms.builder.LocalBuilder(max_workers=os.cpu_count(), timeout_sec=timeout_sec)


def local_runner(timeout_sec: float = 120.0):
    from tvm.s_tir import meta_schedule as ms

    return ms.runner.LocalRunner(timeout_sec=timeout_sec, evaluator_config=ms.runner.EvaluatorConfig(
        number=3, repeat=1, min_repeat_ms=20, enable_cpu_cache_flush=False))


# ---------------------------------------------------------------------------------------------
# RPC


def parse_tracker(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UserError(f"--rpc-tracker {value!r} is not HOST:PORT; write it as tracker.lab:9190")
    return host, int(port)


def check_tracker(host: str, port: int, key: str, timeout_sec: float) -> None:
    """Fail early, in one sentence, when the tracker is unreachable or has no free device."""
    from tvm import rpc

    deadline = time.monotonic() + timeout_sec
    try:  # nothing listening: say so at once (TVM's client would retry for a minute, logging each try)
        socket.create_connection((host, port), timeout=min(timeout_sec, 10.0)).close()
    except OSError as e:
        raise UserError(f"the RPC tracker at {host}:{port} cannot be reached ({e.strerror or e}); start it with "
                        "`python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port 9190` or fix --rpc-tracker") from None
    try:
        tracker = _with_timeout(lambda: rpc.connect_tracker(host, port), timeout_sec)
    except Exception as e:
        raise UserError(f"the RPC tracker at {host}:{port} cannot be reached ({first_line(e)}); start it with "
                        "`python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port 9190` or fix --rpc-tracker") from None
    while True:
        try:
            summary = _with_timeout(tracker.summary, max(1.0, deadline - time.monotonic()))
        except Exception as e:
            raise UserError(f"the RPC tracker at {host}:{port} did not answer ({first_line(e)}); check that it is a TVM "
                            "RPC tracker") from None
        free = sum(s.get("free", 0) for k, s in summary.get("queue_info", {}).items() if k == key)
        servers = [s for s in summary.get("server_info", []) if str(s.get("key", "")).split(":")[-1] == key]
        if free > 0 or servers:
            return
        if time.monotonic() >= deadline:
            keys = sorted(summary.get("queue_info", {})) or ["none"]
            raise UserError(f"the RPC tracker at {host}:{port} has no free device with key {key!r} after {timeout_sec:.0f} s "
                            f"(keys there: {', '.join(keys)}); start `python -m tvm.exec.rpc_server --tracker "
                            f"{host}:{port} --key {key}` on the device or fix --rpc-key")
        time.sleep(0.5)


def _with_timeout(fn: Callable, timeout_sec: float):
    """``fn()`` in a daemon thread, given up after ``timeout_sec`` (TVM's tracker client retries for
    a minute on its own; a daemon thread, unlike an executor's, does not hold the process at exit)."""
    import threading

    outcome: dict = {}

    def call() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as e:  # handed to the caller
            outcome["error"] = e

    thread = threading.Thread(target=call, daemon=True, name="edgesmith-rpc")
    thread.start()
    thread.join(timeout_sec)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {timeout_sec:.0f} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def rpc_runner(host: str, port: int, key: str, timeout_sec: float = 60.0):
    from tvm.s_tir import meta_schedule as ms

    config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key, session_timeout_sec=int(timeout_sec))
    return ms.runner.RPCRunner(rpc_config=config, evaluator_config=ms.runner.EvaluatorConfig(
        number=3, repeat=1, min_repeat_ms=20, enable_cpu_cache_flush=False), max_workers=1)


# ---------------------------------------------------------------------------------------------
# Tuning


@dataclass
class Progress:
    """What a progress display needs: trials measured, failures, and the estimated latency of the
    tuned kernels (sum over tasks of weight × best measured time)."""

    total: int
    done: int = 0
    failed: int = 0
    best_s: dict[int, float] = field(default_factory=dict)
    weights: dict[int, float] = field(default_factory=dict)
    tasks: int = 0
    started: float = field(default_factory=time.monotonic)
    last_error: str | None = None

    @property
    def estimate_us(self) -> float | None:
        if not self.best_s:
            return None
        return sum(self.weights.get(i, 1.0) * s for i, s in self.best_s.items()) * 1e6

    @property
    def trials_per_min(self) -> float:
        minutes = (time.monotonic() - self.started) / 60
        return self.done / minutes if minutes > 0 else 0.0


def _progress_callback(progress: Progress, on_update: Callable[[Progress], None]):
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class ProgressCallback(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
            for b, r in zip(builder_results, runner_results):
                progress.done += 1
                if b.error_msg is not None or r.error_msg is not None or not r.run_secs:
                    progress.failed += 1
                    progress.last_error = first_line(str(b.error_msg or r.error_msg)) if (b.error_msg or r.error_msg) else None
                    continue
                secs = sum(float(x) for x in r.run_secs) / len(r.run_secs)
                if secs < progress.best_s.get(task_id, float("inf")):
                    progress.best_s[task_id] = secs
            on_update(progress)

    return ProgressCallback()


@dataclass
class TuneResult:
    database: Path
    trials: int
    failed: int
    minutes: float
    trials_per_min: float
    tasks: int
    interrupted: bool
    latency_us: float | None
    untuned_latency_us: float | None
    measured_on: str


def tune_module(mod, tvm_target, db_dir: Path, trials: int, *, builder=None, runner=None, prepack: bool = False,
                stop: _Stop | None = None, on_update: Callable[[Progress], None] = lambda p: None,
                seed: int | None = None, fast_search: bool = True) -> Progress:
    """Tune ``mod`` (a Relax module straight from the ONNX frontend) into ``db_dir``; every
    measured record is committed to the JSON database as its batch finishes."""
    from tvm.s_tir import meta_schedule as ms

    import_cpu_tensor_intrinsics()
    prepared = prepare(mod, tvm_target, prepack)
    tasks = extract_tasks(prepared, tvm_target)
    if not tasks:
        raise UserError("the model has no tunable TVM workloads (no convolutions, matmuls or other kernels); tuning cannot help it")
    progress = Progress(total=trials, tasks=len(tasks), weights={i: float(t.weight) for i, t in enumerate(tasks)})
    db_dir.mkdir(parents=True, exist_ok=True)
    database = ms.database.JSONDatabase(work_dir=str(db_dir))
    callbacks = [*ms.measure_callback.MeasureCallback.create("default"), _progress_callback(progress, on_update)]
    if stop is not None:
        callbacks.append(_stop_callback(stop))
    per_iter = max(4, min(64, trials // len(tasks)))
    with _quiet_tvm_logs():
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            tasks, work_dir=str(db_dir), num_threads=os.cpu_count(), seed=seed, strategy=search_strategy(fast_search))
        ms.tune.tune_tasks(tasks=contexts, task_weights=weights, work_dir=str(db_dir), max_trials_global=trials,
                           max_trials_per_task=max(per_iter, -(-trials // len(tasks))), num_trials_per_iter=per_iter,
                           builder=builder or persistent_builder(os.cpu_count() or 1), runner=runner or local_runner(),
                           database=database, measure_callbacks=callbacks, cost_model=cost_model(), task_scheduler="gradient")
    return progress


def cost_model() -> str:
    """MetaSchedule's XGBoost cost model (the ``xgboost-cpu`` package of the toolchain extra); without
    it the search samples candidates at random, which tunes, but needs more trials."""
    import importlib.util

    return "xgb" if importlib.util.find_spec("xgboost") is not None else "random"


def search_strategy(fast: bool):
    """MetaSchedule's evolutionary search; ``fast`` shrinks its population (512 → 128) and genetic
    rounds (4 → 2): on 2 cores the default spends minutes per batch searching before anything is built."""
    from tvm.s_tir import meta_schedule as ms

    if not fast:
        return ms.search_strategy.EvolutionarySearch()
    return ms.search_strategy.EvolutionarySearch(population_size=128, init_min_unmeasured=32, genetic_num_iters=2)


class _Stop:
    """A stop request the measure callback honours at the end of the current batch (Ctrl-C, or
    --max-minutes): every task is terminated, so MetaSchedule returns with all records committed."""

    def __init__(self, deadline: float | None) -> None:
        self.deadline = deadline
        self.requested = False
        self.reason: str | None = None

    def due(self) -> bool:
        if self.requested:
            return True
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self.reason = self.reason or "time limit"
            return True
        return False


def _stop_callback(stop: _Stop):
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class StopCallback(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
            if stop.due():
                for i, task in enumerate(task_scheduler.tasks_):
                    if not task.is_terminated:
                        task_scheduler.terminate_task(i)

    return StopCallback()


# ---------------------------------------------------------------------------------------------
# `edgesmith tune`


@dataclass
class TuneRequest:
    source: Any  # sources.ModelSource
    target: Any  # targets.Target
    trials: int = 200
    rpc_tracker: str | None = None
    rpc_key: str | None = None
    max_minutes: float | None = None
    prepack: bool = False
    rpc_timeout_sec: float = 30.0


def load_relax(source):
    """The source's ONNX graph through TVM's Relax frontend, as ``edgesmith build`` imports it."""
    from tvm.relax.frontend.onnx import from_onnx

    return from_onnx(source.onnx_model, shape_dict={s.name: s.shape for s in source.inputs}, keep_params_in_input=False)


def check_operators(source, target) -> None:
    from edgesmith.toolchain.backends import tvm as tvm_backend

    unsupported = tvm_backend._unsupported_operators(source)
    if unsupported:
        import tvm

        others = ", ".join(b for b in target.backends if b != tvm_backend.NAME) or "openvino or ort"
        raise UserError(f"TVM {tvm.__version__} cannot compile operator(s) {', '.join(unsupported)} of {source.name}, so there "
                        f"is nothing to tune; build it with another backend ({others})")


def preflight(target, trials: int, rpc_tracker: str | None, rpc_key: str | None,
              rpc_timeout_sec: float = 30.0) -> tuple[str, int, str] | None:
    """The checks that need no model: options, the target, and the RPC tracker (host, port, key)."""
    from edgesmith.toolchain.backends import tvm as tvm_backend

    if trials < 1:
        raise UserError(f"--trials {trials} must be at least 1")
    if (rpc_tracker is None) != (rpc_key is None):
        raise UserError("--rpc-tracker and --rpc-key go together: give both (HOST:PORT and the device key) or neither")
    if tvm_backend.NAME not in target.backends:
        raise UserError(f"target {target.name} does not list the tvm backend, so no build would use the tuning; "
                        "pick a target that lists tvm (see `edgesmith targets`)")
    if rpc_tracker is None:
        return None
    host, port = parse_tracker(rpc_tracker)
    check_tracker(host, port, rpc_key, rpc_timeout_sec)
    return host, port, rpc_key


def run_tune(request: TuneRequest, on_update: Callable[[Progress], None] = lambda p: None,
             on_status: Callable[[str], None] = lambda s: None) -> TuneResult:
    """Tune a model for a target into the cache; Ctrl-C (or --max-minutes) stops after the batch
    being measured, keeping every record measured so far."""
    import signal

    from edgesmith.toolchain.backends import tvm as tvm_backend

    tvm_backend.version()
    target = request.target
    rpc = preflight(target, request.trials, request.rpc_tracker, request.rpc_key, request.rpc_timeout_sec)
    check_operators(request.source, target)
    tvm_target = tvm_backend._tvm_target(target)
    if rpc is not None:
        measured_on = f"rpc:{rpc[2]}"
    else:
        execution = tvm_backend.executes_here(target)
        if not execution.possible:
            raise UserError(f"cannot measure {target.name} kernels on this machine ({execution.reason}); tune on the device "
                            "through an RPC tracker: --rpc-tracker HOST:PORT --rpc-key KEY")
        measured_on = target.name
    on_status("importing the model into TVM Relax")
    try:
        mod = load_relax(request.source)
        prepared = prepare(mod, tvm_target, request.prepack)
        tasks = extract_tasks(prepared, tvm_target)
    except UserError:
        raise
    except Exception as e:
        raise CompileError(f"TVM cannot import {request.source.name} for tuning ({first_line(e)}); build it with another backend") from None
    db_dir = cache_dir(tasks, tvm_target, request.prepack)
    on_status(f"starting {os.cpu_count()} builder workers")
    builder = persistent_builder(os.cpu_count() or 1)
    runner = rpc_runner(*rpc, timeout_sec=max(60.0, request.rpc_timeout_sec)) if rpc else local_runner()
    stop = _Stop(time.monotonic() + request.max_minutes * 60 if request.max_minutes else None)

    def on_sigint(signum, frame):
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested, stop.reason = True, "interrupted"
        on_status("stopping after the batch being measured (Ctrl-C again to abort at once)")

    previous = signal.signal(signal.SIGINT, on_sigint) if _main_thread() else None
    started = time.monotonic()
    try:
        progress = tune_module(mod, tvm_target, db_dir, request.trials, builder=builder, runner=runner,
                               prepack=request.prepack, stop=stop, on_update=on_update)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        builder.shutdown()
    minutes = (time.monotonic() - started) / 60
    meta = {"model": request.source.name, "source_sha256": request.source.sha256, "target": target.name,
            "tvm_target": json.loads(target_json(tvm_target)), "tvm_version": _tvm_version(), "workloads": task_hashes(tasks),
            "trials": progress.done, "failed_trials": progress.failed, "minutes": round(minutes, 2),
            "trials_per_min": round(progress.done / minutes, 1) if minutes else None, "measured_on": measured_on,
            "prepack": request.prepack, "stopped": stop.reason, "latency_us": None}
    previous_meta = read_meta(db_dir)
    if previous_meta.get("trials"):
        meta["trials"] += int(previous_meta["trials"])  # a database tuned in several runs
    _write_meta(db_dir, meta)
    latency = None
    if progress.done > progress.failed:
        on_status("measuring the tuned model end to end")
        try:
            latency = measure_latency(mod, tvm_target, db_dir, request.source, target, rpc, request.prepack)
        except Exception as e:  # the database stays useful; say why there is no figure
            on_status(f"could not measure the tuned model end to end ({first_line(e)})")
        if latency is not None:
            meta["latency_us"] = round(latency, 1)
            _write_meta(db_dir, meta)
    return TuneResult(database=db_dir, trials=progress.done, failed=progress.failed, minutes=minutes,
                      trials_per_min=progress.done / minutes if minutes else 0.0, tasks=len(tasks),
                      interrupted=stop.reason is not None, latency_us=latency, untuned_latency_us=None, measured_on=measured_on)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _tvm_version() -> str:
    import tvm

    return tvm.__version__


def _write_meta(db_dir: Path, meta: dict[str, Any]) -> None:
    tmp = db_dir / (META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    tmp.replace(db_dir / META)


def compile_tuned(mod, tvm_target, db_dir: Path | None, prepack: bool = False):
    """``tvm.compile`` of ``mod`` with the database applied (or untuned with ``db_dir`` None)."""
    import tvm

    prepared = prepare(mod, tvm_target, prepack)
    if db_dir is not None:
        applied = apply_database(prepared, tvm_target, db_dir, prepack)
        if applied.warning:
            raise CompileError(applied.warning)
        prepared = applied.mod
    return tvm.compile(prepared, target=tvm_target)


def measure_latency(mod, tvm_target, db_dir: Path | None, source, target, rpc=None, prepack: bool = False,
                    min_repeat_ms: int = 300, repeat: int = 5) -> float:
    """Median end-to-end latency (µs) of the whole model, here or on the RPC device."""
    import numpy as np
    import tvm
    from tvm import relax

    executable = compile_tuned(mod, tvm_target, db_dir, prepack)
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal(s.shape).astype(s.dtype) for s in source.inputs]
    with tempfile.TemporaryDirectory(prefix="edgesmith-tune-") as tmp:
        if rpc is None:
            dev = tvm.cpu()
            vm = relax.VirtualMachine(executable, dev)
        else:
            from tvm import rpc as tvm_rpc

            cross = target.tvm.cross_compiler
            from edgesmith.toolchain.targets import host_isa

            fcompile = tvm.support.cc.cross_compiler(cross) if cross and target.isa != host_isa() else None
            path = os.path.join(tmp, "model.so")
            executable.export_library(path, fcompile=fcompile)
            host, port, key = rpc
            remote = tvm_rpc.connect_tracker(host, port).request(key, priority=1, session_timeout=120)
            remote.upload(path)
            dev = remote.cpu()
            vm = relax.VirtualMachine(remote.load_module("model.so"), dev)
        args = [tvm.runtime.tensor(x, device=dev) for x in inputs]
        timer = vm.time_evaluator("main", dev, number=1, repeat=repeat, min_repeat_ms=min_repeat_ms)
        return float(np.median(timer(*args).results)) * 1e6
