"""edgesmith-agent (csrc/agent/, csrc/telemetry/) against a real Mosquitto run by `edgesmith broker`.

What an outside MQTT client sees (topics, schema), presence (birth, the will on SIGKILL, the
shutdown death), store-and-forward across a broker restart and a 60 s outage (nothing lost,
nothing counted twice), the spool's disk budget, local HTTP inference, the Python publisher, config
errors, and the aarch64 agent under qemu.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from conftest import REPO, run_cli

# EDGESMITH_TEST_AGENT: another build of the agent under test (scripts/sanitize-agent.sh's sanitized one).
AGENT = Path(os.environ.get("EDGESMITH_TEST_AGENT") or Path(sys.executable).parent / "edgesmith-agent")
SCHEMA = json.loads((REPO / "docs" / "telemetry.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
FLEET = "plant-a"

pytestmark = pytest.mark.integration


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


class Broker:
    """A Mosquitto broker in a temporary directory, through the `edgesmith broker` commands."""

    def __init__(self, directory: Path, *flags: str):
        self.dir = directory
        self.info = json.loads(run_cli("broker", "up", "--dir", str(directory), *flags, "--json").stdout)

    @property
    def port(self) -> int:
        return self.info["port"]

    def up(self) -> None:
        run_cli("broker", "up", "--dir", str(self.dir), "--json")

    def down(self) -> None:
        run_cli("broker", "down", "--dir", str(self.dir))

    def central(self, prefix: str) -> dict:
        """A central login of its own (the broker makes the login the client id: sharing the
        monitor's would take over its session)."""
        from edgesmith.toolchain.fleet import broker as fleet_broker

        return fleet_broker.central_login(self.dir, f"edgesmith-{prefix}-{uuid.uuid4().hex[:8]}")

    def add_device(self, device: str, fleet: str = FLEET) -> Path:
        out = json.loads(run_cli("broker", "add-device", device, "--fleet", fleet, "--dir", str(self.dir),
                                 "--json").stdout)
        return Path(out["credentials"])


@pytest.fixture
def broker(tmp_path):
    b = Broker(tmp_path / "broker")
    yield b
    run_cli("broker", "down", "--dir", str(b.dir), check=False)


class Collector:
    """A monitor-like subscriber: paho-mqtt, MQTT v5, QoS 1, a persistent session (the broker
    queues for it while it is away), reconnecting by itself."""

    def __init__(self, broker: Broker, topic: str = "edgesmith/v1/#"):
        import paho.mqtt.client as mqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self.messages: list[tuple[str, dict]] = []
        self._lock = threading.Lock()
        from edgesmith.toolchain.fleet import broker as fleet_broker

        creds = broker.central("collector")
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=creds["username"], protocol=mqtt.MQTTv5)
        fleet_broker.configure_client(self._client, fleet_broker.Broker(broker.dir.resolve()).settings(), creds)
        self._client.on_connect = lambda c, u, flags, rc, props: c.subscribe(topic, qos=1)
        self._client.on_message = self._on_message
        self._client.reconnect_delay_set(0.2, 2)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self._client.connect("127.0.0.1", broker.port, keepalive=10, clean_start=False, properties=props)
        self._client.loop_start()
        wait_for(self._client.is_connected, 10, "the collector to connect")
        time.sleep(0.3)  # the SUBACK

    def _on_message(self, client, userdata, msg) -> None:
        with self._lock:
            self.messages.append((msg.topic, json.loads(msg.payload)))

    def snapshot(self) -> list[tuple[str, dict]]:
        with self._lock:
            return list(self.messages)

    def of_kind(self, kind: str) -> list[dict]:
        return [m for _, m in self.snapshot() if m["kind"] == kind]

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


