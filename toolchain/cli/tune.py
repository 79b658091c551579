"""``edgesmith tune``: MetaSchedule-tune a model for a TVM target into the cached database that
``edgesmith build`` applies."""

from __future__ import annotations

import contextlib
import json
import sys

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from edgesmith.toolchain.cli import out_console
from edgesmith.toolchain.sources import load_source, parse_input_shapes
from edgesmith.toolchain.targets import get_target


def _us(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1000:.2f} ms" if value >= 1000 else f"{value:.1f} µs"


def tune(
    model: str = typer.Argument(..., help="An .onnx file, a PyTorch `module:callable`, or models:/NAME/VERSION (as for build)."),
    target: str = typer.Option("host", "--target", "-t", envvar="EDGESMITH_TARGET", help="Target name (see `edgesmith targets`) or `host`."),
    trials: int = typer.Option(200, "--trials", help="MetaSchedule trials (candidate kernels built and measured) over all tasks."),
    input_shape: list[str] = typer.Option(None, "--input-shape", help="Static input shape: 1,3,224,224 or NAME=1,3,224,224; repeatable."),
    rpc_tracker: str = typer.Option(None, "--rpc-tracker", help="HOST:PORT of a TVM RPC tracker; measure on its devices instead of here."),
    rpc_key: str = typer.Option(None, "--rpc-key", help="Device key registered with the tracker (`python -m tvm.exec.rpc_server --key KEY`)."),
    rpc_timeout: float = typer.Option(30.0, "--rpc-timeout", help="Seconds to wait for the tracker and a free device."),
    max_minutes: float = typer.Option(None, "--max-minutes", help="Stop after this many minutes (the batch being measured finishes)."),
    prepack: bool = typer.Option(False, "--prepack", help="Tune with CPU weight prepacking (layout-rewritten constant weights)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
) -> None:
    """Tune the model's TVM kernels with MetaSchedule; the database is cached per workload, target and TVM version."""
    from edgesmith.toolchain.tune import TuneRequest, preflight, run_tune

    err = Console(stderr=True)
    tune_target = get_target(target)
    with err.status("checking the options" + (f" and the RPC tracker {rpc_tracker}" if rpc_tracker else "")):
        preflight(tune_target, trials, rpc_tracker, rpc_key, rpc_timeout)  # before the model: mistakes fail fast
    with err.status("loading the model"):
        source = load_source(model, parse_input_shapes(input_shape or []))
    request = TuneRequest(source=source, target=tune_target, trials=trials, rpc_tracker=rpc_tracker, rpc_key=rpc_key,
                          max_minutes=max_minutes, prepack=prepack, rpc_timeout_sec=rpc_timeout)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("best {task.fields[best]}"),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn()]
    with Progress(*columns, console=err, transient=False, disable=as_json) as bar:
        task = bar.add_task("tuning", total=trials, best="-", rate="")

        def on_update(p) -> None:
            failed = f", {p.failed} failed" if p.failed else ""
            bar.update(task, completed=min(p.done, trials), best=f"{_us(p.estimate_us)} (kernels)",
                       rate=f"{p.trials_per_min:.0f} trials/min{failed}")

        def on_status(text: str) -> None:
            bar.update(task, description=text if len(text) < 60 else text[:57] + "...")
            if not as_json:
                err.print(text, highlight=False)

        # TVM prints to stdout here and there: keep stdout for the JSON with --json
        with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
            result = run_tune(request, on_update=on_update, on_status=on_status)
    summary = {"database": str(result.database), "trials": result.trials, "failed_trials": result.failed, "tasks": result.tasks,
               "minutes": round(result.minutes, 2), "trials_per_min": round(result.trials_per_min, 1),
               "latency_us": None if result.latency_us is None else round(result.latency_us, 1),
               "measured_on": result.measured_on, "stopped_early": result.interrupted}
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    stopped = " (stopped early; what was measured is kept)" if result.interrupted else ""
    out_console().print(f"tuned {source.name} for {request.target.name}: {result.trials} trials over {result.tasks} tasks in "
                        f"{result.minutes:.1f} min ({result.trials_per_min:.0f} trials/min){stopped}; end-to-end latency "
                        f"{_us(result.latency_us)} measured on {result.measured_on}; database {result.database} "
                        f"(`edgesmith build` applies it)", highlight=False, soft_wrap=True)
