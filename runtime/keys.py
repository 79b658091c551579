"""Which signing keys a device trusts: ``$EDGESMITH_HOME/keys/*.pub`` and ``$EDGESMITH_HOME/trusted/*.pub``.

Public keys are files holding one line, the 32-byte Ed25519 public key in hex (docs/artifact.md).
"""

from __future__ import annotations

import os
from pathlib import Path

from edgesmith.runtime.errors import ValueError as EdgesmithValueError


HOME_DIR_NAME = ".edgesmith"


def edgesmith_home() -> Path:
    """Where keys, tool environments and runtimes live, the same rule as the C++ core's
    ``keys_home()``: ``$EDGESMITH_HOME``; else the nearest ``.edgesmith`` directory in the working
    directory or one of its parents (a project's home, like ``.git``: `make demo` creates one in the
    checkout); else ``~/.edgesmith``."""
    env = os.environ.get("EDGESMITH_HOME")
    if env:
        return Path(env)
    try:
        here = Path.cwd()
    except OSError:  # the working directory was removed
        here = None
    if here is not None:
        for directory in (here, *here.parents):
            if (directory / HOME_DIR_NAME).is_dir():
                return directory / HOME_DIR_NAME
    return Path.home() / HOME_DIR_NAME


def read_hex_key(path: str | os.PathLike, what: str = "public key", hint: str = "") -> bytes:
    """Read a one-line hex file holding a 32-byte Ed25519 key (public key or seed); a missing or
    malformed file is a ValueError naming it (``hint`` says what to do about it)."""
    suffix = f"; {hint}" if hint else ""
    try:
        raw = bytes.fromhex(Path(path).read_text().strip())
    except FileNotFoundError:
        raise EdgesmithValueError(f"{what} {path} does not exist{suffix}") from None
    except ValueError:
        raise EdgesmithValueError(f"{what} {path} is not a hex Ed25519 key{suffix}") from None
    if len(raw) != 32:
        raise EdgesmithValueError(f"{what} {path} holds {len(raw)} bytes, an Ed25519 key has 32{suffix}")
    return raw


def load_public_key(path: str | os.PathLike) -> bytes:
    """Read a .pub file."""
    return read_hex_key(path, "public key")


def trusted_public_keys() -> list[bytes]:
    """Keys trusted without being named: $EDGESMITH_HOME/{keys,trusted}/*.pub."""
    home = edgesmith_home()
    paths = sorted((home / "keys").glob("*.pub")) + sorted((home / "trusted").glob("*.pub"))
    return [load_public_key(p) for p in paths]
