"""Staged rollouts against a real Mosquitto: `edgesmith deploy` / `rollback` / `fleet status` run
as a user runs them (subprocesses), a real monitor stores what devices report, and the devices are
real C++ agents (edgesmith-agent with --trust-dir): signature and replay checks, download, archive
and artifact verification, golden self-test in a child process, slot switch, state/event/birth
reports. Most serve the test-only `testecho` backend (no engine, quick to load); one test serves
the digits CNN on OpenVINO."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import urllib.request
from pathlib import Path

import pytest

from conftest import BOTH_STORES, run_cli
from deploy_helpers import make_echo_artifact
from edgesmith.toolchain.deploy import desired
from edgesmith.toolchain.fleet import broker as fleet_broker
from edgesmith.toolchain.signing import generate_deploy_key, generate_key, load_deploy_key, load_signing_key
from test_agent import Agent
from test_fleet_monitor import broker_dir, start_monitor, wait_until  # noqa: F401  (fixtures)
from test_session_core import backend_dir  # noqa: F401  (fixture: the testecho plugin)

FLEET = "plant-a"
pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


class Device:
    """One running agent, read the way an operator on the device would: its HTTP API and its
    deploy/ directory."""

    def __init__(self, agent: Agent, data_dir: Path):
        self.agent, self.data_dir = agent, data_dir
        self.info: dict = {}

    @property
    def artifact(self) -> str:
        with urllib.request.urlopen(f"{self.info['url']}/v1/model", timeout=10) as response:
            return json.loads(response.read())["artifact"]

    @property
    def current(self) -> str:
        link = self.data_dir / "deploy" / "current"
        return os.readlink(link)[-1] if link.is_symlink() else ""

    @property
    def highest_version(self) -> int:
        path = self.data_dir / "deploy" / "state.json"
        return json.loads(path.read_text())["highest_version"] if path.is_file() else 0


@pytest.fixture
def fleet(tmp_path, broker_dir, _isolated_home, backend_dir):  # noqa: F811
    """Keys (a build key the home trusts, a deploy key), testecho artifacts v1 (factory) and v2, and
    five agents on v1; `failing` agents compute outputs off by one (their golden self-tests fail)."""
    build = load_signing_key(generate_key("default"))
    build_pub = tmp_path / "build.pub"
    build_pub.write_text(build.public_key.hex() + "\n")
    deploy_pub = tmp_path / "deploy.pub"
    deploy_pub.write_text(load_deploy_key(generate_deploy_key()).public_key.hex() + "\n")
    v1 = make_echo_artifact(tmp_path / "dist" / "v1", build, version="1")
    v2 = make_echo_artifact(tmp_path / "dist" / "v2", build, version="2")
    names = [f"cam-0{i}" for i in range(1, 6)]
    credentials = fleet_broker.add_devices(broker_dir, names, FLEET)
    made: list[Agent] = []

    def start(failing: tuple[str, ...] = (), offline: tuple[str, ...] = ()) -> dict[str, Device]:
        devices = {}
        for c in credentials:
            if c["device"] in offline:
                continue
            trust = tmp_path / "trust" / c["device"]
            (trust / "build").mkdir(parents=True)
            (trust / "deploy").mkdir()
            shutil.copy(build_pub, trust / "build" / "build.pub")
            shutil.copy(deploy_pub, trust / "deploy" / "deploy.pub")
            env = {}
            if c["device"] in failing:
                env["EDGESMITH_TESTECHO_OFFSET"] = "1"
            data_dir = tmp_path / "devices" / c["device"]
            data_dir.parent.mkdir(exist_ok=True)
            agent = Agent({"path": v1, "pub": build_pub}, Path(c["credentials"]), data_dir, "--trust-dir", str(trust),
                          "--interval", "1", "--backend-path", str(backend_dir), env=env)
            made.append(agent)
            devices[c["device"]] = Device(agent, data_dir)
        for device in devices.values():
            device.info = device.agent.ready()
        return devices

    yield {"v1": v1, "v2": v2, "start": start, "store": tmp_path / "store", "broker": broker_dir, "build": build,
           "credentials": credentials}
    for agent in made:
        assert agent.stop() == 0, agent.log()


def _deploy(fleet: dict, db: str, artifact: Path, *extra: str, check: bool = True):
    return run_cli("deploy", str(artifact), "--fleet", FLEET, "--broker", str(fleet["broker"]), "--db", db,
                   "--store", str(fleet["store"]), "--serve", "127.0.0.1:0", "--previous", str(fleet["v1"]),
                   "--wave-timeout", "30", *extra, check=check)


def _status(db: str) -> dict[str, dict]:
    return {r["device"]: r for r in json.loads(run_cli("fleet", "status", "--db", db, "--json").stdout)}


def _status_when(db: str, predicate, what: str) -> dict[str, dict]:
    """`fleet status --json` once the monitor has stored what ``predicate`` wants (it ingests asynchronously)."""
    def check():
        status = _status(db)
        return status if predicate(status) else None

    return wait_until(check, 30, what)


V1 = "tiny-v1-host-testecho"
V2 = "tiny-v2-host-testecho"


@BOTH_STORES
def test_staged_rollout_then_explicit_rollback(fleet, store_url, start_monitor):  # noqa: F811
    monitor = start_monitor()
    devices = fleet["start"]()
    wait_until(lambda: len(monitor.api()["devices"]) == 5, 30, "the monitor to learn the five devices")
    result = _deploy(fleet, store_url, fleet["v2"], "--waves", "20%,60%,100%", "--abort-on-failure", "20%")
    out = result.stdout
    assert "in 3 wave(s)" in out and "wave 3/3" in out and "completed: 5 of 5 device(s) applied" in out, out
    assert all(d.artifact == V2 and d.current == "a" for d in devices.values())
    status = _status_when(store_url, lambda s: all(r["artifact"] == V2 for r in s.values()), "births of v2 stored")
    assert {r["deploy"]["result"] for r in status.values()} == {"applied"}
    assert {r["deploy"]["slot"] for r in status.values()} == {"a"}
    versions = {d: r["deploy"]["desired_version"] for d, r in status.items()}
    # Waves: 1 device (20%), then 2 (60%), then 2 (100%).
    table = run_cli("fleet", "status", "--db", store_url).stdout
    assert re.search(rf"artifacts served: {V2} \([0-9a-f]{{8}}\): 5\n", table), table
    assert "wave 1 20%: 1/1 applied; wave 2 60%: 2/2 applied; wave 3 100%: 2/2 applied" in table, table

    # Explicit rollback: signed, to the artifact each device served before (downloaded: v1 was the factory's).
    back = run_cli("rollback", "--fleet", FLEET, "--broker", str(fleet["broker"]), "--db", store_url,
                   "--store", str(fleet["store"]), "--serve", "127.0.0.1:0", "--timeout", "30").stdout
    assert "5 of 5 device(s) back" in back, back
    assert all(d.artifact == V1 and d.current == "b" for d in devices.values())
    status = _status_when(store_url, lambda s: all(r["deploy"].get("action") == "rollback" and r["deploy"]["result"]
                                                   == "applied" for r in s.values()), "the rollback's results")
    assert all(r["deploy"]["desired_version"] > versions[d] for d, r in status.items())  # versions only grow

    # A replayed (older) desired state is refused by the device; the rollout's versions outrun it.
    from edgesmith.toolchain.deploy.archive import archive
    from edgesmith.toolchain.deploy.rollout import FleetWatch

    cam = devices["cam-01"]
    old = desired.sign(desired.desired_state(FLEET, "cam-01", versions["cam-01"], "dep-replay", "deploy",
                                             archive(fleet["v2"], fleet["store"]), "http://127.0.0.1:1"),
                       load_deploy_key())
    watch = FleetWatch(fleet_broker.Broker(fleet["broker"]), FLEET).start()
    try:
        watch.publish_desired(FLEET, "cam-01", old)
    finally:
        watch.stop()
    wait_until(lambda: re.search(r"deploy.refused: .*not above", cam.agent.log()), 30, "cam-01 to refuse the replay")
    assert cam.artifact == V1


def test_failing_device_aborts_and_rolls_back(fleet, store_url, start_monitor):  # noqa: F811
    monitor = start_monitor()
    devices = fleet["start"](failing=("cam-02",))
    wait_until(lambda: len(monitor.api()["devices"]) == 5, 30, "the monitor to learn the five devices")
    result = _deploy(fleet, store_url, fleet["v2"], "--waves", "20%,60%,100%", "--abort-on-failure", "20%",
                     check=False)
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert "cam-02: failed: the artifact failed its golden self-test" in out and "ABORT: 33% failed > 20%" in out, out
    assert "wave 3/3" not in out and "rolled-back" in out, out
    # cam-01 (wave 1) and cam-03 (wave 2) applied it and were rolled back; cam-02 kept v1; wave 3 never started.
    assert {n: d.artifact for n, d in devices.items()} == {n: V1 for n in devices}
    assert devices["cam-01"].highest_version == devices["cam-03"].highest_version == 2
    assert devices["cam-04"].highest_version == 0 and devices["cam-05"].highest_version == 0

    status = _status_when(store_url, lambda s: s["cam-03"]["deploy"].get("action") == "rollback"
                          and s["cam-01"]["artifact"] == V1, "the rollback in the store")
    assert status["cam-01"]["deploy"]["result"] == status["cam-03"]["deploy"]["result"] == "applied"
    assert status["cam-02"]["deploy"]["result"] == "failed" and "self-test" in status["cam-02"]["deploy"]["error"]
    for untouched in ("cam-04", "cam-05"):  # their state (sent on connect) names no deployment
        assert status[untouched]["deploy"]["deployment_id"] is None and status[untouched]["deploy"]["slot"] is None
    table = run_cli("fleet", "status", "--db", store_url).stdout
    assert re.search(rf"artifacts served: {V1} \([0-9a-f]{{8}}\): 5\n", table), table
    assert "rolled-back" in table and "rollback of dep-" in table, table
    history = json.loads(run_cli("fleet", "deployments", "--db", store_url, "--json").stdout)
    rollback, deployment = history
    assert deployment["status"] == "rolled-back" and rollback["rolls_back"] == deployment["id"]
    assert {t["device"]: t["result"] for t in deployment["targets"]} == {
        "cam-01": "applied", "cam-02": "failed", "cam-03": "applied"}
    assert [w["status"] for w in deployment["wave_rows"]] == ["done", "aborted", "skipped"]
    # The dashboard: the version mix (every device back on version 1) and the deployments.
    def dashboard() -> str | None:
        page = monitor.get("/").decode()
        return page if f'data-deployment="{rollback["id"]}"' in page else None

    page = wait_until(dashboard, 30, "the dashboard to show the rollback")
    assert "<h2>Version mix</h2>" in page and "1: 5" in page and "rolled-back" in page
    assert monitor.api()["version_mix"] == {FLEET: {"tiny × host": {"1": 5}}}


def test_an_artifact_whose_golden_self_test_fails_never_serves(fleet, store_url, tmp_path):
    """An artifact signed by the trusted build key whose golden outputs are wrong: wave 1's agent
    runs its self-test, fails it, reports deploy.failed, and the rollout aborts before wave 2."""
    devices = fleet["start"]()
    bad = make_echo_artifact(tmp_path / "dist" / "v2-bad", fleet["build"], version="2", wrong_golden=True)
    result = _deploy(fleet, store_url, bad, "--waves", "20%,100%", "--abort-on-failure", "0%", check=False)
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert "cam-01: failed: the artifact failed its golden self-test (sample 0" in out and "ABORT" in out, out
    assert "wave 2/2" not in out, out
    assert {n: d.artifact for n, d in devices.items()} == {n: V1 for n in devices}
    state = json.loads((devices["cam-01"].data_dir / "deploy" / "state.json").read_text())
    assert state["deployment"]["result"] == "failed" and state["deployment"]["phase"] == "self-test", state
    assert state["slots"]["a"]["status"] == "empty" and not (devices["cam-01"].data_dir / "deploy" / "current").exists()


def test_silent_device_times_out_and_counts_as_failed(fleet, store_url):
    """cam-02 is provisioned but never connects: after --wave-timeout it counts as failed, the rollout
    aborts, and it gets a rollback too (it may still apply the deployment late) — which it cannot
    confirm, nor can the store say what it served before, so the deployment stays aborted."""
    devices = fleet["start"](offline=("cam-02",))
    result = _deploy(fleet, store_url, fleet["v2"], "--waves", "20%,60%,100%", "--abort-on-failure", "20%",
                     "--wave-timeout", "3", check=False)
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert "cam-02: timeout (no result reported within 3 s)" in out, out
    assert "cam-02: cannot be rolled back: what it served before is unknown" in out, out
    assert "2 of 2 device(s) back; 1 could not be rolled back" in out, out
    assert "aborted" in out.splitlines()[-1] and "(1 not back)" in out.splitlines()[-1], out
    assert devices["cam-01"].artifact == devices["cam-03"].artifact == V1
    (rollback, deployment) = json.loads(run_cli("fleet", "deployments", "--db", store_url, "--json").stdout)
    assert {t["device"]: t["result"] for t in deployment["targets"]}["cam-02"] == "timeout"
    assert rollback["status"] == "completed" and sorted(t["device"] for t in rollback["targets"]) == ["cam-01", "cam-03"]


# ---- the digits CNN on OpenVINO ----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(300)
def test_real_agents_abort_and_roll_back(tmp_path, broker_dir, store_url, start_monitor,  # noqa: F811
                                         digits_host_openvino, session_home, _isolated_home):
    """Three C++ agents on the factory artifact (the digits CNN, OpenVINO); the rollout of a new build
    of it (another manifest, same key) reaches cam-01 and cam-02 in wave 1; cam-02 was provisioned without the deploy key, refuses, and the rollout
    aborts: cam-01 is rolled back to the factory artifact, cam-03 is never touched."""
    # The home trusts the build key the artifacts were signed with (the deploy command verifies them).
    (_isolated_home / "keys").mkdir(parents=True, exist_ok=True)
    shutil.copy(digits_host_openvino["pub"], _isolated_home / "keys" / "build.pub")
    deploy_pub = generate_deploy_key().with_suffix(".pub")
    factory = digits_host_openvino["path"]
    from conftest import DIGITS, build_json

    (built,) = build_json(DIGITS, "--input-shape", "1,1,8,8", "-t", "x86_64-avx2", "--backend", "openvino", "-o",
                          str(tmp_path / "dist"), env={"EDGESMITH_HOME": str(session_home)})["artifacts"]
    new = Path(built["path"])
    monitor = start_monitor()
    agents = []
    try:
        for device in ("cam-01", "cam-02", "cam-03"):
            credentials = Path(fleet_broker.add_device(broker_dir, device, FLEET)["credentials"])
            trust = tmp_path / "trust" / device
            (trust / "build").mkdir(parents=True)
            (trust / "deploy").mkdir()
            shutil.copy(digits_host_openvino["pub"], trust / "build" / "build.pub")
            if device != "cam-02":  # cam-02 trusts no deploy key: it must refuse every desired state
                shutil.copy(deploy_pub, trust / "deploy" / "deploy.pub")
            (tmp_path / "agents").mkdir(exist_ok=True)
            agent = Agent(digits_host_openvino, credentials, tmp_path / "agents" / device, "--trust-dir", str(trust),
                          "--interval", "1")
            agents.append(agent)
            agent.ready()
        wait_until(lambda: len(monitor.api()["devices"]) == 3, 60, "the monitor to learn the three agents")
        result = run_cli("deploy", str(new), "--fleet", FLEET, "--broker", str(broker_dir), "--db", store_url,
                         "--store", str(tmp_path / "store"), "--serve", "127.0.0.1:0", "--previous", str(factory),
                         "--waves", "50%,100%", "--abort-on-failure", "20%", "--wave-timeout", "90", check=False)
        out = result.stdout
        assert result.returncode == 1, out + result.stderr
        assert "cam-02: refused" in out and "ABORT" in out and "cam-03" not in out, out
        factory_sha = hashlib.sha256((factory / "manifest.json").read_bytes()).hexdigest()
        factory_name = json.loads((factory / "manifest.json").read_text())["name"]
        status = _status_when(store_url, lambda s: s["cam-01"]["manifest_sha256"] == factory_sha
                              and s["cam-01"]["deploy"].get("action") == "rollback"
                              and s["cam-01"]["deploy"].get("result") == "applied", "cam-01 back on the factory artifact")
        assert status["cam-02"]["deploy"]["result"] == "refused"
        assert status["cam-03"]["deploy"].get("deployment_id") is None and status["cam-03"]["manifest_sha256"] == factory_sha
        assert status["cam-01"]["artifact"] == factory_name
        table = run_cli("fleet", "status", "--db", store_url).stdout
        assert "rolled-back" in table, table
    finally:
        for agent in agents:
            agent.stop()


def test_broker_lost_mid_rollout_marks_the_deployment_failed(fleet, store_url):
    """The broker goes away during wave 1 (nobody answers): wave 2's publish fails, and the deployment
    is recorded `failed` with that sentence instead of staying `running` forever."""
    import threading

    from edgesmith.toolchain.deploy import archive as archive_mod
    from edgesmith.toolchain.deploy import rollout
    from edgesmith.toolchain.errors import UserError
    from edgesmith.toolchain.fleet.store import Store
    from edgesmith.toolchain.fleet.store import deployments as history

    info = archive_mod.archive(fleet["v2"], fleet["store"])
    config = rollout.RolloutConfig(FLEET, fleet["broker"], [0.5, 1.0], 1.0, 3.0, load_deploy_key(None),
                                   "http://127.0.0.1:9/", fleet["store"], devices=["cam-01", "cam-02"])
    store = Store.open(store_url)
    said: list[str] = []

    def say(line: str) -> None:
        said.append(line)
        if line.startswith("wave 1/"):  # wave 1 is published; take the broker away while it waits
            threading.Thread(target=fleet_broker.down, args=(fleet["broker"],), daemon=True).start()

    with pytest.raises(UserError) as raised:
        rollout.deploy(info, config, store, say)
    assert "cam-02" in str(raised.value), (str(raised.value), said)
    dep = history.latest_deployment(store, FLEET)
    assert dep["status"] == "failed" and "cam-02" in dep["message"], dep


def test_reports_sent_while_the_rollout_reconnects_are_not_lost(broker_dir):  # noqa: F811
    """The rollout's client keeps its broker session: a device report published while it is away
    (a network drop, a broker restart) is delivered when it reconnects, not counted as a time-out."""
    import time

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from edgesmith.toolchain.deploy.rollout import FleetWatch
    from edgesmith.toolchain.fleet import protocol

    (cred,) = fleet_broker.add_devices(broker_dir, ["cam-01"], FLEET)
    watch = FleetWatch(fleet_broker.Broker(broker_dir), FLEET).start()
    got: list[bytes] = []
    watch.client.on_message = lambda _c, _u, msg: got.append(msg.payload)
    device = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cred.get("client_id", "cam-01"), protocol=mqtt.MQTTv5)
    device.username_pw_set(cred["username"], cred["password"])
    device.connect(cred["host"], cred["port"])
    device.loop_start()
    try:
        topic = f"{protocol.TOPIC_ROOT}/{FLEET}/cam-01/state"
        watch.client.disconnect()
        watch.client.loop_stop()
        sent = device.publish(topic, b"sent in the gap", qos=1)
        sent.wait_for_publish(10)
        assert sent.is_published()
        watch.client.reconnect()
        watch.client.loop_start()
        wait_until(lambda: got or None, 15, "the report sent in the gap")
        assert got == [b"sent in the gap"]
    finally:
        watch.stop()
        device.disconnect()
        device.loop_stop()


def test_a_hostile_device_cannot_stop_a_rollout(fleet, store_url, start_monitor):  # noqa: F811
    """Issue 16, done means: with one device's own login (cam-05's), take over its session, send the
    issue's poison messages (a histogram without edges, 10^12 classes, counts >= 2^63, a state
    claiming desired_version 2^63-1, a device id with a newline, a birth naming an artifact nobody
    built) and over-size packets. The monitor stays up and answering, and a rollout to the other
    four devices completes."""
    from test_broker_security import _raw_publish_is_cut_off, _settings
    from test_fleet_hostile import ART, _poison
    from test_fleet_monitor import connected

    monitor = start_monitor()
    devices = fleet["start"]()
    wait_until(lambda: len(monitor.api()["devices"]) == 5, 30, "the monitor to learn the five devices")
    stolen = next(c for c in fleet["credentials"] if c["device"] == "cam-05")
    attacker = connected(stolen, artifact=ART, interval_s=60, seed=7)  # its login: cam-05's session, no other
    sent = _poison(attacker)
    for kind, payload, _ in sent:
        attacker.send((attacker.topic(kind), payload))
    # Over-size packets straight at the broker: each cut off (max_packet_size) before it is buffered.
    topic = attacker.topic("telemetry")
    for _ in range(3):
        assert _raw_publish_is_cut_off(_settings(fleet["broker"]), stolen, topic, fleet_broker.MAX_PACKET_BYTES + 1)
    poison = sum(1 for _, _, reason in sent if reason)

    def judged():
        refused = next(d for d in monitor.api()["devices"] if d["device"] == "cam-05")["refused"]
        return refused if refused and refused["total"] >= poison else None

    wait_until(judged, 30, "the monitor to refuse every poison message")
    assert monitor.proc.poll() is None
    attacker.drop()

    result = _deploy(fleet, store_url, fleet["v2"], "--waves", "50%,100%", check=False)
    others = [n for n in devices if n != "cam-05"]
    assert all(devices[n].artifact == V2 for n in others), result.stdout + result.stderr
    status = _status_when(store_url, lambda s: all(s[n]["artifact"] == V2 for n in others), "the four devices on v2")
    assert {status[n]["deploy"]["result"] for n in others} == {"applied"}
    assert all(r["refused"] is None for d, r in status.items() if d != "cam-05")
