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

from conftest import BOTH_STORES
from deploy_helpers import make_artifact
from edgesmith.toolchain.deploy import archive as archive_mod
from edgesmith.toolchain.deploy import desired
from edgesmith.toolchain.deploy.server import ArtifactServer
from edgesmith.toolchain.errors import UserError
from edgesmith.toolchain.signing import (deploy_keys_dir, ephemeral_key, generate_deploy_key, generate_key,
                                         load_deploy_key, load_signing_key, sign_manifest)

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
    # Signed with the rest: devices refuse it a week (plus clock skew) after it was issued.
    assert state["not_after"] == state["issued_at_ms"] // 1000 + desired.DESIRED_VALIDITY_S
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
    for not_after in (0, -1, "soon", 2**53, True):
        with pytest.raises(ValueError, match="not_after"):
            desired.verify(desired.sign({**state, "not_after": not_after}, key), [key.public_key])
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


@pytest.mark.integration
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


# ---- waves, store bookkeeping, lineage ------------------------------------------------------------------

def test_waves_are_cumulative_shares():
    from edgesmith.toolchain.deploy.rollout import parse_share, parse_waves, plan_waves

    names = [f"d{i}" for i in range(10)]
    assert plan_waves(names, parse_waves("10%,50%,100%")) == [(0.1, names[:1]), (0.5, names[1:5]), (1.0, names[5:])]
    assert [len(w) for _, w in plan_waves(names[:2], parse_waves("10%,20%,100%"))] == [1, 1]  # none empty
    assert [len(w) for _, w in plan_waves(names[:1], parse_waves("10%,50%,100%"))] == [1]
    assert parse_share("20%", "x") == 0.2
    for bad in ("50%,10%,100%", "10%,50%", "0%,100%", "ten", "10,100"):
        with pytest.raises(UserError):
            parse_waves(bad)


@BOTH_STORES
def test_ingest_records_deploy_reports(store_url):
    """The monitor's ingest: a device's state becomes its deploy state (newest seq wins), and its
    reports settle the deployment's target row; in-progress never undoes a final result."""
    from edgesmith.toolchain.fleet import protocol
    from edgesmith.toolchain.fleet.store import Incoming, Store
    from edgesmith.toolchain.fleet.store import deployments as history

    store = Store.open(store_url)
    history.create_deployment(store, {"id": "dep-1", "fleet": "f", "action": "deploy", "rolls_back": None,
                                      "artifact": "a", "archive_sha256": "0" * 64, "manifest_sha256": "1" * 64,
                                      "model": "m", "model_version": "2", "model_uri": None, "url": "http://x",
                                      "key_id": "0" * 16, "waves": "[1.0]", "abort_on_failure": 0.2}, [(1.0, ["d"])])
    history.add_target(store, "dep-1", "f", "d", 1, history.reserve_version(store, "f", "d", 4), ("2" * 64, "old"))
    assert history.targets(store, "dep-1")[0]["version"] == 5  # above what the device had
    assert history.reserve_version(store, "f", "d") == 6

    def msg(kind: str, seq: int, result: str, **extra):
        details = {"slot": "a", "artifact": "a", "desired_version": 5, "deployment_id": "dep-1", "result": result,
                   "phase": None, "error": extra.pop("error", None)}
        common = {"fleet": "f", "device": "d", "epoch": "0" * 16, "bdSeq": 1, "seq": seq, "ts_ms": 1, "details": details}
        if kind == "state":
            return Incoming(1000 + seq, protocol.State(**common, artifact_sha256="1" * 64))
        return Incoming(1000 + seq, protocol.Event(**common, event=extra["event"], message="m"))

    store.ingest([msg("state", 1, "in-progress"), msg("event", 2, "applied", event="deploy.applied")])
    store.ingest([msg("state", 3, "applied")])
    store.ingest([msg("event", 4, "in-progress", event="deploy.started")])  # late / replayed: not final
    target = history.targets(store, "dep-1")[0]
    assert (target["result"], target["slot"]) == ("applied", "a")
    state = history.device_states(store)[("f", "d")]["state"]
    assert (state["seq"], state["result"], state["desired_version"]) == (3, "applied", 5)
    store.ingest([msg("state", 5, "failed", error="self-test failed")])
    assert history.targets(store, "dep-1")[0]["error"] == "self-test failed"


