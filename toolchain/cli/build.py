"""``edgesmith build``: compile a model for one or more targets into signed artifacts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import typer
from rich.console import Console

from edgesmith.toolchain.cli import out_console, print_error
from rich.table import Table

from edgesmith.toolchain.build import BuildOptions, build_one, choose_backends, run_reference
from edgesmith.toolchain.errors import UserError, first_line
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
    backend: str = typer.Option(None, "--backend", "-b", envvar="EDGESMITH_BACKEND",
                                help="Force a backend the target lists, or `all` for every candidate (default: the target's first)."),
    output: Path = typer.Option(Path("dist"), "--output", "-o", envvar="EDGESMITH_DIST", help="Directory to write artifacts into."),
    input_shape: list[str] = typer.Option(None, "--input-shape", help="Static input shape: 1,3,224,224 or NAME=1,3,224,224; repeatable."),
    name: str = typer.Option(None, "--name", help="Model name used in artifact names (default: file or callable name)."),
    model_version: str = typer.Option("1", "--model-version", help="Model version recorded in the manifest."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, or fp16 weights (openvino)."),
    key: Path = typer.Option(None, "--key", envvar="EDGESMITH_KEY", help="Signing key (.key); default $EDGESMITH_HOME/keys/default.key, created on first use."),
    tuning_db: Path = typer.Option(None, "--tuning-db", help="MetaSchedule tuning work directory to apply (tvm)."),
    samples: Path = typer.Option(None, "--samples", help=".npz of validation inputs named like the model inputs, samples on axis 0."),
    num_samples: int = typer.Option(8, "--num-samples", help="Number of random validation samples when --samples is not given."),
    allow_constant_output: bool = typer.Option(False, "--allow-constant-output", help="Accept a model whose outputs ignore its input (latency work only)."),
    quantize: str = typer.Option(None, "--quantize", envvar="EDGESMITH_QUANTIZE",
                                 help="int8: post-training quantization (openvino: NNCF; ort: ONNX Runtime QDQ) behind an accuracy gate."),
    calib: Path = typer.Option(None, "--calib", help="Calibration inputs for --quantize: .npz with x (N samples shaped like the model input); default: a registered model's test split."),
    eval_data: Path = typer.Option(None, "--eval", help="Labelled held-out data for the accuracy gate: .npz with x and integer y; default: a registered model's test split."),
    max_accuracy_drop: float = typer.Option(1.0, "--max-accuracy-drop", help="Refuse an INT8 artifact whose top-1 accuracy is more than this many points below FP32's."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object listing every artifact instead of a table."),
) -> None:
    """Build, validate against ONNX Runtime, package and sign one artifact per target (and backend)."""
    if precision not in ("fp32", "fp16"):
        raise UserError(f"--precision {precision!r} is not known; use fp32 or fp16")
    if quantize is not None and precision != "fp32":
        raise UserError("--quantize int8 starts from the FP32 model; drop --precision")
    if not math.isfinite(max_accuracy_drop):
        raise UserError(f"--max-accuracy-drop {max_accuracy_drop} is not a number of points; give e.g. 1.0")
    if quantize is None and (calib or eval_data):
        raise UserError("--calib and --eval are data for --quantize int8; add --quantize int8 or drop them")
    targets = _targets(target)
    plan = [(t, b) for t in targets for b in choose_backends(t, backend)]
    signing_key = load_signing_key(key) if key else default_signing_key()
    options = BuildOptions(out_dir=output, precision=precision, tuning_db=tuning_db, samples_path=samples,
                           num_samples=num_samples, allow_constant_output=allow_constant_output, model_version=model_version,
                           quantize=quantize, calib_path=calib, eval_path=eval_data, max_accuracy_drop=max_accuracy_drop)
    err = Console(stderr=True)
    with err.status("loading the model") as status:
        source = load_source(model, parse_input_shapes(input_shape or []), name)
        status.update("running ONNX Runtime on the sample inputs")
        ref = run_reference(source, options)
        results, failures = [], []
        for t, b in plan:
            try:
                results.append(build_one(source, ref, t, b, options, signing_key, status=status.update))
            except KeyboardInterrupt:
                raise
            except Exception as e:  # one failing pair must not stop the others
                message = str(e) if isinstance(e, UserError) else (
                    f"internal error in edgesmith ({type(e).__name__}: {first_line(e)}); nothing was written for this "
                    "pair, please report it with the model")
                failures.append({"target": t.name, "backend": b, "error": message})
                print_error(f"{t.name}/{b}: {message}")
    if as_json:
        print(json.dumps({"artifacts": [
            {"target": r.target, "backend": r.backend, "path": str(r.path), "size_bytes": r.size_bytes,
             "build_time_s": round(r.duration_s, 3), "stages_s": {k: round(v, 3) for k, v in r.stages.items()},
             "validation": r.manifest.validation.model_dump(mode="json"),
             "quantization": r.manifest.quantization.model_dump(mode="json") if r.manifest.quantization else None,
             "proof": r.manifest.proof.model_dump(mode="json")}
            for r in results], "failures": failures}, indent=2))
    else:
        _print_table(results, signing_key.key_id)
    if failures:
        raise typer.Exit(1)


def _print_table(results, key_id: str) -> None:
    if not results:
        return
    table = Table(title=f"artifacts (signed with key {key_id})")
    quantized = any(r.manifest.quantization for r in results)
    columns = ["target", "backend", "size", "validation", "max abs err", "top-1", *(["INT8 / FP32 acc"] if quantized else []),
               "proof on ISA", "build time", "path"]
    for column in columns:
        table.add_column(column, justify="right" if column in ("size", "max abs err", "build time") else "left")
    for r in results:
        v = r.manifest.validation
        state = f"[green]{v.status}[/] ({v.executed.how})" if v.executed else f"[yellow]{v.status}[/]"
        p = r.manifest.proof
        proof = f"[green]proven[/] ({p.how})" if p.status == "proven" else f"[yellow]{p.status}[/]"
        table.add_row(r.target, r.backend, _size(r.size_bytes), state,
                      f"{v.max_abs_err:.2e}" if v.max_abs_err is not None else "—",
                      f"{v.top1_agreement:.0%}" if v.top1_agreement is not None else "—",
                      *([_accuracy(r.manifest.quantization)] if quantized else []), proof,
                      f"{r.duration_s:.1f} s", str(r.path))
    out_console().print(table)


def _accuracy(q) -> str:
    return "—" if q is None else f"{q.int8_accuracy:.2%} / {q.fp32_accuracy:.2%}"
