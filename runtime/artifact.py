"""Verify and read edgesmith artifacts on the device.

This is the documented Python face of the C++ core (``csrc/artifact/``); the private extension
``edgesmith.runtime._core`` does the work, so the device and ``edgesmith verify`` apply the exact
same rules (docs/artifact.md, "Integrity rules"). Trust is the caller's decision: :func:`verify`
never looks keys up itself, the toolchain passes the keys it trusts.

Errors are the classes of :mod:`edgesmith.runtime.errors`: ``IntegrityError`` (with ``.path``,
the artifact-relative file to blame), ``ManifestError``, ``ValueError`` for a malformed key and
``RuntimeError`` when the directory cannot be read.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from edgesmith.runtime.errors import RuntimeError as EdgesmithRuntimeError

__all__ = ["VerifiedArtifact", "core_version", "read_manifest", "sha256_file", "verify"]


def _core() -> ModuleType:
    """The compiled extension, imported on first use so pure-Python users never need it."""
    try:
        return importlib.import_module("edgesmith.runtime._core")
    except ImportError as exc:
        raise EdgesmithRuntimeError(
            "edgesmith's C++ core is not built; run `make` / `pip install -e .`"
        ) from exc


@dataclass(frozen=True)
class VerifiedArtifact:
    """An artifact directory that passed every integrity rule.

    ``manifest`` is parsed from the exact bytes the signature covers, so it can be trusted as is.
    """

    path: Path
    key_id: str
    file_count: int
    manifest: dict[str, Any]


def verify(path: str | os.PathLike[str], trusted_keys: list[bytes] | None = None) -> VerifiedArtifact:
    """Check integrity rules 1-8 on the artifact directory ``path``.

    ``trusted_keys`` are raw 32-byte Ed25519 public keys; ``None`` means none, so the check fails
    at rule 3 (the toolchain decides which keys to trust and passes them in).
    Raises ``IntegrityError`` naming the offending file, or ``ManifestError``.
    """
    keys = [bytes(k) for k in (trusted_keys or [])]
    result = _core().verify_artifact(os.fspath(path), keys)
    return VerifiedArtifact(
        path=Path(path),
        key_id=result["key_id"],
        file_count=result["file_count"],
        manifest=json.loads(result["manifest_json"]),
    )


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The C++ reader's view of a manifest (artifact directory or manifest.json), unverified.

    Only the fields the device uses: schema_version, name, payload, files, inputs, outputs,
    golden {samples, atol, rtol}, monitoring {outputs, latency}, target {name, isa, threads (when
    set)}, backend {name, options_json (the options object as JSON text, as plugins get it)}.
    Raises ``ManifestError`` on a schema violation.
    """
    return _core().read_manifest(os.fspath(path))


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Lower-case hex SHA-256 of a file, computed by the core (streamed, GIL released)."""
    return _core().sha256_file(os.fspath(path))


def core_version() -> str:
    """Version of the compiled C++ core."""
    return _core().__version__
