"""``edgesmith bench``: one model, one target, edgesmith's artifacts against the peer engines.

    model source → (build per backend | --artifacts) + peers on the same ONNX / PyTorch model
      → rounds: every engine once per round, each in its own process (measure.py), order rotated
      → per engine: its best round's latency percentiles, throughput, cold start, peak RSS,
        payload size, max abs error vs ONNX Runtime on the same inputs, ratio to the fastest peer
      → report.json + report.md + PNG plots (report.py)

Timings are only as good as the machine is idle: the best of several rounds is reported, and
every round's median is kept in the JSON so the spread is visible.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from edgesmith.toolchain.bench.engines import (PEERS, Engine, artifact_engine, parse_against, parse_backends, payload_bytes,
                                               peer_engines, peers_for)
from edgesmith.toolchain.bench.measure import Block, run_block, save_samples
from edgesmith.toolchain.errors import UserError

__all__ = ["BenchConfig", "run_bench", "PEERS"]


@dataclass
class BenchConfig:
    model: str
    target: str = "host"
    against: str | None = None  # comma-separated peers; None: every peer that applies
    backends: str | None = None  # edgesmith backends to build; None: openvino and ort (those the target lists)
    artifacts: list[Path] = field(default_factory=list)  # prebuilt artifacts instead of building
    input_shapes: object = None  # sources.parse_input_shapes(...)
    threads: int | None = None  # None: the target's thread count
    rounds: int = 3
    iterations: int = 50
    warmup: int = 10
    samples: int = 4  # inputs timed (cycled) and compared with ONNX Runtime
    samples_path: Path | None = None  # .npz of inputs as `edgesmith build --samples` takes; default: seeded N(0,1)
    quantize: str | None = None
    calib: Path | None = None
    eval_data: Path | None = None
    max_accuracy_drop: float = 1.0
    command: str = ""


@dataclass
class Progress:
    """Callbacks the CLI binds to a rich progress bar; the defaults print nothing."""

    status: Callable[[str], None] = lambda _: None
    start: Callable[[int], None] = lambda _: None  # total number of engine runs
    advance: Callable[[str], None] = lambda _: None


def _check(config: BenchConfig) -> None:
    for flag, value, least in (("--rounds", config.rounds, 1), ("--iterations", config.iterations, 5),
                               ("--warmup", config.warmup, 0), ("--num-samples", config.samples, 1)):
        if value < least:
            raise UserError(f"{flag} {value} is too small; give at least {least}")
    if config.threads is not None and config.threads < 1:
        raise UserError(f"--threads {config.threads} is not a thread count; give 1 or more")
    if config.artifacts and (config.backends or config.quantize):
        raise UserError("--artifacts benchmarks prebuilt artifacts; drop --backends/--quantize (they choose what to build)")


def _build(source, target, backends: list[str], config: BenchConfig, out: Path, progress: Progress) -> list[Engine]:
    from edgesmith.toolchain.build import BuildOptions, build_one, run_reference
    from edgesmith.toolchain.signing import ephemeral_key

    options = BuildOptions(out_dir=out, num_samples=8, samples_path=config.samples_path, quantize=config.quantize,
                           calib_path=config.calib, eval_path=config.eval_data, max_accuracy_drop=config.max_accuracy_drop)
    progress.status("running ONNX Runtime on the build's sample inputs")
    ref = run_reference(source, options)
    key = ephemeral_key()  # the artifacts live only as long as this benchmark
    engines = []
    for backend in backends:
        built = build_one(source, ref, target, backend, options, key, status=progress.status)
        manifest = built.manifest.model_dump(mode="json")
        engines.append(Engine(name=f"edgesmith:{backend}", kind="session", role="edgesmith", path=built.path,
                              size_bytes=payload_bytes(manifest), precision=manifest["backend"]["precision"],
                              extra={"trusted_keys": [key.public_key.hex()]}))
    return engines


def _prebuilt(paths: list[Path], source) -> list[Engine]:
    from edgesmith.runtime.keys import trusted_public_keys

    keys = trusted_public_keys()
    engines = []
    for path in paths:
        engine = artifact_engine(Path(path), keys)
        inputs = json.loads((Path(path) / "manifest.json").read_text())["inputs"]
        want = [(s.name, list(s.shape), s.dtype) for s in source.inputs]
        got = [(i["name"], list(i["shape"]), i["dtype"]) for i in inputs]
        if [(s, d) for _, s, d in got] != [(s, d) for _, s, d in want]:
            raise UserError(f"{path} takes inputs {got}, but {source.ref} takes {want}; pass artifacts built from this model")
        if any(e.name == engine.name for e in engines):
            engine.name = f"{engine.name}#{sum(e.name.startswith(engine.name) for e in engines) + 1}"
        engines.append(engine)
    return engines


def _summarise(engine: Engine, blocks: list[Block], reference: list[list[np.ndarray]], iterations: int) -> dict:
    best = min(blocks, key=lambda b: b.p50_ms)
    lat = np.array(best.latencies_ms)
    errors = [float(np.max(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))))
              for got_sample, want_sample in zip(blocks[0].outputs, reference) for got, want in zip(got_sample, want_sample)]
    return {"name": engine.name, "role": engine.role, "version": best.version, "precision": engine.precision,
            "p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
            "p99_ms": float(np.percentile(lat, 99)), "mean_ms": float(lat.mean()),
            "throughput_per_s": iterations / best.timed_wall_s,
            "cold_start_s": min(b.cold_start_s for b in blocks), "load_s": min(b.load_s for b in blocks),
            "peak_rss_mib": max(b.peak_rss_mib for b in blocks), "size_bytes": engine.size_bytes,
            "max_abs_err_vs_ort": max(errors), "rounds_p50_ms": [b.p50_ms for b in blocks],
            "latencies_ms": best.latencies_ms}


def _goals(rows: list[dict]) -> dict:
    """The issue's goals, computed (never asserted): the best edgesmith artifact vs the fastest of
    ONNX Runtime / OpenVINO, and Session's overhead over the engine it wraps."""
    by = {r["name"]: r for r in rows}
    goals: dict = {}
    ours = [r for r in rows if r["role"] == "edgesmith"]
    direct = [by[n] for n in ("ort", "openvino") if n in by]
    if ours and direct:
        best, fastest = min(ours, key=lambda r: r["p50_ms"]), min(direct, key=lambda r: r["p50_ms"])
        ratio = best["p50_ms"] / fastest["p50_ms"]
        goals["selected_vs_fastest"] = {"engine": best["name"], "fastest": fastest["name"], "ratio": ratio, "goal": 1.00,
                                        "met": ratio <= 1.00}
    for backend in ("openvino", "ort"):
        mine, theirs = by.get(f"edgesmith:{backend}"), by.get(backend)
        if mine and theirs and mine["precision"] == "fp32":
            ratio = mine["p50_ms"] / theirs["p50_ms"]
            goals[f"session_overhead_{backend}"] = {"ratio": ratio, "overhead_pct": 100 * (ratio - 1), "goal_pct": 3.0,
                                                    "met": ratio <= 1.03}
    return goals


