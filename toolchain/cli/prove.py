"""``edgesmith prove``: run an artifact on its own ISA with the device runtime."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from edgesmith.runtime import artifact as runtime_artifact
from edgesmith.toolchain.cli.artifacts import check_artifact_dir, trusted_keys
from edgesmith.toolchain.errors import UserError
from edgesmith.toolchain.prove import prove as prove_artifact
from edgesmith.toolchain.targets import Target


def prove(artifact: Path = typer.Argument(..., help="The artifact directory."),
          key: list[Path] = typer.Option(None, "--key", "-k", help="Trusted public key file (.pub); repeatable.",
                                         envvar="EDGESMITH_TRUSTED_KEY"),
          as_json: bool = typer.Option(False, "--json", help="Print the proof record as JSON.")) -> None:
    """Run the artifact's golden samples with edgesmith-run on its ISA (native or qemu) and compare."""
    check_artifact_dir(artifact)
    keys = trusted_keys(key)
    verified = runtime_artifact.verify(artifact, keys)
    target = Target.model_validate(verified.manifest["target"])
    result = prove_artifact(artifact, target, verified.manifest["backend"]["name"], keys)
    if as_json:
        print(json.dumps(result.model_dump(mode="json"), indent=2))
    if result.status == "not-run":
        raise UserError(f"cannot prove {artifact.name} on this machine: {result.reason}")
    if result.status == "failed":
        raise UserError(f"{artifact.name} failed its proof on {result.isa} ({result.how}): {result.reason}")
    if not as_json:
        print(f"proven: {artifact.name} ran on {result.isa} ({result.how}) with {result.runner}; "
              f"{result.samples} golden samples within tolerance (max abs err {result.max_abs_err:.3g})")
