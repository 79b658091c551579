"""``edgesmith keys``: Ed25519 signing keys for artifacts."""

from __future__ import annotations

from pathlib import Path

import typer

from edgesmith.toolchain.signing import generate_key, load_signing_key

app = typer.Typer(help="Manage artifact signing keys.", no_args_is_help=True)


@app.command("generate")
def generate(name: str = typer.Option("default", help="Key name: writes NAME.key and NAME.pub."),
             directory: Path = typer.Option(None, "--dir", help="Where to write (default $EDGESMITH_HOME/keys)."),
             force: bool = typer.Option(False, help="Replace an existing key of that name.")) -> None:
    """Make a signing key pair; `edgesmith build --key NAME.key` signs with it."""
    path = generate_key(name, directory, overwrite=force)
    key = load_signing_key(path)
    print(f"wrote {path} (secret, mode 0600) and {path.with_suffix('.pub')}; key id {key.key_id}")