def _machine() -> dict:
    from edgesmith.toolchain.build import _host_cpu

    return {"cpu": _host_cpu(), "cores": os.cpu_count(), "isa": platform.machine(), "os": platform.platform(),
            "python": platform.python_version()}


def run_bench(config: BenchConfig, report_dir: Path | None = None, progress: Progress | None = None,
              source=None) -> dict:
    """Benchmark; returns the report dict (and writes it with plots when ``report_dir`` is given).
    ``source``: the ``ModelSource`` of ``config.model`` when the caller has loaded it already."""
    from edgesmith.toolchain.reference import ReferenceModel, load_samples, make_samples
    from edgesmith.toolchain.sources import load_source
    from edgesmith.toolchain.targets import get_target, host_isa, runs_natively

    progress = progress or Progress()
    _check(config)
    target = get_target(config.target)
    if not runs_natively(target):
        raise UserError(f"target {target.name} ({target.isa}) does not run natively on this {host_isa()} machine, and timings under "
                        "emulation mean nothing; benchmark on the device, or use -t host")
    backends = [] if config.artifacts else parse_backends(config.backends, target)
    named_peers = parse_against(config.against)
    threads = config.threads or target.threads
    if source is None:
        progress.status("loading the model")
        source = load_source(config.model, config.input_shapes)
    against = peers_for(named_peers, source)
    with tempfile.TemporaryDirectory(prefix="edgesmith-bench-") as tmp:
        work = Path(tmp)
        if config.artifacts:
            engines = _prebuilt(config.artifacts, source)
        else:
            engines = _build(source, target, backends, config, work / "artifacts", progress)
        engines += peer_engines(source, against, work, progress.status)
        if not engines:
            raise UserError("nothing to benchmark; name peers with --against or backends with --backends")
        if config.samples_path is not None:
            samples = load_samples(config.samples_path, source.inputs)[:config.samples]
        else:
            samples = make_samples(source.inputs, config.samples, seed=1)
        reference = [ReferenceModel(source.onnx_model).run(s) for s in samples]
        samples_path = work / "samples.npz"
        save_samples(samples, samples_path)
        blocks: dict[str, list[Block]] = {e.name: [] for e in engines}
        progress.start(len(engines) * config.rounds)
        for r in range(config.rounds):
            order = engines[r % len(engines):] + engines[:r % len(engines)]  # no engine always runs first
            for engine in order:
                progress.status(f"round {r + 1}/{config.rounds}: {engine.name}")
                blocks[engine.name].append(run_block(engine, samples_path, len(source.inputs), threads, config.warmup,
                                                     config.iterations, work, f"{engine.name.replace(':', '-')}-{r}"))
                progress.advance(engine.name)
    rows = [_summarise(e, blocks[e.name], reference, config.iterations) for e in engines]
    peers = [r for r in rows if r["role"] == "peer"]
    fastest = min(peers, key=lambda r: r["p50_ms"]) if peers else None
    for row in rows:
        row["ratio_to_fastest_peer"] = row["p50_ms"] / fastest["p50_ms"] if fastest else None
    report = {"model": {"ref": source.ref, "name": source.name, "kind": source.kind,
                        "inputs": [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in source.inputs]},
              "target": target.name, "threads": threads, "quantize": config.quantize,
              "rounds": config.rounds, "iterations": config.iterations, "warmup": config.warmup, "samples": len(samples),
              "samples_origin": f"file:{config.samples_path}" if config.samples_path else "seeded N(0,1)",
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": _machine(),
              "command": config.command, "fastest_peer": fastest["name"] if fastest else None,
              "engines": rows, "goals": _goals(rows)}
    if report_dir is not None:
        from edgesmith.toolchain.bench.report import write_report

        write_report(report, Path(report_dir))
    return report
