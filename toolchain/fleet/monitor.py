"""``edgesmith fleet monitor``: subscribe to the fleet's telemetry, store it, aggregate, detect drift, alert, serve.

Threads: paho's network loop hands every message to a queue; the ingest loop validates, batches
and stores (one transaction per batch), and only then acknowledges the batch's messages (manual
PUBACK), so a monitor that dies mid-batch gets them again from its persistent session and the
store's sequence bookkeeping drops what it had already written. The evaluator follows the store
once a tick (aggregates, drift, alerts) and publishes a snapshot that the HTTP server reads.
"""

from __future__ import annotations

import gc
import json
import logging
import queue
import re
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError, OperationalError

from edgesmith.runtime import contract
from edgesmith.toolchain.errors import UserError
from edgesmith.toolchain.fleet import protocol
from edgesmith.toolchain.fleet.aggregate import ArtifactIndex, FleetView
from edgesmith.toolchain.fleet.alerts import AlertManager, Notifier, Thresholds
from edgesmith.toolchain.fleet.broker import Broker, central_login, configure_client
from edgesmith.toolchain.fleet.store import (DEFAULT_RETENTION_DAYS, DeviceBudget, Incoming, Store, now_ms)
from edgesmith.toolchain.fleet.web import HttpServer

log = logging.getLogger("edgesmith.fleet.monitor")

SESSION_EXPIRY_S = 7 * 24 * 3600  # as the devices' sessions: a monitor away for a week misses nothing
KEEPALIVE_S = 30
# The queue between paho's network thread and the ingest: bounded, so a flood (QoS 0 messages are
# not held back by the broker's in-flight window) costs refusals, not the monitor's memory.
MAX_QUEUED_MESSAGES = 20_000
MAX_QUEUED_BYTES = 64 << 20
# Fair share: once the queue is half full, a device holding more than this share of it has its
# further messages refused (`flooding`), so one flooding device cannot crowd the others out. Below
# half full nobody is refused, so a device flushing a long outage's spool is not penalised.
DEVICE_SHARE = 1 / 16
RC_SESSION_TAKEN_OVER = 142
# paho's network thread gives up the GIL on every socket read (several per message) and must win it
# back from the busy ingest and evaluator threads each time; at Python's default 5 ms switch interval
# that alone held it to a few hundred messages a second and put seconds of latency on the stream.
SWITCH_INTERVAL_S = 0.0005
# The view keeps hundreds of thousands of small objects (recent windows of every device). Python's
# cyclic collector walked them all in full collections, stopping every thread for up to 0.4 s.
# What has lived a while is moved out of its reach (gc.freeze: no collection ever walks it; it is
# still freed by reference counting when the view drops it), and a full collection including it
# runs rarely, to reclaim any reference cycles among it.
GC_FREEZE_EVERY_S = 1.0
GC_FULL_EVERY_S = 1800.0
# Retention: the prune runs this often (and once at start), PRUNE_PAUSE_S between its transactions
# so ingest is never held behind more than one of them.
PRUNE_EVERY_S = 600.0
PRUNE_PAUSE_S = 0.05
RETRAIN_SHOWN = 50  # retrain requests on the dashboard and /api/retrain: the active ones first, newest first


