"""Which signing keys a device trusts: ``$EDGESMITH_HOME/keys/*.pub`` and ``$EDGESMITH_HOME/trusted/*.pub``.

Public keys are files holding one line, the 32-byte Ed25519 public key in hex (docs/artifact.md).
"""

from __future__ import annotations

import os
from pathlib import Path

from edgesmith.runtime.errors import ValueError as EdgesmithValueError


def edgesmith_home() -> Path:
    """Where keys and tool environments live: ``$EDGESMITH_HOME`` or ``~/.edgesmith``."""
    return Path(os.environ.get("EDGESMITH_HOME") or Path.home() / ".edgesmith")


def load_public_key(path: str | os.PathLike) -> bytes:
    """Read a .pub file; a missing or malformed file is a ValueError naming it."""
    try:
        raw = bytes.fromhex(Path(path).read_text().strip())
    except FileNotFoundError:
        raise EdgesmithValueError(f"public key {path} does not exist") from None
    except ValueError:
        raise EdgesmithValueError(f"public key {path} is not a hex Ed25519 public key") from None
    if len(raw) != 32:
        raise EdgesmithValueError(f"public key {path} holds {len(raw)} bytes, an Ed25519 public key has 32")
    return raw


def trusted_public_keys() -> list[bytes]:
    """Keys trusted without being named: $EDGESMITH_HOME/{keys,trusted}/*.pub."""
    home = edgesmith_home()
    paths = sorted((home / "keys").glob("*.pub")) + sorted((home / "trusted").glob("*.pub"))
    return [load_public_key(p) for p in paths]
