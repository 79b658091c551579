"""Simulated devices: protocol-valid birth, telemetry and death over MQTT v5 (paho), each with its own login.

Two uses: the monitor's tests, which need exact messages (a chosen seq, a duplicate, a gap, a
stale death, shifted outputs), and the load benchmark, which needs many devices per process:
``Swarm`` drives any number of paho clients from one thread on a selector instead of a thread per
client. The real device agent is C++ (``edgesmith-agent``); this stands in for it in Python.

    python -m edgesmith.toolchain.fleet.simulate --broker DIR --fleet F --devices 1000 --interval-s 10 --duration-s 60
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import secrets
import select
import selectors
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgesmith.toolchain.fleet import protocol
from edgesmith.toolchain.fleet.latency import LatencyHistogram

SESSION_EXPIRY_S = 7 * 24 * 3600
RETAINED_KINDS = ("birth", "death")  # the current session's birth and the last death (docs/telemetry.md)
DEFAULT_LAYOUT = protocol.LatencyLayout(start_us=1.0, factor=2 ** 0.25, count=96)  # the manifest's default


def sha256_of(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class SimArtifact:
    """What a simulated device has installed (what its birth announces)."""

    name: str = "digits-x86_64-avx2-tvm"
    model: str = "digits"
    model_version: str = "1"
    target: str = "x86_64-avx2"
    backend: str = "tvm"
    backend_version: str = "0.27.0"
    outputs: list[protocol.OutputLayout] = field(default_factory=lambda: [
        protocol.OutputLayout(name="logits", kind="classes", classes=4, reference=[0.25, 0.25, 0.25, 0.25])])
    latency: protocol.LatencyLayout = field(default_factory=lambda: DEFAULT_LAYOUT)
    build_latency_us: float | None = 1000.0
    manifest_sha256: str | None = None  # a real artifact's; else one made up from the labels

    @property
    def sha256(self) -> str:
        if self.manifest_sha256:
            return self.manifest_sha256
        return sha256_of(f"{self.name}/{self.model}/{self.model_version}/{self.target}/{self.backend}")

    @classmethod
    def of_manifest(cls, manifest_bytes: bytes) -> SimArtifact:
        """What a device serving this real artifact announces."""
        m = json.loads(manifest_bytes)
        return cls(name=m["name"], model=m["model"]["name"], model_version=m["model"]["version"],
                   target=m["target"]["name"], backend=m["backend"]["name"], backend_version=m["backend"]["version"],
                   manifest_sha256=hashlib.sha256(manifest_bytes).hexdigest())

    def ref(self) -> protocol.ArtifactRef:
        return protocol.ArtifactRef(name=self.name, model=self.model, model_version=self.model_version,
                                    target=self.target, backend=self.backend, backend_version=self.backend_version,
                                    manifest_sha256=self.sha256)


def output_window(counts: Sequence[int], underflow: int = 0, overflow: int = 0, nan: int = 0) -> protocol.OutputWindow:
    binned = int(sum(counts)) + underflow + overflow + nan
    return protocol.OutputWindow(counts=[int(c) for c in counts], underflow=underflow, overflow=overflow, nan=nan,
                                 seen=binned, binned=binned)


class SimulatedDevice:
    """One device: builds messages with its own ``bdSeq``/``seq`` counters and publishes them."""

    def __init__(self, credentials: dict[str, Any], artifact: SimArtifact | None = None, interval_s: float = 10.0,
                 bd_seq: int = 1, seq: int = 0, seed: int = 0, epoch: str | None = None):
        self.credentials = credentials
        self.fleet = credentials["fleet"]
        self.device = credentials["device"]
        self.artifact = artifact or SimArtifact()
        self.interval_s = interval_s
        self.bd_seq = bd_seq
        self.seq = seq
        self.birth_seq = seq
        self.rng = np.random.default_rng(seed)
        # The spool's epoch (a device's random id for its spool database): ``reimage`` starts a new one.
        self.epoch = epoch or hashlib.sha256(f"{self.fleet}/{self.device}/{seed}".encode()).hexdigest()[:16]
        self.window_end_ms = int(time.time() * 1000)
        self.client: mqtt.Client | None = None
        self._acks: dict[int, ReasonCode] = {}
        self._subacks: dict[int, list[ReasonCode]] = {}
        self._received: list[mqtt.MQTTMessage] = []
        self._cond = threading.Condition()
        self.connected = threading.Event()
        self.refused: ReasonCode | None = None

    # ---- messages (no network) ---------------------------------------------------------------------

    def _envelope(self, historical: bool, seq: int | None = None) -> dict[str, Any]:
        if seq is None:
            self.seq += 1
            seq = self.seq
        return {"fleet": self.fleet, "device": self.device, "epoch": self.epoch, "bdSeq": self.bd_seq, "seq": seq,
                "ts_ms": int(time.time() * 1000), "historical": historical}

    def birth(self, historical: bool = False) -> protocol.Birth:
        envelope = self._envelope(historical)
        self.birth_seq = envelope["seq"]
        a = self.artifact
        return protocol.Birth(**envelope, target=a.target, runtime=protocol.Runtime(version="0.1.0", isa="x86_64", cpu="simulated device"),
                              artifact=a.ref(), metrics=protocol.MetricSchema(
                                  interval_s=self.interval_s, latency=a.latency, outputs=a.outputs,
                                  build_latency_us=a.build_latency_us))

    def death(self, reason: str = "shutdown", bd_seq: int | None = None, seq: int | None = None) -> protocol.Death:
        """A death repeats its session's birth seq (and bdSeq)."""
        return protocol.Death(fleet=self.fleet, device=self.device, epoch=self.epoch, bdSeq=self.bd_seq if bd_seq is None else bd_seq,
                              seq=self.birth_seq if seq is None else seq, ts_ms=int(time.time() * 1000), reason=reason)

    def telemetry(self, runs: int, errors: int = 0, latency_us: Sequence[float] | np.ndarray | None = None,
                  outputs: dict[str, protocol.OutputWindow] | None = None, historical: bool = False,
                  seq: int | None = None, window_s: float | None = None) -> protocol.Telemetry:
        """One window. ``latency_us``: the runs' latencies (default: lognormal around 1 ms);
        ``outputs``: per output (default: class counts drawn from the reference shares)."""
        if latency_us is None:
            latency_us = self.rng.lognormal(np.log(1000.0), 0.2, size=runs)
        hist = LatencyHistogram.of_samples(latency_us, self.artifact.latency)
        q = hist.quantiles()
        if outputs is None:
            outputs = {}
            for o in self.artifact.outputs:
                shares = np.asarray(o.reference or [1.0], dtype=np.float64)
                outputs[o.name] = output_window(self.rng.multinomial(runs, shares / shares.sum()).tolist())
        start_ms = self.window_end_ms
        self.window_end_ms = start_ms + int((window_s or self.interval_s) * 1000)
        return protocol.Telemetry(
            **self._envelope(historical, seq), artifact_sha256=self.artifact.sha256, window_start_ms=start_ms,
            window_end_ms=self.window_end_ms, runs=runs, errors=errors, nan_input_runs=0, nan_input_values=0,
            latency=protocol.LatencyWindow(counts=hist.counts, underflow=hist.underflow, overflow=hist.overflow,
                                           sum_us=hist.sum_us, max_us=hist.max_us, p50_us=q["p50_us"] or 0.0,
                                           p95_us=q["p95_us"] or 0.0, p99_us=q["p99_us"] or 0.0),
            outputs=outputs, process=protocol.ProcessWindow(rss_bytes=50_000_000, cpu_seconds=0.1, cpu_percent=1.0),
            temperature_c=None, spool=protocol.SpoolState(queued=0, dropped_total=0))

    def telemetry_from(self, body: bytes) -> bytes:
        """The next window as JSON, its summary taken from a pre-rendered body (``WindowPool``):
        only the envelope and window times are made per message."""
        self.seq += 1
        start_ms = self.window_end_ms
        self.window_end_ms = start_ms + int(self.interval_s * 1000)
        return (f'{{"v":1,"fleet":"{self.fleet}","device":"{self.device}","epoch":"{self.epoch}","bdSeq":{self.bd_seq},"seq":{self.seq},'
                f'"ts_ms":{int(time.time() * 1000)},"historical":false,"kind":"telemetry",'
                f'"artifact_sha256":"{self.artifact.sha256}","window_start_ms":{start_ms},'
                f'"window_end_ms":{self.window_end_ms},').encode() + body

    def reimage(self) -> None:
        """As a re-imaged device (a new spool database): a new epoch, and bdSeq and seq start over."""
        self.epoch = secrets.token_hex(8)
        self.bd_seq, self.seq, self.birth_seq = 1, 0, 0

    def topic(self, kind: str) -> str:
        return protocol.topic(self.fleet, self.device, kind)

    # ---- network -----------------------------------------------------------------------------------

    def make_client(self) -> mqtt.Client:
        """A paho client with this device's login and its will (the death of the current bdSeq)."""
        c = self.credentials
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{self.fleet}.{self.device}", protocol=mqtt.MQTTv5)
        client.username_pw_set(c["username"], c["password"])
        if c.get("tls"):
            client.tls_set(ca_certs=c.get("cafile"), certfile=c.get("certfile"), keyfile=c.get("keyfile"))
        # The will is this session's death: it repeats the seq the birth about to be sent will carry.
        will = self.death("connection-lost").model_copy(update={"seq": self.seq + 1})
        client.will_set(self.topic("death"), will.model_dump_json(), qos=1, retain=True)
        client.max_inflight_messages_set(1000)
        client.on_connect = self._on_connect
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    @staticmethod
    def connect_properties() -> Properties:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        return props

    def connect(self, birth: bool = True, timeout: float = 10.0) -> None:
        """Start a session (bdSeq as set; call ``new_session`` first for the next one) and publish the birth."""
        self.connected.clear()
        self.client = self.make_client()
        self.client.connect(self.credentials["host"], self.credentials["port"], keepalive=30, clean_start=False,
                            properties=self.connect_properties())
        self.client.loop_start()
        if not self.connected.wait(timeout):
            raise TimeoutError(f"{self.device}: not connected within {timeout} s (last refusal: {self.refused})")
        if birth:
            self.send(self.birth())

    def new_session(self) -> None:
        self.bd_seq += 1

    def _on_connect(self, _client: Any, _userdata: Any, _flags: Any, reason_code: ReasonCode, _props: Any) -> None:
        # A refused login is retried by paho's loop (a device added a moment ago may not be in the
        # broker's password file yet: Mosquitto reloads it on SIGHUP, asynchronously).
        self.refused = reason_code if reason_code.is_failure else None
        if not reason_code.is_failure:
            self.connected.set()

    def _on_publish(self, _client: Any, _userdata: Any, mid: int, reason_code: ReasonCode, _props: Any) -> None:
        with self._cond:
            self._acks[mid] = reason_code
            self._cond.notify_all()

    def _on_subscribe(self, _client: Any, _userdata: Any, mid: int, reason_codes: list[ReasonCode], _props: Any) -> None:
        with self._cond:
            self._subacks[mid] = reason_codes
            self._cond.notify_all()

    def _on_message(self, _client: Any, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self._received.append(msg)
            self._cond.notify_all()

    def _wait(self, table: dict[int, Any], mid: int, timeout: float) -> Any:
        with self._cond:
            if not self._cond.wait_for(lambda: mid in table, timeout):
                raise TimeoutError(f"{self.device}: no acknowledgement for message {mid} within {timeout} s")
            return table.pop(mid)

    def send(self, message: protocol.Envelope | tuple[str, bytes], qos: int = 1, timeout: float = 10.0) -> ReasonCode | None:
        """Publish a message (or a raw ``(topic, payload)``); with QoS 1 waits for the PUBACK and
        returns its reason code. Births and deaths are retained, as the agent does."""
        assert self.client is not None, "connect() first"
        if isinstance(message, tuple):
            (topic, payload), retain = message, False
        else:
            topic, payload = self.topic(message.kind), message.model_dump_json().encode()
            retain = message.kind in RETAINED_KINDS
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        return self._wait(self._acks, info.mid, timeout) if qos > 0 else None

    def subscribe(self, topic: str, timeout: float = 10.0) -> list[ReasonCode]:
        assert self.client is not None, "connect() first"
        _, mid = self.client.subscribe(topic, qos=1)
        return self._wait(self._subacks, mid, timeout)

    def received(self) -> list[mqtt.MQTTMessage]:
        with self._cond:
            return list(self._received)

    def shutdown(self) -> None:
        """A clean stop: the death said by the device, then a normal disconnect (the will is discarded)."""
        assert self.client is not None
        self.send(self.death("shutdown"))
        self.client.disconnect()
        self.client.loop_stop()
        self.client = None

    def drop(self) -> None:
        """Lose the connection without DISCONNECT: the broker publishes the will (death, connection-lost)."""
        assert self.client is not None
        self.client.loop_stop()
        sock = self.client.socket()
        if sock is not None:
            sock.close()
        self.client = None


class WindowPool:
    """Window summaries rendered once (by ``SimulatedDevice.telemetry``, so they are what a device
    sends) and reused: a swarm of thousands of devices then spends its time sending, not summarising."""

    FIRST_BODY_FIELD = '"runs":'

    def __init__(self, artifact: SimArtifact, interval_s: float, runs: int, size: int = 64, seed: int = 0):
        maker = SimulatedDevice({"fleet": "pool", "device": "pool"}, artifact, interval_s, seed=seed)
        self.bodies: list[bytes] = []
        for _ in range(size):
            text = maker.telemetry(runs=runs).model_dump_json()
            self.bodies.append(text[text.index(self.FIRST_BODY_FIELD):].encode())
        probe = SimulatedDevice({"fleet": "pool", "device": "pool"}, artifact, interval_s)
        protocol.parse_message(probe.telemetry_from(self.bodies[0]))  # the spliced form must be valid

    def body(self, k: int) -> bytes:
        return self.bodies[k % len(self.bodies)]


class Swarm:
    """Many simulated devices on one thread: paho clients driven from a selector (paho's external
    loop: ``loop_read``/``loop_write``/``loop_misc``), not a thread each, and windows due taken
    from a heap, so an idle swarm costs nothing and a busy one only what it sends. While
    connecting, write interest follows paho's socket callbacks; once connected, a publish writes
    straight to its socket and write interest is taken only for what the socket did not accept."""

    def __init__(self, devices: list[SimulatedDevice]):
        self.devices = devices
        self.clients: list[mqtt.Client] = []
        self.selector = selectors.DefaultSelector()
        self.acked = 0
        self.published = 0
        self._fds: dict[int, int] = {}

    def _on_publish(self, *_args: Any) -> None:
        self.acked += 1

    def _want_write(self, client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        self._interest(client, sock, selectors.EVENT_READ | selectors.EVENT_WRITE)

    def _written(self, client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        self._interest(client, sock, selectors.EVENT_READ)

    def _interest(self, client: mqtt.Client, sock: Any, events: int) -> None:
        try:
            self.selector.modify(sock, events, client)
        except (KeyError, ValueError):
            pass  # not registered yet (connecting), or closed: _open registers it

    def connect(self, timeout: float = 60.0) -> None:
        for device in self.devices:
            client = device.make_client()
            client.on_publish = self._on_publish
            client.on_socket_register_write = self._want_write
            client.on_socket_unregister_write = self._written
            self._open(device, client)
            self.clients.append(client)
            device.client = client
        deadline = time.monotonic() + timeout
        last_retry = time.monotonic()
        while not all(d.connected.is_set() for d in self.devices):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{sum(not d.connected.is_set() for d in self.devices)} devices did not connect")
            self.pump(0.05)
            if time.monotonic() - last_retry > 1.0:  # refused logins (password file not reloaded yet): again
                last_retry = time.monotonic()
                for device in self.devices:
                    if device.refused is not None and not device.connected.is_set():
                        device.refused = None
                        self._open(device, device.client)
        for client in self.clients:  # from here on, publish() writes directly (see the class doc)
            client.on_socket_register_write = None
            client.on_socket_unregister_write = None
        for device in self.devices:
            self.publish(device, device.birth())

    def _open(self, device: SimulatedDevice, client: mqtt.Client) -> None:
        old = self._fds.pop(id(client), None)
        if old is not None:
            try:
                self.selector.unregister(old)  # by descriptor number: paho may have closed the socket already
            except KeyError:
                pass
        client.connect(device.credentials["host"], device.credentials["port"], keepalive=60, clean_start=False,
                       properties=device.connect_properties())
        sock = client.socket()
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.want_write() else 0)
        self.selector.register(sock, events, client)
        self._fds[id(client)] = sock.fileno()

    def publish(self, device: SimulatedDevice, message: protocol.Envelope | bytes, kind: str = "telemetry") -> None:
        client = device.client
        assert client is not None
        if isinstance(message, bytes):
            payload = message
        else:
            payload, kind = message.model_dump_json(), message.kind
        client.publish(device.topic(kind), payload, qos=1, retain=kind in RETAINED_KINDS)
        self.published += 1
        if client.on_socket_register_write is None and client.want_write():  # the socket was full: finish later
            self._interest(client, client.socket(), selectors.EVENT_READ | selectors.EVENT_WRITE)

    def pump(self, timeout: float) -> None:
        for key, events in self.selector.select(timeout):
            client = key.data
            if events & selectors.EVENT_READ:
                client.loop_read(max_packets=100)
            if events & selectors.EVENT_WRITE:
                client.loop_write()
                if client.on_socket_register_write is None and not client.want_write():
                    self._interest(client, key.fileobj, selectors.EVENT_READ)

    def run(self, duration_s: float, runs_per_window: int = 20) -> None:
        """Each device publishes a window every ``interval_s`` (staggered) for ``duration_s``."""
        start = time.monotonic()
        pools = {}
        for d in self.devices:
            key = (d.artifact.sha256, d.interval_s)
            if key not in pools:
                pools[key] = WindowPool(d.artifact, d.interval_s, runs_per_window, seed=len(pools))
        n = len(self.devices)
        due = [(start + (i / n) * d.interval_s, i) for i, d in enumerate(self.devices)]
        heapq.heapify(due)
        last_misc = start
        while (now := time.monotonic()) - start < duration_s:
            while due and due[0][0] <= now:
                at, i = heapq.heappop(due)
                device = self.devices[i]
                body = pools[(device.artifact.sha256, device.interval_s)].body(i + device.seq)
                self.publish(device, device.telemetry_from(body))
                heapq.heappush(due, (at + device.interval_s, i))
            self.pump(max(0.0, min(0.05, due[0][0] - time.monotonic())) if due else 0.05)
            if now - last_misc >= 1.0:  # keepalive pings and retries
                for client in self.clients:
                    client.loop_misc()
                last_misc = now

    def drain(self, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while self.acked < self.published and time.monotonic() < deadline:
            self.pump(0.05)
        return self.acked >= self.published

    def close(self, clean: bool = True) -> None:
        for device in self.devices:
            if clean and device.client is not None:
                self.publish(device, device.death("shutdown"))
        self.drain(10.0)
        for client in self.clients:
            client.disconnect()
            self.pump(0.0)
        self.selector.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", type=Path, required=True, help="broker directory (devices are added to it)")
    parser.add_argument("--fleet", default="sim")
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--first", type=int, default=0, help="index of the first device (to split over processes)")
    parser.add_argument("--prefix", default="sim-")
    parser.add_argument("--interval-s", type=float, default=10.0)
    parser.add_argument("--duration-s", type=float, default=60.0)
    parser.add_argument("--runs", type=int, default=20, help="runs per window")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--wait-for-go", action="store_true",
                        help="after the births, print a 'connected' line and send windows only once a line comes on "
                             "stdin (so several processes start together, after their births are stored)")
    args = parser.parse_args(argv)
    from edgesmith.toolchain.fleet import broker

    creds = broker.add_devices(args.broker, [f"{args.prefix}{i:05d}" for i in range(args.first, args.first + args.devices)],
                               args.fleet)
    swarm = Swarm([SimulatedDevice(c, interval_s=args.interval_s, seed=args.seed + i) for i, c in enumerate(creds)])
    swarm.connect()
    if args.wait_for_go:
        swarm.drain()
        print(json.dumps({"connected": len(creds)}), flush=True)
        while not select.select([sys.stdin], [], [], 0)[0]:
            swarm.pump(0.05)  # keep the sessions alive while waiting
        sys.stdin.readline()
    swarm.run(args.duration_s, runs_per_window=args.runs)
    ok = swarm.drain()
    swarm.close()
    print(json.dumps({"devices": len(creds), "published": swarm.published, "acked": swarm.acked, "drained": ok,
                      "cpu_s": round(time.process_time(), 3)}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
