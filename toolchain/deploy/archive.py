"""Artifact directory → content-addressed ustar archive in the artifact store (docs/deployment.md §1).

The archive is deterministic (sorted members, zero mtimes and owners, fixed modes), so the same
artifact always gives the same SHA-256 and a device resuming a download gets the same bytes.
The store directory holds ``<sha256>.tar`` (what the server serves) and ``index/<manifest
sha256>.json`` (what each archive holds), so a rollback can find the archive of the artifact a
device served before.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tarfile
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgesmith.runtime.keys import edgesmith_home
from edgesmith.runtime.manifest import Manifest
from edgesmith.toolchain.errors import UserError
from edgesmith.toolchain.files import fsync

MAX_NAME_BYTES = 255
CHUNK = 1 << 20


@dataclass(frozen=True)
class ArchiveInfo:
    """One archive in the store, and what the desired state says about it."""

    sha256: str
    size: int
    path: str
    name: str  # the artifact's name (manifest)
    manifest_sha256: str
    model: str
    model_version: str
    target: str
    backend: str
    model_uri: str | None = None  # models:/NAME/VERSION when built from the registry

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"


def default_store_dir() -> Path:
    return edgesmith_home() / "deploy" / "artifacts"


def _members(artifact_dir: Path) -> list[tuple[str, Path, bool]]:
    """(archive name, path, is_dir) for every entry, parents before children, in byte order."""
    entries: list[tuple[str, Path, bool]] = []
    for root, dirs, files in os.walk(artifact_dir, followlinks=False):
        for name in dirs + files:
            path = Path(root) / name
            rel = path.relative_to(artifact_dir).as_posix()
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise UserError(f"{path} is a symbolic link; an artifact archive holds regular files and directories "
                                "only (devices refuse links), so copy the file it points to into the artifact instead")
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise UserError(f"{path} is not a regular file or directory; remove it from the artifact directory")
            if len(rel.encode()) > MAX_NAME_BYTES:
                raise UserError(f"{path}: member names in an artifact archive are at most {MAX_NAME_BYTES} bytes; "
                                "rename it")
            entries.append((rel, path, stat.S_ISDIR(mode)))
    return sorted(entries, key=lambda e: e[0].encode())


def _tarinfo(name: str, size: int, is_dir: bool) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
    info.size = 0 if is_dir else size
    info.mode = 0o755 if is_dir else 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def read_manifest(artifact_dir: Path) -> tuple[Manifest, str]:
    """The artifact's manifest and the SHA-256 of its manifest.json bytes."""
    manifest_path = artifact_dir / "manifest.json"
    if not artifact_dir.is_dir():
        raise UserError(f"{artifact_dir} is not an artifact directory; pass the directory `edgesmith build` wrote "
                        "(it holds manifest.json and manifest.sig)")
    if not manifest_path.is_file() or not (artifact_dir / "manifest.sig").is_file():
        raise UserError(f"{artifact_dir} has no manifest.json and manifest.sig; pass the directory `edgesmith build` "
                        "wrote for one artifact")
    data = manifest_path.read_bytes()
    try:
        manifest = Manifest.from_bytes(data)
    except ValueError as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"{manifest_path} is not a valid manifest ({first}); rebuild the artifact") from None
    return manifest, hashlib.sha256(data).hexdigest()


def archive(artifact_dir: Path, store_dir: Path | None = None) -> ArchiveInfo:
    """Write the artifact's archive into the store (atomically: temp file, fsync, rename) and index it."""
    artifact_dir = Path(artifact_dir)
    store = Path(store_dir) if store_dir else default_store_dir()
    manifest, manifest_sha256 = read_manifest(artifact_dir)
    members = _members(artifact_dir)
    (store / "index").mkdir(parents=True, exist_ok=True)
    tmp = store / f".{uuid.uuid4().hex}.tar.tmp"
    try:
        with open(tmp, "wb") as out:
            with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for name, path, is_dir in members:
                    if is_dir:
                        tar.addfile(_tarinfo(name, 0, True))
                        continue
                    with open(path, "rb") as f:
                        size = os.fstat(f.fileno()).st_size
                        try:
                            tar.addfile(_tarinfo(name, size, False), f)
                        except ValueError as e:  # ustar cannot split this name into prefix + name
                            raise UserError(f"{path} cannot be named in a ustar archive ({e}); use shorter "
                                            "directory and file names") from None
            out.flush()
            os.fsync(out.fileno())
        digest = hashlib.sha256()
        with open(tmp, "rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
        sha256 = digest.hexdigest()
        final = store / f"{sha256}.tar"
        os.replace(tmp, final)  # same name, same bytes: replacing an existing copy changes nothing
    finally:
        tmp.unlink(missing_ok=True)
    source = manifest.model.source
    info = ArchiveInfo(sha256=sha256, size=final.stat().st_size, path=str(final), name=manifest.name,
                       manifest_sha256=manifest_sha256, model=manifest.model.name,
                       model_version=manifest.model.version, target=manifest.target.name,
                       backend=manifest.backend.name, model_uri=source.model_uri)
    _write_atomic(store / "index" / f"{manifest_sha256}.json", info.to_json())
    fsync(store)
    return info


def lookup(manifest_sha256: str, store_dir: Path | None = None) -> ArchiveInfo | None:
    """The stored archive of the artifact with this manifest digest, if the store holds it."""
    store = Path(store_dir) if store_dir else default_store_dir()
    index = store / "index" / f"{manifest_sha256}.json"
    if not index.is_file():
        return None
    info = ArchiveInfo(**json.loads(index.read_text()))
    return info if (store / f"{info.sha256}.tar").is_file() else None


def monitoring(info: ArchiveInfo) -> dict[str, Any]:
    """The ``monitoring`` section (latency layout, monitored outputs and their references) of the
    manifest inside a stored archive, checked against the digest the archive is filed under."""
    with tarfile.open(info.path) as tar:
        member = tar.extractfile("manifest.json")
        data = member.read() if member is not None else b""
    if hashlib.sha256(data).hexdigest() != info.manifest_sha256:
        raise UserError(f"the archive {info.path} does not hold the manifest {info.manifest_sha256[:12]}… it is filed "
                        "under; archive the artifact directory again (`edgesmith deploy` does)")
    return Manifest.from_bytes(data).monitoring.model_dump(mode="json", exclude_none=True)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync(path.parent)  # the rename is durable once the index directory is


