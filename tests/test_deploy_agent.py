"""The C++ agent's deployment (docs/deployment.md) against a real Mosquitto, real artifact servers
and real agents: a good deploy switches the serving model and reports `applied`; 50+ bad desired
states and archives are all refused or fail while the old model keeps serving (checked through the
agent's HTTP API); replayed and older desired states are refused; a download whose server goes away
is retried with back-off and resumed with Range; SIGKILL in each phase of deployments always
leaves a verified model serving and the deployment applied; a self-test that crashes the process
fails its deployment after three attempts while the agent keeps serving; deleting state.json keeps
older desired states out; a corrupt spool is set aside.

The central pieces are the real ones (toolchain/deploy: archive, desired.sign, server); only the
misbehaving archives and the slow / dying HTTP server are made here.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
import tarfile
import threading
import time
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from edgesmith.toolchain.deploy import archive as deploy_archive
from edgesmith.toolchain.deploy import desired as deploy_desired
from edgesmith.toolchain.deploy.server import ArtifactServer
from edgesmith.toolchain.signing import SigningKey, load_signing_key, sign_manifest
from conftest import DIGITS, _once, build_json
from deploy_helpers import make_echo_artifact
from test_agent import FLEET, VALIDATOR, Agent, Broker, wait_for
from test_session_core import backend_dir  # noqa: F401  (fixture: the testecho plugin)

pytestmark = pytest.mark.integration


# --- artifacts ------------------------------------------------------------------------------------


def _files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _resign(src: Path, dst: Path, key: SigningKey, edit) -> Path:
    """A copy of an artifact whose manifest `edit(doc)` changed, signed again with `key`."""
    shutil.copytree(src, dst)
    doc = json.loads((dst / "manifest.json").read_bytes())
    edit(doc)
    data = json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n"
    (dst / "manifest.json").write_bytes(data)
    (dst / "manifest.sig").write_bytes(sign_manifest(data, key))
    return dst


def _tar(members: list[tuple[str, bytes | None, bytes]]) -> bytes:
    """A ustar archive from (name, data or None for a directory, type) members, in the given order."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.mtime = 0
            if kind == tarfile.REGTYPE:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            elif kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                info.linkname = data.decode()
                tar.addfile(info)
            else:
                tar.addfile(info)
    return out.getvalue()


def _tar_files(files: dict[str, bytes]) -> bytes:
    return _tar([(name, data, tarfile.REGTYPE) for name, data in sorted(files.items())])


class Store:
    """Archives served by the central artifact server (content-addressed, Range, HEAD)."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.server = ArtifactServer(directory).start()

    def put(self, data: bytes, name: str | None = None) -> tuple[str, str, int]:
        """(url, sha256, size) of archive bytes; `name` stores them under another content address."""
        sha = hashlib.sha256(data).hexdigest()
        (self.dir / f"{name or sha}.tar").write_bytes(data)
        return f"{self.server.url}/artifacts/{name or sha}.tar", sha, len(data)


# --- the central side's messages ---------------------------------------------------------------------


class Central:
    """Publishes signed desired states (retained, QoS 1) and collects the devices' reports."""

    def __init__(self, broker: Broker, deploy_key: SigningKey):
        import paho.mqtt.client as mqtt

        self.key = deploy_key
        self.messages: list[tuple[str, dict]] = []
        self._lock = threading.Lock()
        creds = broker.central("central")
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=creds["username"], protocol=mqtt.MQTTv5)
        self._client.username_pw_set(creds["username"], creds["password"])
        topics = [(f"edgesmith/v1/{FLEET}/+/{kind}", 1) for kind in ("birth", "event", "state")]
        subscribed = threading.Event()
        self._client.on_connect = lambda c, u, flags, rc, props: c.subscribe(topics)
        self._client.on_subscribe = lambda *_: subscribed.set()  # the SUBACK: from now on nothing is missed
        self._client.on_message = self._on_message
        self._client.connect("127.0.0.1", broker.port, keepalive=10)
        self._client.loop_start()
        assert subscribed.wait(10), "the central client's subscription was not acknowledged"

    def _on_message(self, client, userdata, msg) -> None:
        with self._lock:
            self.messages.append((msg.topic, json.loads(msg.payload)))

    def of(self, device: str, kind: str) -> list[dict]:
        with self._lock:
            return [m for _, m in self.messages if m["device"] == device and m["kind"] == kind]

    def publish(self, device: str, payload: bytes) -> None:
        info = self._client.publish(deploy_desired.desired_topic(FLEET, device), payload, qos=1, retain=True)
        info.wait_for_publish(10)

    def envelope(self, device: str, version: int, url: str, sha: str, size: int, manifest_sha: str,
                 action: str = "deploy", name: str = "artifact", fleet: str = FLEET, key: SigningKey | None = None,
                 deployment_id: str | None = None, not_after: int | None = None) -> tuple[bytes, str]:
        dep = deployment_id or f"dep-test-{uuid.uuid4().hex[:10]}"
        state = {"v": 1, "fleet": fleet, "device": device, "version": version, "deployment_id": dep,
                 "action": action, "issued_at_ms": int(time.time() * 1000),
                 "not_after": not_after if not_after is not None else int(time.time()) + 3600,
                 "artifact": {"url": url, "sha256": sha, "size": size, "manifest_sha256": manifest_sha, "name": name}}
        return deploy_desired.sign(state, key or self.key), dep

    def result(self, device: str, deployment_id: str, timeout: float = 60) -> dict:
        """The final deploy.* event of a deployment (applied, rolled-back, failed or refused)."""
        final = {"deploy.applied", "deploy.rolled-back", "deploy.failed", "deploy.refused"}

        def done():
            for event in self.of(device, "event"):
                if event["event"] in final and event["details"].get("deployment_id") == deployment_id:
                    return event
            return None
        return wait_for(done, timeout, f"the result of {deployment_id}")

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


