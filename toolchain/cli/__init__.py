"""The ``edgesmith`` command: verb-first, one module per command group, thin bodies.

User mistakes (``UserError`` and the runtime's typed errors) print as one ``error:`` sentence and
exit with status 1, and so does a package of an extra this install lacks (``toolchain/extras.py``);
a traceback means a bug in edgesmith.
"""

from __future__ import annotations

import os
import signal
import sys
from contextlib import contextmanager
from typing import Iterator

import typer
from rich.markup import escape
from rich.console import Console

from edgesmith.runtime.errors import Error as RuntimeErrorBase
from edgesmith.toolchain.errors import UserError
from edgesmith.toolchain.extras import missing_package_message

app = typer.Typer(name="edgesmith", help="Compile ML models per hardware target into signed, self-describing artifacts.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
err_console = Console(stderr=True)


def out_console() -> Console:
    """Console for tables on stdout; wide enough when piped (logs, CI) not to fold every cell."""
    console = Console()
    return console if console.is_terminal else Console(width=160)


def print_error(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


@contextmanager
def stdout_reserved(reserve: bool) -> Iterator[None]:
    """With ``--json`` stdout carries the JSON and nothing else: while the command works, whatever an
    engine prints there (TVM's ONNX frontend prints its conversion errors on stdout, and C++ code
    and child processes write to descriptor 1 directly) goes to stderr, at the file-descriptor level."""
    if not reserve:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _register() -> None:
    from edgesmith.toolchain.cli import artifacts, bench, broker, build, deploy, fleet, keys, prove, targets, tools, train
    from edgesmith.toolchain.cli import capture, check, data, loop, shadow, tune

    app.command("targets")(targets.targets)
    app.command("build")(build.build)
    app.command("check")(check.check)
    app.command("tune")(tune.tune)
    app.command("train")(train.train)
    app.command("verify")(artifacts.verify)
    app.command("inspect")(artifacts.inspect)
    app.command("prove")(prove.prove)
    app.command("bench")(bench.bench)
    app.command("deploy")(deploy.deploy)
    app.command("rollback")(deploy.rollback)
    app.command("select")(shadow.select)
    app.command("loop")(loop.loop)
    app.add_typer(keys.app, name="keys")
    app.add_typer(tools.app, name="tools")
    app.add_typer(broker.app, name="broker")
    app.add_typer(fleet.app, name="fleet")
    app.add_typer(shadow.app, name="shadow")
    app.add_typer(capture.app, name="capture")
    app.add_typer(data.app, name="data")


_register()


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt


def run(command: typer.Typer, interrupted: str = "interrupted; nothing half-written was left behind") -> None:
    """Run a Typer app as a console script: a user mistake, or a package of an extra this install
    lacks, is one ``error:`` sentence and status 1; Ctrl-C prints ``interrupted`` and exits 130.
    SIGTERM (a CI time-out, `kill`) is handled like Ctrl-C, so staging directories and the like are
    cleaned up on the way out; commands that serve (the monitor, the artifact server) install their
    own handlers."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        command()
    except (UserError, RuntimeErrorBase) as e:
        print_error(str(e))
        sys.exit(1)
    except ModuleNotFoundError as e:
        message = missing_package_message(e)
        if message is None:  # not a package of an extra: a bug, show it
            raise
        print_error(message)
        sys.exit(1)
    except KeyboardInterrupt:
        err_console.print(interrupted)
        sys.exit(130)


def main() -> None:
    run(app)
