"""``edgesmith keys``: Ed25519 keys: build keys sign artifacts, deploy keys sign desired states."""

from __future__ import annotations

from pathlib import Path

import typer

from edgesmith.toolchain.signing import generate_deploy_key, generate_key, load_signing_key

app = typer.Typer(help="Manage signing keys (artifacts: build keys; desired states: deploy keys).", no_args_is_help=True)


@app.command("generate")
def generate(name: str = typer.Option("default", help="Key name: writes NAME.key and NAME.pub."),
             directory: Path = typer.Option(None, "--dir", help="Where to write (default $EDGESMITH_HOME/keys, "
                                            "or $EDGESMITH_HOME/keys/deploy with --deploy)."),
             deploy: bool = typer.Option(False, "--deploy", help="A deploy key: `edgesmith deploy` signs desired "
                                         "states with it; devices trust its .pub in trust_dir/deploy/."),
             force: bool = typer.Option(False, help="Replace an existing key of that name.")) -> None:
    """Make a key pair; `edgesmith build --key NAME.key` signs with a build key, `edgesmith deploy` with a deploy key."""
    path = (generate_deploy_key if deploy else generate_key)(name, directory, overwrite=force)
    key = load_signing_key(path)
    kind = "deploy key" if deploy else "signing key"
    print(f"wrote {kind} {path} (secret, mode 0600) and {path.with_suffix('.pub')}; key id {key.key_id}")