@dataclass(frozen=True)
class MonitorConfig:
    broker_dir: Path
    db_url: str
    http_host: str = "127.0.0.1"
    http_port: int = 9110
    shared_group: str | None = None
    client_id: str | None = None
    interval_s: float = 10.0  # assumed telemetry interval of devices whose birth did not say; chart step
    recent_s: float = 300.0
    thresholds: Thresholds = field(default_factory=Thresholds)
    webhook: str | None = None
    batch_size: int = 500
    # Store only (no view, alerts or HTTP): extra workers on a shared subscription take a share of
    # the stream's ingest; one full monitor on the same store serves the dashboard and alerts.
    ingest_only: bool = False
    batch_wait_s: float = 0.005
    tick_s: float = 1.0
    # Raw windows, events, states and old sessions older than this are deleted (0: kept for ever).
    retention_s: float = DEFAULT_RETENTION_DAYS * 86400
    budget: DeviceBudget = field(default_factory=DeviceBudget)

    def __post_init__(self) -> None:
        # The view starts from the windows of the last 2 x recent_s: they must still be there.
        if self.retention_s and self.retention_s < 2 * self.recent_s:
            raise UserError(f"--retention-days {self.retention_s / 86400:g} keeps less than twice --recent-s "
                            f"({self.recent_s:g} s), which the monitor's view reads back; keep at least "
                            f"{2 * self.recent_s / 86400:.3g} days, or 0 to keep everything")

    @property
    def subscription(self) -> str:
        topic = f"{protocol.TOPIC_ROOT}/#"
        return f"$share/{self.shared_group}/{topic}" if self.shared_group else topic

    @property
    def mqtt_client_id(self) -> str:
        if self.client_id:
            return self.client_id
        return f"edgesmith-monitor-{self.shared_group}" if self.shared_group else "edgesmith-monitor"


def parse_http(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise UserError(f"--http {value!r} is not HOST:PORT; use e.g. 127.0.0.1:9110")
    return host.strip("[]"), int(port)


_MONITOR_TOPIC = re.compile(rf"^{re.escape(protocol.TOPIC_ROOT)}/[^/]+/_monitor/")


def classify(topic: str, payload: bytes, received_ms: int, retained: bool = False) -> Incoming | None:
    """Validate one MQTT message; None for topics that are not device messages (alerts, desired states).
    A refused message names the device its topic names, so the refusal is counted against it."""
    parts = protocol.parse_topic(topic)
    if parts is None:
        return None if _MONITOR_TOPIC.match(topic) else Incoming(received_ms, dropped="unknown_topic")
    fleet, device, kind = parts
    if kind == contract.DESIRED_TOPIC:
        return None
    topic_said = Incoming(received_ms, fleet=fleet, device=device)
    if kind not in protocol.DEVICE_KINDS:
        return topic_said.refused("unknown_topic", f"unknown topic {kind[:64]!r}")
    try:
        message = contract.parse_message(payload)
    except contract.PayloadTooLarge as e:
        return topic_said.refused("oversized", str(e))
    except ValidationError as e:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))[:200]
        return topic_said.refused(contract.refusal_reason(e), f"{kind}: {where}: {first.get('msg', '')[:200]}")
    except Exception as e:  # noqa: BLE001 (whatever a payload does to a parser, it costs only itself)
        return topic_said.refused("malformed", f"{kind}: {type(e).__name__}")
    if (message.fleet, message.device, message.kind) != (fleet, device, kind):
        return topic_said.refused("topic_mismatch", f"a {message.kind} of {message.fleet}/{message.device} on "
                                                    f"{kind}")  # a device may only speak for itself
    if b"\\u0000" in payload:  # valid JSON, but PostgreSQL text cannot hold NUL characters
        return topic_said.refused("invalid", f"{kind}: a NUL character")
    return Incoming(received_ms, message=message, retained=retained)


@dataclass
class _Received:
    generation: int
    mid: int
    qos: int
    topic: str
    payload: bytes
    received_ms: int
    retained: bool


