"""Durable file-system steps shared by everything that writes atomically (artifacts, keys, the
deployment store): write a temporary file, fsync it, rename it into place, fsync the directory."""

from __future__ import annotations

import os
from pathlib import Path


def fsync(path: Path) -> None:
    """Flush a file's or a directory's data and metadata (a rename is durable once its directory is)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def private_dirs(path: Path) -> Path:
    """Create ``path`` and any missing parents with mode 0700, whatever the umask (a 002 umask would
    make them group-writable, and the device rule refuses a key or trust directory another user
    could write: csrc/common/file.cc path_trust_problem). Existing directories are left as they are."""
    path = Path(path)
    missing = []
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing.append(folder)
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:
            continue
        os.chmod(folder, 0o700)  # mkdir's mode is masked by the umask; a 077-or-looser umask is not assumed
    return path