class Agent:
    """edgesmith-agent in a subprocess; its stderr goes to <data-dir>.log."""

    def __init__(self, artifact: dict, credentials: Path, data_dir: Path, *extra: str, command: list[str] | None = None,
                 env: dict | None = None):
        self.data_dir = data_dir
        self.log_path = data_dir.with_suffix(".log")
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()/kill()
        args = [*(command or [str(AGENT)]), "--artifact", str(artifact["path"]), "--credentials", str(credentials),
                "--data-dir", str(data_dir), "--key", str(artifact["pub"]), *extra]
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})

    def log(self) -> str:
        return self.log_path.read_text()

    def ready(self, timeout: float = 60) -> dict:
        def agent_json():
            if self.proc.poll() is not None:
                raise AssertionError(f"the agent exited ({self.proc.returncode}):\n{self.log()}")
            path = self.data_dir / "agent.json"
            return json.loads(path.read_text()) if path.is_file() else None
        return wait_for(agent_json, timeout, "agent.json")

    def stop(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._log.close()
        return code

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self._log.close()


def spool_counters(data_dir: Path) -> tuple[dict[str, int], list[int]]:
    """The spool's counters and the seqs still queued in it (read after the agent exited)."""
    with sqlite3.connect(data_dir / "spool.db") as db:
        counters = dict(db.execute("SELECT name, value FROM counters").fetchall())
        queued = [row[0] for row in db.execute("SELECT seq FROM messages ORDER BY id")]
    return counters, queued


def test_outside_client_sees_documented_topics_and_valid_payloads(broker, digits_host_openvino, tmp_path):
    credentials = broker.add_device("cam-01")
    monitor = broker.info["monitor"]
    sub = subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port), "-u", monitor["username"],
                            "-P", monitor["password"], "-V", "mqttv5", "-q", "1", "-t", "edgesmith/v1/#", "-v"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(sub.stdout.readline, "")), daemon=True)
    reader.start()
    time.sleep(0.5)
    agent = Agent(digits_host_openvino, credentials, tmp_path / "data", "--interval", "0.3", "--synthetic-load", "40")
    try:
        agent.ready()
        wait_for(lambda: sum("/telemetry " in line for line in lines) >= 4, 60, "4 telemetry messages")
    finally:
        assert agent.stop() == 0, agent.log()
    wait_for(lambda: any("/death " in line for line in lines), 20, "the death")
    sub.terminate()
    sub.wait(10)

    messages = []
    for line in lines:
        topic, payload = line.rstrip("\n").split(" ", 1)
        message = json.loads(payload)
        errors = sorted(VALIDATOR.iter_errors(message), key=str)
        assert not errors, f"{topic}: {errors[0].message}\n{payload[:400]}"
        assert topic == f"edgesmith/v1/{FLEET}/cam-01/{message['kind']}"
        messages.append(message)
    kinds = [m["kind"] for m in messages]
    assert kinds[0] == "birth", kinds[:5]
    assert kinds[-1] == "death"
    assert {"birth", "telemetry", "event", "death"} <= set(kinds)

    birth, death = messages[0], messages[-1]
    manifest_bytes = (digits_host_openvino["path"] / "manifest.json").read_bytes()
    manifest = json.loads(manifest_bytes)
    assert birth["artifact"]["manifest_sha256"] == hashlib.sha256(manifest_bytes).hexdigest()
    assert birth["artifact"]["model"] == manifest["model"]["name"]
    assert birth["runtime"]["isa"] == "x86_64"
    assert birth["metrics"]["outputs"][0]["reference"] == manifest["monitoring"]["outputs"][0]["reference"]
    assert birth["metrics"]["interval_s"] == 0.3
    assert death["reason"] == "shutdown"
    assert (death["bdSeq"], death["seq"]) == (birth["bdSeq"], birth["seq"])
    telemetry = [m for m in messages if m["kind"] == "telemetry"]
    assert all(t["bdSeq"] == birth["bdSeq"] and not t["historical"] for t in telemetry)
    assert sum(t["runs"] for t in telemetry) > 0
    for t in telemetry:
        assert sum(t["latency"]["counts"]) + t["latency"]["underflow"] + t["latency"]["overflow"] == t["runs"]
        assert sum(t["outputs"]["linear"]["counts"]) + t["outputs"]["linear"]["overflow"] == t["outputs"]["linear"]["binned"]
        assert t["window_end_ms"] >= t["window_start_ms"]
        assert t["process"]["rss_bytes"] > 0
    seqs = [m["seq"] for m in messages if m["kind"] != "death"]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