class Monitor:
    def __init__(self, config: MonitorConfig, artifact_index: ArtifactIndex | None = None):
        """``artifact_index`` labels the digests devices name from the artifact store (archive.lookup)."""
        self.config = config
        broker = Broker(Path(config.broker_dir).resolve())
        self.broker_settings = broker.settings()
        if not (broker.dir / "monitor.json").is_file():
            raise UserError(f"no monitor login in {broker.dir / 'monitor.json'}; run `edgesmith broker up --dir "
                            f"{broker.dir}` first")
        # The broker uses the login as the client id: each monitor (or ingest worker) has its own.
        self.credentials = central_login(broker.dir, config.mqtt_client_id)
        self.store = Store.open(config.db_url)
        self.store.budget = config.budget
        self.view = FleetView(self.store, recent_s=config.recent_s, default_interval_s=config.interval_s,
                              artifact_index=artifact_index)
        self.received: queue.Queue[_Received] = queue.Queue()
        self._queue_lock = threading.Lock()
        self.queued_bytes = 0
        self.queued_by_device: dict[tuple[str, str], list[int]] = {}  # (fleet, device) -> [messages, bytes]
        self.queue_refused: list[Incoming] = []  # refused because the queue was full; counted by the next batch
        self.stop_event = threading.Event()
        self.fatal: str | None = None
        self.generation = 0
        self.stored_here = 0  # by this process (several monitors may share the store)
        self.connected = False
        self._unreachable_logged = False
        self._snapshot: dict[str, Any] | None = None
        self._view_lock = threading.Lock()  # the evaluator changes the view, HTTP requests read it
        self._snapshot_lock = threading.Lock()  # HTTP requests building a snapshot (see snapshot)
        self._view_generation = 0  # ticks so far: a snapshot built across one is not kept
        self._last_history_ms = 0
        self.client = self._client()
        self.notifier = Notifier(publish=self._publish_alert, webhook=config.webhook)
        self.alerts = AlertManager(self.store, config.thresholds, self.notifier)
        self.http: HttpServer | None = None
        self.store_was_empty = True

    # ---- MQTT ------------------------------------------------------------------------------------

    def _client(self) -> mqtt.Client:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.config.mqtt_client_id, protocol=mqtt.MQTTv5,
                             manual_ack=True)
        configure_client(client, self.broker_settings, self.credentials)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    def _on_connect(self, client: mqtt.Client, _userdata: Any, flags: Any, reason_code: Any, _props: Any) -> None:
        if reason_code.is_failure:
            self.fatal = (f"the broker refused the monitor's login ({reason_code}); check "
                          f"{Path(self.config.broker_dir) / 'monitor.json'} belongs to this broker")
            self.stop_event.set()
            return
        self.generation += 1
        self.connected = True
        self._unreachable_logged = False
        self.view.listening_since_ms = now_ms()
        # Devices retain their current birth and last death. A store that knows no device yet wants
        # them on every subscription; otherwise only a new subscription gets them (a resumed
        # session has everything since in its queue).
        handling = (SubscribeOptions.RETAIN_SEND_ON_SUBSCRIBE if self.store_was_empty
                    else SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)
        client.subscribe(self.config.subscription, options=SubscribeOptions(qos=1, retainHandling=handling))
        log.info("connected to %s:%d as %s (%s session), subscribed to %s", self.broker_settings.host,
                 self.broker_settings.port, self.config.mqtt_client_id,
                 "resumed" if flags.session_present else "new", self.config.subscription)

    def _on_connect_fail(self, _client: mqtt.Client, _userdata: Any) -> None:
        if not self._unreachable_logged:  # once per outage; paho keeps retrying
            self._unreachable_logged = True
            log.warning("cannot reach the broker at %s:%d; retrying (is it up? `edgesmith broker up --dir %s`)",
                        self.broker_settings.host, self.broker_settings.port, self.config.broker_dir)

    def _on_disconnect(self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason_code: Any, _props: Any) -> None:
        self.connected = False
        if self.stop_event.is_set():
            return
        if reason_code == RC_SESSION_TAKEN_OVER:
            self.fatal = (f"another client connected with the monitor's client id {self.config.mqtt_client_id!r} and "
                          "took over its session; give each monitor its own --client-id")
            self.stop_event.set()
            return
        log.warning("disconnected from the broker (%s); reconnecting", reason_code)

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        size = len(msg.payload) + len(msg.topic)
        parts = protocol.parse_topic(msg.topic) or (None, None, None)
        key = (parts[0], parts[1]) if parts[1] is not None else None
        with self._queue_lock:
            queued = self.received.qsize()
            reason = None
            if not msg.retain:
                if queued >= MAX_QUEUED_MESSAGES or self.queued_bytes + size > MAX_QUEUED_BYTES:
                    reason, detail = "queue_full", "the monitor's queue was full"
                elif key is not None and (queued >= MAX_QUEUED_MESSAGES // 2 or self.queued_bytes > MAX_QUEUED_BYTES // 2):
                    held = self.queued_by_device.get(key, [0, 0])
                    if held[0] >= MAX_QUEUED_MESSAGES * DEVICE_SHARE or held[1] + size > MAX_QUEUED_BYTES * DEVICE_SHARE:
                        reason, detail = "flooding", (f"the device held {held[0]} messages ({held[1]} bytes) of the "
                                                      "monitor's queue while it was over half full")
            if reason is None:
                self.queued_bytes += size
                if key is not None:
                    held = self.queued_by_device.setdefault(key, [0, 0])
                    held[0] += 1
                    held[1] += size
            elif len(self.queue_refused) < MAX_QUEUED_MESSAGES:
                self.queue_refused.append(Incoming(now_ms(), dropped=reason, fleet=parts[0], device=parts[1], detail=detail))
        full = reason is not None
        if full:
            if msg.qos > 0:
                self.client.ack(msg.mid, msg.qos)  # refused and counted: the broker must not hold it in flight
            return
        self.received.put(_Received(self.generation, msg.mid, msg.qos, msg.topic, msg.payload, now_ms(), msg.retain))

    def _publish_alert(self, fleet: str, event: dict[str, Any]) -> None:
        self.client.publish(protocol.alert_topic(fleet), json.dumps(event), qos=1)

    # ---- ingest ----------------------------------------------------------------------------------

    def _next_batch(self) -> list[_Received]:
        try:
            first = self.received.get(timeout=0.2)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self.config.batch_wait_s
        while len(batch) < self.config.batch_size:
            remaining = deadline - time.monotonic()
            try:
                batch.append(self.received.get(timeout=remaining) if remaining > 0 else self.received.get_nowait())
            except queue.Empty:
                break
        with self._queue_lock:
            for r in batch:
                size = len(r.payload) + len(r.topic)
                self.queued_bytes -= size
                parts = protocol.parse_topic(r.topic)
                held = self.queued_by_device.get((parts[0], parts[1])) if parts else None
                if held is not None:
                    held[0] -= 1
                    held[1] -= size
                    if held[0] <= 0:
                        del self.queued_by_device[(parts[0], parts[1])]
        return batch

    def _store(self, items: list[Incoming]) -> bool:
        """Store a batch, retrying while the database is unreachable; False when stopped first."""
        delay = 1.0
        while True:
            try:
                listener = None if self.config.ingest_only else self.view
                self.stored_here += self.store.ingest(items, listener=listener).stored
                return True
            except OperationalError as e:
                log.error("cannot write to the store (%s); retrying in %.0f s", str(e.orig).strip().splitlines()[0], delay)
            except DBAPIError as e:
                if len(items) == 1:
                    why = str(e.orig).strip().splitlines()[0]
                    log.error("a message from %s could not be stored (%s); dropped", items[0].message.device
                              if items[0].message else "?", why)
                    items = [items[0].refused("unstorable", why[:200])]
                    continue
                # One message the database refuses must not hold up the rest: store them one by one.
                return all(self._store([item]) for item in items)
            except Exception as e:  # noqa: BLE001 (a message that breaks processing costs only itself)
                if len(items) == 1:
                    if items[0].message is None:
                        raise  # a batch of nothing but refusals: the store itself is broken
                    log.exception("a %s from %s could not be processed; dropped", items[0].message.kind,
                                  items[0].message.device)
                    items = [items[0].refused("unprocessable", f"{type(e).__name__}: {str(e)[:200]}")]
                    continue
                return all(self._store([item]) for item in items)
            if self.stop_event.wait(delay):
                return False
            delay = min(delay * 2, 30.0)

    def _ingest(self, batch: list[_Received]) -> bool:
        items = [classify(r.topic, r.payload, r.received_ms, r.retained) for r in batch]
        with self._queue_lock:
            items += self.queue_refused
            self.queue_refused = []
        if not self._store([i for i in items if i is not None]):
            return False  # not acknowledged: the broker delivers them again in the next session
        for r in batch:
            if r.qos > 0 and r.generation == self.generation:
                self.client.ack(r.mid, r.qos)
        return True

    def _ingest_loop(self) -> None:
        while not self.stop_event.is_set():
            batch = self._next_batch()
            if len(batch) >= self.config.batch_size:  # a backlog: the devices are not silent, we are behind
                self.view.listening_since_ms = now_ms()
            if batch and not self._ingest(batch):
                return
        # Stopping: store and acknowledge what has arrived so far; anything later stays queued at
        # the broker for the next session.
        left = self.received.qsize()
        while left > 0 and not self.fatal:
            batch = []
            while len(batch) < min(left, self.config.batch_size):
                batch.append(self.received.get_nowait())
            left -= len(batch)
            if not self._ingest(batch):
                return

    # ---- evaluation --------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The whole fleet as the HTTP side shows it; built on request, at most once per tick. Only the
        view's part is read under the view lock: the store's reads (alerts, deployments, shadows, retrain
        requests) run outside it, so a dashboard or API request never stalls alert evaluation."""
        from edgesmith.toolchain.fleet.store import retrain, shadows

        with self._snapshot_lock:  # one builder at a time; the others take what it built
            with self._view_lock:
                at = now_ms()
                if self._snapshot is not None and at - self._snapshot["generated_ms"] < self.config.tick_s * 1000:
                    return self._snapshot
                snap = self.view.snapshot(at)
                bad_rows = self.view.bad_rows
                generation = self._view_generation
            snap["alerts"] = self.store.alerts()
            snap["deployments"], snap["deploy_states"] = self._deployments()
            snap["shadows"] = shadows.panel(self.store)
            snap["retrain"] = retrain.requests(self.store, limit=RETRAIN_SHOWN)
            refusals = self.store.refusals()
            for d in snap["devices"]:
                d["refused"] = refusals.pop((d["fleet"], d["device"]), None)
            snap["refused_devices"] = [{"fleet": f, "device": dev, "refused": r}
                                       for (f, dev), r in sorted(refusals.items())]
            snap["monitor"] = {"counters": self.store.counters(), "connected": self.connected,
                               "client_id": self.config.mqtt_client_id, "subscription": self.config.subscription,
                               "queued": self.received.qsize(), "queued_bytes": self.queued_bytes,
                               "bad_rows": bad_rows, "stored_here": self.stored_here,
                               "thresholds": asdict(self.config.thresholds)}
            with self._view_lock:
                if self._view_generation == generation:  # else a tick ran meanwhile: the next request rebuilds
                    self._snapshot = snap
            return snap

    def _deployments(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Recent deployments and each device's deployment state (written by `edgesmith deploy` and ingest)."""
        from edgesmith.toolchain.fleet.status import deploy_info
        from edgesmith.toolchain.fleet.store import deployments as history

        states = history.device_states(self.store)
        rows = [{"fleet": fleet, "device": device, "deploy": deploy_info(entry)}
                for (fleet, device), entry in sorted(states.items())]
        return history.deployments_list(self.store, None, 10), [r for r in rows if r["deploy"]]

    def evaluate(self) -> None:
        """One tick: follow the store, judge the devices that changed, keep the charts' history."""
        with self._view_lock:
            self.view.refresh()
            at = now_ms()
            if not self.connected:  # while we hear nothing, nobody is silent
                self.view.listening_since_ms = at
            changed = self.view.take_changed(at)
            if at - self._last_history_ms >= self.config.interval_s * 1000:
                self.view.record_history(at)
                self._last_history_ms = at
            self._snapshot = None
            self._view_generation += 1
        self.alerts.evaluate(changed, at)

    def _collect_garbage(self, at: float) -> None:
        if at - self._gc_full_at >= GC_FULL_EVERY_S:
            gc.unfreeze()
            gc.collect()
            self._gc_full_at = at
        if at - self._gc_frozen_at >= GC_FREEZE_EVERY_S:
            gc.freeze()
            self._gc_frozen_at = at

    def _evaluate_loop(self) -> None:
        while not self.stop_event.wait(self.config.tick_s):
            self._collect_garbage(time.monotonic())
            if self.config.ingest_only:
                continue
            try:
                started = time.perf_counter()
                self.evaluate()
                log.debug("evaluated in %.0f ms", (time.perf_counter() - started) * 1000)
            except OperationalError as e:
                log.error("cannot read the store (%s); the view is not updated", str(e.orig).strip().splitlines()[0])
            except Exception:  # noqa: BLE001 (the evaluator must outlive any bug a device's data finds)
                log.exception("evaluating the fleet failed; trying again next tick")

    def prune(self) -> dict[str, int]:
        """Delete what is older than the retention, in short transactions (Store.prune)."""
        before = now_ms() - int(self.config.retention_s * 1000)
        deleted = self.store.prune(before, between=lambda: self.stop_event.wait(PRUNE_PAUSE_S))
        if any(deleted.values()):
            log.info("retention: deleted %d window(s), %d message(s) and %d session(s) older than %g day(s)",
                     deleted["windows"], deleted["messages"], deleted["sessions"], self.config.retention_s / 86400)
        return deleted

    def _prune_loop(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.prune()
            except OperationalError as e:
                log.error("cannot prune the store (%s); trying again later", str(e.orig).strip().splitlines()[0])
            except Exception:  # noqa: BLE001 (retention must not stop the monitor)
                log.exception("pruning the store failed; trying again later")
            if self.stop_event.wait(PRUNE_EVERY_S):
                return

    # ---- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        if self.config.ingest_only:
            self.store_was_empty = self.store.batch() == 0
            log.info("store %s; ingest only (the dashboard, metrics and alerts are the full monitor's)",
                     self.store.engine.url.render_as_string())
        else:
            self.view.load()
            self.store_was_empty = not self.view.devices
            self.evaluate()
            self.http = HttpServer(self.config.http_host, self.config.http_port, self.snapshot,
                                   asdict(self.config.thresholds))
            self.http.start()
            host, port = self.http.address
            log.info("store %s; dashboard http://%s:%d/ (metrics /metrics, JSON /api/fleet)",
                     self.store.engine.url.render_as_string(), host, port)
        s = self.broker_settings
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        # Batches are acknowledged after they are stored: let the broker keep a few batches in flight.
        props.ReceiveMaximum = min(65535, 4 * self.config.batch_size)
        self.client.connect_async(s.host, s.port, keepalive=KEEPALIVE_S, clean_start=False, properties=props)
        self.client.loop_start()

    def run(self) -> None:
        """Run until SIGINT/SIGTERM (or a fatal broker error); stops cleanly, the session kept."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.stop_event.set())
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self.start()
        gc.freeze()  # what start() loaded from the store
        self._gc_frozen_at = self._gc_full_at = time.monotonic()
        evaluator = threading.Thread(target=self._evaluate_loop, name="evaluate", daemon=True)
        evaluator.start()
        if self.config.retention_s and not self.config.ingest_only:  # the full monitor prunes, its workers do not
            threading.Thread(target=self._prune_loop, name="prune", daemon=True).start()
        try:
            self._ingest_loop()
        finally:
            self.stop_event.set()
            self.close()
            evaluator.join(timeout=10)
        if self.fatal:
            raise UserError(self.fatal)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self.notifier.close()
        if self.http is not None:
            self.http.stop()
        self.store.engine.dispose()
        log.info("monitor stopped")
