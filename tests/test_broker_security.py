"""Broker identities, limits and TLS (docs/broker-security.md), against a real Mosquitto run by
`edgesmith broker`: a login can only be its own client id (no takeover of the monitor's or another
device's session), central names are reserved, ids are whole-string checked, the broker bounds
packets, plaintext off loopback needs saying, and with mutual TLS a device certificate is that
device and nobody else."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from conftest import run_cli
from edgesmith.toolchain.errors import UserError
from edgesmith.toolchain.fleet import broker as fleet_broker
from edgesmith.toolchain.fleet import protocol

FLEET = "plant-a"
pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def wait_for(predicate, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


class Client:
    """A paho client that records its connection events and what it receives."""

    def __init__(self, settings: fleet_broker.BrokerSettings, login: dict[str, Any], client_id: str,
                 *, clean_start: bool = False, subscribe: str | None = None, will: str | None = None,
                 tls: dict[str, Any] | None = None):
        self.connects: list[Any] = []
        self.disconnects: list[Any] = []
        self.messages: list[mqtt.MQTTMessage] = []
        self.subscribed = threading.Event()
        self.acks: dict[int, Any] = {}
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.client.username_pw_set(login["username"], login.get("password"))
        if tls is not None:
            self.client.tls_set(**tls)
        elif settings.tls:
            self.client.tls_set(ca_certs=settings.cafile, certfile=login.get("certfile"), keyfile=login.get("keyfile"))
        if will:
            self.client.will_set(will, b'{"will": true}', qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda _c, _u, _f, rc, _p: self.disconnects.append(rc)
        self.client.on_message = lambda _c, _u, msg: self.messages.append(msg)
        self.client.on_subscribe = lambda *_a: self.subscribed.set()
        self.client.on_publish = self._on_publish
        self._subscribe = subscribe
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.connect(settings.host, settings.port, keepalive=10, clean_start=clean_start, properties=props)
        self.client.loop_start()

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        self.connects.append(rc)
        if self._subscribe and not rc.is_failure:
            client.subscribe(self._subscribe, qos=1)

    def _on_publish(self, _c: Any, _u: Any, mid: int, rc: Any, _p: Any) -> None:
        with self._lock:
            self.acks[mid] = rc

    def wait_connected(self) -> None:
        wait_for(lambda: self.connects, 10, "the CONNACK")
        assert not self.connects[-1].is_failure, self.connects[-1]
        if self._subscribe:
            assert self.subscribed.wait(10), "no SUBACK"

    def publish(self, topic: str, payload: bytes) -> Any:
        info = self.client.publish(topic, payload, qos=1)
        return wait_for(lambda: self.acks.get(info.mid), 10, f"the PUBACK on {topic}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def broker_dir(tmp_path):
    directory = tmp_path / "broker"
    fleet_broker.up(directory)
    yield directory
    fleet_broker.down(directory)


def _settings(directory: Path) -> fleet_broker.BrokerSettings:
    return fleet_broker.Broker(directory.resolve()).settings()


def _payload(device: str, n: int) -> bytes:
    return json.dumps({"device": device, "n": n}).encode()


def test_a_device_using_the_monitors_client_id_takes_over_nothing(broker_dir):
    """Before: Mosquitto closed the monitor's connection and, with clean start, discarded its
    persistent session and the messages queued in it."""
    settings = _settings(broker_dir)
    cam1, cam2 = fleet_broker.add_devices(broker_dir, ["cam-01", "cam-02"], FLEET)
    monitor = Client(settings, fleet_broker.Broker(broker_dir).monitor_credentials(), fleet_broker.MONITOR_USER,
                     subscribe=f"{protocol.TOPIC_ROOT}/#")
    monitor.wait_connected()
    honest = Client(settings, cam2, "cam-02")
    honest.wait_connected()
    attacker = Client(settings, cam1, fleet_broker.MONITOR_USER, clean_start=True)
    attacker.wait_connected()
    topic = protocol.topic(FLEET, "cam-02", "telemetry")
    for n in range(5):
        assert honest.publish(topic, _payload("cam-02", n)).value == 0
    wait_for(lambda: len([m for m in monitor.messages if m.topic == topic]) == 5, 10, "5 messages at the monitor")
    # The attacker's login became its client id: the monitor was never disconnected.
    assert monitor.disconnects == [] and len(monitor.connects) == 1
    # ... and the attacker is still only cam-01: the monitor's topics are not its own.
    assert attacker.publish(protocol.alert_topic(FLEET), b"{}").value == 0x87  # not authorised
    for client in (attacker, honest, monitor):
        client.close()


def test_a_device_using_another_devices_client_id_cannot_kick_it_or_fire_its_death(broker_dir):
    settings = _settings(broker_dir)
    cam1, cam2 = fleet_broker.add_devices(broker_dir, ["cam-01", "cam-02"], FLEET)
    watcher = Client(settings, fleet_broker.central_login(broker_dir, "edgesmith-test-watch"), "edgesmith-test-watch",
                     subscribe=f"{protocol.TOPIC_ROOT}/#")
    watcher.wait_connected()
    death = protocol.topic(FLEET, "cam-02", "death")
    victim = Client(settings, cam2, "cam-02", will=death)
    victim.wait_connected()
    for attempt in range(3):  # again and again, as the issue reproduced
        attacker = Client(settings, cam1, "cam-02", clean_start=True)
        attacker.wait_connected()
        attacker.close()
    probe = protocol.topic(FLEET, "cam-02", "state")
    assert victim.publish(probe, b"{}").value == 0
    wait_for(lambda: any(m.topic == probe for m in watcher.messages), 10, "the victim's message")
    assert victim.disconnects == [] and len(victim.connects) == 1
    assert not [m for m in watcher.messages if m.topic == death]  # its will never fired
    victim.close()
    watcher.close()


def test_central_names_are_reserved_and_the_monitor_keeps_its_password(broker_dir):
    monitor_file = broker_dir / "monitor.json"
    before = monitor_file.read_text()
    passwd_before = (broker_dir / "passwd").read_text()
    for name in ("edgesmith-monitor", "EdgeSmith-Monitor", "edgesmith-deploy-1234"):
        with pytest.raises(UserError, match="reserved for the fleet's own logins"):
            fleet_broker.add_device(broker_dir, name, FLEET, rotate=True)
        with pytest.raises(UserError, match="reserved"):
            fleet_broker.add_devices(broker_dir, ["cam-01", name], FLEET)
    result = run_cli("broker", "add-device", "edgesmith-monitor", "--fleet", FLEET, "--dir", str(broker_dir), check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "reserved for the fleet's own logins" in " ".join(result.stderr.split())
    assert monitor_file.read_text() == before and (broker_dir / "passwd").read_text() == passwd_before
    # The monitor still logs in with the password it had.
    monitor = Client(_settings(broker_dir), json.loads(before), fleet_broker.MONITOR_USER)
    monitor.wait_connected()
    monitor.close()
    # Central logins must say they are central; device ids never can.
    with pytest.raises(UserError, match="central logins start with 'edgesmith-'"):
        fleet_broker.central_login(broker_dir, "mon-1")


def test_a_device_of_another_fleet_is_refused_not_handed_out(broker_dir):
    """Before: add_devices returned an existing device's credentials from another fleet silently."""
    (theirs,) = fleet_broker.add_devices(broker_dir, ["cam-01"], "plant-b")
    acl = (broker_dir / "acl").read_text()
    with pytest.raises(UserError, match=r"cam-01 \(plant-b\) already in another fleet"):
        fleet_broker.add_devices(broker_dir, ["cam-09", "cam-01"], FLEET)
    with pytest.raises(UserError, match="already in fleet plant-b"):
        fleet_broker.add_device(broker_dir, "cam-01", FLEET)
    # all or nothing: cam-09 was not made either, and cam-01 keeps its fleet and password
    assert (broker_dir / "acl").read_text() == acl and not (broker_dir / "devices" / "cam-09.json").exists()
    assert json.loads((broker_dir / "devices" / "cam-01.json").read_text())["password"] == theirs["password"]


