"""The fleet monitor against a real Mosquitto (`edgesmith broker up`), driven by simulated devices
(toolchain/fleet/simulate.py: protocol-valid births, windows and deaths with each device's own
login). The monitor runs as the CLI would (`edgesmith fleet monitor`, a subprocess), so a crash
shows as a traceback in its log or a non-zero exit, which every test checks at teardown.

Fast tests at the end cover the pieces without services (sequence bookkeeping, drift formulas,
percentiles, the store's DDL on PostgreSQL).
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

from conftest import BOTH_STORES, EDGESMITH, run_cli
from edgesmith.toolchain.fleet import broker as fleet_broker
from edgesmith.toolchain.fleet import protocol
from edgesmith.toolchain.fleet.simulate import SimArtifact, SimulatedDevice, output_window

FLEET = "plant-a"
CHROMIUM = "/usr/bin/chromium"
ALLOWED_LABELS = {"fleet", "device", "model", "version", "target"}

# ---- helpers ---------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class MonitorProcess:
    """`edgesmith fleet monitor` as a subprocess, with its log in the test's directory."""

    def __init__(self, broker_dir: Path, db: str, log: Path, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [EDGESMITH, "fleet", "monitor", "--broker", str(broker_dir), "--db", db,
                     "--http", f"127.0.0.1:{self.port}", "--interval-s", "1", *extra]
        self.db = db
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> MonitorProcess:
        with open(self.log, "a") as out:
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT)
        wait_until(lambda: self._up(), 60, "the monitor's HTTP server")
        wait_until(lambda: self.api()["monitor"]["connected"], 30, "the monitor to connect to the broker")
        return self

    def _up(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"the monitor exited with {self.proc.returncode}:\n{self.log.read_text()}")
        try:
            return self.get("/healthz") == b"ok\n"
        except OSError:
            return False

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return response.read()

    def api(self) -> dict[str, Any]:
        return json.loads(self.get("/api/fleet"))

    def device(self, name: str) -> dict[str, Any] | None:
        return next((d for d in self.api()["devices"] if d["device"] == name), None)

    def counters(self) -> dict[str, int]:
        return self.api()["monitor"]["counters"]

    def wait_device(self, name: str, predicate: Callable[[dict[str, Any]], bool], what: str, timeout: float = 30.0) -> dict:
        last: list = [None]

        def check() -> dict | None:
            d = last[0] = self.device(name)
            return d if d is not None and predicate(d) else None
        try:
            return wait_until(check, timeout, f"{name}: {what}")
        except AssertionError as e:
            raise AssertionError(f"{e}; last seen: {json.dumps(last[0])}\nmonitor log:\n{self.log_text()[-3000:]}") from None

    def alerts(self, active: bool = True) -> set[tuple[str, str]]:
        return {(a["alert"], a["subject"]) for a in self.api()["alerts"] if a["active"] or not active}

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)
        return self.proc.returncode

    def log_text(self) -> str:
        return self.log.read_text()


@pytest.fixture
def broker_dir(tmp_path):
    directory = tmp_path / "broker"
    info = json.loads(run_cli("broker", "up", "--dir", str(directory), "--json").stdout)
    assert info["monitor"]["username"]
    yield directory
    run_cli("broker", "down", "--dir", str(directory))


def query(url: str, sql: str) -> list[tuple]:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql))]
    finally:
        engine.dispose()


@pytest.fixture
def start_monitor(broker_dir, tmp_path, store_url):
    """Start monitors (same store unless told); at teardown each must stop cleanly: exit 0, no traceback."""
    started: list[MonitorProcess] = []

    def start(*extra: str, log_name: str = "monitor.log") -> MonitorProcess:
        monitor = MonitorProcess(broker_dir, store_url, tmp_path / log_name, *extra).start()
        started.append(monitor)
        return monitor

    yield start
    for monitor in started:
        code = monitor.stop()
        text = monitor.log_text()
        assert "Traceback" not in text, text
        assert code in (0, -signal.SIGKILL), text


def devices(broker_dir: Path, *names: str, fleet: str = FLEET) -> list[dict[str, Any]]:
    return fleet_broker.add_devices(broker_dir, list(names), fleet)


def connected(credentials: dict[str, Any], **kwargs: Any) -> SimulatedDevice:
    device = SimulatedDevice(credentials, **kwargs)
    device.connect()
    return device


