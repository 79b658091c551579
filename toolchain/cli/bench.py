"""``edgesmith bench``: edgesmith's artifacts against the peer engines, for one model and target."""

from __future__ import annotations

import json
import math
import shlex
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgesmith.toolchain import bench as bench_api
from edgesmith.toolchain.bench.report import HEADER, goal_lines, table_rows
from edgesmith.toolchain.cli import out_console, stdout_reserved
from edgesmith.toolchain.errors import UserError
from edgesmith.toolchain.sources import parse_input_shapes


def bench(
    model: str = typer.Argument(..., help="An .onnx file, a PyTorch `module:callable` (with --input-shape), or models:/NAME/VERSION."),
    target: str = typer.Option("host", "--target", "-t", envvar="EDGESMITH_TARGET", help="A target this machine runs natively (default: host)."),
    against: str = typer.Option(None, "--against", help=f"Peer engines, comma-separated, from: {', '.join(bench_api.PEERS)} "
                                                        "(default: ort,openvino, and litert for PyTorch sources when its converter is installed)."),
    backends: str = typer.Option(None, "--backends", help="edgesmith backends to build and run through Session (default: openvino,ort; `all` adds tvm)."),
    artifacts: list[Path] = typer.Option(None, "--artifacts", help="Benchmark these prebuilt artifact directories instead of building; repeatable."),
    report: Path = typer.Option(Path("bench-report"), "--report", envvar="EDGESMITH_BENCH_REPORT", help="Directory for report.md, report.json and the PNG plots."),
    threads: int = typer.Option(None, "--threads", help="Threads for every engine (default: the target's)."),
    input_shape: list[str] = typer.Option(None, "--input-shape", help="Static input shape: 1,3,224,224 or NAME=1,3,224,224; repeatable."),
    rounds: int = typer.Option(3, "--rounds", help="Rounds: each runs every engine once, in its own process; the best round counts."),
    iterations: int = typer.Option(50, "--iterations", help="Timed runs per engine per round."),
    warmup: int = typer.Option(10, "--warmup", help="Untimed runs before timing, per engine per round."),
    samples: Path = typer.Option(None, "--samples", help=".npz of inputs named like the model inputs, samples on axis 0 (default: seeded N(0,1))."),
    num_samples: int = typer.Option(4, "--num-samples", help="How many inputs to cycle through and compare with ONNX Runtime."),
    quantize: str = typer.Option(None, "--quantize", help="int8: build edgesmith's artifacts INT8 (peers stay FP32); needs --calib and --eval."),
    calib: Path = typer.Option(None, "--calib", help="Calibration inputs for --quantize (.npz with x)."),
    eval_data: Path = typer.Option(None, "--eval", help="Labelled held-out data for --quantize's accuracy gate (.npz with x and y)."),
    max_accuracy_drop: float = typer.Option(1.0, "--max-accuracy-drop", help="INT8 accuracy gate bound, in points."),
    as_json: bool = typer.Option(False, "--json", help="Print the report JSON instead of a table."),
) -> None:
    """Time edgesmith's artifacts (through Session) and peer engines (their own APIs) on one model, each in its own process."""
    if not math.isfinite(max_accuracy_drop):
        raise UserError(f"--max-accuracy-drop {max_accuracy_drop} is not a number of points; give e.g. 1.0")
    config = bench_api.BenchConfig(model=model, target=target, against=against, backends=backends, artifacts=list(artifacts or []),
                                   input_shapes=parse_input_shapes(input_shape or []), threads=threads, rounds=rounds,
                                   iterations=iterations, warmup=warmup, samples=num_samples, samples_path=samples, quantize=quantize, calib=calib, eval_data=eval_data,
                                   max_accuracy_drop=max_accuracy_drop,
                                   command=" ".join(["edgesmith", "bench", *map(shlex.quote, sys.argv[2:])]))
    err = Console(stderr=True)
    with stdout_reserved(as_json), Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                            TimeElapsedColumn(), console=err, transient=True) as bar:
        task = bar.add_task("preparing", total=None)
        hooks = bench_api.Progress(status=lambda text: bar.update(task, description=text),
                                   start=lambda total: bar.update(task, total=total, completed=0),
                                   advance=lambda _: bar.advance(task))
        result = bench_api.run_bench(config, report, hooks)
    if as_json:
        print(json.dumps(result, indent=1))
        return
    table = Table(title=f"{result['model']['name']} on {result['target']}, {result['threads']} threads, best of {rounds} rounds")
    for column in HEADER:
        table.add_column(column, justify="left" if column in ("engine", "version") else "right")
    for row in table_rows(result):
        table.add_row(*row)
    console = out_console()
    console.print(table)
    for line in goal_lines(result):
        console.print(line, highlight=False)
    console.print(f"report: {report / 'report.md'}", highlight=False)
