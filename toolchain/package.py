"""Package a staged build into a signed artifact directory, atomically.

A build writes into a hidden staging directory beside the destination; only a complete, signed
and re-verified artifact is renamed into place, so a failed or interrupted build leaves nothing
half-written behind (and never destroys the previous artifact of the same name before the new one
is complete).
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from edgesmith.runtime import artifact as runtime_artifact
from edgesmith.runtime.manifest import MANIFEST_FILE, SIGNATURE_FILE, FileEntry, Manifest
from edgesmith.toolchain.files import fsync
from edgesmith.toolchain.signing import SigningKey, sign_manifest


def file_entries(directory: Path) -> list[FileEntry]:
    """Every file below ``directory`` except the manifest and its signature, sorted by path."""
    entries = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel not in (MANIFEST_FILE, SIGNATURE_FILE):
            entries.append(FileEntry(path=rel, size=path.stat().st_size, sha256=runtime_artifact.sha256_file(path)))
    return entries


@contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """A fresh hidden directory next to ``final``; removed on exit unless it was published."""
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def sign_and_check(staging: Path, manifest: Manifest, key: SigningKey) -> None:
    """Write manifest.json and manifest.sig, then verify with the device's own (C++) verifier."""
    data = manifest.to_bytes()
    (staging / MANIFEST_FILE).write_bytes(data)
    (staging / SIGNATURE_FILE).write_bytes(sign_manifest(data, key))
    runtime_artifact.verify(staging, [key.public_key])


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where the kernel or the
    filesystem cannot (the caller then falls back to two renames)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_tree(directory: Path) -> None:
    for path in [*directory.rglob("*"), directory]:
        fsync(path)


def publish(staging: Path, final: Path) -> None:
    """Move a complete artifact into place, replacing an older one of the same name.

    Readers never see a missing or mixed artifact: a new name is a rename; an existing one is
    swapped with the staging directory in one atomic renameat2(RENAME_EXCHANGE), so ``final`` is
    always either the whole old artifact or the whole new one. Everything is fsynced first, and the
    parent directory after, so a power cut cannot leave a renamed but empty artifact.
    """
    _fsync_tree(staging)
    if final.exists() and _exchange(staging, final):
        shutil.rmtree(staging, ignore_errors=True)  # now holds the old artifact
    else:
        old = None
        if final.exists():  # no atomic exchange here: a short window without `final`
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
        try:
            os.rename(staging, final)
        except OSError:
            if old is not None:
                os.rename(old, final)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    fsync(final.parent)
