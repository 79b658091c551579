"""``edgesmith build``: compile a model for one or more targets into signed artifacts."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import typer
from rich.console import Console

from edgesmith.toolchain.cli import out_console, print_error, stdout_reserved
from rich.table import Table

from edgesmith.toolchain.build import BuildOptions, TargetBuild, build_target, choose_backends, error_message, run_reference
from edgesmith.toolchain.errors import UserError
from edgesmith.toolchain.signing import default_signing_key, load_signing_key
from edgesmith.toolchain.sources import load_source, parse_input_shapes
from edgesmith.toolchain.targets import all_targets, get_target


def _targets(names: list[str]) -> list:
    if "all" in names:
        return list(all_targets().values())
    seen, resolved = set(), []
    for name in names:
        target = get_target(name)
        if target.name not in seen:
            seen.add(target.name)
            resolved.append(target)
    return resolved


def _size(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.1f} MiB"


def build(
    model: str = typer.Argument(..., help="An .onnx file, or a PyTorch `module:callable` / `file.py:callable` returning an nn.Module."),
    target: list[str] = typer.Option(["host"], "--target", "-t", envvar="EDGESMITH_TARGET",
                                     help="Target name (see `edgesmith targets`), `host`, or `all`; repeatable."),
    backend: str = typer.Option("auto", "--backend", "-b", envvar="EDGESMITH_BACKEND",
                                help="auto: build every backend the target lists, validate each, keep the best one: the fastest "
                                     "p50 timed here through the device runtime where the target runs natively, else the "
                                     "target's listed order with TVM last unless its tuning database's recorded latency on "
                                     "the target beats every other's (docs/selection.md). all: publish every candidate that "
                                     "passes. NAME: force one backend the target lists."),
    output: Path = typer.Option(Path("dist"), "--output", "-o", envvar="EDGESMITH_DIST", help="Directory to write artifacts into."),
    input_shape: list[str] = typer.Option(None, "--input-shape", help="Static input shape: 1,3,224,224 or NAME=1,3,224,224; repeatable."),
    name: str = typer.Option(None, "--name", help="Model name used in artifact names (default: file or callable name)."),
    model_version: str = typer.Option("1", "--model-version", help="Model version recorded in the manifest."),
    precision: str = typer.Option("auto", "--precision", "-p", envvar="EDGESMITH_PRECISION",
                                  help="auto: every precision the target lists (fp32, bf16, fp16, int8) is a candidate, a "
                                       "reduced one only within the accuracy budget, and the fastest is kept; or force one "
                                       "(docs/selection.md)."),
    key: Path = typer.Option(None, "--key", envvar="EDGESMITH_KEY", help="Signing key (.key); default $EDGESMITH_HOME/keys/default.key, created on first use."),
    tuning_db: Path = typer.Option(None, "--tuning-db", help="MetaSchedule tuning work directory to apply (tvm)."),
    samples: Path = typer.Option(None, "--samples", help=".npz of validation inputs named like the model inputs, samples on axis 0."),
    num_samples: int = typer.Option(8, "--num-samples", help="Number of random validation samples when --samples is not given."),
    allow_constant_output: bool = typer.Option(False, "--allow-constant-output", help="Accept a model whose outputs ignore its input (latency work only)."),
    quantize: str = typer.Option(None, "--quantize", envvar="EDGESMITH_QUANTIZE",
                                 help="int8: the same as --precision int8 (openvino: NNCF; ort: ONNX Runtime QDQ; tflite: PT2E)."),
    calib: Path = typer.Option(None, "--calib", help="Calibration inputs for int8 (and unlabelled gate inputs): .npz with x (N samples shaped like the model input); default: a registered model's test split."),
    eval_data: Path = typer.Option(None, "--eval", help="Labelled held-out data for the accuracy budget: .npz with x and integer y (>= 64 samples); default: a registered model's test split."),
    max_accuracy_drop: float = typer.Option(1.0, "--max-accuracy-drop", help="With labelled data: refuse a bf16/fp16/int8 candidate whose top-1 accuracy is more than this many points below FP32's."),
    min_agreement: float = typer.Option(0.99, "--min-agreement", help="Without labels: refuse a bf16/fp16/int8 candidate whose top-1 class agrees with FP32's on less than this share of the inputs."),
    tracking_uri: str = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI",
                                     help="MLflow tracking URI for models:/ sources (default sqlite:///<edgesmith home>/mlflow.db)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object listing every artifact instead of a table."),
) -> None:
    """Build, validate against ONNX Runtime, package and sign one artifact per target.

    By default (--backend auto, --precision auto) every backend the target lists, at every precision
    the target lists (fp32, bf16, fp16, int8), is built and validated: FP32 element-wise against ONNX
    Runtime, a reduced precision by the accuracy budget against the FP32 model (labelled --eval data,
    unlabelled --calib/--samples inputs, or with no data at all the build's own samples, a weaker
    proof; int8 needs calibration inputs). Only the best is published: where the target runs
    natively here, the fastest p50 measured through the device runtime (Session, the target's
    threads, in blocks); elsewhere the most reduced precision that passed, in the target's backend
    order, with TVM ranked last unless its tuning database records a latency on the target that
    beats every other candidate's. The manifest's `selection` records every candidate, its latency,
    gate figures or error, and the reason (docs/selection.md).
    """
    if not math.isfinite(max_accuracy_drop):
        raise UserError(f"--max-accuracy-drop {max_accuracy_drop} is not a number of points; give e.g. 1.0")
    if not math.isfinite(min_agreement):
        raise UserError(f"--min-agreement {min_agreement} is not a share; give e.g. 0.99")
    targets = _targets(target)
    options = BuildOptions(out_dir=output, precision=precision, tuning_db=tuning_db, samples_path=samples,
                           num_samples=num_samples, allow_constant_output=allow_constant_output, model_version=model_version,
                           quantize=quantize, calib_path=calib, eval_path=eval_data, max_accuracy_drop=max_accuracy_drop,
                           min_agreement=min_agreement)
    for t in targets:  # a backend or precision the target does not list: one sentence before any work
        choose_backends(t, backend, "fp32" if options.precision == "auto" else options.precision)
    if tracking_uri:
        # the registry and MLflow's own clients read the store from the environment (toolchain/registry.py)
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    signing_key = load_signing_key(key) if key else default_signing_key()
    err = Console(stderr=True)
    with stdout_reserved(as_json), err.status("loading the model") as status:
        source = load_source(model, parse_input_shapes(input_shape or []), name)
        status.update("running ONNX Runtime on the sample inputs")
        try:
            ref = run_reference(source, options)
        except UserError as e:  # ONNX Runtime cannot run it: an operator no backend has is one sentence naming it
            if not str(e).startswith("ONNX Runtime cannot load the model"):
                raise
            raise _no_backend_has(source, targets) or e from None
        plans = [(t, choose_backends(t, backend, options.precision, ref.data)) for t in targets]
        builds: list[TargetBuild] = []
        failures, notes = [], []
        for t, plan in plans:
            try:
                built = build_target(source, ref, t, plan, options, signing_key, status=status.update)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # one failing target must not stop the others
                failures.append({"target": t.name, "backend": plan.mode if plan.mode != "forced" else plan.backends[0],
                                 "error": error_message(e)})
                print_error(f"{t.name}: {error_message(e)}")
                continue
            builds.append(built)
            for b, message in built.errors:
                failures.append({"target": t.name, "backend": b, "error": message})
                print_error(f"{t.name}/{b}: {message}")
            if built.mode != "forced":  # a candidate that lost or was skipped is a note; a build failure is listed above
                for c in built.candidates:
                    if c.error and (c.label, c.error) not in built.errors:
                        notes.append({"target": t.name, "backend": c.backend, "precision": c.precision,
                                      "status": c.status, "error": c.error})
                        err.print(f"note: {t.name}/{c.label} {c.status}, another candidate was chosen: {c.error}",
                                  markup=False, highlight=False, soft_wrap=True)
            for p, why in built.left_out.items():
                notes.append({"target": t.name, "backend": None, "precision": p, "status": "left out", "error": why})
                err.print(f"note: {t.name}: {p} left out: {why}", markup=False, highlight=False, soft_wrap=True)
    results = [a for b in builds for a in b.artifacts]
    if as_json:
        print(json.dumps({"artifacts": [
            {"target": r.target, "backend": r.backend, "precision": r.manifest.backend.precision, "path": str(r.path),
             "size_bytes": r.size_bytes,
             "build_time_s": round(r.duration_s, 3), "stages_s": {k: round(v, 3) for k, v in r.stages.items()},
             "latency_us": r.manifest.build.latency_us,
             "validation": r.manifest.validation.model_dump(mode="json"),
             "quantization": r.manifest.quantization.model_dump(mode="json") if r.manifest.quantization else None,
             "accuracy": r.manifest.accuracy.model_dump(mode="json") if r.manifest.accuracy else None,
             "proof": r.manifest.proof.model_dump(mode="json")}
            for r in results],
            "selections": [_selection_json(b) for b in builds if b.mode != "forced"],
            "failures": failures, "notes": notes}, indent=2))
    else:
        _print_table(results, signing_key.key_id)
        _print_selection([b for b in builds if b.mode != "forced"])
    if failures:
        raise typer.Exit(1)


def _no_backend_has(source, targets: list) -> UserError | None:
    from edgesmith.toolchain.coverage import nobody_supports

    for t in targets:
        sentence = nobody_supports(source.onnx_model, t.name, list(t.backends))
        if sentence:
            return UserError(sentence)
    return None


def _selection_json(b: TargetBuild) -> dict:
    from edgesmith.toolchain.build import RULE

    return {"target": b.target, "mode": b.mode, "chosen": b.chosen, "chosen_precision": b.chosen_precision,
            "reason": b.reason, "rule": RULE,
            "candidates": [c.record().model_dump(mode="json") for c in b.candidates]}


def _print_selection(builds: list[TargetBuild]) -> None:
    if not builds:
        return
    table = Table(title="selection: backend x precision (docs/selection.md)")
    for column in ("target", "backend", "precision", "status", "p50", "p95", "accuracy gate / timed / error"):
        table.add_column(column, justify="right" if column in ("p50", "p95") else "left")
    for b in builds:
        for c in b.candidates:
            r = c.record()
            mark = "[bold green]chosen[/]" if c is b.best else (
                "[green]passed[/]" if c.status == "passed" else f"[red]{c.status}[/]")
            detail = r.error or "; ".join(x for x in (r.gate, r.timed_how or "not timed here") if x)
            table.add_row(b.target, c.backend, c.precision, mark,
                          f"{r.latency_us_p50:.1f} µs" if r.latency_us_p50 else "—",
                          f"{r.latency_us_p95:.1f} µs" if r.latency_us_p95 else "—", detail)
    console = out_console()
    console.print(table)
    for b in builds:
        if b.best:
            console.print(f"{b.target}: {b.best.label}: {b.reason}", markup=False, highlight=False, soft_wrap=True)


def _print_table(results, key_id: str) -> None:
    if not results:
        return
    table = Table(title=f"artifacts (signed with key {key_id})")
    gated = any(r.manifest.accuracy for r in results)
    columns = ["target", "backend", "precision", "size", "validation", "max abs err", "top-1", *(["accuracy gate"] if gated else []),
               "proof on ISA", "p50 here", "build time", "path"]
    for column in columns:
        table.add_column(column, justify="right" if column in ("size", "max abs err", "p50 here", "build time") else "left")
    for r in results:
        v = r.manifest.validation
        state = f"[green]{v.status}[/] ({v.executed.how})" if v.executed else f"[yellow]{v.status}[/]"
        p = r.manifest.proof
        proof = f"[green]proven[/] ({p.how})" if p.status == "proven" else f"[yellow]{p.status}[/]"
        table.add_row(r.target, r.backend, r.manifest.backend.precision, _size(r.size_bytes), state,
                      f"{v.max_abs_err:.2e}" if v.max_abs_err is not None else "—",
                      f"{v.top1_agreement:.0%}" if v.top1_agreement is not None else "—",
                      *([_accuracy(r.manifest.accuracy)] if gated else []), proof,
                      f"{r.manifest.build.latency_us:.1f} µs" if r.manifest.build.latency_us else "—",
                      f"{r.duration_s:.1f} s", str(r.path))
    out_console().print(table)


def _accuracy(gate) -> str:
    if gate is None:
        return "—"
    if gate.accuracy is not None:
        return f"{gate.accuracy:.2%} / FP32 {gate.reference_accuracy:.2%}"
    if gate.top1_agreement is not None:
        return f"{gate.top1_agreement:.1%} agree ({gate.proof})"
    return f"err {gate.max_rel_err:.2g} of spread ({gate.proof})"