@pytest.mark.parametrize("bad", ["dev\n", "dev\nuser edgesmith-monitor", "cam 01", "", "-x", "x" * 65, "a/b", "a+b"])
def test_ids_are_checked_as_whole_strings(broker_dir, bad):
    """Before: re.match with `$` accepted "dev\\n", which split lines in the ACL and password file."""
    acl, passwd = (broker_dir / "acl").read_text(), (broker_dir / "passwd").read_text()
    with pytest.raises(UserError, match="is not allowed"):
        fleet_broker.add_device(broker_dir, bad, FLEET)
    with pytest.raises(UserError, match="is not allowed"):
        fleet_broker.add_device(broker_dir, "cam-01", bad)
    with pytest.raises(UserError, match="is not allowed"):
        fleet_broker.add_devices(broker_dir, ["cam-01", bad], FLEET)
    assert (broker_dir / "acl").read_text() == acl and (broker_dir / "passwd").read_text() == passwd
    assert list((broker_dir / "devices").iterdir()) == []


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(text: str) -> bytes:
    data = text.encode()
    return len(data).to_bytes(2, "big") + data


def _raw_publish_is_cut_off(settings: fleet_broker.BrokerSettings, login: dict[str, Any], topic: str, size: int) -> bool:
    """MQTT 3.1.1 over a plain socket: CONNECT, then one QoS 0 PUBLISH of ``size`` payload bytes;
    True when the broker closes the connection instead of reading on."""
    import socket

    body = _string("MQTT") + bytes([4, 0xC2]) + (30).to_bytes(2, "big") + _string("raw") + _string(login["username"]) \
        + _string(login["password"])
    with socket.create_connection((settings.host, settings.port), timeout=10) as sock:
        sock.sendall(b"\x10" + _remaining_length(len(body)) + body)
        assert sock.recv(4) == b"\x20\x02\x00\x00"  # CONNACK, accepted
        publish = _string(topic) + b"z" * size
        try:
            sock.sendall(b"\x30" + _remaining_length(len(publish)) + publish)
            return sock.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True


