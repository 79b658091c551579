"""Which signing keys a device trusts: ``$EDGESMITH_HOME/keys/*.pub`` and ``$EDGESMITH_HOME/trusted/*.pub``.

Public keys are files holding one line, the 32-byte Ed25519 public key in hex (docs/artifact.md).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from edgesmith.runtime.artifact import _core
from edgesmith.runtime.errors import ValueError as EdgesmithValueError


HOME_DIR_NAME = ".edgesmith"
_warned: set[str] = set()


def edgesmith_home() -> Path:
    """Where keys, tool environments and runtimes live, the C++ core's ``home_resolve()`` rule:
    ``$EDGESMITH_HOME``; else the nearest ``.edgesmith`` directory in the working directory or one of
    its parents (a project's home, like ``.git``: `make demo` creates one in the checkout) if the
    user owns it and nobody else can write it; else ``~/.edgesmith``. A project home passed over is
    reported once as a warning."""
    home, skipped = _core().home_resolve()
    if skipped and skipped not in _warned:
        _warned.add(skipped)
        warnings.warn(skipped, stacklevel=2)
    return Path(home)


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
    """Keys trusted without being named: <home>/{keys,trusted}/*.pub, read by the C++ core, which
    refuses (ValueError) a home or key directory another user owns or others can write."""
    edgesmith_home()  # the warning about a passed-over project home, if any
    return list(_core().trusted_keys_default())
