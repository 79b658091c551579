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