def monitor_client(broker_dir: Path, client_id: str) -> tuple[Any, list]:
    """A plain MQTT client with the monitor's login (to read alerts, write desired states)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    creds = fleet_broker.central_login(broker_dir, f"edgesmith-{client_id}")  # its own: the login is the client id
    settings = fleet_broker.Broker(broker_dir).settings()
    received: list = []
    ready = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=creds["username"], protocol=mqtt.MQTTv5)
    fleet_broker.configure_client(client, settings, creds)
    client.on_connect = lambda *_a: ready.set()
    client.on_message = lambda _c, _u, msg: received.append(msg)
    client.connect(settings.host, settings.port)
    client.loop_start()
    assert ready.wait(10), "the monitor login did not connect"
    return client, received


def layout(start_us: float = 100.0, factor: float = 2.0, count: int = 8) -> protocol.LatencyLayout:
    return protocol.LatencyLayout(start_us=start_us, factor=factor, count=count)


def classes(reference: list[float], name: str = "logits") -> protocol.OutputLayout:
    return protocol.OutputLayout(name=name, kind="classes", classes=len(reference), reference=reference)


# ---- ingest and aggregates -----------------------------------------------------------------------

@BOTH_STORES
@pytest.mark.integration
@pytest.mark.timeout(180)
def test_ingest_and_aggregates_exact(broker_dir, start_monitor):
    monitor = start_monitor()
    art = SimArtifact(latency=layout(), outputs=[classes([0.5, 0.5])], build_latency_us=None)
    ca, cb = devices(broker_dir, "cam-01", "cam-02")
    a = connected(ca, artifact=art, interval_s=60)
    b = connected(cb, artifact=art, interval_s=60)
    sent_a = []
    for errors in (1, 0, 2):  # 40 runs at 150 us (bucket 0: [100, 200)) and 10 at 500 us (bucket 2: [400, 800))
        sent_a.append(a.telemetry(runs=50, errors=errors, latency_us=[150.0] * 40 + [500.0] * 10,
                                  outputs={"logits": output_window([25, 25])}, window_s=10))
        assert a.send(sent_a[-1]).value == 0
    for _ in range(2):  # 20 runs at 3000 us (bucket 4: [1600, 3200))
        b.send(b.telemetry(runs=20, latency_us=[3000.0] * 20, outputs={"logits": output_window([10, 10])}, window_s=10))

    da = monitor.wait_device("cam-01", lambda d: d["recent"]["windows"] == 3, "3 windows")
    db = monitor.wait_device("cam-02", lambda d: d["recent"]["windows"] == 2, "2 windows")
    assert (da["runs_total"], da["errors_total"], da["messages"], da["duplicates"], da["gaps"]) == (150, 3, 4, 0, 0)
    assert (db["runs_total"], db["errors_total"], db["messages"]) == (40, 0, 3)
    assert da["online"] and db["online"] and da["bd_seq"] == 1
    assert (da["artifact"], da["version"], da["target"]) == (art.name, art.model_version, art.target)

    # cam-01 merged: 120 runs in bucket 0, 30 in bucket 2, max 500 us. Quantile q of n runs is at
    # rank q*n, interpolated log-linearly inside its bucket, capped at the maximum seen.
    ra = da["recent"]
    assert ra["p50_us"] == pytest.approx(100 * 2 ** (75 / 120))  # rank 75 of 120 in bucket 0
    assert ra["p95_us"] == pytest.approx(500.0)  # 400 * 2 ** 0.75 = 673 > max
    assert ra["p99_us"] == pytest.approx(500.0)
    assert ra["error_rate"] == pytest.approx(3 / 153)
    assert ra["throughput_rps"] == pytest.approx(150 / 30)
    assert db["recent"]["p50_us"] == pytest.approx(1600 * 2 ** 0.5)  # rank 20 of 40 in bucket 4

    # The group (model version × target): 120 + 30 + 40 runs, max 3000 us.
    (group,) = monitor.api()["groups"]
    assert (group["model"], group["version"], group["target"], group["devices"], group["online"]) == (
        art.model, art.model_version, art.target, 2, 2)
    rg = group["recent"]
    assert (rg["runs"], rg["errors"], rg["windows"]) == (190, 3, 5)
    assert rg["p50_us"] == pytest.approx(100 * 2 ** (95 / 120))
    assert rg["p95_us"] == pytest.approx(1600 * 2 ** ((0.95 * 190 - 150) / 40))
    assert rg["p99_us"] == pytest.approx(3000.0)
    assert rg["throughput_rps"] == pytest.approx(150 / 30 + 40 / 20)
    assert monitor.api()["version_mix"] == {FLEET: {f"{art.model} × {art.target}": {art.model_version: 2}}}

    # Stored: every window once, in the store `fleet status` reads.
    assert query(monitor.db, "select device, count(*), sum(runs) from windows group by device order by device") == [
        ("cam-01", 3, 150), ("cam-02", 2, 40)]
    status = json.loads(run_cli("fleet", "status", "--db", monitor.db, "--json").stdout)
    by_name = {s["device"]: s for s in status}
    assert set(by_name) == {"cam-01", "cam-02"}
    assert {k: by_name["cam-01"][k] for k in ("device", "fleet", "online", "artifact")} == {
        "device": "cam-01", "fleet": FLEET, "online": True, "artifact": art.name}
    last = sent_a[-1].latency
    assert by_name["cam-01"]["latency"] == {"p50_us": last.p50_us, "p95_us": last.p95_us, "p99_us": last.p99_us,
                                             "window_end_ms": sent_a[-1].window_end_ms}
    table = run_cli("fleet", "status", "--db", monitor.db).stdout
    assert "cam-01" in table and "cam-02" in table and "online" in table


@BOTH_STORES
@pytest.mark.integration
@pytest.mark.timeout(180)
def test_duplicates_dropped_and_gaps_counted(broker_dir, start_monitor):
    monitor = start_monitor()
    (creds,) = devices(broker_dir, "cam-01")
    d = connected(creds, interval_s=60)  # birth: seq 1
    w2, w3, w4, w5 = (d.telemetry(runs=10) for _ in range(4))
    assert [w.seq for w in (w2, w3, w4, w5)] == [2, 3, 4, 5]
    for w in (w2, w3, w3, w5, w2):  # QoS 1 may deliver twice; 4 is late
        d.send(w)
    got = monitor.wait_device("cam-01", lambda x: x["messages"] == 4 and x["duplicates"] == 2, "4 stored, 2 duplicates")
    assert (got["gaps"], got["runs_total"]) == (1, 30)
    d.send(w4)  # the late one fills the gap
    got = monitor.wait_device("cam-01", lambda x: x["messages"] == 5, "the late window stored")
    assert (got["gaps"], got["duplicates"], got["runs_total"]) == (0, 2, 40)
    # A death repeats its birth's seq: it is not a duplicate of the birth, but twice is one death.
    death = d.death("shutdown")
    d.send(death)
    d.send(death)
    got = monitor.wait_device("cam-01", lambda x: not x["online"] and x["duplicates"] == 3, "offline, duplicate death")
    assert (got["messages"], got["gaps"], got["death_reason"]) == (6, 0, "shutdown")
    assert monitor.counters()["duplicates"] == 3


@BOTH_STORES
@pytest.mark.integration
@pytest.mark.timeout(180)
def test_bad_payloads_counted_and_dropped(broker_dir, start_monitor):
    monitor = start_monitor()
    c1, c2 = devices(broker_dir, "cam-01", "cam-02")
    d = connected(c1, interval_s=60)
    other = SimulatedDevice(c2)
    good = d.telemetry(runs=5)
    bad = [
        ("telemetry", b"{not json", "malformed"),
        ("telemetry", b"\xff\xfe\x00", "malformed"),
        ("telemetry", b"[" + b"1," * (protocol.MAX_PAYLOAD_BYTES // 2) + b"1]", "oversized"),
        ("telemetry", good.model_dump_json().replace('"v":1', '"v":2').encode(), "invalid"),  # unknown schema version
        ("telemetry", b'{"v": 1, "kind": "telemetry"}', "invalid"),
        ("telemetry", b"[1, 2]", "invalid"),
        ("telemetry", good.model_dump_json().replace('"runs":5', '"runs":-5').encode(), "invalid"),
        ("birth", other.birth().model_dump_json().encode(), "topic_mismatch"),  # speaks for cam-02
        ("event", good.model_dump_json().encode(), "topic_mismatch"),  # a window on the event topic
    ]
    for kind, payload, _ in bad:
        assert d.send((d.topic(kind), payload)).value in (0, 16)  # the broker takes them; the monitor judges
    d.send(good)
    got = monitor.wait_device("cam-01", lambda x: x["runs_total"] == 5, "the good window after the bad ones")
    assert (got["messages"], got["duplicates"], got["gaps"]) == (2, 0, 0)
    counters = monitor.counters()
    expected = {"malformed": 2, "oversized": 1, "invalid": 4, "topic_mismatch": 2, "unknown_topic": 0, "unstorable": 0}
    assert {r: counters[f"dropped.{r}"] for r in expected} == expected
    assert monitor.device("cam-02") is None
    assert monitor.proc.poll() is None


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_broker_refuses_foreign_topics(broker_dir, start_monitor):
    monitor = start_monitor()
    ca, cb = devices(broker_dir, "cam-01", "cam-02")
    a = connected(ca, interval_s=60)
    b_identity = SimulatedDevice(cb)
    # cam-01 publishing as cam-02: the broker answers the v5 PUBACK with "not authorised".
    forged = b_identity.birth().model_dump_json().encode()
    assert a.send((protocol.topic(FLEET, "cam-02", "birth"), forged)).value == 135
    assert a.send((protocol.topic(FLEET, "cam-02", "telemetry"), b_identity.telemetry(runs=1).model_dump_json().encode())).value == 135
    a.send(a.telemetry(runs=7))  # then something of its own, to know the monitor has seen everything before it
    monitor.wait_device("cam-01", lambda x: x["runs_total"] == 7, "cam-01's own window")
    assert monitor.device("cam-02") is None
    assert sum(v for k, v in monitor.counters().items() if k.startswith("dropped.")) == 0

    # cam-01 reading cam-02's desired state: Mosquitto 2.0 grants the SUBACK but never delivers.
    b = connected(cb, interval_s=60)
    a.subscribe(protocol.topic(FLEET, "cam-02", "desired"))
    a.subscribe(f"{protocol.TOPIC_ROOT}/{FLEET}/+/telemetry")
    assert b.subscribe(protocol.topic(FLEET, "cam-02", "desired"))[0].value == 1
    central, _ = monitor_client(broker_dir, "test-central")
    central.publish(protocol.topic(FLEET, "cam-02", "desired"), b'{"artifact": "x"}', qos=1, retain=True).wait_for_publish(10)
    wait_until(lambda: b.received(), 10, "cam-02 to receive its desired state")
    b.send(b.telemetry(runs=1))
    monitor.wait_device("cam-02", lambda x: x["runs_total"] == 1, "cam-02's window")
    time.sleep(0.5)
    assert a.received() == []  # neither cam-02's desired state nor its telemetry
    central.loop_stop()
    central.disconnect()


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_a_device_taking_the_monitors_client_id_does_not_stop_it(broker_dir, start_monitor):
    """Before: a device login connecting with client id `edgesmith-monitor` and clean start closed the
    monitor's connection and discarded its session; the two then knocked each other off for good.
    Now the broker makes the login the client id: the monitor stays connected and keeps storing."""
    monitor = start_monitor()
    ca, cb = devices(broker_dir, "cam-01", "cam-02")
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    healthy = connected(cb, interval_s=60)
    for _ in range(3):  # cam-01's login, the monitor's client id
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="edgesmith-monitor", protocol=mqtt.MQTTv5)
        client.username_pw_set(ca["username"], ca["password"])
        ready = threading.Event()
        client.on_connect = lambda _c, _u, _f, rc, _p, ready=ready: ready.set()
        client.connect(ca["host"], ca["port"], clean_start=True)
        client.loop_start()
        assert ready.wait(10)
        client.disconnect()
        client.loop_stop()
    healthy.send(healthy.telemetry(runs=9))
    monitor.wait_device("cam-02", lambda x: x["runs_total"] == 9, "the healthy device's window")
    api = monitor.api()
    assert api["monitor"]["connected"], api["monitor"]
    assert "took over its session" not in monitor.log_text()
    assert monitor.proc.poll() is None


# ---- restarts and presence -------------------------------------------------------------------------

def _window_rows(db: str) -> int:
    return query(db, "select count(*) from windows")[0][0]


@BOTH_STORES
@pytest.mark.integration
@pytest.mark.timeout(240)
def test_monitor_restart_resumes_without_double_counting(broker_dir, start_monitor):
    monitor = start_monitor()
    (creds,) = devices(broker_dir, "cam-01")
    d = connected(creds, interval_s=60)
    windows = [d.telemetry(runs=10) for _ in range(3)]
    for w in windows:
        d.send(w)
    monitor.wait_device("cam-01", lambda x: x["runs_total"] == 30, "3 windows")
    assert monitor.stop() == 0

    # While the monitor is away: 3 new windows and one old one again; the broker queues them in
    # the monitor's persistent session.
    for _ in range(3):
        d.send(d.telemetry(runs=10))
    d.send(windows[-1])
    monitor = start_monitor()
    got = monitor.wait_device("cam-01", lambda x: x["runs_total"] == 60 and x["duplicates"] == 1, "the queued windows")
    assert (got["messages"], got["gaps"]) == (7, 0)
    assert "(resumed session)" in monitor.log_text()

    # Killed mid-stream (no clean stop, acknowledgements maybe not sent): whatever the broker
    # delivers again is recognised from the store.
    for _ in range(3):
        d.send(d.telemetry(runs=10))
    monitor.stop(signal.SIGKILL)
    for _ in range(3):
        d.send(d.telemetry(runs=10))
    monitor = start_monitor()
    got = monitor.wait_device("cam-01", lambda x: x["runs_total"] == 120, "all 12 windows")
    time.sleep(1.5)  # anything delivered twice would be counted by now
    got = monitor.device("cam-01")
    assert (got["runs_total"], got["messages"], got["gaps"]) == (120, 13, 0)
    assert _window_rows(monitor.db) == 12


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_stale_death_does_not_mark_offline(broker_dir, start_monitor):
    monitor = start_monitor()
    (creds,) = devices(broker_dir, "cam-01")
    d = connected(creds, interval_s=60)  # session (bdSeq) 1
    first_birth_seq = d.birth_seq
    d.client.disconnect()  # a normal disconnect: the will is discarded
    d.client.loop_stop()
    d.new_session()
    d.connect()  # bdSeq 2
    monitor.wait_device("cam-01", lambda x: x["bd_seq"] == 2 and x["online"], "session 2 online")
    d.send(d.death("connection-lost", bd_seq=1, seq=first_birth_seq))  # session 1's will, arriving late
    d.send(d.telemetry(runs=3))
    got = monitor.wait_device("cam-01", lambda x: x["runs_total"] == 3, "the window after the stale death")
    assert got["online"] and got["session_open"] and got["bd_seq"] == 2
    d.send(d.death("connection-lost"))  # session 2's own death
    got = monitor.wait_device("cam-01", lambda x: not x["session_open"], "offline")
    assert (got["online"], got["death_reason"]) == (False, "connection-lost")
    d.bd_seq = 3
    d.send(d.birth(historical=True))  # replayed from a spool: stored, but presence is unchanged
    got = monitor.wait_device("cam-01", lambda x: x["messages"] == 6, "the historical birth")  # 3 births, 2 deaths, 1 window
    assert not got["online"] and got["bd_seq"] == 2


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_monitor_started_after_the_devices_learns_them_from_retained_births(broker_dir, start_monitor):
    ca, cb = devices(broker_dir, "cam-01", "cam-02")
    a = connected(ca, interval_s=60)  # birth (seq 1), retained
    a.send(a.telemetry(runs=5))  # seq 2, 3: before any monitor subscribed, so never queued for one
    a.send(a.telemetry(runs=5))
    b = connected(cb, interval_s=60)
    b.shutdown()  # its retained death says the session ended
    monitor = start_monitor()
    got = monitor.wait_device("cam-01", lambda x: x["artifact"] is not None, "cam-01 from its retained birth")
    assert got["online"] and got["duplicates"] == 0
    gone = monitor.wait_device("cam-02", lambda x: x["death_reason"] == "shutdown", "cam-02's retained death")
    assert not gone["online"] and gone["artifact"] == b.artifact.name
    a.send(a.telemetry(runs=7))
    got = monitor.wait_device("cam-01", lambda x: x["runs_total"] == 7, "a window after the monitor started")
    # The retained birth is state, not stream: counting starts with this window, so the two sent
    # before any monitor subscribed are not gaps (nobody was owed them).
    assert (got["gaps"], got["messages"]) == (0, 2)
    # Restarted: a retained birth seen again is not news, nothing is counted twice.
    monitor.stop()
    monitor = start_monitor()
    a.send(a.telemetry(runs=1))
    got = monitor.wait_device("cam-01", lambda x: x["runs_total"] == 8, "the next window")
    assert (got["duplicates"], got["messages"], got["gaps"]) == (0, 3, 0)


class _Webhook(BaseHTTPRequestHandler):
    posts: list = []

    def do_POST(self) -> None:  # noqa: N802
        self.posts.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *_args: Any) -> None:
        pass


@BOTH_STORES
@pytest.mark.integration
@pytest.mark.timeout(180)
def test_silence_marks_offline_and_alerts_once(broker_dir, start_monitor):
    _Webhook.posts = []
    hook = HTTPServer(("127.0.0.1", 0), _Webhook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    monitor = start_monitor("--webhook", f"http://127.0.0.1:{hook.server_address[1]}/alerts")
    listener, alerts = monitor_client(broker_dir, "test-alerts")
    listener.subscribe(protocol.alert_topic(FLEET), qos=1)
    (creds,) = devices(broker_dir, "cam-01")
    d = connected(creds, interval_s=0.5)  # silent after 1.5 s without a message
    d.send(d.telemetry(runs=5))
    got = monitor.wait_device("cam-01", lambda x: x["silent"], "silence")
    assert not got["online"] and got["session_open"]  # still connected, but nothing said: offline
    wait_until(lambda: ("silent", "cam-01") in monitor.alerts(), 10, "the silent alert")  # evaluated after the view
    time.sleep(3)  # several evaluations while it stays silent: still one alert
    events = [json.loads(m.payload) for m in alerts]
    assert [(e["alert"], e["state"], e["subject"]) for e in events] == [("silent", "firing", "cam-01")]
    d.send(d.telemetry(runs=5))
    monitor.wait_device("cam-01", lambda x: x["online"], "back online")
    wait_until(lambda: len(alerts) == 2, 10, "the resolved alert")
    assert json.loads(alerts[1].payload)["state"] == "resolved"
    wait_until(lambda: len(_Webhook.posts) == 2, 10, "two webhook posts")
    assert [(p["alert"], p["state"]) for p in _Webhook.posts] == [("silent", "firing"), ("silent", "resolved")]
    # Not active while it talks (it falls silent again 1.5 s after its last message, so keep it
    # talking: on a loaded machine the checks above can take that long).
    d.send(d.telemetry(runs=5))
    wait_until(lambda: ("silent", "cam-01") not in monitor.alerts(), 10, "the silent alert inactive")
    hook.shutdown()
    listener.loop_stop()
    listener.disconnect()


# ---- drift, error rate, latency ------------------------------------------------------------------

def _psi(p: list[float], q: list[float]) -> float:
    return sum((a - b) * math.log(a / b) for a, b in zip(p, q))


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_drift_alert_on_shifted_outputs_only(broker_dir, start_monitor):
    monitor = start_monitor()
    reference = [0.4, 0.3, 0.2, 0.1]
    histogram = protocol.OutputLayout(name="score", kind="histogram", edges=[0.0, 1.0, 2.0],
                                      reference=[0.5, 0.5, 0.0, 0.0])  # 2 bins, then under, then over
    art = SimArtifact(outputs=[classes(reference), histogram])
    c_steady, c_shifted, c_over = devices(broker_dir, "steady", "shifted", "overflowing")
    steady = connected(c_steady, artifact=art, interval_s=60)
    shifted = connected(c_shifted, artifact=art, interval_s=60)
    over = connected(c_over, artifact=art, interval_s=60)
    for _ in range(3):
        steady.send(steady.telemetry(runs=1000, outputs={"logits": output_window([400, 300, 200, 100]),
                                                         "score": output_window([500, 500])}))
        shifted.send(shifted.telemetry(runs=1000, outputs={"logits": output_window([100, 200, 300, 400]),
                                                           "score": output_window([500, 500])}))
        over.send(over.telemetry(runs=1000, outputs={"logits": output_window([400, 300, 200, 100]),
                                                     "score": output_window([500, 0], overflow=500)}))
    wait_until(lambda: monitor.alerts() >= {("drift", "shifted/logits"), ("drift", "overflowing/score")}, 30,
               "drift alerts")
    time.sleep(1.5)
    assert monitor.alerts() == {("drift", "shifted/logits"), ("drift", "overflowing/score")}
    s = monitor.device("shifted")["drift"]["logits"]
    assert s["samples"] == 3000
    assert s["psi"] == pytest.approx(_psi([0.1, 0.2, 0.3, 0.4], reference), rel=1e-3)
    assert 0.1 < s["js"] < 1
    quiet = monitor.device("steady")["drift"]
    assert quiet["logits"]["psi"] == pytest.approx(0.0, abs=1e-9) and quiet["score"]["psi"] == pytest.approx(0.0, abs=1e-9)
    (group,) = monitor.api()["groups"]
    assert group["drift"]["logits"]["samples"] == 9000


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_error_rate_and_latency_alerts(broker_dir, start_monitor):
    monitor = start_monitor()
    art = SimArtifact(build_latency_us=1000.0)
    c_ok, c_flaky, c_slow = devices(broker_dir, "healthy", "flaky", "slow")
    healthy = connected(c_ok, artifact=art, interval_s=60)
    flaky = connected(c_flaky, artifact=art, interval_s=60)
    slow = connected(c_slow, artifact=art, interval_s=60)
    for _ in range(2):
        healthy.send(healthy.telemetry(runs=99, errors=1, latency_us=[1100.0] * 99))
        flaky.send(flaky.telemetry(runs=80, errors=20, latency_us=[1100.0] * 80))
        slow.send(slow.telemetry(runs=100, latency_us=[3000.0] * 100))
    wait_until(lambda: monitor.alerts() >= {("error_rate", "flaky"), ("latency", "slow")}, 30, "both alerts")
    time.sleep(1.5)
    assert monitor.alerts() == {("error_rate", "flaky"), ("latency", "slow")}
    alerts = {a["alert"]: a for a in monitor.api()["alerts"]}
    assert alerts["error_rate"]["value"] == pytest.approx(0.2)
    assert alerts["latency"]["value"] == pytest.approx(monitor.device("slow")["recent"]["p50_us"] / 1000.0)
    assert alerts["latency"]["fired"] == 1


# ---- HTTP: /metrics, /api/fleet, the dashboard ----------------------------------------------------

@pytest.mark.integration
@pytest.mark.timeout(180)
def test_metrics_and_api(broker_dir, start_monitor):
    from prometheus_client.parser import text_string_to_metric_families

    monitor = start_monitor()
    art = SimArtifact()
    (creds,) = devices(broker_dir, "cam-01")
    d = connected(creds, artifact=art, interval_s=60)
    for _ in range(2):
        d.send(d.telemetry(runs=50, errors=5))
    monitor.wait_device("cam-01", lambda x: x["runs_total"] == 100, "2 windows")
    d.send((d.topic("telemetry"), b"junk"))
    wait_until(lambda: monitor.counters()["dropped.malformed"] == 1, 10, "the malformed message counted")

    families = {f.name: f for f in text_string_to_metric_families(monitor.get("/metrics").decode())}
    for family in families.values():
        assert family.name.startswith("edgesmith_"), family.name
        for sample in family.samples:
            assert set(sample.labels) <= ALLOWED_LABELS, (sample.name, sample.labels)
            if family.type == "counter":
                assert sample.name.endswith(("_total", "_created")), sample.name
    expected = {"edgesmith_monitor_messages", "edgesmith_monitor_duplicate_messages", "edgesmith_monitor_malformed_messages",
                "edgesmith_monitor_oversized_messages", "edgesmith_monitor_invalid_messages",
                "edgesmith_monitor_alerts_firing", "edgesmith_device_online", "edgesmith_device_runs",
                "edgesmith_device_errors", "edgesmith_device_last_seen_timestamp_seconds",
                "edgesmith_device_latency_p50_seconds", "edgesmith_device_latency_p95_seconds",
                "edgesmith_device_latency_p99_seconds", "edgesmith_device_error_ratio", "edgesmith_device_runs_per_second",
                "edgesmith_device_drift_psi", "edgesmith_device_drift_js", "edgesmith_device_missing_messages",
                "edgesmith_model_devices", "edgesmith_model_latency_p95_seconds", "edgesmith_model_drift_psi",
                "edgesmith_monitor_process_resident_memory_bytes"}
    assert expected <= set(families), expected - set(families)

    def value(name: str, **labels: str) -> float:
        (sample,) = [s for s in families[name].samples if all(s.labels.get(k) == v for k, v in labels.items())
                     and not s.name.endswith("_created")]
        return sample.value

    labels = {"fleet": FLEET, "device": "cam-01", "model": art.model, "version": art.model_version, "target": art.target}
    assert value("edgesmith_device_runs", **labels) == 100
    assert value("edgesmith_device_errors", **labels) == 10
    assert value("edgesmith_device_online", **labels) == 1
    assert value("edgesmith_device_error_ratio", **labels) == pytest.approx(10 / 110)
    assert value("edgesmith_monitor_malformed_messages") == 1
    assert value("edgesmith_model_devices", fleet=FLEET, model=art.model) == 1
    device = monitor.device("cam-01")
    assert value("edgesmith_device_latency_p95_seconds", **labels) == pytest.approx(device["recent"]["p95_us"] / 1e6)

    api = monitor.api()
    assert set(api) >= {"generated_ms", "devices", "groups", "version_mix", "alerts", "monitor"}
    assert {"device", "fleet", "online", "artifact", "version", "target", "last_seen_ms", "last_window", "recent",
            "drift", "runs_total", "errors_total", "gaps", "duplicates"} <= set(device)
    assert api["monitor"]["counters"]["stored"] == 3


class _FleetTable(HTMLParser):
    """The devices in the dashboard's fleet table (rows of <table id=fleet> with data-device)."""

    def __init__(self) -> None:
        super().__init__()
        self.in_table = False
        self.devices: list[str] = []
        self.charts = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "table":
            self.in_table = a.get("id") == "fleet"
        elif tag == "tr" and self.in_table and "data-device" in a:
            self.devices.append(a["data-device"])
        elif tag == "svg" and "chart" in (a.get("class") or ""):
            self.charts += 1


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_dashboard_in_headless_chromium(broker_dir, start_monitor, tmp_path):
    assert os.access(CHROMIUM, os.X_OK), "Debian's chromium is part of the fleet's system packages (make bootstrap)"
    monitor = start_monitor()
    names = ["cam-01", "cam-02", "gate-7"]
    sims = [connected(c, interval_s=60, seed=i) for i, c in enumerate(devices(broker_dir, *names))]
    for _ in range(3):
        for sim in sims:
            sim.send(sim.telemetry(runs=200))
        time.sleep(1.1)  # a chart point per monitor interval
    wait_until(lambda: all((monitor.device(n) or {}).get("runs_total") == 600 for n in names), 30, "all windows")
    time.sleep(1.1)
    profile = tmp_path / "chromium-profile"
    common = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
              "--window-size=1400,1000"]
    dom = subprocess.run([*common, "--dump-dom", monitor.url + "/"], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    table = _FleetTable()
    table.feed(dom.stdout)
    assert table.devices == names
    assert table.charts == 2  # latency and drift for the one model version × target
    screenshot = tmp_path / "dashboard.png"
    shot = subprocess.run([*common, f"--screenshot={screenshot}", monitor.url + "/"], capture_output=True, text=True,
                          timeout=120)
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 10_000
    print(f"dashboard screenshot: {screenshot}")


# ---- shared subscription ---------------------------------------------------------------------------

@BOTH_STORES
@pytest.mark.integration
@pytest.mark.timeout(240)
def test_two_monitors_share_the_stream_and_the_store(broker_dir, start_monitor, tmp_path):
    first = start_monitor("--shared", "g", "--client-id", "edgesmith-mon-1", log_name="monitor-1.log")
    second = start_monitor("--shared", "g", "--client-id", "edgesmith-mon-2", log_name="monitor-2.log")
    sims = [connected(c, interval_s=60, seed=i) for i, c in enumerate(devices(broker_dir, "cam-01", "cam-02"))]
    for _ in range(25):
        for sim in sims:
            sim.send(sim.telemetry(runs=4))
    for monitor in (first, second):
        for name in ("cam-01", "cam-02"):
            got = monitor.wait_device(name, lambda x: x["runs_total"] == 100, "all windows, in both views")
            assert (got["messages"], got["duplicates"], got["gaps"]) == (26, 0, 0)
    assert _window_rows(first.db) == 50
    # Both took part (the broker delivers a shared subscription round-robin).
    stored = [m.api()["monitor"]["stored_here"] for m in (first, second)]
    assert sum(stored) == 52 and min(stored) > 0, stored


@BOTH_STORES
@pytest.mark.integration
@pytest.mark.timeout(240)
def test_an_ingest_only_worker_takes_a_share_the_full_monitor_shows(broker_dir, start_monitor, store_url, tmp_path):
    full = start_monitor("--shared", "g", "--client-id", "edgesmith-mon-full", log_name="monitor-full.log")
    log = tmp_path / "worker.log"
    with open(log, "w") as out:
        worker = subprocess.Popen([EDGESMITH, "fleet", "monitor", "--broker", str(broker_dir), "--db", store_url,
                                   "--http", "127.0.0.1:1", "--shared", "g", "--client-id", "edgesmith-mon-worker",
                                   "--ingest-only"], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "subscribed" in log.read_text() or worker.poll() is not None, 60, "the worker to subscribe")
        assert worker.poll() is None, log.read_text()
        sims = [connected(c, interval_s=60, seed=i) for i, c in enumerate(devices(broker_dir, "cam-01", "cam-02"))]
        for _ in range(25):
            for sim in sims:
                sim.send(sim.telemetry(runs=4))
        for name in ("cam-01", "cam-02"):  # the full monitor's view has the worker's windows too (the last 300 s: 6)
            got = full.wait_device(name, lambda x: x["runs_total"] == 100 and x["recent"]["runs"] == 24,
                                   "every window in the full monitor's view")
            assert (got["messages"], got["duplicates"], got["gaps"]) == (26, 0, 0)
        api = full.api()
        assert api["monitor"]["counters"]["stored"] == 52
        assert 0 < api["monitor"]["stored_here"] < 52  # the worker stored the rest
        assert _window_rows(full.db) == 50
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0, log.read_text()
    text = log.read_text()
    assert "Traceback" not in text and "ingest only" in text, text


# ---- errors a user sees ----------------------------------------------------------------------------

@pytest.mark.integration
@pytest.mark.timeout(60)
def test_cli_errors_are_one_sentence(tmp_path, broker_dir):
    missing = run_cli("fleet", "status", "--db", f"sqlite:///{tmp_path / 'none.db'}", check=False)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert "no monitor store" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
    bad_http = run_cli("fleet", "monitor", "--broker", str(broker_dir), "--db", f"sqlite:///{tmp_path / 'm.db'}",
                       "--http", "nonsense", check=False)
    assert bad_http.returncode == 1 and "HOST:PORT" in bad_http.stderr and "Traceback" not in bad_http.stderr
    no_broker = run_cli("fleet", "monitor", "--broker", str(tmp_path / "nowhere"), "--db",
                        f"sqlite:///{tmp_path / 'm.db'}", "--http", "127.0.0.1:0", check=False)
    assert no_broker.returncode == 1 and "broker up" in no_broker.stderr and "Traceback" not in no_broker.stderr


# ---- fast: no services -----------------------------------------------------------------------------

def test_sequence_tracker_duplicates_and_gaps():
    from edgesmith.toolchain.fleet.sequence import SeqTracker

    t = SeqTracker()
    assert [t.accept(s) for s in (5, 6, 6, 9, 7, 5, 12)] == [True, True, False, True, True, False, True]
    assert t.gaps == 3  # 8, 10, 11
    assert t.accept(3) and t.gaps == 4  # older than anything seen: 4 is missing too
    again = SeqTracker.from_json(t.to_json())
    assert [again.accept(s) for s in (8, 8, 4, 10, 11, 12)] == [True, False, True, True, True, False]
    assert again.gaps == 0 and again.holes == []


def test_sequence_tracker_bounds_its_holes():
    from edgesmith.toolchain.fleet import sequence

    t = sequence.SeqTracker()
    for s in range(0, 2 * (sequence.MAX_HOLES + 10), 2):  # every other message lost
        t.accept(s)
    assert len(t.holes) == sequence.MAX_HOLES and t.gaps == sequence.MAX_HOLES + 9


def test_drift_measures():
    from edgesmith.toolchain.fleet import drift

    assert drift.measure([10, 10], [0.5, 0.5], min_samples=1).psi == pytest.approx(0.0)
    assert drift.measure([10, 10], [0.5, 0.5], min_samples=100) is None  # too few to say
    assert drift.measure([10, 10, 0], [0.5, 0.5], min_samples=1) is None  # another layout
    assert drift.measure([10, 10], None, min_samples=1) is None
    d = drift.measure([900, 100], [0.5, 0.5], min_samples=1)
    assert d.psi == pytest.approx((0.9 - 0.5) * math.log(0.9 / 0.5) + (0.1 - 0.5) * math.log(0.1 / 0.5), rel=1e-3)
    p, q = [0.9, 0.1], [0.5, 0.5]
    m = [(a + b) / 2 for a, b in zip(p, q)]  # [0.7, 0.3]
    js = 0.5 * sum(a * math.log2(a / c) for a, c in zip(p, m)) + 0.5 * sum(b * math.log2(b / c) for b, c in zip(q, m))
    assert d.js == pytest.approx(js, rel=1e-3)
    assert drift.measure([1000, 0], [0.0, 1.0], min_samples=1).js == pytest.approx(1.0, abs=1e-2)  # disjoint: 1 bit


def test_latency_histogram_matches_device_percentiles():
    from edgesmith.toolchain.fleet.latency import LatencyHistogram

    h = LatencyHistogram.of_samples([150.0] * 40 + [500.0] * 10 + [50.0] * 2 + [1e9], layout())
    assert (h.counts[0], h.counts[2], h.underflow, h.overflow, h.total) == (40, 10, 2, 1, 53)
    assert h.percentile_us(0.01) == 100.0  # inside the underflow: the layout's start
    assert h.percentile_us(0.5) == pytest.approx(100 * 2 ** ((0.5 * 53 - 2) / 40))
    assert h.percentile_us(1.0) == 1e9  # the overflow: the maximum seen
    assert LatencyHistogram(layout()).percentile_us(0.5) is None


def test_store_schema_compiles_for_postgresql():
    from sqlalchemy.dialects import postgresql
    from sqlalchemy.schema import CreateIndex, CreateTable

    from edgesmith.toolchain.fleet import store

    dialect = postgresql.dialect()
    ddl = "\n".join(str(CreateTable(t).compile(dialect=dialect)) for t in store.metadata.sorted_tables)
    ddl += "\n".join(str(CreateIndex(i).compile(dialect=dialect)) for t in store.metadata.sorted_tables for i in t.indexes)
    assert "BIGSERIAL" in ddl and "AUTOINCREMENT" not in ddl.upper().replace("BIGSERIAL", "")
    assert "INTEGER NOT NULL" not in ddl.split("CREATE TABLE windows")[1].split(")")[0]  # ids are 64-bit there


def test_the_suites_postgresql_is_15_unprivileged_and_socket_only(postgres_server):
    """What BOTH_STORES runs on: PostgreSQL 15, its cluster owned by an unprivileged user, no TCP."""
    from sqlalchemy import create_engine, text

    server = postgres_server
    engine = create_engine(server.url())
    try:
        with engine.connect() as conn:
            version = conn.scalar(text("SHOW server_version_num"))
            listen = conn.scalar(text("SHOW listen_addresses"))
    finally:
        engine.dispose()
    assert version.startswith("15") and listen == ""
    assert (server.dir / "data").stat().st_uid != 0 and (server.dir / "data" / "postmaster.pid").is_file()


def test_percentiles_match_the_device_runtime_rule():
    """The monitor's (vectorised) estimate against a line-by-line transcription of
    stats_percentile_us in csrc/runtime/stats.cc, on random sparse histograms."""
    import numpy as np

    from edgesmith.toolchain.fleet.latency import percentiles_us

    def stats_percentile_us(counts, underflow, overflow, lay, max_us, q):
        total = underflow + overflow + sum(counts)
        rank = min(max(q, 0.0), 1.0) * total
        seen = float(underflow)
        if rank <= seen and underflow > 0:
            return lay.start_us
        for k, count in enumerate(counts):
            if count > 0 and rank <= seen + count:
                estimate = lay.start_us * lay.factor ** (k + (rank - seen) / count)
                return min(estimate, max_us) if max_us > 0.0 else estimate
            seen += count
        return max_us

    rng = np.random.default_rng(7)
    lay = protocol.LatencyLayout(start_us=1.0, factor=2 ** 0.25, count=96)
    for _ in range(500):
        counts = (rng.integers(0, 5, 96) * (rng.random(96) < 0.2)).tolist()
        underflow, overflow = int(rng.integers(0, 3)), int(rng.integers(0, 3))
        if sum(counts) + underflow + overflow == 0:
            continue
        max_us = float(rng.choice([0.0, 1e3, 1e9]))
        qs = (0.0001, 0.5, 0.95, 0.99, 1.0)
        got = percentiles_us(np.array(counts + [underflow, overflow]), lay, max_us, qs)
        assert got == pytest.approx([stats_percentile_us(counts, underflow, overflow, lay, max_us, q) for q in qs])


# ---- the load benchmark runs (its figures are the bench's business, not a test's) ----------------

@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_load_bench_small_run_loses_nothing():
    bench = Path(__file__).resolve().parent.parent / "bench" / "telemetry_load.py"
    out = subprocess.run([sys.executable, str(bench), "--devices", "200", "--processes", "2", "--duration-s", "6",
                          "--burst-interval-s", "1", "--burst-duration-s", "3"],
                         capture_output=True, text=True, timeout=580)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = {r["run"]: r for r in (json.loads(line) for line in out.stdout.splitlines() if line.startswith("{"))}
    assert set(runs) == {"steady", "ceiling-1", "ceiling-2", "ceiling-2-ingest"}, out.stdout
    for run in runs.values():
        assert run["published"] > 0 and run["stored"] == run["published"], run
        assert run["lost"] == 0 and run["duplicated"] == 0, run
    assert runs["steady"]["births_stored_s"] is not None
    assert "steady:" in out.stdout and "ceiling (a backlog of" in out.stdout
