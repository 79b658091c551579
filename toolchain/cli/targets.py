"""``edgesmith targets``: the hardware targets edgesmith can build for."""

from __future__ import annotations

import json

import typer
from edgesmith.toolchain.cli import out_console
from rich.table import Table

from edgesmith.toolchain.errors import UserError
from edgesmith.toolchain.prove import runner_for
from edgesmith.toolchain.targets import all_targets, host_target


def _proof_here(target) -> tuple[bool, str]:
    try:
        runner, how = runner_for(target)
    except UserError as e:
        return False, str(e)
    return runner is not None, how


def targets(as_json: bool = typer.Option(False, "--json", help="Print the resolved target specs as JSON.")) -> None:
    """List the targets, their backends, and whether their artifacts can be proven on this machine."""
    found = all_targets()
    try:
        host = host_target().name
    except UserError:
        host = None
    if as_json:
        rows = []
        for target in found.values():
            possible, how = _proof_here(target)
            rows.append({**target.spec(), "is_host": target.name == host, "proof_here": {"possible": possible, "how": how}})
        print(json.dumps({"host": host, "targets": rows}, indent=2))
        return
    table = Table(title="edgesmith targets" + (f" (host = {host})" if host else ""))
    for column in ("target", "isa", "backends", "threads"):
        table.add_column(column, no_wrap=True)
    table.add_column("proof here", overflow="fold", max_width=60)
    table.add_column("description", overflow="fold")
    for target in found.values():
        possible, how = _proof_here(target)
        name = f"{target.name} *" if target.name == host else target.name
        table.add_row(name, target.isa, ", ".join(target.backends), str(target.threads),
                      f"[green]yes[/] ({how})" if possible else f"[yellow]no[/]: {how}", target.description)
    out_console().print(table)
