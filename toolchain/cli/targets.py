"""``edgesmith targets``: the hardware targets edgesmith can build for."""

from __future__ import annotations

import json

import typer
from edgesmith.toolchain.cli import out_console
from rich.table import Table

from edgesmith.toolchain.targets import all_targets, host_target, proof_status


def targets(as_json: bool = typer.Option(False, "--json", help="Print the resolved target specs as JSON.")) -> None:
    """List the targets, their backends, and whether their artifacts can be proven on this machine."""
    found = all_targets()
    try:
        host = host_target().name
    except Exception:
        host = None
    if as_json:
        rows = []
        for target in found.values():
            possible, how = proof_status(target)
            rows.append({**target.spec(), "is_host": target.name == host, "proof_here": {"possible": possible, "how": how}})
        print(json.dumps({"host": host, "targets": rows}, indent=2))
        return
    table = Table(title="edgesmith targets" + (f" (host = {host})" if host else ""))
    for column in ("target", "isa", "backends", "threads", "proof here", "description"):
        table.add_column(column)
    for target in found.values():
        possible, how = proof_status(target)
        name = f"{target.name} *" if target.name == host else target.name
        table.add_row(name, target.isa, ", ".join(target.backends), str(target.threads),
                      f"[green]yes[/] ({how})" if possible else f"[yellow]no[/]: {how}", target.description)
    out_console().print(table)