def _health(info: dict) -> dict:
    """What the agent serves right now (GET /v1/model)."""
    with urllib.request.urlopen(f"{info['url']}/v1/model", timeout=10) as response:
        return json.loads(response.read())


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _infer_golden(info: dict, artifact_dir: Path) -> None:
    """Run the artifact's first golden sample through the agent's HTTP API and compare."""
    manifest = json.loads((artifact_dir / "manifest.json").read_bytes())
    sample = manifest["golden"]["samples"][0]
    body = b"".join(_npy(np.load(artifact_dir / p)) for p in sample["inputs"])
    request = urllib.request.Request(f"{info['url']}/v1/infer", data=body, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        data = response.read()
    got = np.load(io.BytesIO(data))
    expected = np.load(artifact_dir / sample["outputs"][0])
    np.testing.assert_allclose(got, expected, atol=1e-3, rtol=1e-3)


def _manifest_sha(artifact_dir: Path) -> str:
    return hashlib.sha256((artifact_dir / "manifest.json").read_bytes()).hexdigest()


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory, shared_root, session_home, digits_host_openvino):
    """A broker, a build key (the one the shared artifacts are signed with), a deploy key, the trust
    store, artifacts A (openvino, the factory one), B (ort) and an aarch64 one, and an artifact server."""
    root = tmp_path_factory.mktemp("deploy-agent")

    def make(out: Path) -> dict:
        return build_json(DIGITS, "--input-shape", "1,1,8,8", "-t", "x86_64-avx2", "-t", "rpi4-aarch64",
                          "--backend", "ort", "-o", str(out), env={"EDGESMITH_HOME": str(session_home)})

    arts = {(x["target"], x["backend"]): x for x in _once(shared_root, "dist-deploy-ort", make)["artifacts"]}
    build_key = load_signing_key(session_home / "keys" / "default.key")
    deploy_key = SigningKey(seed=os.urandom(32))
    trust = root / "trust"
    (trust / "build").mkdir(parents=True)
    (trust / "deploy").mkdir(parents=True)
    shutil.copy(digits_host_openvino["pub"], trust / "build" / "default.pub")
    (trust / "deploy" / "central.pub").write_text(deploy_key.public_key.hex() + "\n")
    broker = Broker(root / "broker")
    central = Central(broker, deploy_key)
    store = Store(root / "store")
    a = Path(digits_host_openvino["path"])
    b = Path(arts[("x86_64-avx2", "ort")]["path"])
    arm = Path(arts[("rpi4-aarch64", "ort")]["path"])
    yield {"root": root, "broker": broker, "central": central, "store": store, "trust": trust, "a": a, "b": b,
           "arm": arm, "build_key": build_key, "deploy_key": deploy_key, "pub": digits_host_openvino["pub"]}
    central.close()
    store.server.stop()
    broker.down()


def _start(world, device: str, data_dir: Path, *extra: str) -> tuple[Agent, dict]:
    (data_dir / "agent.json").unlink(missing_ok=True)  # what a SIGKILLed agent left
    agent = Agent({"path": world["a"], "pub": world["pub"]}, _credentials(world, device), data_dir, "--trust-dir", str(world["trust"]),
                  "--interval", "1", *extra)
    return agent, agent.ready()


def _archive(world, artifact: Path) -> tuple[str, str, int]:
    info = deploy_archive.archive(artifact, world["store"].dir)
    return f"{world['store'].server.url}/artifacts/{info.sha256}.tar", info.sha256, info.size


# --- tests ----------------------------------------------------------------------------------------


