"""Deployment, central side, without services: archives (§1), signed desired states (§2), deploy
keys, and the artifact server's HEAD / Range answers over real HTTP (docs/deployment.md)."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import tarfile
from pathlib import Path

import pytest

from deploy_helpers import make_artifact
from edgesmith.toolchain.deploy import archive as archive_mod
from edgesmith.toolchain.deploy import desired
from edgesmith.toolchain.deploy.server import ArtifactServer
from edgesmith.toolchain.errors import UserError
from edgesmith.toolchain.signing import (deploy_keys_dir, ephemeral_key, generate_deploy_key, generate_key,
                                         load_deploy_key, sign_manifest)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def build_key():
    return ephemeral_key()


@pytest.fixture
def artifact(tmp_path, build_key) -> Path:
    return make_artifact(tmp_path / "art-v1", build_key)


# ---- archives ---------------------------------------------------------------------------------------

def test_archive_is_content_addressed_and_deterministic(tmp_path, artifact):
    store = tmp_path / "store"
    first = archive_mod.archive(artifact, store)
    data = Path(first.path).read_bytes()
    assert Path(first.path).name == f"{hashlib.sha256(data).hexdigest()}.tar" == f"{first.sha256}.tar"
    assert first.size == len(data)
    assert first.manifest_sha256 == hashlib.sha256((artifact / "manifest.json").read_bytes()).hexdigest()
    # Touching every file (new mtimes) and archiving into another store gives the same bytes.
    for path in artifact.rglob("*"):
        os.utime(path, (1_700_000_000, 1_700_000_000))
    second = archive_mod.archive(artifact, tmp_path / "other")
    assert second.sha256 == first.sha256
    with tarfile.open(first.path) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == sorted(m.name for m in members)
        assert all(not m.name.startswith(("./", "/")) and ".." not in m.name.split("/") for m in members)
        assert all(m.isfile() or m.isdir() for m in members) and all(m.mtime == 0 and m.uid == 0 for m in members)
        files = {m.name: tar.extractfile(m).read() for m in members if m.isfile()}
    assert files == {p.relative_to(artifact).as_posix(): p.read_bytes() for p in artifact.rglob("*") if p.is_file()}
    assert data[257:263] == b"ustar\x00"  # POSIX ustar magic in the first header
    assert archive_mod.lookup(first.manifest_sha256, store) == first
    assert not [p for p in store.iterdir() if p.name.startswith(".")]  # no temp file left


def test_archive_refuses_links_and_non_artifacts(tmp_path, artifact):
    (artifact / "link").symlink_to("/etc/passwd")
    with pytest.raises(UserError, match="symbolic link"):
        archive_mod.archive(artifact, tmp_path / "store")
    (artifact / "link").unlink()
    (artifact / "manifest.sig").unlink()
    with pytest.raises(UserError, match="no manifest.json and manifest.sig"):
        archive_mod.archive(artifact, tmp_path / "store")
    with pytest.raises(UserError, match="not an artifact directory"):
        archive_mod.archive(tmp_path / "missing", tmp_path / "store")
    (artifact / "manifest.sig").write_text("{}")
    (artifact / "manifest.json").write_text('{"schema_version": 1}')
    with pytest.raises(UserError, match="not a valid manifest"):
        archive_mod.archive(artifact, tmp_path / "store")
    assert archive_mod.lookup("0" * 64, tmp_path / "store") is None


# ---- desired states ---------------------------------------------------------------------------------

def _state(tmp_path, artifact, version=7, action="deploy"):
    info = archive_mod.archive(artifact, tmp_path / "store")
    return info, desired.desired_state("plant-a", "cam-01", version, "dep-20261129-0412-ab12cd", action, info,
                                       "http://10.0.0.5:8470/")


def test_desired_state_fields_and_signature(tmp_path, artifact):
    info, state = _state(tmp_path, artifact)
    assert state["artifact"] == {"url": f"http://10.0.0.5:8470/artifacts/{info.sha256}.tar", "sha256": info.sha256,
                                 "size": info.size, "manifest_sha256": info.manifest_sha256, "name": info.name}
    key = ephemeral_key()
    envelope = desired.sign(state, key)
    outer = json.loads(envelope)
    assert set(outer) == {"v", "signed", "key_id", "signature"} and outer["key_id"] == key.key_id
    assert len(outer["key_id"]) == 16 and len(outer["signature"]) == 128
    assert desired.verify(envelope, [key.public_key]) == state == json.loads(outer["signed"])
    assert desired.version_of(envelope) == 7


def test_desired_state_refusals(tmp_path, artifact):
    _, state = _state(tmp_path, artifact)
    key, other = ephemeral_key(), ephemeral_key()
    envelope = desired.sign(state, key)
    with pytest.raises(ValueError, match="not a trusted deploy key"):
        desired.verify(envelope, [other.public_key])
    outer = json.loads(envelope)
    tampered = dict(outer, signed=outer["signed"].replace('"version":7', '"version":8'))
    with pytest.raises(ValueError, match="signature is not valid"):
        desired.verify(json.dumps(tampered).encode(), [key.public_key])
    # The same key signing the text as a manifest (no domain prefix) does not make a valid desired state.
    as_manifest = json.loads(sign_manifest(outer["signed"].encode(), key))
    with pytest.raises(ValueError, match="signature is not valid"):
        desired.verify(json.dumps(dict(outer, signature=as_manifest["signature"])).encode(), [key.public_key])
    for broken in (b"not json", b"{}", json.dumps(dict(outer, v=2)).encode()):
        with pytest.raises(ValueError):
            desired.verify(broken, [key.public_key])


def test_deployment_ids_are_unique_and_dated():
    ids = {desired.new_deployment_id(0) for _ in range(50)}
    assert len(ids) == 50 and all(i.startswith("dep-19700101-0000-") for i in ids)


# ---- deploy keys -------------------------------------------------------------------------------------

def test_deploy_keys_live_apart_from_build_keys(tmp_path, _isolated_home):
    with pytest.raises(UserError, match="keys generate --deploy"):
        load_deploy_key()
    path = generate_deploy_key()
    assert path == deploy_keys_dir() / "default.key" and path.parent != _isolated_home / "keys"
    assert (path.stat().st_mode & 0o777) == 0o600
    assert load_deploy_key().key_id == load_deploy_key(path).key_id
    assert not list((_isolated_home / "keys").glob("*.pub"))  # devices trusting keys/*.pub do not trust it
    build = generate_key("default")
    with pytest.raises(UserError, match="is a build key"):
        load_deploy_key(build)


def test_keys_cli_makes_a_deploy_key(_isolated_home):
    from conftest import run_cli

    out = run_cli("keys", "generate", "--deploy", "--name", "ops").stdout
    assert "deploy key" in out and (deploy_keys_dir() / "ops.key").is_file()


# ---- the artifact server ------------------------------------------------------------------------------

def _request(url: str, method: str, path: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def test_server_head_range_and_resume(tmp_path, artifact):
    info = archive_mod.archive(artifact, tmp_path / "store")
    data = Path(info.path).read_bytes()
    path = f"/artifacts/{info.sha256}.tar"
    with ArtifactServer(tmp_path / "store") as server:
        status, headers, body = _request(server.url, "HEAD", path)
        assert status == 200 and int(headers["content-length"]) == len(data) and body == b""
        assert headers["accept-ranges"] == "bytes"
        status, _, body = _request(server.url, "GET", path)
        assert status == 200 and body == data
        # A download cut after 1000 bytes, resumed with Range: bytes=1000-
        status, headers, rest = _request(server.url, "GET", path, {"Range": "bytes=1000-"})
        assert status == 206 and headers["content-range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"
        assert data[:1000] + rest == data
        status, _, middle = _request(server.url, "GET", path, {"Range": "bytes=10-19"})
        assert status == 206 and middle == data[10:20]
        status, headers, _ = _request(server.url, "GET", path, {"Range": f"bytes={len(data)}-"})
        assert status == 416 and headers["content-range"] == f"bytes */{len(data)}"
        for bad in ("/artifacts/../store/index", f"/artifacts/{'0' * 64}.tar", "/artifacts/index",
                    f"/artifacts/{info.sha256}.tar.tmp", "/"):
            assert _request(server.url, "GET", bad)[0] == 404, bad
