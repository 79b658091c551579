"""Shadow evaluation on real agents (docs/shadow.md, "On the device"): a real Mosquitto, real
edgesmith-agent binaries serving one artifact while a signed shadow state makes them run candidates
beside it in a child process, on sampled live requests. Checked through what a central login reads
(`shadow` messages validated with runtime/contract.py, `shadow.*` events) and the agents' HTTP API:
agreement as the candidates compute, refusals (a different signature, replayed, expired, a
desired-state signature), a candidate that crashes on a live input, a full queue, and a SIGKILL
mid-shadow. Artifacts are signed testecho ones (tests/deploy_helpers.py), no compiler needed.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

from edgesmith.runtime import contract
from edgesmith.toolchain.deploy import archive as deploy_archive
from edgesmith.toolchain.deploy import desired as deploy_desired
from edgesmith.toolchain.capture import record as capture_record
from edgesmith.toolchain.capture.store import CaptureStore
from edgesmith.toolchain.signing import SigningKey, generate_deploy_key, load_deploy_key
from deploy_helpers import CaptureReceiver as Receiver, make_echo_artifact
from conftest import run_cli
from test_agent import AGENT, FLEET, Agent, Broker, wait_for
from test_deploy_agent import Store
from test_session_core import backend_dir  # noqa: F401  (fixture: the testecho plugin)

pytestmark = pytest.mark.integration


class Central:
    """A central login: publishes signed shadow states (retained, QoS 1), collects what devices send."""

    def __init__(self, broker: Broker, deploy_key: SigningKey):
        import paho.mqtt.client as mqtt

        self.key = deploy_key
        self.messages: list[dict] = []
        self.invalid: list[tuple[bytes, str]] = []
        self._lock = threading.Lock()
        creds = broker.central("shadow")
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=creds["username"], protocol=mqtt.MQTTv5)
        self._client.username_pw_set(creds["username"], creds["password"])
        topics = [(f"edgesmith/v1/{FLEET}/+/{kind}", 1) for kind in ("event", "shadow", "telemetry")]
        subscribed = threading.Event()
        self._client.on_connect = lambda c, u, flags, rc, props: c.subscribe(topics)
        self._client.on_subscribe = lambda *_: subscribed.set()
        self._client.on_message = self._on_message
        self._client.connect("127.0.0.1", broker.port, keepalive=10)
        self._client.loop_start()
        assert subscribed.wait(10), "the central client's subscription was not acknowledged"

    def _on_message(self, client, userdata, msg) -> None:
        try:
            message = contract.parse_message(msg.payload).model_dump(mode="json")
        except ValueError as e:  # pydantic's ValidationError is one
            with self._lock:
                self.invalid.append((msg.payload, str(e)))
            return
        with self._lock:
            self.messages.append(message)

    def of(self, device: str, kind: str) -> list[dict]:
        with self._lock:
            return [m for m in self.messages if m["device"] == device and m["kind"] == kind]

    def events(self, device: str, shadow_id: str | None = None, prefix: str = "shadow.") -> list[dict]:
        return [m for m in self.of(device, "event") if m["event"].startswith(prefix)
                and (shadow_id is None or m["details"].get("shadow_id") == shadow_id)]

    def event(self, device: str, name: str, shadow_id: str | None, timeout: float = 60, **details) -> dict:
        def found():
            for m in self.events(device, shadow_id):
                if m["event"] == name and all(m["details"].get(k) == v for k, v in details.items()):
                    return m
            return None
        return wait_for(found, timeout, f"{name} of {shadow_id} from {device}")

    def windows(self, device: str, shadow_id: str, candidate: int | None = None) -> list[dict]:
        return [m for m in self.of(device, "shadow")
                if m["shadow_id"] == shadow_id and (candidate is None or m["candidate"] == candidate)]

    def publish(self, device: str, payload: bytes, topic=deploy_desired.shadow_topic) -> None:
        info = self._client.publish(topic(FLEET, device), payload, qos=1, retain=True)
        info.wait_for_publish(10)

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


@pytest.fixture(scope="module")
def world(tmp_path_factory, backend_dir):  # noqa: F811
    root = tmp_path_factory.mktemp("shadow-agent")
    build_key = SigningKey(seed=os.urandom(32))
    deploy_key = SigningKey(seed=os.urandom(32))
    trust = root / "trust"
    (trust / "build").mkdir(parents=True)
    (trust / "deploy").mkdir(parents=True)
    (trust / "build" / "build.pub").write_text(build_key.public_key.hex() + "\n")
    (trust / "deploy" / "central.pub").write_text(deploy_key.public_key.hex() + "\n")
    os.chmod(trust, 0o700)
    for sub in ("build", "deploy"):
        os.chmod(trust / sub, 0o700)
    dist = root / "dist"
    arts = {
        "serving": make_echo_artifact(dist / "v1", build_key, version="1"),
        "same": make_echo_artifact(dist / "v2", build_key, version="2"),
        "negated": make_echo_artifact(dist / "v3", build_key, version="3", mode="negate-double"),
        "wide": make_echo_artifact(dist / "v4", build_key, version="4", shape=(1, 5)),
        "crashing": make_echo_artifact(dist / "v5", build_key, version="5", fail="abort-on-run-if-negative"),
    }
    broker = Broker(root / "broker")
    central = Central(broker, deploy_key)
    store = Store(root / "store")
    world = {"root": root, "broker": broker, "central": central, "store": store, "trust": trust, "arts": arts,
             "build_key": build_key, "deploy_key": deploy_key, "backend_dir": backend_dir, "versions": {}}
    yield world
    central.close()
    store.server.stop()
    broker.down()


def _start(world, device: str, *extra: str, data_dir: Path | None = None, artifact: str = "serving") -> tuple[Agent, dict]:
    data_dir = data_dir or world["root"] / "agents" / device
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    (data_dir / "agent.json").unlink(missing_ok=True)  # what a SIGKILLed agent left
    credentials = world.setdefault("credentials", {})
    if device not in credentials:
        credentials[device] = world["broker"].add_device(device)
    pub = world["trust"] / "build" / "build.pub"
    agent = Agent({"path": world["arts"][artifact], "pub": pub}, credentials[device], data_dir,
                  "--trust-dir", str(world["trust"]), "--interval", "1", "--backend-path", str(world["backend_dir"]),
                  *extra)
    return agent, agent.ready()


def _shadow(world, device: str, candidates: list[str], *, version: int | None = None, domain: bytes | None = None,
            **options) -> tuple[bytes, str, int]:
    """(envelope, shadow id, version) of a shadow state for `device` over the named candidates."""
    if version is None:
        version = world["versions"].get(device, 0) + 1
    world["versions"][device] = max(world["versions"].get(device, 0), version)
    shadow_id = f"sh-test-{uuid.uuid4().hex[:8]}"
    infos = [deploy_archive.archive(world["arts"][c], world["store"].dir) for c in candidates]
    options.setdefault("duration_s", 600)
    options.setdefault("sample", 1.0)
    state = deploy_desired.shadow_state(FLEET, device, version, shadow_id, infos, world["store"].server.url, **options)
    envelope = deploy_desired.sign(state, world["deploy_key"],
                                   domain=domain if domain is not None else contract.SHADOW_DOMAIN.encode())
    return envelope, shadow_id, version


def _get(info: dict, path: str) -> dict:
    with urllib.request.urlopen(f"{info['url']}{path}", timeout=10) as response:
        return json.loads(response.read())


def _infer(info: dict, x: np.ndarray) -> np.ndarray:
    buffer = io.BytesIO()
    np.save(buffer, x.astype(np.float32))
    request = urllib.request.Request(f"{info['url']}/v1/infer", data=buffer.getvalue(), method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        return np.load(io.BytesIO(response.read()))


def _slot_files(data_dir: Path) -> list[str]:
    return sorted(p.name for p in (data_dir / "shadow").iterdir())


def _serving_sha(world) -> str:
    import hashlib

    return hashlib.sha256((world["arts"]["serving"] / "manifest.json").read_bytes()).hexdigest()


# --- tests ----------------------------------------------------------------------------------------


def test_candidates_in_turn_report_agreement_then_end(world):
    """Two candidates, each for half the duration, under synthetic load: the same function agrees on
    every row with no error, the negated one on none; the shadow ends by itself and frees the slot;
    serving telemetry goes on throughout."""
    central = world["central"]
    device = "sh-agree"
    agent, info = _start(world, device, "--synthetic-load", "40")
    try:
        envelope, shadow_id, _ = _shadow(world, device, ["same", "negated"], duration_s=10, sample=0.5)
        central.publish(device, envelope)
        started = central.event(device, "shadow.started", shadow_id, candidate=0)
        assert started["details"]["rss_increase_bytes"] >= 0
        central.event(device, "shadow.started", shadow_id, candidate=1, timeout=30)
        ended = central.event(device, "shadow.ended", shadow_id, timeout=30)
        assert ended["details"]["reason"] == "duration"
        same = central.windows(device, shadow_id, 0)
        negated = central.windows(device, shadow_id, 1)
        assert sum(w["samples"] for w in same) > 0 and sum(w["samples"] for w in negated) > 0, (same, negated)
        for w in same + negated:
            assert w["serving_sha256"] == _serving_sha(world) and w["errors"] == 0, w
        # A sample offered at the end of one window may run in the next.
        assert sum(w["samples"] + w["dropped"] for w in same) <= sum(w["offered"] for w in same)
        rows = sum(w["outputs"]["y"]["rows"] for w in same)
        assert rows > 0 and sum(w["outputs"]["y"]["agree"] for w in same) == rows
        assert max(w["outputs"]["y"]["max_abs_err"] for w in same) == 0.0
        rows = sum(w["outputs"]["y"]["rows"] for w in negated)
        assert rows > 0 and sum(w["outputs"]["y"]["agree"] for w in negated) == 0
        assert max(w["outputs"]["y"]["max_abs_err"] for w in negated) > 0.0
        timed = [w for w in same if w["samples"] > 0]
        assert all(sum(w["latency"]["counts"]) + w["latency"]["underflow"] + w["latency"]["overflow"] == w["samples"]
                   and w["latency"]["p50_us"] > 0 and w["serving_latency"]["p50_us"] > 0 for w in timed), timed
        # Paired timing: the child ran the serving artifact beside the candidate on every sample.
        assert all(w["paired_samples"] == w["samples"] and w["paired_serving_latency"]["p50_us"] > 0
                   and sum(w["paired_serving_latency"]["counts"]) + w["paired_serving_latency"]["underflow"]
                   + w["paired_serving_latency"]["overflow"] == w["samples"] for w in timed), timed
        wait_for(lambda: _slot_files(agent.data_dir) == ["floor.json"], 10, "the shadow slot freed")
        assert _get(info, "/v1/stats")["shadow"] == {"active": False}
        before = len(central.of(device, "telemetry"))
        wait_for(lambda: len(central.of(device, "telemetry")) >= before + 2, 20, "serving telemetry going on")
        assert _get(info, "/v1/model")["manifest_sha256"] == _serving_sha(world)
    finally:
        assert agent.stop() == 0, agent.log()
    assert not central.invalid, central.invalid[:3]


def test_refusals_leave_serving_untouched(world):
    """A candidate whose inputs differ, a replayed and an expired shadow state, a candidate over the
    byte budget, and a shadow state signed as a desired state: each one `shadow.refused`, the
    serving model untouched."""
    central = world["central"]
    device = "sh-refuse"
    agent, info = _start(world, device, "--synthetic-load", "20")
    try:
        envelope, shadow_id, _ = _shadow(world, device, ["wide"], version=5)
        central.publish(device, envelope)
        refused = central.event(device, "shadow.refused", shadow_id)
        assert "cannot shadow the serving model" in refused["message"] and refused["details"]["candidate"] == 0, refused
        # The same shadow state again (the retained message after a reconnect) is not refused twice;
        # an older version is a replay.
        central.publish(device, envelope)
        envelope, shadow_id, _ = _shadow(world, device, ["same"], version=3)
        central.publish(device, envelope)
        refused = central.event(device, "shadow.refused", shadow_id)
        assert "is not above" in refused["message"], refused
        now_ms = int(time.time() * 1000)
        envelope, shadow_id, _ = _shadow(world, device, ["same"], issued_at_ms=now_ms - 7_200_000, valid_for_s=60)
        central.publish(device, envelope)
        refused = central.event(device, "shadow.refused", shadow_id)
        assert "expired" in refused["message"], refused
        envelope, shadow_id, _ = _shadow(world, device, ["same"], max_bytes=1024)
        central.publish(device, envelope)
        refused = central.event(device, "shadow.refused", shadow_id)
        assert "over the shadow slot's budget of 1024 bytes" in refused["message"], refused
        envelope, shadow_id, _ = _shadow(world, device, ["same"], domain=deploy_desired.DOMAIN)
        central.publish(device, envelope)
        refused = central.event(device, "shadow.refused", shadow_id)
        assert "signature" in refused["message"], refused
        assert not central.events(device, prefix="shadow.started")
        assert _get(info, "/v1/model")["manifest_sha256"] == _serving_sha(world)
        assert _get(info, "/v1/health")["errors"] == 0
        # The refused candidate left nothing in the slot (the shadow itself runs its course: state.json).
        assert set(_slot_files(agent.data_dir)) <= {"floor.json", "state.json"}
    finally:
        assert agent.stop() == 0, agent.log()
    assert not central.invalid, central.invalid[:3]


def test_candidate_crashing_on_a_live_input_fails_alone(world):
    """The candidate passes its self-test and aborts on a negative input: `shadow.failed` naming the
    signal, its slot freed, and the agent keeps serving (HTTP and telemetry)."""
    central = world["central"]
    device = "sh-crash"
    agent, info = _start(world, device)
    try:
        envelope, shadow_id, _ = _shadow(world, device, ["crashing"], sample=1.0)
        central.publish(device, envelope)
        central.event(device, "shadow.started", shadow_id)
        x = -np.ones((1, 4), dtype=np.float32)
        np.testing.assert_allclose(_infer(info, x), 2 * x)
        failed = central.event(device, "shadow.failed", shadow_id)
        assert "SIGABRT" in failed["message"], failed
        np.testing.assert_allclose(_infer(info, -x), -2 * x)
        assert _get(info, "/v1/health")["errors"] == 0
        before = len(central.of(device, "telemetry"))
        wait_for(lambda: len(central.of(device, "telemetry")) >= before + 2, 20, "telemetry after the crash")
        wait_for(lambda: "candidate" not in _slot_files(agent.data_dir), 10, "the candidate's slot freed")
    finally:
        assert agent.stop() == 0, agent.log()


def test_full_queue_drops_and_counts(world):
    """queue 1, every request sampled, a small CPU share and 200 requests a second: samples are
    dropped and counted, others run, serving goes on."""
    central = world["central"]
    device = "sh-queue"
    # The children start through --child-executable (what an emulated agent needs): a wrapper here.
    wrapper = world["root"] / "child-wrapper"
    calls = world["root"] / "child-wrapper.calls"
    wrapper.write_text(f'#!/bin/sh\necho "$1" >> {calls}\nexec {AGENT} "$@"\n')
    wrapper.chmod(0o755)
    agent, info = _start(world, device, "--synthetic-load", "200", "--child-executable", str(wrapper))
    try:
        envelope, shadow_id, _ = _shadow(world, device, ["same"], sample=1.0, queue=1, cpu_share=0.05)
        central.publish(device, envelope)
        central.event(device, "shadow.started", shadow_id)
        windows = wait_for(lambda: [w for w in central.windows(device, shadow_id) if w["dropped"] > 0 and w["samples"] > 0],
                           30, "a window with drops and samples")
        w = windows[0]
        assert w["offered"] >= w["dropped"] + w["samples"], w
        status = _get(info, "/v1/stats")["shadow"]
        assert status["active"] and status["dropped"] > 0 and status["shadow_id"] == shadow_id, status
        runs = _get(info, "/v1/health")["runs"]
        wait_for(lambda: _get(info, "/v1/health")["runs"] > runs + 100, 20, "serving runs going on")
        stop, _, _ = _shadow(world, device, [])
        central.publish(device, stop)
        ended = central.event(device, "shadow.ended", shadow_id)
        assert ended["details"]["reason"] == "stopped"
        assert calls.read_text().split() == ["--deploy-check", "--shadow-child"]
    finally:
        assert agent.stop() == 0, agent.log()


def test_shadow_resumes_after_sigkill(world):
    """SIGKILL mid-shadow: the restarted agent resumes the same candidate from state.json (and the
    retained message is not taken as a replay); a stop then ends it and leaves no slot files."""
    central = world["central"]
    device = "sh-restart"
    data_dir = world["root"] / "agents" / device
    agent, info = _start(world, device, "--synthetic-load", "20", data_dir=data_dir)
    envelope, shadow_id, _ = _shadow(world, device, ["same", "negated"], duration_s=600)
    try:
        central.publish(device, envelope)
        central.event(device, "shadow.started", shadow_id, candidate=0)
        wait_for(lambda: (data_dir / "shadow" / "candidate").is_dir(), 10, "the candidate in its slot")
    finally:
        agent.kill()
    agent, info = _start(world, device, "--synthetic-load", "20", data_dir=data_dir)
    try:
        wait_for(lambda: len([e for e in central.events(device, shadow_id) if e["event"] == "shadow.started"]) >= 2,
                 60, "the shadow started again")
        assert [e["details"]["candidate"] for e in central.events(device, shadow_id) if e["event"] == "shadow.started"] == [0, 0]
        assert not [e for e in central.events(device, shadow_id) if e["event"] == "shadow.refused"]
        wait_for(lambda: [w for w in central.windows(device, shadow_id) if w["samples"] > 0], 30, "samples after the restart")
        stop, _, _ = _shadow(world, device, [])
        central.publish(device, stop)
        ended = central.event(device, "shadow.ended", shadow_id)
        assert ended["details"]["reason"] == "stopped"
        wait_for(lambda: _slot_files(data_dir) == ["floor.json"], 10, "no slot files after the end")
    finally:
        assert agent.stop() == 0, agent.log()


def test_real_engines_agree(world, tmp_path, shared_root, session_home, digits_host_openvino):
    """The demo CNN served by OpenVINO, shadowed by its ONNX Runtime build (both FP32, the same
    network): top-1 agreement >= 0.99 on live synthetic inputs, small errors, both latencies measured."""
    from conftest import DIGITS, _once, build_json

    def make(out: Path) -> dict:  # the same shared build as test_deploy_agent's
        return build_json(DIGITS, "--input-shape", "1,1,8,8", "-t", "x86_64-avx2", "-t", "rpi4-aarch64",
                          "--backend", "ort", "-o", str(out), env={"EDGESMITH_HOME": str(session_home)})

    arts = {(x["target"], x["backend"]): x for x in _once(shared_root, "dist-deploy-ort", make)["artifacts"]}
    world["arts"]["digits-openvino"] = Path(digits_host_openvino["path"])
    world["arts"]["digits-ort"] = Path(arts[("x86_64-avx2", "ort")]["path"])
    trust = tmp_path / "trust"
    shutil.copytree(world["trust"], trust)
    shutil.copy(digits_host_openvino["pub"], trust / "build" / "session.pub")
    central = world["central"]
    device = "sh-engines"
    credentials = world["broker"].add_device(device)
    agent = Agent(digits_host_openvino, credentials, tmp_path / "data", "--trust-dir", str(trust), "--interval", "1",
                  "--synthetic-load", "50")
    info = agent.ready()
    try:
        envelope, shadow_id, _ = _shadow(world, device, ["digits-ort"], sample=0.5)
        central.publish(device, envelope)
        central.event(device, "shadow.started", shadow_id, timeout=120)
        windows = wait_for(lambda: (lambda ws: ws if sum(w["samples"] for w in ws) >= 100 else None)(
            central.windows(device, shadow_id)), 60, "100 samples of the ORT candidate")
        (name,) = windows[0]["outputs"]
        rows = sum(w["outputs"][name]["rows"] for w in windows)
        agree = sum(w["outputs"][name]["agree"] for w in windows)
        assert agree / rows >= 0.99, (agree, rows)
        assert max(w["outputs"][name]["max_abs_err"] for w in windows) < 1e-2
        measured = [w for w in windows if w["samples"] > 0]
        assert all(w["latency"]["p50_us"] > 0 and w["serving_latency"]["p50_us"] > 0 for w in measured)
        # The OpenVINO serving artifact timed beside the ORT candidate in the child, on every sample.
        assert all(w["paired_samples"] == w["samples"] and w["paired_serving_latency"]["p50_us"] > 0
                   for w in measured), measured
        assert _get(info, "/v1/model")["backend"] == "openvino"  # serving untouched
        stop, _, _ = _shadow(world, device, [])
        central.publish(device, stop)
        central.event(device, "shadow.ended", shadow_id)
    finally:
        assert agent.stop() == 0, agent.log()


def test_a_deployment_ends_the_shadow(world):
    """A deployment switches the serving model mid-shadow: the shadow ends (reason serving-changed)
    and frees its slot; its figures compared against one serving model only."""
    central = world["central"]
    device = "sh-deploy"
    agent, info = _start(world, device, "--synthetic-load", "20")
    try:
        envelope, shadow_id, _ = _shadow(world, device, ["same"])
        central.publish(device, envelope)
        central.event(device, "shadow.started", shadow_id)
        archive = deploy_archive.archive(world["arts"]["same"], world["store"].dir)
        state = deploy_desired.desired_state(FLEET, device, 1, f"dep-{uuid.uuid4().hex[:8]}", "deploy", archive,
                                             world["store"].server.url)
        central.publish(device, deploy_desired.sign(state, world["deploy_key"]), topic=deploy_desired.desired_topic)
        ended = central.event(device, "shadow.ended", shadow_id)
        assert ended["details"]["reason"] == "serving-changed", ended
        assert _get(info, "/v1/model")["manifest_sha256"] == archive.manifest_sha256
        wait_for(lambda: _slot_files(agent.data_dir) == ["floor.json"], 10, "the shadow slot freed")
    finally:
        assert agent.stop() == 0, agent.log()


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_aarch64_agent_shadows_under_qemu(world, tmp_path, shared_root, session_home):
    """The aarch64 agent (the cross-built bundle) under qemu-user serves the rpi4 ONNX Runtime build
    and shadows a candidate end to end, then captures served samples and uploads them to a real
    receiver (issue 19 on Arm). Its children (the check, the shadow child) start through
    --child-executable: a wrapper that runs the agent under qemu again (the host has no binfmt_misc)."""
    from conftest import DIGITS, _once, build_json
    from edgesmith.toolchain.prove import QEMU, aarch64_bundle, qemu_prefix

    exe = aarch64_bundle() / "bin" / "edgesmith-agent"
    assert exe.is_file(), f"{exe} is missing; build the bundle with `edgesmith tools install aarch64-runtime`"
    assert shutil.which(QEMU), f"{QEMU} is missing (bootstrap installs qemu-user-static)"

    def make(out: Path) -> dict:  # the same shared build as test_deploy_agent's
        return build_json(DIGITS, "--input-shape", "1,1,8,8", "-t", "x86_64-avx2", "-t", "rpi4-aarch64",
                          "--backend", "ort", "-o", str(out), env={"EDGESMITH_HOME": str(session_home)})

    arts = {(x["target"], x["backend"]): x for x in _once(shared_root, "dist-deploy-ort", make)["artifacts"]}
    arm = Path(arts[("rpi4-aarch64", "ort")]["path"])
    world["arts"]["digits-arm"] = arm
    trust = tmp_path / "trust"
    shutil.copytree(world["trust"], trust)
    shutil.copy(session_home / "keys" / "default.pub", trust / "build" / "session.pub")
    capture_key = generate_deploy_key(directory=tmp_path / "keys" / "deploy")  # `edgesmith capture` signs with a key file
    (trust / "deploy" / "capture.pub").write_text(load_deploy_key(capture_key).public_key.hex() + "\n")
    emulator = [shutil.which(QEMU), "-cpu", "cortex-a72", "-L", str(qemu_prefix("cortex-a72"))]
    wrapper = tmp_path / "agent-under-qemu"
    wrapper.write_text("#!/bin/sh\nexec " + " ".join(f"'{a}'" for a in [*emulator, str(exe)]) + ' "$@"\n')
    wrapper.chmod(0o755)
    central = world["central"]
    device = "sh-arm"
    credentials = world["broker"].add_device(device)
    agent = Agent({"path": arm, "pub": session_home / "keys" / "default.pub"}, credentials, tmp_path / "data",
                  "--trust-dir", str(trust), "--interval", "2", "--synthetic-load", "5",
                  "--child-executable", str(wrapper), command=[*emulator, str(exe)])
    try:
        agent.ready(timeout=300)
        envelope, shadow_id, _ = _shadow(world, device, ["digits-arm"], sample=1.0)
        central.publish(device, envelope)
        started = central.event(device, "shadow.started", shadow_id, timeout=600)
        assert started["details"]["rss_increase_bytes"] > 0, started
        windows = wait_for(lambda: [w for w in central.windows(device, shadow_id) if w["samples"] > 0], 300,
                           "shadow samples from the aarch64 agent")
        (name,) = windows[0]["outputs"]
        assert windows[0]["outputs"][name]["agree"] == windows[0]["outputs"][name]["rows"]
        stop, _, _ = _shadow(world, device, [])
        central.publish(device, stop)
        central.event(device, "shadow.ended", shadow_id, timeout=120)

        # Capture on the Arm agent (issue 19): uniform:1 stores served samples, `capture upload` moves
        # them to a real receiver, and each record holds the served input.
        receiver = Receiver(tmp_path / "captures", tmp_path / "capture-artifacts")
        try:
            cli = ["--devices", device, "--fleet", FLEET, "--broker", str(world["broker"].dir), "--key", str(capture_key),
                   "--dir", str(receiver.dir), "--receiver", receiver.url]
            run_cli("capture", "start", *cli, "--policy", "uniform:1", "--max-samples", "6")
            capture_event = lambda name: wait_for(  # noqa: E731
                lambda: next((m for m in central.of(device, "event") if m["event"] == name), None), 300,
                f"{name} from the aarch64 agent")
            capture_event("capture.started")
            capture_event("capture.dropped")  # the 7th sample meets the 6-sample budget: the oldest goes
            run_cli("capture", "stop", *cli)
            capture_event("capture.stopped")
            run_cli("capture", "upload", *cli)
            uploaded = capture_event("capture.uploaded")
            assert uploaded["details"]["samples"] == 6 and uploaded["details"]["stored_samples"] == 0, uploaded
            shas = receiver.shas(device)
            assert len(shas) == 6
            body = CaptureStore(receiver.dir).object_path(shas[0]).read_bytes()
            header = capture_record.parse(body)
            (served,) = capture_record.tensors(body, header).values()
            assert header.device == device and served.shape == (1, 1, 8, 8)
        finally:
            receiver.stop()
    finally:
        code = agent.stop(timeout=120)
    assert code == 0, agent.log()
    assert not central.invalid, central.invalid[:3]
