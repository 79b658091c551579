"""``edgesmith verify`` and ``edgesmith inspect``: read artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from edgesmith.toolchain.cli import out_console
from rich.table import Table

from edgesmith.runtime import artifact as runtime_artifact
from edgesmith.runtime.errors import Error as RuntimeErrorBase
from edgesmith.runtime.manifest import MANIFEST_FILE, Manifest
from edgesmith.toolchain.errors import UserError
from edgesmith.runtime.keys import edgesmith_home, load_public_key, trusted_public_keys


def trusted_keys(keys: list[Path] | None) -> list[bytes]:
    if keys:
        return [load_public_key(k) for k in keys]
    found = trusted_public_keys()
    if not found:
        raise UserError(f"no trusted public keys: pass --key FILE.pub, or put .pub files in {edgesmith_home() / 'trusted'}")
    return found


def check_artifact_dir(path: Path) -> None:
    if not path.is_dir():
        raise UserError(f"{path} is not an artifact directory (it does not exist or is a file)")
    if not (path / MANIFEST_FILE).is_file():
        raise UserError(f"{path} is not an artifact: it has no {MANIFEST_FILE}")


def verify(artifact: Path = typer.Argument(..., help="The artifact directory."),
           key: list[Path] = typer.Option(None, "--key", "-k", help="Trusted public key file (.pub); repeatable.",
                                          envvar="EDGESMITH_TRUSTED_KEY")) -> None:
    """Check an artifact's signature and every file's size and SHA-256 (exit 0 only if intact)."""
    check_artifact_dir(artifact)
    result = runtime_artifact.verify(artifact, trusted_keys(key))
    print(f"ok: {artifact} is intact: {result.file_count} files match the manifest, signed by key {result.key_id}")


def inspect(artifact: Path = typer.Argument(..., help="The artifact directory."),
            as_json: bool = typer.Option(False, "--json", help="Print the whole manifest as JSON."),
            key: list[Path] = typer.Option(None, "--key", "-k", help="Trusted public key file (.pub); repeatable.",
                                           envvar="EDGESMITH_TRUSTED_KEY")) -> None:
    """Show what an artifact is: model, target, backend, I/O, validation, files, signature state."""
    check_artifact_dir(artifact)
    try:
        manifest = Manifest.from_bytes((artifact / MANIFEST_FILE).read_bytes())
    except ValueError as e:
        raise UserError(f"{artifact / MANIFEST_FILE} does not follow the artifact schema ({str(e).splitlines()[0]})") from None
    try:
        signature = f"[green]valid[/], key {runtime_artifact.verify(artifact, trusted_keys(key)).key_id}"
    except (RuntimeErrorBase, UserError) as e:
        signature = f"[red]NOT VALID[/]: {e}"
    if as_json:
        print(json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=True))
        return
    console = out_console()
    v = manifest.validation
    console.print(f"[bold]{manifest.name}[/]  signature: {signature}", highlight=False)
    console.print(f"model    {manifest.model.name} v{manifest.model.version} ({manifest.model.source.kind}: {manifest.model.source.ref}), opset {manifest.model.opset}")
    console.print(f"target   {manifest.target.name} ({manifest.target.isa}, {getattr(manifest.target, 'description', '')})")
    console.print(f"backend  {manifest.backend.name} {manifest.backend.version}, {manifest.backend.precision}; payload {manifest.payload.format}: {manifest.payload.entry}")
    for kind, specs in (("input ", manifest.inputs), ("output", manifest.outputs)):
        for spec in specs:
            console.print(f"{kind}   {spec.name}: {spec.dtype}{spec.shape}")
    executed = f"ran {v.executed.how} on {v.executed.isa}" if v.executed else "did not run here"
    errors = f"max abs err {v.max_abs_err:.3g}, max rel err {v.max_rel_err:.3g}" if v.max_abs_err is not None else ""
    top1 = f", top-1 agreement {v.top1_agreement:.0%}" if v.top1_agreement is not None else ""
    console.print(f"validation [bold]{v.status}[/] vs {v.reference} on {v.samples} samples ({executed}) {errors}{top1}"
                  + (f" — {v.reason}" if v.reason else ""), highlight=False)
    console.print(f"built    {manifest.build.created_at} in {manifest.build.duration_s:.1f}s on {manifest.build.host.cpu}")
    table = Table("file", "size", "sha256")
    for entry in manifest.files:
        table.add_row(entry.path, f"{entry.size:,}", entry.sha256[:16] + "…")
    console.print(table)