def test_oversized_packets_are_stopped_at_the_broker(broker_dir):
    """Before: no packet or message size limit (a device could make the broker hold, and the
    monitor receive, anything up to MQTT's 256 MiB)."""
    settings = _settings(broker_dir)
    cam1, cam2 = fleet_broker.add_devices(broker_dir, ["cam-01", "cam-02"], FLEET)
    monitor = Client(settings, fleet_broker.Broker(broker_dir).monitor_credentials(), fleet_broker.MONITOR_USER,
                     subscribe=f"{protocol.TOPIC_ROOT}/#")
    monitor.wait_connected()
    flooder = Client(settings, cam1, "cam-01")
    flooder.wait_connected()
    topic = protocol.topic(FLEET, "cam-01", "telemetry")
    # Over max_packet_size: the sender is disconnected (written raw: paho would refuse to send it).
    assert _raw_publish_is_cut_off(settings, cam1, topic, fleet_broker.MAX_PACKET_BYTES + 1)
    # A healthy device's message still reaches the monitor, and the big ones never did.
    honest = Client(settings, cam2, "cam-02")
    honest.wait_connected()
    good = protocol.topic(FLEET, "cam-02", "telemetry")
    assert honest.publish(good, _payload("cam-02", 1)).value == 0
    wait_for(lambda: any(m.topic == good for m in monitor.messages), 10, "the healthy device's message")
    assert all(len(m.payload) <= fleet_broker.MAX_PACKET_BYTES for m in monitor.messages)
    assert monitor.disconnects == []
    config = (broker_dir / "mosquitto.conf").read_text()
    for option in ("max_packet_size", "max_queued_messages", "max_queued_bytes",
                   "use_username_as_clientid true"):
        assert option in config
    for client in (honest, flooder, monitor):
        client.close()


def test_broker_up_off_loopback_needs_tls_or_saying_plaintext(tmp_path):
    directory = tmp_path / "broker"
    result = run_cli("broker", "up", "--dir", str(directory), "--host", "0.0.0.0", check=False)
    message = " ".join(result.stderr.split())
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "in plaintext" in message and "--insecure-plaintext" in message and "broker certs" in message
    assert not (directory / "mosquitto.pid").exists()
    result = run_cli("broker", "up", "--dir", str(directory), "--host", "0.0.0.0", "--insecure-plaintext", "--json")
    try:
        assert json.loads(result.stdout)["tls"] is False
    finally:
        run_cli("broker", "down", "--dir", str(directory))
    # With `broker certs` and --tls it starts; devices are told the public name, which the
    # certificate holds, and verify it.
    run_cli("broker", "certs", "--dir", str(directory), "--host", "127.0.0.1")
    run_cli("broker", "up", "--dir", str(directory), "--host", "0.0.0.0", "--tls", "--public-host", "127.0.0.1")
    try:
        (cam,) = fleet_broker.add_devices(directory, ["cam-01"], FLEET)
        assert (cam["host"], cam["tls"]) == ("127.0.0.1", True)
        device = Client(_settings(directory).model_copy(update={"host": cam["host"]}), cam, "cam-01")
        device.wait_connected()
        device.close()
    finally:
        run_cli("broker", "down", "--dir", str(directory))


