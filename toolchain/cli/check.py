"""``edgesmith check``: which operators of a model each candidate backend of a target cannot compile."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from edgesmith.toolchain.cli import out_console
from edgesmith.toolchain.errors import UserError


def check(
    model: str = typer.Argument(..., help="An .onnx file (or a PyTorch `module:callable`, exported first)."),
    target: str = typer.Option("host", "--target", "-t", envvar="EDGESMITH_TARGET", help="Target name (see `edgesmith targets`) or `host`."),
    input_shape: list[str] = typer.Option(None, "--input-shape", help="Static input shape: 1,3,224,224 or NAME=1,3,224,224; repeatable."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Pre-flight coverage: per candidate backend of the target, the operators (with opset, and the
    attribute or constant-input conditions that matter) it cannot compile. Nothing is compiled: the
    answer comes from the frontends' own converter and kernel tables and from the conditions ONNX's
    conformance cases showed (toolchain/coverage.py, docs/onnx_coverage.md). Exits 1 when no
    backend of the target covers the model."""
    from edgesmith.toolchain import coverage
    from edgesmith.toolchain.sources import load_source, parse_input_shapes
    from edgesmith.toolchain.targets import get_target

    t = get_target(target)
    source = load_source(model, parse_input_shapes(input_shape or []))
    report = coverage.check(source.onnx_model, list(t.backends))
    if as_json:
        print(json.dumps({"model": source.ref, "target": t.name, "opset": source.opset,
                          "backends": [c.to_json() for c in report]}, indent=2))
    else:
        table = Table(title=f"{source.ref} on {t.name}: what each candidate backend cannot compile")
        for column in ("backend", "verdict", "operator", "why"):
            table.add_column(column)
        for c in report:
            if not c.checked:
                table.add_row(c.backend, "[yellow]not checked[/]", "—", c.note or "")
            elif not c.gaps:
                table.add_row(c.backend, "[green]can compile[/]", "—", "every operator is covered")
            for k, g in enumerate(c.gaps):
                table.add_row(c.backend if k == 0 else "", "[red]cannot compile[/]" if k == 0 else "", g.operator, g.why)
        out_console().print(table)
    if all(c.can_compile is False for c in report if c.checked) and any(c.checked for c in report):
        sentence = coverage.nobody_supports(source.onnx_model, t.name, list(t.backends))
        raise UserError(sentence or f"no backend of {t.name} ({', '.join(t.backends)}) covers every operator of "
                                    f"{source.ref}; the table above lists what each lacks")