def test_good_deploy_switches_and_reports_applied_then_rollback(world, tmp_path):
    central, a, b = world["central"], world["a"], world["b"]
    agent, info = _start(world, "dep-good", tmp_path / "data", "--synthetic-load", "20")
    try:
        assert _health(info)["manifest_sha256"] == _manifest_sha(a)
        url, sha, size = _archive(world, b)
        envelope, dep = central.envelope("dep-good", 1, url, sha, size, _manifest_sha(b), name=b.name)
        central.publish("dep-good", envelope)
        result = central.result("dep-good", dep)
        assert result["event"] == "deploy.applied", result
        assert result["details"]["result"] == "applied" and result["details"]["slot"] == "a"
        assert result["details"]["previous_slot"] == {"slot": None, "artifact_sha256": _manifest_sha(a)}
        assert _health(info)["manifest_sha256"] == _manifest_sha(b)
        _infer_golden(info, b)
        # A fresh birth in the same MQTT session names the new artifact.
        births = wait_for(lambda: [m for m in central.of("dep-good", "birth")
                                   if m["artifact"]["manifest_sha256"] == _manifest_sha(b)], 20, "the new birth")
        # Its build_latency_us is what the build measured for sporadic requests (manifest
        # build.serving_latency_us), else back to back (build.latency_us), null without either.
        build = json.loads((b / "manifest.json").read_bytes())["build"]
        assert build.get("serving_latency_us") or build.get("latency_us") is None, build
        expected = build.get("serving_latency_us") or build.get("latency_us")
        assert births[-1]["metrics"]["build_latency_us"] == expected, births[-1]["metrics"]
        first_birth = central.of("dep-good", "birth")[0]
        assert births[-1]["bdSeq"] == first_birth["bdSeq"] and births[-1]["seq"] > first_birth["seq"]
        states = [m for m in central.of("dep-good", "state") if m["details"].get("deployment_id") == dep]
        assert states[-1]["artifact_sha256"] == _manifest_sha(b) and states[-1]["details"]["result"] == "applied"
        started = [m for m in central.of("dep-good", "event") if m["event"] == "deploy.started"]
        assert started and started[0]["details"]["deployment_id"] == dep
        state = json.loads((tmp_path / "data" / "deploy" / "state.json").read_text())
        assert state["highest_version"] == 1 and state["slots"]["a"]["status"] == "good"
        assert os.readlink(tmp_path / "data" / "deploy" / "current") == "slots/a"

        # Going back to the factory artifact takes a rollback (a plain deploy of it is downloaded anew).
        url, sha, size = _archive(world, a)
        envelope, dep = central.envelope("dep-good", 2, url, sha, size, _manifest_sha(a), action="rollback")
        central.publish("dep-good", envelope)
        result = central.result("dep-good", dep)
        assert result["event"] == "deploy.rolled-back", result
        assert _health(info)["manifest_sha256"] == _manifest_sha(a)
        # The rollback left slot a retired: B may be deployed again (downloaded afresh into it).
        state = json.loads((tmp_path / "data" / "deploy" / "state.json").read_text())
        assert state["slots"]["a"]["status"] == "retired" and state["slots"]["b"]["status"] == "good", state
        url_b, sha_b, size_b = _archive(world, b)
        envelope, dep = central.envelope("dep-good", 3, url_b, sha_b, size_b, _manifest_sha(b))
        central.publish("dep-good", envelope)
        result = central.result("dep-good", dep)
        assert result["event"] == "deploy.applied" and result["details"]["slot"] == "a", result
        assert _health(info)["manifest_sha256"] == _manifest_sha(b)
        # Now A sits in the good inactive slot b: deploying it again must be an explicit rollback.
        envelope, dep = central.envelope("dep-good", 4, url, sha, size, _manifest_sha(a))
        central.publish("dep-good", envelope)
        result = central.result("dep-good", dep)
        assert result["event"] == "deploy.refused" and "rollback" in result["message"], result
        envelope, dep = central.envelope("dep-good", 5, url, sha, size, _manifest_sha(a), action="rollback")
        central.publish("dep-good", envelope)
        result = central.result("dep-good", dep)
        assert result["event"] == "deploy.rolled-back" and result["details"]["slot"] == "b", result
        assert _health(info)["manifest_sha256"] == _manifest_sha(a)
        # v2 deployed, rolled back in place, deployed again: applied.
        envelope, dep = central.envelope("dep-good", 6, url_b, sha_b, size_b, _manifest_sha(b))
        central.publish("dep-good", envelope)
        result = central.result("dep-good", dep)
        assert result["event"] == "deploy.applied" and result["details"]["slot"] == "a", result
        assert _health(info)["manifest_sha256"] == _manifest_sha(b)
        _infer_golden(info, b)
        url, sha, size = url_b, sha_b, size_b
        # Replayed and older desired states are refused; the model keeps serving.
        for version in (6, 5, 1):
            envelope, dep = central.envelope("dep-good", version, url, sha, size, _manifest_sha(a))
            central.publish("dep-good", envelope)
            result = central.result("dep-good", dep)
            assert result["event"] == "deploy.refused" and "replayed or older" in result["message"], result
        assert _health(info)["manifest_sha256"] == _manifest_sha(b)
    finally:
        assert agent.stop() == 0, agent.log()
    for device_messages in (central.of("dep-good", k) for k in ("birth", "state", "event")):
        for message in device_messages:
            errors = list(VALIDATOR.iter_errors(message))
            assert not errors, (errors[0].message, message)