def _never_connects(settings: fleet_broker.BrokerSettings, login: dict[str, Any], tls: dict[str, Any]) -> bool:
    try:
        client = Client(settings, login, login["username"], tls=tls)
    except OSError:  # ssl.SSLError included
        return True
    wait_for(lambda: client.disconnects or client.connects, 10, "the broker's answer")
    client.client.loop_stop()
    return not any(not rc.is_failure for rc in client.connects)


def test_mutual_tls_a_device_certificate_is_that_device_only(tmp_path):
    directory = tmp_path / "broker"
    out = json.loads(run_cli("broker", "certs", "--dir", str(directory), "--host", "broker.example", "--json").stdout)
    assert Path(out["cafile"]).is_file() and (Path(out["cafile"]).parent / "ca.key").stat().st_mode & 0o077 == 0
    info = json.loads(run_cli("broker", "up", "--dir", str(directory), "--tls", "--mutual-tls", "--json").stdout)
    assert info["tls"] and info["mutual_tls"]
    try:
        settings = _settings(directory)
        cam1, cam2 = fleet_broker.add_devices(directory, ["cam-01", "cam-02"], FLEET)
        assert Path(cam1["certfile"]).is_file() and Path(cam1["keyfile"]).stat().st_mode & 0o077 == 0
        monitor = Client(settings, fleet_broker.Broker(directory).monitor_credentials(), fleet_broker.MONITOR_USER,
                         subscribe=f"{protocol.TOPIC_ROOT}/#")
        monitor.wait_connected()
        # cam-01's certificate with cam-02's username and password: the certificate decides, so it
        # is cam-01, and cam-02's topics are refused.
        impostor = Client(settings, {**cam2, "certfile": cam1["certfile"], "keyfile": cam1["keyfile"]}, "cam-02")
        impostor.wait_connected()
        assert impostor.publish(protocol.topic(FLEET, "cam-02", "telemetry"), b"{}").value == 0x87
        own = protocol.topic(FLEET, "cam-01", "telemetry")
        assert impostor.publish(own, b"{}").value == 0
        wait_for(lambda: any(m.topic == own for m in monitor.messages), 10, "cam-01's own message")
        assert not any("cam-02" in m.topic for m in monitor.messages)
        # No certificate at all: the TLS handshake fails (TLS 1.3 may tell the client only after it).
        assert _never_connects(settings, cam2, {"ca_certs": settings.cafile})
        # A certificate from another CA, with a device's name: refused too.
        other = tmp_path / "other"
        fleet_broker.certs(other, [])
        from edgesmith.toolchain.fleet import certs

        forged = certs.issue(other / "tls", "cam-02", tmp_path / "forged")
        assert _never_connects(settings, cam2, {"ca_certs": settings.cafile, "certfile": str(forged.cert),
                                                "keyfile": str(forged.key)})
        impostor.close()
        monitor.close()
    finally:
        run_cli("broker", "down", "--dir", str(directory))


def test_central_logins_are_separate_and_removed(broker_dir):
    name = "edgesmith-deploy-test"
    login = fleet_broker.central_login(broker_dir, name)
    assert login["username"] == name and fleet_broker.central_login(broker_dir, name) == login
    assert f"user {name}" in (broker_dir / "acl").read_text()
    client = Client(_settings(broker_dir), login, "anything")
    client.wait_connected()
    client.close()
    fleet_broker.remove_central_login(broker_dir, name)
    assert f"user {name}" not in (broker_dir / "acl").read_text()
    assert not (broker_dir / "central" / f"{name}.json").exists()
    assert f"{name}:" not in (broker_dir / "passwd").read_text()