@pytest.mark.integration
@pytest.mark.slow  # ~20 s, nearly all of it MLflow creating its SQLite schema
@pytest.mark.timeout(120)
def test_lineage_logged_to_mlflow(tmp_path, monkeypatch, build_key):
    """A deployment of an artifact built from models:/tiny/1: a run in the training run's experiment,
    tagged with the model version, listing the devices; the model version is tagged with it."""
    import mlflow

    from edgesmith.toolchain.deploy.lineage import log_deployment

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = mlflow.MlflowClient(uri, uri)
    experiment = client.create_experiment("train", artifact_location=(tmp_path / "mlartifacts").as_uri())
    training = client.create_run(experiment)
    client.create_registered_model("tiny")
    client.create_model_version("tiny", f"{training.info.artifact_uri}/onnx", run_id=training.info.run_id)
    info = archive_mod.archive(make_artifact(tmp_path / "reg", build_key, model_uri="models:/tiny/1"), tmp_path / "s")
    deployment = {"id": "dep-x", "fleet": "plant-a", "status": "completed", "waves": "[0.5, 1.0]",
                  "abort_on_failure": 0.2}
    targets = [{"device": d, "result": "applied", "wave": 1, "version": 3, "slot": "a", "error": None,
                "previous_artifact": "old"} for d in ("cam-01", "cam-02")]
    run_id = log_deployment(info, deployment, targets)
    run = client.get_run(run_id)
    assert run.info.experiment_id == experiment
    assert run.data.tags["edgesmith.model_version_uri"] == "models:/tiny/1"
    assert run.data.tags["edgesmith.deployment_id"] == "dep-x" and run.data.metrics["applied"] == 2
    assert run.data.tags["edgesmith.manifest_sha256"] == info.manifest_sha256
    assert client.get_model_version("tiny", "1").tags["edgesmith.deploy.dep-x"].startswith("completed plant-a")
    devices = json.loads((Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="deployment/devices.json",
                                                                   dst_path=str(tmp_path / "dl")))).read_text())
    assert set(devices) == {"cam-01", "cam-02"}


@pytest.mark.integration
def test_deploy_bad_input_is_one_sentence(tmp_path, artifact, _isolated_home):
    """User mistakes before anything is published: one `error:` sentence, exit status 1."""
    from conftest import run_cli

    (tmp_path / "broker").mkdir()
    common = ["--fleet", "plant-a", "--broker", str(tmp_path / "broker"), "--db", f"sqlite:///{tmp_path / 'm.db'}",
              "--store", str(tmp_path / "store"), "--serve", "127.0.0.1:0"]
    # The home trusts the artifact's build key from here on: the next mistakes are past verification.
    generate_key("default")

    def error(*args: str) -> str:
        result = run_cli("deploy", *args, *common, check=False)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        return " ".join(result.stderr.split())

    assert "is not an artifact directory" in error(str(tmp_path / "nope"))
    assert "trusted" in error(str(artifact))  # signed by a key the home does not trust
    trusted = make_artifact(tmp_path / "trusted", load_signing_key(_isolated_home / "keys" / "default.key"))
    assert "no deploy key" in error(str(trusted))
    generate_deploy_key()
    assert "is not an http:// or https:// URL" in error(str(trusted), "--base-url", "ftp://artifacts.example:8470")
    assert "not an edgesmith broker directory" in error(str(trusted))


@BOTH_STORES
def test_reserved_versions_are_unique_under_concurrency(store_url):
    """A deploy and a rollback reserving versions at once never get the same one; the floor (what the
    broker or the device knows) is respected."""
    from concurrent.futures import ThreadPoolExecutor

    from edgesmith.toolchain.fleet.store import Store
    from edgesmith.toolchain.fleet.store import deployments as history

    store = Store.open(store_url)
    history.ensure_tables(store)
    assert history.reserve_version(store, "f", "cam-01", at_least=41) == 42
    assert history.reserve_version(store, "f", "cam-01") == 43
    assert history.reserve_version(store, "f", "cam-01", at_least=50) == 51
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda _: history.reserve_version(store, "f", "cam-02"), range(40)))
    assert sorted(got) == list(range(1, 41))