def test_sigkill_death_arrives_through_the_will(broker, digits_host_openvino, tmp_path):
    credentials = broker.add_device("cam-02")
    collector = Collector(broker)
    agent = Agent(digits_host_openvino, credentials, tmp_path / "data", "--interval", "0.5")
    try:
        agent.ready()
        (birth,) = wait_for(lambda: collector.of_kind("birth"), 30, "the birth")
        wait_for(lambda: collector.of_kind("telemetry"), 30, "a telemetry message")
        agent.kill()
        (death,) = wait_for(lambda: collector.of_kind("death"), 30, "the will")
    finally:
        collector.close()
        if agent.proc.poll() is None:
            agent.kill()
    assert death["reason"] == "connection-lost"
    assert (death["bdSeq"], death["seq"]) == (birth["bdSeq"], birth["seq"])
    assert not list(VALIDATOR.iter_errors(death))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_broker_restart_and_60s_outage_lose_and_duplicate_nothing(broker, digits_host_openvino, tmp_path):
    credentials = broker.add_device("cam-03")
    collector = Collector(broker)
    data = tmp_path / "data"
    agent = Agent(digits_host_openvino, credentials, data, "--interval", "0.02", "--synthetic-load", "20")
    try:
        agent.ready()
        time.sleep(3)
        broker.down()  # restart mid-stream
        broker.up()
        time.sleep(3)
        broker.down()  # the device is offline for 60 s: it keeps summarising into its spool
        time.sleep(60)
        broker.up()
        wait_for(lambda: len({b["bdSeq"] for b in collector.of_kind("birth")}) >= 3, 60, "the third session's birth")
        time.sleep(3)
    finally:
        code = agent.stop()
    assert code == 0, agent.log()
    wait_for(lambda: collector.of_kind("death"), 30, "the shutdown death")
    counters, still_queued = spool_counters(data)
    assert still_queued == [], f"{len(still_queued)} messages were never acknowledged"
    assert counters.get("dropped_total", 0) == 0
    made = set(range(1, counters["seq"] + 1)) - {counters.get("birth_seq", 0)}

    def received_seqs():
        return {m["seq"] for _, m in collector.snapshot() if m["kind"] != "death"}

    wait_for(lambda: received_seqs() >= made, 120, "every message the agent made", interval=0.5)
    time.sleep(2)  # late duplicates, if any
    collector.close()

    messages = [m for _, m in collector.snapshot() if m["kind"] != "death"]
    keys = Counter((m["device"], m["bdSeq"], m["seq"]) for m in messages)
    unique_by_seq = Counter(seq for (_, _, seq) in keys)
    redelivered = sum(n - 1 for n in keys.values())
    print(f"\n{len(made)} messages made, {len(messages)} delivered, {redelivered} QoS 1 redeliveries "
          f"(dropped by (device, bdSeq, seq)), {sum(m['historical'] for m in messages)} historical, "
          f"{len(collector.of_kind('birth'))} births")
    assert len(made) >= 3000
    # Nothing lost: every seq arrived. Nothing counted twice: no seq under two (bdSeq) keys, and a
    # redelivery is the same message.
    assert {seq for (_, _, seq) in keys} == made
    assert max(unique_by_seq.values()) == 1
    first = {}
    for m in messages:
        key = (m["device"], m["bdSeq"], m["seq"])
        if key in first:
            assert (m["kind"], m["ts_ms"]) == (first[key]["kind"], first[key]["ts_ms"])
        first[key] = m
    # What was made during the outage was replayed flagged as historical.
    assert any(m["historical"] for m in messages)
    # One birth per session; a birth seen again is the retained copy the broker hands a subscriber
    # that (re)subscribes, the same message.
    births: dict[int, dict] = {}
    for birth in collector.of_kind("birth"):
        assert births.setdefault(birth["bdSeq"], birth) == birth
    assert len(births) >= 3


