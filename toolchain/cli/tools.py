"""``edgesmith tools``: isolated environments for converters that can't share edgesmith's."""

from __future__ import annotations

import typer

from edgesmith.toolchain import tools as tool_envs

app = typer.Typer(help="Install isolated tool environments (e.g. the LiteRT converter).", no_args_is_help=True)


@app.command("install")
def install(name: str = typer.Argument(..., help=f"One of: {', '.join([*tool_envs.TOOLS, *tool_envs.BUILT_TOOLS])}")) -> None:
    """Create the tool's virtual environment under $EDGESMITH_HOME/tools (idempotent)."""
    python = tool_envs.install(name)
    print(f"{name}: ready ({python})")