def _mutations(world) -> list[tuple[str, dict]]:
    """(what, desired-state arguments) for 50+ things a device must not apply."""
    store, central, a, b = world["store"], world["central"], world["a"], world["b"]
    files_b = _files(b)
    b_sha = _manifest_sha(b)
    out: list[tuple[str, dict]] = []

    def archive_case(what: str, data: bytes, manifest_sha: str = b_sha) -> None:
        url, sha, size = store.put(data)
        out.append((what, {"url": url, "sha": sha, "size": size, "manifest_sha": manifest_sha}))

    for name in files_b:
        flipped = dict(files_b)
        data = bytearray(flipped[name])
        data[len(data) // 2] ^= 0x01
        flipped[name] = bytes(data)
        archive_case(f"flipped byte in {name}", _tar_files(flipped))
        truncated = dict(files_b)
        truncated[name] = files_b[name][: len(files_b[name]) // 2]
        archive_case(f"truncated {name}", _tar_files(truncated))
        missing = {k: v for k, v in files_b.items() if k != name}
        archive_case(f"missing {name}", _tar_files(missing))
    archive_case("extra file at the root", _tar_files({**files_b, "extra.bin": b"x" * 100}))
    archive_case("extra golden file", _tar_files({**files_b, "golden/extra.npy": b"x" * 100}))
    foreign = SigningKey(seed=os.urandom(32))
    resigned = _resign(b, world["root"] / f"foreign-{uuid.uuid4().hex[:6]}", foreign, lambda doc: None)
    archive_case("signed by a foreign build key", _tar_files(_files(resigned)), _manifest_sha(resigned))
    files_a = _files(a)
    swapped = {**files_b, "manifest.json": files_a["manifest.json"], "manifest.sig": files_a["manifest.sig"]}
    archive_case("A's manifest with B's files", _tar_files(swapped))
    swapped = {**files_a, "manifest.json": files_b["manifest.json"], "manifest.sig": files_b["manifest.sig"]}
    archive_case("B's manifest with A's files", _tar_files(swapped))
    archive_case("a valid archive of another artifact than manifest_sha256 names", _tar_files(files_a))
    members = [(n, d, tarfile.REGTYPE) for n, d in sorted(files_b.items())]
    archive_case("a member named ../escape", _tar(members + [("../escape", b"x", tarfile.REGTYPE)]))
    archive_case("a member named golden/../../escape", _tar(members + [("golden/../../escape", b"x", tarfile.REGTYPE)]))
    archive_case("an absolute member name", _tar(members + [("/tmp/edgesmith-escape", b"x", tarfile.REGTYPE)]))
    archive_case("a symlink member", _tar(members + [("link", b"/etc/passwd", tarfile.SYMTYPE)]))
    archive_case("a symlink directory then a file through it",
                 _tar([("golden", b"/tmp", tarfile.SYMTYPE)] + members))
    archive_case("a hard link member", _tar(members + [("hard", b"manifest.json", tarfile.LNKTYPE)]))
    archive_case("a FIFO member", _tar(members + [("fifo", None, tarfile.FIFOTYPE)]))
    archive_case("a character device member", _tar(members + [("dev", None, tarfile.CHRTYPE)]))
    archive_case("a duplicate member", _tar(members + [("manifest.json", files_b["manifest.json"], tarfile.REGTYPE)]))
    archive_case("an archive cut in half", _tar_files(files_b)[: len(_tar_files(files_b)) // 2])
    archive_case("not a tar at all", os.urandom(4096))
    arm = world["arm"]
    archive_case("an artifact for aarch64", _tar_files(_files(arm)), _manifest_sha(arm))
    flags = set(re.findall(r"\S+", next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                                           if line.startswith("flags")).split(":", 1)[1]))
    lacking = next(f for f in ("xop", "fma4", "sse4a", "avx512_vp2intersect", "amx_fp16", "avx_ifma") if f not in flags)

    def need_feature(doc: dict) -> None:
        doc["target"]["cpu_features"] = [*doc["target"].get("cpu_features", []), lacking]
    needs = _resign(b, world["root"] / f"needs-{uuid.uuid4().hex[:6]}", world["build_key"], need_feature)
    archive_case(f"an artifact needing the CPU feature {lacking}", _tar_files(_files(needs)), _manifest_sha(needs))
    limit = world["limit"]
    archive_case("an archive over deploy_max_bytes", _tar_files({**files_b, "pad.bin": b"\0" * limit}))
    # Desired states whose archive facts are wrong.
    url, sha, size = store.put(_tar_files(files_b))
    out.append(("a size smaller than the archive", {"url": url, "sha": sha, "size": size - 512, "manifest_sha": b_sha}))
    out.append(("a size larger than the archive", {"url": url, "sha": sha, "size": size + 512, "manifest_sha": b_sha}))
    out.append(("a size over deploy_max_bytes", {"url": url, "sha": sha, "size": limit + 1, "manifest_sha": b_sha}))
    wrong_sha = hashlib.sha256(b"something else").hexdigest()
    other_url, _, _ = store.put(_tar_files(files_b), name=wrong_sha)
    out.append(("an archive whose SHA-256 is not the one named",
                {"url": other_url, "sha": wrong_sha, "size": size, "manifest_sha": b_sha}))
    # Envelopes that must be refused before anything is downloaded.
    good = {"url": url, "sha": sha, "size": size, "manifest_sha": b_sha}
    out.append(("signed by a foreign deploy key", {**good, "key": SigningKey(seed=os.urandom(32))}))
    out.append(("signed with the build key", {**good, "key": world["build_key"]}))
    out.append(("for another device", {**good, "for_device": "someone-else"}))
    out.append(("for another fleet", {**good, "fleet": "plant-b"}))
    out.append(("a bad signature", {**good, "tamper": "signature"}))
    out.append(("signed text changed after signing", {**good, "tamper": "signed"}))
    out.append(("an envelope that is not JSON", {**good, "raw": b"{not json"}))
    out.append(("an envelope without a signature", {**good, "tamper": "drop-signature"}))
    out.append(("an unknown action", {**good, "action": "wipe"}))
    out.append(("an ftp URL", {**good, "url": url.replace("http://", "ftp://")}))
    out.append(("an expired desired state (not_after an hour ago)", {**good, "not_after": int(time.time()) - 3600}))
    return out


# _mutations() makes three per file of B (a flipped byte, a truncation, a deletion) and these many more.
FIXED_MUTATIONS = 35


def test_fifty_mutations_are_refused_while_the_old_model_serves(world, tmp_path):
    central, a = world["central"], world["a"]
    largest = max(len(_tar_files(_files(world[k]))) for k in ("a", "b", "arm"))
    world["limit"] = largest + 64 * 1024
    agent, info = _start(world, "dep-mut", tmp_path / "data", "--deploy-max-bytes", str(world["limit"]),
                         "--deploy-timeout", "20")
    mutations = _mutations(world)
    assert len(mutations) == 3 * len(_files(world["b"])) + FIXED_MUTATIONS >= 50, len(mutations)
    refused: list[str] = []
    try:
        version = 0
        for what, args in mutations:
            version += 1
            device = args.get("for_device", "dep-mut")
            envelope, dep = central.envelope(device, version, args["url"], args["sha"], args["size"],
                                             args["manifest_sha"], action=args.get("action", "deploy"),
                                             fleet=args.get("fleet", FLEET), key=args.get("key"),
                                             not_after=args.get("not_after"))
            tamper = args.get("tamper")
            if tamper or "raw" in args or "action" in args:
                outer = json.loads(envelope)
                if tamper == "signature":
                    outer["signature"] = ("0" if outer["signature"][0] != "0" else "1") + outer["signature"][1:]
                elif tamper == "signed":
                    outer["signed"] = outer["signed"].replace('"version":', '"version": ', 1)
                elif tamper == "drop-signature":
                    del outer["signature"]
                envelope = args.get("raw") or json.dumps(outer).encode()
            # Published on this device's topic whatever the desired state says inside.
            central.publish("dep-mut", envelope)
            result = central.result("dep-mut", dep, timeout=60) if "raw" not in args else wait_for(
                lambda: [e for e in central.of("dep-mut", "event") if e["event"] == "deploy.refused"
                         and "not a JSON object" in e["message"]], 30, "the refusal of a non-JSON envelope")[-1]
            assert result["event"] in ("deploy.failed", "deploy.refused"), (what, result)
            assert result["details"]["error"], (what, result)
            health = _health(info)
            assert health["manifest_sha256"] == _manifest_sha(a), (what, health)
            refused.append(f"{what}: {result['message']}")
            if len(refused) % 10 == 0:
                _infer_golden(info, a)
        _infer_golden(info, a)
        staging = tmp_path / "data" / "deploy" / "staging"
        assert list(staging.iterdir()) == [], list(staging.iterdir())
        assert not Path("/tmp/edgesmith-escape").exists()
        assert not (tmp_path / "data" / "deploy" / "escape").exists()
        assert not (tmp_path / "data" / "deploy" / "current").exists()
    finally:
        assert agent.stop() == 0, agent.log()
    assert len(refused) == len(mutations), (len(refused), len(mutations))  # every one refused, none skipped
    print(f"\n{len(refused)} mutations refused:\n  " + "\n  ".join(refused))


class SlowServer:
    """A throttled HTTP server with Range support that can drop a transfer half way and go away
    (what the central server cannot be made to do)."""

    def __init__(self, data: bytes, chunk: int = 4096, delay_s: float = 0.01, port: int = 0):
        self.data = data
        self.chunk = chunk
        self.delay_s = delay_s
        self.cut_after: int | None = None
        self.ranges: list[str | None] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                header = self.headers.get("Range")
                outer.ranges.append(header)
                start = int(re.fullmatch(r"bytes=(\d+)-", header).group(1)) if header else 0
                body = outer.data[start:]
                self.send_response(206 if header else 200)
                if header:
                    self.send_header("Content-Range", f"bytes {start}-{len(outer.data) - 1}/{len(outer.data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                sent = 0
                try:
                    for i in range(0, len(body), outer.chunk):
                        if outer.cut_after is not None and start + sent >= outer.cut_after:
                            self.close_connection = True
                            self.connection.shutdown(2)
                            return
                        self.wfile.write(body[i:i + outer.chunk])
                        sent += len(body[i:i + outer.chunk])
                        time.sleep(outer.delay_s)
                except OSError:  # the agent went away (SIGKILL) or the test cut the transfer
                    self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_server_gone_mid_download_is_retried_with_backoff_and_resumed(world, tmp_path):
    central, b = world["central"], world["b"]
    data = _tar_files(_files(b))
    sha = hashlib.sha256(data).hexdigest()
    server = SlowServer(data, chunk=4096, delay_s=0.005)
    server.cut_after = len(data) // 2
    port = server.port
    agent, info = _start(world, "dep-resume", tmp_path / "data")
    try:
        url = f"http://127.0.0.1:{port}/artifacts/{sha}.tar"
        envelope, dep = central.envelope("dep-resume", 1, url, sha, len(data), _manifest_sha(b))
        central.publish("dep-resume", envelope)
        wait_for(lambda: server.ranges, 30, "the first request")
        part = tmp_path / "data" / "deploy" / "staging" / f"{sha}.tar.part"
        wait_for(lambda: part.is_file() and part.stat().st_size >= len(data) // 2 - 4096, 30, "half the archive")
        server.stop()  # gone: connections refused from now on
        wait_for(lambda: len(re.findall(r"retrying in", agent.log())) >= 2, 30, "two retries")
        server = SlowServer(data, chunk=4096, delay_s=0.001, port=port)
        result = central.result("dep-resume", dep, timeout=60)
        assert result["event"] == "deploy.applied", result
        assert _health(info)["manifest_sha256"] == _manifest_sha(b)
        delays = [float(d) for d in re.findall(r"retrying in ([0-9.]+) s", agent.log())]
        assert delays[:2] == [1.0, 2.0], delays  # exponential back-off from 1 s
        resumed = [r for r in server.ranges if r]
        assert resumed and int(re.fullmatch(r"bytes=(\d+)-", resumed[0]).group(1)) >= len(data) // 2 - 4096, server.ranges
    finally:
        server.stop()
        assert agent.stop() == 0, agent.log()


# Where the SIGKILL test kills: each phase of state.json's deployment record, and just after it.
KILL_PHASES = ("download", "verify", "self-test", "switch", "after")


def _kill_point(data_dir: Path, dep: str, phase: str, part: Path, size: int, share: float) -> bool:
    """Wait until deployment `dep` is in `phase` (True), or until it went past it (False)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        record = _deployment(data_dir, dep)
        if phase == "after":
            if record.get("result") == "applied":
                return True
        elif record.get("result") not in (None, "in-progress"):
            return False  # finished before the phase was seen: too short to catch this time
        elif record.get("phase") == phase:
            if phase != "download":
                return True
            if part.is_file() and part.stat().st_size >= share * size:
                return True
        time.sleep(0.001)
    raise AssertionError(f"deployment {dep} never reached {phase}: {_deployment(data_dir, dep)}")


@pytest.mark.slow
def test_sigkill_at_each_phase_of_deployments(world, tmp_path):
    """Deployments cycle through three artifacts; each is SIGKILLed in a fixed phase (download,
    verify, self-test, switch, just after), twice per phase. The restarted agent must serve a
    verified artifact and finish the deployment: applied, whatever the phase it was killed in."""
    central, a, b = world["central"], world["a"], world["b"]
    c = _resign(b, world["root"] / f"c-{uuid.uuid4().hex[:6]}", world["build_key"],
                lambda doc: doc.update(name=doc["name"] + "-c"))
    cycle = [b, c, a]
    servers = {}
    for artifact in cycle:
        data = _tar_files(_files(artifact))
        servers[_manifest_sha(artifact)] = (SlowServer(data, chunk=4096, delay_s=0.02),
                                            hashlib.sha256(data).hexdigest(), len(data))
    known = {_manifest_sha(x): x for x in cycle}
    rng = random.Random(20261129)
    data_dir = tmp_path / "data"
    killed_in: list[str] = []
    misses: list[str] = []
    version = 0
    agent, info = _start(world, "dep-kill", data_dir)
    try:
        for phase in KILL_PHASES * 2:
            for _ in range(4):  # a short phase can be missed; the next deployment tries again
                # The next artifact: neither the serving one nor the inactive slot's (that takes a rollback).
                serving = _health(info)["manifest_sha256"]
                state_path = data_dir / "deploy" / "state.json"
                slots = json.loads(state_path.read_text())["slots"] if state_path.is_file() else {}
                link = data_dir / "deploy" / "current"
                current = os.readlink(link)[-1] if link.is_symlink() else ""
                inactive = slots.get("b" if current == "a" else "a", {}).get("manifest_sha256") if current else None
                target = next(x for x in cycle if _manifest_sha(x) not in (serving, inactive))
                server, sha, size = servers[_manifest_sha(target)]
                version += 1
                url = f"http://127.0.0.1:{server.port}/artifacts/{sha}.tar"
                envelope, dep = central.envelope("dep-kill", version, url, sha, size, _manifest_sha(target))
                central.publish("dep-kill", envelope)
                part = data_dir / "deploy" / "staging" / f"{sha}.tar.part"
                hit = _kill_point(data_dir, dep, phase, part, size, rng.uniform(0.05, 0.95))
                if hit:
                    agent.kill()
                    killed_in.append(phase)
                    agent, info = _start(world, "dep-kill", data_dir)
                try:
                    health = _health(info)
                    assert health["manifest_sha256"] in known, health
                    result = central.result("dep-kill", dep, timeout=60)
                    assert result["event"] == "deploy.applied", result
                    health = _health(info)
                    assert health["manifest_sha256"] == _manifest_sha(target), (result, health)
                    _infer_golden(info, known[health["manifest_sha256"]])
                except AssertionError as e:
                    raise AssertionError(f"killed in {phase} ({dep}): {e}\nagent log:\n{agent.log()[-3000:]}") from None
                if hit:
                    break
                misses.append(phase)
            else:
                raise AssertionError(f"the {phase} phase was never caught in 4 deployments")
    finally:
        agent.stop()
        for server, _, _ in servers.values():
            server.stop()
    assert killed_in == list(KILL_PHASES * 2), killed_in  # every phase was hit, twice
    print(f"\nkills: {killed_in}; phases missed and tried again: {misses}")


def test_deleting_state_json_does_not_let_an_older_desired_state_through(world, tmp_path):
    """The replay floor lives in state.json and in deploy/floor: with state.json gone, a replayed or
    older signed desired state is still refused, and so is an expired one."""
    central, a, b = world["central"], world["a"], world["b"]
    data_dir = tmp_path / "data"
    agent, info = _start(world, "dep-floor", data_dir)
    try:
        url, sha, size = _archive(world, b)
        envelope, dep = central.envelope("dep-floor", 3, url, sha, size, _manifest_sha(b), name=b.name)
        central.publish("dep-floor", envelope)
        assert central.result("dep-floor", dep)["event"] == "deploy.applied"
    finally:
        assert agent.stop() == 0, agent.log()
    (data_dir / "deploy" / "state.json").unlink()
    agent, info = _start(world, "dep-floor", data_dir)
    try:
        for version in (2, 3):
            envelope, dep = central.envelope("dep-floor", version, url, sha, size, _manifest_sha(b), name=b.name)
            central.publish("dep-floor", envelope)
            result = central.result("dep-floor", dep)
            assert result["event"] == "deploy.refused" and "not above 3" in result["message"], result
        envelope, dep = central.envelope("dep-floor", 4, url, sha, size, _manifest_sha(b), name=b.name,
                                         not_after=int(time.time()) - 600)
        central.publish("dep-floor", envelope)
        result = central.result("dep-floor", dep)
        assert result["event"] == "deploy.refused" and "expired" in result["message"], result
        # Without state.json the slots' records are gone too: the factory artifact serves.
        assert _health(info)["manifest_sha256"] == _manifest_sha(a)
        assert json.loads((data_dir / "deploy" / "state.json").read_text())["highest_version"] == 3
    finally:
        assert agent.stop() == 0, agent.log()


def test_a_self_test_that_crashes_fails_the_deployment_after_three_attempts(world, tmp_path, backend_dir):
    """A payload that aborts the process in its golden self-test (testecho {"fail": "abort"}): the
    self-test runs in a child process, so the agent survives, tries three times, reports
    deploy.failed with the reason, and keeps serving the slot it had."""
    central = world["central"]
    root = world["root"] / f"echo-{uuid.uuid4().hex[:6]}"
    factory = make_echo_artifact(root / "v1", world["build_key"], version="1")
    good = make_echo_artifact(root / "v2", world["build_key"], version="2")
    crashing = make_echo_artifact(root / "v3", world["build_key"], version="3", fail="abort")
    data_dir = tmp_path / "data"
    agent = Agent({"path": factory, "pub": world["pub"]}, _credentials(world, "dep-crash"), data_dir, "--trust-dir",
                  str(world["trust"]), "--interval", "1", "--backend-path", str(backend_dir))
    info = agent.ready()
    try:
        url, sha, size = _archive(world, good)
        envelope, dep = central.envelope("dep-crash", 1, url, sha, size, _manifest_sha(good), name=good.name)
        central.publish("dep-crash", envelope)
        assert central.result("dep-crash", dep)["event"] == "deploy.applied"
        url, sha, size = _archive(world, crashing)
        envelope, dep = central.envelope("dep-crash", 2, url, sha, size, _manifest_sha(crashing), name=crashing.name)
        central.publish("dep-crash", envelope)
        result = central.result("dep-crash", dep)
        assert result["event"] == "deploy.failed", result
        assert "self-test phase was tried 3 times" in result["message"] and "SIGABRT" in result["message"], result
        assert result["details"]["phase"] == "self-test", result
        assert agent.proc.poll() is None, agent.log()  # the agent itself never crashed
        assert re.findall(r"crashed the checking process \(signal 6 SIGABRT\) \(attempt (\d) of 3\)",
                          agent.log()) == ["1", "2", "3"], agent.log()
        assert _health(info)["manifest_sha256"] == _manifest_sha(good)  # the old slot serves
        state = json.loads((data_dir / "deploy" / "state.json").read_text())
        assert state["slots"]["a"]["status"] == "good" and state["slots"]["b"]["status"] == "empty", state
        assert os.readlink(data_dir / "deploy" / "current") == "slots/a"
    finally:
        assert agent.stop() == 0, agent.log()


def test_archive_member_limit_and_directories_listed_after_their_files(world, tmp_path):
    """An archive of more than 4096 members fails before anything is written; an archive that lists
    `golden/` after `golden/...` files (as `tar` of a file list writes it) is applied."""
    central, b = world["central"], world["b"]
    agent, info = _start(world, "dep-tar", tmp_path / "data", "--deploy-max-bytes", str(16 << 20))
    try:
        files = _files(b)
        many = _tar([(name, data, tarfile.REGTYPE) for name, data in sorted(files.items())]
                    + [(f"pad/{i}", b"", tarfile.REGTYPE) for i in range(4100)])
        url, sha, size = world["store"].put(many)
        envelope, dep = central.envelope("dep-tar", 1, url, sha, size, _manifest_sha(b))
        central.publish("dep-tar", envelope)
        result = central.result("dep-tar", dep)
        assert result["event"] == "deploy.failed" and "more than 4096 members" in result["message"], result
        dirs = sorted({str(Path(name).parent) for name in files if "/" in name})
        ordered = _tar([(name, data, tarfile.REGTYPE) for name, data in sorted(files.items())]
                       + [(d + "/", None, tarfile.DIRTYPE) for d in sorted(dirs, reverse=True)])
        url, sha, size = world["store"].put(ordered)
        envelope, dep = central.envelope("dep-tar", 2, url, sha, size, _manifest_sha(b))
        central.publish("dep-tar", envelope)
        result = central.result("dep-tar", dep)
        assert result["event"] == "deploy.applied", result
        assert _health(info)["manifest_sha256"] == _manifest_sha(b)
    finally:
        assert agent.stop() == 0, agent.log()


def test_a_corrupt_spool_is_set_aside_and_the_agent_starts(world, tmp_path):
    central = world["central"]
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "spool.db").write_bytes(b"this is not an SQLite database\n" * 200)
    agent, info = _start(world, "dep-spool", data_dir)
    try:
        wait_for(lambda: central.of("dep-spool", "birth"), 30, "a birth from the new spool")
        (aside,) = data_dir.glob("spool.db.corrupt-*")
        assert aside.read_bytes().startswith(b"this is not an SQLite database")
        assert "is corrupt" in agent.log() and "a new spool is created" in agent.log(), agent.log()
    finally:
        assert agent.stop() == 0, agent.log()


def _deployment(data_dir: Path, deployment_id: str) -> dict:
    """state.json's record of this deployment ({} before it is recorded)."""
    try:
        state = json.loads((data_dir / "deploy" / "state.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}
    record = state.get("deployment") or {}
    return record if record.get("deployment_id") == deployment_id else {}


_CREDENTIALS: dict[str, Path] = {}


def _credentials(world, device: str) -> Path:
    if device not in _CREDENTIALS:
        _CREDENTIALS[device] = world["broker"].add_device(device)
    return _CREDENTIALS[device]


def test_archives_download_over_https_verified_with_the_credentials_ca(world, tmp_path):
    """Before: devices refused https:// archive URLs (artifacts could not come from a CDN or an
    object store). Now the server is verified with the CA of the device's credentials: a server
    whose certificate another CA issued gets no download (at once, not retried until
    deploy_timeout_s: 600 s here), the fleet CA's does."""
    from edgesmith.toolchain.fleet import broker as fleet_broker

    central, b = world["central"], world["b"]
    fleet_ca = fleet_broker.certs(tmp_path / "fleet-pki", [])  # a server certificate for 127.0.0.1 too
    stranger = fleet_broker.certs(tmp_path / "other-pki", [])
    credentials = json.loads(_credentials(world, "dep-https").read_text()) | {"cafile": fleet_ca["cafile"]}
    cred_file = tmp_path / "dep-https.json"
    cred_file.write_text(json.dumps(credentials))
    info = deploy_archive.archive(b, world["store"].dir)
    trusted = ArtifactServer(world["store"].dir, certfile=fleet_ca["certfile"], keyfile=fleet_ca["keyfile"]).start()
    untrusted = ArtifactServer(world["store"].dir, certfile=stranger["certfile"], keyfile=stranger["keyfile"]).start()
    agent = Agent({"path": world["a"], "pub": world["pub"]}, cred_file, tmp_path / "data", "--trust-dir",
                  str(world["trust"]), "--interval", "1", "--deploy-timeout", "600")
    try:
        served = agent.ready()
        assert trusted.url.startswith("https://") and untrusted.url.startswith("https://")
        envelope, dep = central.envelope("dep-https", 1, f"{untrusted.url}/artifacts/{info.sha256}.tar", info.sha256,
                                         info.size, _manifest_sha(b), name=b.name)
        central.publish("dep-https", envelope)
        result = central.result("dep-https", dep)
        assert result["event"] == "deploy.failed" and "does not verify against the CA file" in result["message"], result
        assert _health(served)["manifest_sha256"] == _manifest_sha(world["a"])
        envelope, dep = central.envelope("dep-https", 2, f"{trusted.url}/artifacts/{info.sha256}.tar", info.sha256,
                                         info.size, _manifest_sha(b), name=b.name)
        central.publish("dep-https", envelope)
        result = central.result("dep-https", dep)
        assert result["event"] == "deploy.applied", result
        assert _health(served)["manifest_sha256"] == _manifest_sha(b)
    finally:
        trusted.stop()
        untrusted.stop()
        assert agent.stop() == 0, agent.log()
    assert "certificate" in agent.log() or "SSL" in agent.log(), agent.log()