def test_exhausted_spool_drops_oldest_counts_and_reports(broker, digits_host_openvino, tmp_path):
    credentials = broker.add_device("cam-04")
    collector = Collector(broker)  # its persistent session queues what arrives while it reconnects
    broker.down()
    data = tmp_path / "data"
    agent = Agent(digits_host_openvino, credentials, data, "--interval", "0.05", "--spool-max-bytes", "16384")
    try:
        info = agent.ready()
        time.sleep(4)  # ~80 windows of ~1.2 kB into a 16 kB budget, broker away
        broker.up()
        drops = wait_for(lambda: collector.of_kind("event") and
                         [e for e in collector.of_kind("event") if e["event"] == "spool_dropped"], 60,
                         "a spool_dropped event")
        live = wait_for(lambda: [t for t in collector.of_kind("telemetry")
                                 if not t["historical"] and t["spool"]["dropped_total"] > 0], 30,
                        "a live telemetry counting the drops")
        assert agent.proc.poll() is None, agent.log()
        with urllib.request.urlopen(f"{info['url']}/v1/health", timeout=10) as response:
            assert json.load(response)["device"] == "cam-04"
    finally:
        code = agent.stop()
        collector.close()
    assert code == 0, agent.log()
    dropped = drops[0]["details"]["dropped"]
    assert dropped > 0
    assert live[0]["spool"]["dropped_total"] >= dropped
    counters, _ = spool_counters(data)
    assert counters["dropped_total"] >= live[0]["spool"]["dropped_total"]
    # The oldest went: the earliest seqs never arrived, the newest did.
    seqs = {m["seq"] for _, m in collector.snapshot()}
    assert 2 not in seqs  # the `started` event, made first while the broker was away
    assert max(seqs) >= counters["seq"] - 5
    for _, message in collector.snapshot():
        assert not list(VALIDATOR.iter_errors(message))


def _npy_concat(arrays) -> bytes:
    out = io.BytesIO()
    for a in arrays:
        np.save(out, a)
    return out.getvalue()


def _npy_split(data: bytes) -> list[np.ndarray]:
    stream, out = io.BytesIO(data), []
    while stream.tell() < len(data):
        out.append(np.load(stream))
    return out


def test_http_inference_matches_session(broker, digits_host_openvino, tmp_path):
    from edgesmith.runtime import Session

    credentials = broker.add_device("cam-05")
    agent = Agent(digits_host_openvino, credentials, tmp_path / "data", "--interval", "1")
    session = Session(digits_host_openvino["path"],
                      trusted_keys=[bytes.fromhex(digits_host_openvino["pub"].read_text().strip())])
    rng = np.random.default_rng(7)
    x = rng.normal(size=(1, 1, 8, 8)).astype(np.float32)
    try:
        url = agent.ready()["url"]
        request = urllib.request.Request(f"{url}/v1/infer", data=_npy_concat([x]), method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            got = _npy_split(response.read())
        expected = session.run([x])
        assert len(got) == len(expected) == 1
        assert got[0].dtype == expected[0].dtype and got[0].shape == expected[0].shape
        np.testing.assert_allclose(got[0], expected[0], rtol=1e-6, atol=1e-7)

        wrong = urllib.request.Request(f"{url}/v1/infer", data=_npy_concat([x[:, :, :4]]), method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(wrong, timeout=30)
        assert refused.value.code == 400
        assert "input" in json.loads(refused.value.read())["error"]
        garbage = urllib.request.Request(f"{url}/v1/infer", data=b"not npy", method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(garbage, timeout=30)
        assert refused.value.code == 400

        with urllib.request.urlopen(f"{url}/v1/health", timeout=10) as response:
            health = json.load(response)
        # The two bad requests were refused before reaching the model: counted by the API, not as runs.
        assert health == {"device": "cam-05", "artifact": digits_host_openvino["path"].name, "runs": 1, "errors": 0}
        with urllib.request.urlopen(f"{url}/v1/stats", timeout=10) as response:
            stats = json.load(response)
        assert stats["runs"] == 1 and stats["outputs"]["linear"]["kind"] == "classes"
        assert stats["telemetry"]["device"] == "cam-05"
        assert stats["http"]["refused"] == {"input_mismatch": 1, "malformed": 1}
    finally:
        assert agent.stop() == 0, agent.log()
    assert not (tmp_path / "data" / "agent.json").exists()


def test_python_publisher_reports_a_session(broker, digits_host_openvino, tmp_path):
    from edgesmith.runtime import Session
    from edgesmith.runtime.errors import ValueError as EdgesmithValueError
    from edgesmith.runtime.telemetry import Publisher

    credentials = broker.add_device("py-01")
    collector = Collector(broker)
    session = Session(digits_host_openvino["path"],
                      trusted_keys=[bytes.fromhex(digits_host_openvino["pub"].read_text().strip())])
    x = np.zeros((1, 1, 8, 8), np.float32)
    try:
        with Publisher(session, credentials, tmp_path / "py-data", interval_s=60) as publisher:
            wait_for(lambda: publisher.status()["connected"], 30, "the publisher to connect")
            for _ in range(5):
                session.run([x])
            publisher.event("recalibrated", "camera recalibrated", {"exposure_ms": 4})
            with pytest.raises(EdgesmithValueError, match="event name 'Bad Name'"):
                publisher.event("Bad Name", "not a protocol event name")
            publisher.window()
            wait_for(lambda: collector.of_kind("telemetry"), 30, "the window")
        wait_for(lambda: collector.of_kind("death"), 30, "the death")
    finally:
        collector.close()
    (telemetry,) = [t for t in collector.of_kind("telemetry") if t["runs"] == 5]
    assert telemetry["outputs"]["linear"]["binned"] == 5
    events = {e["event"]: e for e in collector.of_kind("event")}
    assert events["recalibrated"]["details"] == {"exposure_ms": 4}
    assert collector.of_kind("death")[0]["reason"] == "shutdown"
    for _, message in collector.snapshot():
        assert not list(VALIDATOR.iter_errors(message))


def _agent_error(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([str(AGENT), *args], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    return result


def test_config_errors_are_one_line(broker, digits_host_openvino, tmp_path):
    credentials = broker.add_device("cam-06")
    config = tmp_path / "device.toml"
    config.write_text(f'artifact = "{digits_host_openvino["path"]}"\ncredentials = "{credentials}"\n'
                      f'data_dir = "data"\nintervall_s = 5\n')
    result = _agent_error("--config", str(config))
    assert result.returncode == 2
    assert "unknown key 'intervall_s'" in result.stderr.splitlines()[0]

    result = _agent_error("--artifact", str(digits_host_openvino["path"]), "--credentials", str(tmp_path / "nope.json"),
                          "--data-dir", str(tmp_path / "d"))
    assert result.returncode == 1
    assert "nope.json does not exist" in result.stderr.splitlines()[0]

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"device": "cam-06", "fleet": FLEET, "host": "127.0.0.1", "port": "x",
                               "username": "u", "password": "p"}))
    result = _agent_error("--artifact", str(digits_host_openvino["path"]), "--credentials", str(bad),
                          "--data-dir", str(tmp_path / "d"))
    assert "'port'" in result.stderr.splitlines()[0]

    result = _agent_error("--artifact", str(digits_host_openvino["path"]), "--credentials", str(credentials),
                          "--data-dir", str(tmp_path / "d"), "--device", "cam-99")
    assert "cam-06" in result.stderr and "cam-99" in result.stderr

    result = _agent_error("--credentials", str(credentials), "--data-dir", str(tmp_path / "d"))
    assert result.returncode == 2 and "--artifact" in result.stderr.splitlines()[0]

    result = _agent_error("--artifact", str(digits_host_openvino["path"]), "--credentials", str(credentials),
                          "--data-dir", str(tmp_path / "d"), "--interval", "0")
    assert result.returncode == 2 and "--interval" in result.stderr.splitlines()[0]

    # A config file that works: relative data_dir from the file's directory, flags override it.
    config.write_text(f'artifact = "{digits_host_openvino["path"]}"\ncredentials = "{credentials}"\n'
                      f'data_dir = "data"\ninterval_s = 5\ntrusted_keys = ["{digits_host_openvino["pub"]}"]\n')
    proc = subprocess.Popen([str(AGENT), "--config", str(config), "--interval", "0.5"], stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (tmp_path / "data" / "agent.json").is_file(), 60, "agent.json next to the config")
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "telemetry every 0.5 s" in err


def test_agent_refuses_plaintext_to_a_broker_off_this_machine(broker, digits_host_openvino, tmp_path):
    """Before: `tcp://` to any address, so the password and signed desired states crossed the
    network in clear. The check comes before the artifact is loaded."""
    credentials = json.loads(broker.add_device("cam-07").read_text())
    for host in ("192.0.2.10", "broker.example", "::ffff:10.0.0.1"):
        remote = tmp_path / f"remote-{host}.json"
        remote.write_text(json.dumps(credentials | {"host": host}))
        result = _agent_error("--artifact", str(tmp_path / "not-loaded"), "--credentials", str(remote),
                              "--data-dir", str(tmp_path / "d"))
        assert result.returncode == 1, result.stderr
        line = result.stderr.splitlines()[0]
        assert f"refusing plaintext MQTT to {host}" in line and "edgesmith broker up --tls" in line, line
    # Loopback stays plaintext-friendly (only the missing artifact stops this one).
    for host in ("localhost", "127.0.0.2", "::1"):
        local = tmp_path / f"local-{host}.json"
        local.write_text(json.dumps(credentials | {"host": host}))
        result = _agent_error("--artifact", str(tmp_path / "not-loaded"), "--credentials", str(local),
                              "--data-dir", str(tmp_path / "d"))
        assert "refusing plaintext" not in result.stderr, result.stderr


def test_agent_over_mutual_tls_with_broker_certs(digits_host_openvino, tmp_path):
    """`broker certs`, `broker up --tls --mutual-tls`: the agent connects with its own certificate
    (its Common Name is its login); the same agent with another device's certificate is that other
    device to the broker, so the ACL refuses its own topics and nothing of it arrives."""
    directory = tmp_path / "tls-broker"
    run_cli("broker", "certs", "--dir", str(directory), "--host", "127.0.0.1")
    b = Broker(directory, "--tls", "--mutual-tls")
    try:
        good = json.loads(run_cli("broker", "add-device", "mtls-01", "--fleet", FLEET, "--dir", str(directory),
                                  "--json").stdout)
        other = json.loads(run_cli("broker", "add-device", "mtls-02", "--fleet", FLEET, "--dir", str(directory),
                                   "--json").stdout)
        assert good["tls"] and Path(good["certfile"]).is_file() and Path(good["keyfile"]).is_file()
        collector = Collector(b)
        agent = Agent(digits_host_openvino, Path(good["credentials"]), tmp_path / "data", "--interval", "0.5")
        try:
            agent.ready()
            wait_for(lambda: collector.of_kind("telemetry"), 60, "telemetry over mutual TLS")
        finally:
            assert agent.stop() == 0, agent.log()
        assert {m["device"] for m in collector.of_kind("telemetry")} == {"mtls-01"}
        # mtls-01's credentials with mtls-02's certificate: the broker sees mtls-02 and refuses
        # every mtls-01 topic, so no birth of this session ever arrives.
        stolen = tmp_path / "stolen.json"
        stolen.write_text(json.dumps(good | {"certfile": other["certfile"], "keyfile": other["keyfile"]}))
        births = len(collector.of_kind("birth"))
        agent = Agent(digits_host_openvino, stolen, tmp_path / "data-stolen", "--interval", "0.5")
        try:
            agent.ready()
            # The broker answers each of its messages (birth first, then windows) "not authorised".
            wait_for(lambda: agent.log().count("Not authorized") >= 3, 60, "three refused messages")
        finally:
            agent.stop()
        assert len(collector.of_kind("birth")) == births
        assert not [m for m in collector.snapshot() if "mtls-02" in m[0]]
        collector.close()
    finally:
        run_cli("broker", "down", "--dir", str(directory), check=False)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_aarch64_agent_publishes_under_qemu(broker, tmp_path, session_home):
    from edgesmith.toolchain.prove import QEMU, aarch64_bundle, qemu_prefix

    bundle = aarch64_bundle()
    exe = bundle / "bin" / "edgesmith-agent"
    assert exe.is_file(), f"{exe} is missing; build the bundle with `edgesmith tools install aarch64-runtime`"
    assert shutil.which(QEMU), f"{QEMU} is missing (bootstrap installs qemu-user-static)"
    out = tmp_path / "dist"
    result = json.loads(run_cli("build", "edgesmith.toolchain.models.digits:digits_cnn", "--input-shape", "1,1,8,8",
                                "-t", "rpi4-aarch64", "--backend", "tvm", "-o", str(out), "--json",
                                env={"EDGESMITH_HOME": str(session_home)}).stdout)
    (built,) = result["artifacts"]
    artifact = {"path": Path(built["path"]), "pub": session_home / "keys" / "default.pub"}
    credentials = broker.add_device("rpi-01")
    collector = Collector(broker)
    agent = Agent(artifact, credentials, tmp_path / "data", "--interval", "1", "--synthetic-load", "2",
                  command=[QEMU, "-cpu", "cortex-a72", "-L", str(qemu_prefix("cortex-a72")), str(exe)])
    try:
        agent.ready(timeout=300)
        (birth,) = wait_for(lambda: collector.of_kind("birth"), 300, "the aarch64 agent's birth")
        wait_for(lambda: [t for t in collector.of_kind("telemetry") if t["runs"] > 0], 300,
                 "telemetry with runs from the aarch64 agent")
    finally:
        code = agent.stop(timeout=120)
    assert code == 0, agent.log()
    wait_for(lambda: collector.of_kind("death"), 60, "the shutdown death")
    collector.close()
    assert birth["runtime"]["isa"] == "aarch64"
    assert birth["runtime"]["cpu"] == "Arm Cortex-A72"  # MIDR_EL1 as qemu's -cpu cortex-a72 answers it
    assert birth["artifact"]["target"] == "rpi4-aarch64"
    for _, message in collector.snapshot():
        assert not list(VALIDATOR.iter_errors(message)), message


def _tls_files(directory: Path) -> dict[str, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 (openssl CLI)."""
    directory.mkdir()
    ca_key, ca, key, csr, cert = (directory / n for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem"))
    ext = directory / "san.cnf"
    ext.write_text("subjectAltName = IP:127.0.0.1\n")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca), "-days", "2",
            "-subj", "/CN=edgesmith test CA")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial", "-out", str(cert),
            "-days", "2", "-extfile", str(ext))
    return {"ca": ca, "key": key, "cert": cert}


def test_agent_connects_with_tls_when_the_credentials_say_so(digits_host_openvino, tmp_path):
    import paho.mqtt.client as mqtt

    tls = _tls_files(tmp_path / "tls")
    directory = tmp_path / "tls-broker"
    info = json.loads(run_cli("broker", "up", "--dir", str(directory), "--certfile", str(tls["cert"]), "--keyfile",
                              str(tls["key"]), "--cafile", str(tls["ca"]), "--json").stdout)
    try:
        out = json.loads(run_cli("broker", "add-device", "tls-01", "--fleet", FLEET, "--dir", str(directory),
                                 "--json").stdout)
        assert out["tls"] is True and out["cafile"] == str(tls["ca"])
        received: list[dict] = []
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="tls-collector", protocol=mqtt.MQTTv5)
        client.username_pw_set(info["monitor"]["username"], info["monitor"]["password"])
        client.tls_set(ca_certs=str(tls["ca"]))
        client.on_connect = lambda c, u, flags, rc, props: c.subscribe("edgesmith/v1/#", qos=1)
        client.on_message = lambda c, u, msg: received.append(json.loads(msg.payload))
        client.connect("127.0.0.1", info["port"])
        client.loop_start()
        agent = Agent(digits_host_openvino, Path(out["credentials"]), tmp_path / "data", "--interval", "0.5")
        try:
            agent.ready()
            wait_for(lambda: any(m["kind"] == "telemetry" for m in received), 60, "telemetry over TLS")
        finally:
            assert agent.stop() == 0, agent.log()
        wait_for(lambda: any(m["kind"] == "death" for m in received), 30, "the death over TLS")
        client.loop_stop()
        client.disconnect()
        assert "connected to 127.0.0.1" in agent.log()
    finally:
        run_cli("broker", "down", "--dir", str(directory), check=False)
