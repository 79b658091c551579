"""Telemetry ingest: what devices send, stored one batch per transaction.

Tables: ``devices`` (one row per device: its current session, presence, sequence bookkeeping,
cumulative counts and the last window's latency), ``sessions`` (one row per birth/death bdSeq),
``windows`` (every telemetry window), ``messages`` (events, states and deaths, as received) and
``device_refusals`` (messages refused per device and reason); ingest's counts go in ``counters``
(engine.py), with the batch number.

Ingest is one transaction per batch. It starts by incrementing the ``batch`` counter, which takes
that row's write lock: batches from several monitors (a shared subscription onto one database)
are serialised and numbered in commit order, so each sees the others' sequence bookkeeping and
readers can follow new rows by batch number without missing any.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import TypeAdapter
from sqlalchemy import BigInteger, Boolean, Column, Float, Index, String, Table, Text, bindparam, select, update
from sqlalchemy.engine import Connection, Engine

from edgesmith.runtime import contract
from edgesmith.runtime.contract import MessageKind as K
from edgesmith.toolchain.fleet import protocol
from edgesmith.toolchain.fleet.budget import (DEFAULT_BYTES_PER_DAY, DEFAULT_RETENTION_DAYS,  # noqa: F401 (re-exported)
                                               DEFAULT_WINDOWS_PER_DAY, PRUNE_ROWS, DeviceBudget)
from edgesmith.toolchain.fleet.sequence import SeqTracker
from edgesmith.toolchain.fleet.store.engine import IN_CHUNK, RowId, StoreBase, counters, metadata, now_ms

INT64_MAX = 2**63 - 1

SILENT_INTERVALS = 3  # a device is silent (offline) after this many of its intervals without a message
# Why a message was refused (each counted in `counters` as dropped.<reason>, and per device in
# `device_refusals` when its topic names one): not JSON; over the payload limit; JSON but not in the
# contract; a device speaking for another; not a device topic; refused by the database; failed in
# processing (a bug, isolated to its message); the monitor's queue was full; the device held more
# than its share of a queue over half full; from a spool epoch the device has since replaced; a window
# past the device's daily budget (DeviceBudget).
DROP_REASONS = ("malformed", "oversized", "invalid", "topic_mismatch", "unknown_topic", "unstorable", "unprocessable",
                "queue_full", "flooding", "stale_epoch", "over_budget")

DAY_MS = 86_400_000
# What a stored window costs beyond its JSON text columns (latency, outputs, layout, labels): its
# numeric columns, row header and three index entries. Measured (docs/telemetry.md, "Retention and
# budgets"): a window of 4 classes and the default 96 latency buckets takes 862 bytes in SQLite and
# 912 in PostgreSQL 15, of which ~525 are its texts.
WINDOW_ROW_BYTES = 380
def window_bytes(row: dict[str, Any]) -> int:
    """What a window row costs in the store, as the budget counts it."""
    return WINDOW_ROW_BYTES + sum(len(row[c]) for c in ("latency", "outputs", "latency_layout", "model",
                                                          "model_version", "target") if row[c])

log = logging.getLogger("edgesmith.fleet.store")

devices = Table(
    "devices", metadata,
    Column("fleet", String(64), primary_key=True),
    Column("device", String(64), primary_key=True),
    Column("bd_seq", BigInteger),  # the current session: the newest non-historical birth's bdSeq
    Column("session_open", Boolean, nullable=False),  # that birth came and its death did not
    Column("death_reason", String(32)),
    Column("interval_s", Float),
    Column("artifact", Text), Column("model", Text), Column("model_version", Text), Column("target", Text),
    Column("backend", Text), Column("manifest_sha256", String(64)), Column("build_latency_us", Float),
    Column("birth", Text),  # the current birth message (JSON): metric schema, runtime, artifact
    Column("seq_state", Text),  # SeqTracker as JSON
    Column("gaps", BigInteger, nullable=False),
    Column("messages", BigInteger, nullable=False),
    Column("duplicates", BigInteger, nullable=False),
    Column("runs", BigInteger, nullable=False),
    Column("errors", BigInteger, nullable=False),
    Column("first_seen_ms", BigInteger, nullable=False),
    Column("last_seen_ms", BigInteger, nullable=False),
    Column("last_window_end_ms", BigInteger),
    Column("p50_us", Float), Column("p95_us", Float), Column("p99_us", Float),
    Column("batch", BigInteger, nullable=False, index=True),
    # The device's budget (DeviceBudget): the UTC day (days since 1970) and what it stored that day.
    Column("budget_day", BigInteger), Column("budget_windows", BigInteger), Column("budget_bytes", BigInteger),
)

sessions = Table(
    "sessions", metadata,
    Column("fleet", String(64), primary_key=True),
    Column("device", String(64), primary_key=True),
    Column("bd_seq", BigInteger, primary_key=True, autoincrement=False),
    Column("birth_seq", BigInteger),
    Column("birth_ts_ms", BigInteger),
    Column("historical", Boolean),
    Column("birth", Text),  # null when only the death was seen
    Column("death_reason", String(32)),
    Column("death_received_ms", BigInteger),
    Column("received_ms", BigInteger, nullable=False),
    Column("batch", BigInteger, nullable=False),
)

windows = Table(
    "windows", metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("batch", BigInteger, nullable=False, index=True),
    Column("fleet", String(64), nullable=False),
    Column("device", String(64), nullable=False),
    Column("bd_seq", BigInteger, nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("historical", Boolean, nullable=False),
    Column("ts_ms", BigInteger, nullable=False),  # device clock, when it made the message
    Column("received_ms", BigInteger, nullable=False),  # monitor clock
    Column("stored_ms", BigInteger, nullable=False),  # monitor clock, when its batch was written
    Column("window_start_ms", BigInteger, nullable=False),
    Column("window_end_ms", BigInteger, nullable=False),
    Column("artifact_sha256", String(64), nullable=False),
    Column("model", Text), Column("model_version", Text), Column("target", Text),
    Column("runs", BigInteger, nullable=False),
    Column("errors", BigInteger, nullable=False),
    Column("nan_input_runs", BigInteger, nullable=False),
    Column("p50_us", Float), Column("p95_us", Float), Column("p99_us", Float),
    Column("latency", Text, nullable=False),  # the window's LatencyWindow (JSON)
    Column("latency_layout", Text),  # its session's bucket layout, [start_us, factor, count] (JSON); null if unknown
    Column("outputs", Text, nullable=False),  # {name: OutputWindow} (JSON)
    Column("rss_bytes", BigInteger), Column("cpu_percent", Float), Column("temperature_c", Float),
    Column("spool_queued", BigInteger), Column("spool_dropped_total", BigInteger),
    Index("ix_windows_device_seq", "fleet", "device", "seq"),
    Index("ix_windows_received", "received_ms"),
)

messages = Table(
    "messages", metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("batch", BigInteger, nullable=False, index=True),
    Column("fleet", String(64), nullable=False),
    Column("device", String(64), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("bd_seq", BigInteger, nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("historical", Boolean, nullable=False),
    Column("ts_ms", BigInteger, nullable=False),
    Column("received_ms", BigInteger, nullable=False),
    Column("payload", Text, nullable=False),
    Index("ix_messages_device_seq", "fleet", "device", "seq"),
)

device_refusals = Table(  # messages refused per device and reason: the device is marked, never the monitor
    "device_refusals", metadata,
    Column("fleet", String(64), primary_key=True),
    Column("device", String(64), primary_key=True),
    Column("reason", String(32), primary_key=True),
    Column("count", BigInteger, nullable=False),
    Column("last_ms", BigInteger, nullable=False),
    Column("detail", Text),  # what was wrong with the last one (one line)
)

# What any stored message may change in its device's row; the rest changes with a birth or a death.
_HOT_COLUMNS = ("seq_state", "gaps", "messages", "duplicates", "runs", "errors", "last_seen_ms", "last_window_end_ms",
                "p50_us", "p95_us", "p99_us", "batch", "budget_day", "budget_windows", "budget_bytes")
_OUTPUTS = TypeAdapter(dict[str, protocol.OutputWindow])
_DEVICE_COLUMNS = [c.name for c in devices.columns]


def is_silent(last_seen_ms: int, interval_s: float | None, at_ms: int, default_interval_s: float) -> bool:
    """Nothing from the device for SILENT_INTERVALS of its telemetry interval."""
    return at_ms - last_seen_ms > SILENT_INTERVALS * (interval_s or default_interval_s) * 1000


@dataclass
class Incoming:
    """One MQTT message after validation: a device message, or the reason it was refused."""

    received_ms: int
    message: protocol.Birth | protocol.Death | protocol.Telemetry | protocol.Event | protocol.State | None = None
    dropped: str | None = None
    retained: bool = False  # delivered because it is retained (a birth or death the broker keeps), not as news
    # A refused message's device, as its topic names it (None when the topic names none), and why.
    fleet: str | None = None
    device: str | None = None
    detail: str | None = None

    def refused(self, reason: str, detail: str | None = None) -> Incoming:
        """This message, refused: counted under ``reason`` and against its device."""
        who = (self.message.fleet, self.message.device) if self.message is not None else (self.fleet, self.device)
        return Incoming(self.received_ms, dropped=reason, fleet=who[0], device=who[1], detail=detail)


@dataclass
class BatchResult:
    batch: int
    stored: int = 0
    duplicates: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    refusals: dict[tuple[str, str, str], list[Any]] = field(default_factory=dict)  # (fleet, device, reason): [n, ms, detail]
    reimaged: list[tuple[str, str]] = field(default_factory=list)
    devices: list[dict[str, Any]] = field(default_factory=list)  # the device rows as committed
    windows: list[tuple[dict[str, Any], protocol.Telemetry]] = field(default_factory=list)  # rows as committed, and their messages


class BatchListener(Protocol):
    """Told about each ingest batch (the monitor's view, so it need not read its own writes back)."""

    def batch_started(self, batch: int) -> None: ...
    def batch_committed(self, result: BatchResult) -> None: ...
    def batch_abandoned(self, batch: int) -> None: ...


@dataclass
class _Device:
    """A device row being updated inside an ingest transaction."""

    row: dict[str, Any]
    tracker: SeqTracker
    is_new: bool
    presence_changed: bool = False  # a birth or death: the whole row is written, not only _HOT_COLUMNS

    @classmethod
    def new(cls, fleet: str, device: str, received_ms: int) -> _Device:
        row = {c.name: None for c in devices.columns}
        row.update(fleet=fleet, device=device, session_open=False, gaps=0, messages=0, duplicates=0, runs=0,
                   errors=0, first_seen_ms=received_ms, last_seen_ms=received_ms)
        return cls(row=row, tracker=SeqTracker(), is_new=True)


def _session_labels(birth: protocol.Birth) -> dict[str, Any]:
    a = birth.artifact
    return {"artifact": a.name, "model": a.model, "model_version": a.model_version, "target": a.target,
            "backend": a.backend, "manifest_sha256": a.manifest_sha256}


BIRTH_INFO_CACHED = 4096
# Keyed on the birth's digest, not its text: a device may send thousands of distinct births of up to
# MAX_PAYLOAD_BYTES, and a cache holding their texts would keep a gigabyte of them.
_birth_infos: OrderedDict[bytes, tuple[dict[str, Any], str | None, str | None]] = OrderedDict()
_birth_infos_lock = threading.Lock()


def _birth_info(birth_json: str | None) -> tuple[dict[str, Any], str | None, str | None]:
    """Labels, latency layout (JSON) and manifest digest of a stored birth (cached: every window asks)."""
    if not birth_json:
        return {}, None, None
    key = hashlib.blake2b(birth_json.encode(), digest_size=16).digest()
    with _birth_infos_lock:
        info = _birth_infos.get(key)
        if info is not None:
            _birth_infos.move_to_end(key)
            return info
    birth = json.loads(birth_json)
    a, lat = birth["artifact"], birth["metrics"]["latency"]
    labels = {"model": a["model"], "model_version": a["model_version"], "target": a["target"]}
    info = labels, json.dumps([lat["start_us"], lat["factor"], lat["count"]]), a["manifest_sha256"]
    with _birth_infos_lock:
        _birth_infos[key] = info
        while len(_birth_infos) > BIRTH_INFO_CACHED:
            _birth_infos.popitem(last=False)
    return info


class IngestStore(StoreBase):
    """The Store's ingest and its reads of what devices sent."""

    COUNTERS = (*StoreBase.COUNTERS, "batch", "stored", "duplicates", "reimaged", "pruned",
                *(f"dropped.{r}" for r in DROP_REASONS))

    def __init__(self, engine: Engine):
        super().__init__(engine)
        self.budget = DeviceBudget()  # the monitor sets its own
        self._over_budget_logged: dict[tuple[str, str], int] = {}
        # Device rows as this process last committed them. A row is reused while its `batch` in
        # the store is still the one it was written in (another monitor sharing the store would
        # have changed it); this saves reading every device's birth back on every batch.
        self._rows: dict[tuple[str, str], tuple[dict[str, Any], SeqTracker]] = {}
        self._numbered: int | None = None  # the batch number of the ingest transaction under way
        # The number of this process's last committed batch: when the next one is numbered right
        # after it, nobody else wrote in between and every cached row is still what the store holds.
        self._committed: int | None = None
        self._driver_sql: dict[str, tuple[str, tuple[str, ...] | None]] = {}

    # ---- ingest ------------------------------------------------------------------------------------

    def ingest(self, items: Sequence[Incoming], stored_ms: int | None = None,
               listener: BatchListener | None = None) -> BatchResult:
        """Store one batch in one transaction: duplicates dropped, gaps counted, presence updated."""
        stored_ms = stored_ms if stored_ms is not None else now_ms()
        self._numbered = None
        try:
            with self.engine.begin() as conn:
                result, state = self._ingest(conn, items, stored_ms, listener)
        except BaseException:
            if listener is not None and self._numbered is not None:
                listener.batch_abandoned(self._numbered)  # rolled back: the number will be given out again
            raise
        for key, dev in state.items():  # committed: these rows are what the store holds now
            self._rows[key] = (dev.row, dev.tracker)
        self._committed = result.batch
        result.devices = [dev.row for dev in state.values()]
        if listener is not None:
            listener.batch_committed(result)
        return result

    def _next_batch(self, conn: Connection) -> int:
        conn.execute(update(counters).where(counters.c.name == "batch").values(value=counters.c.value + 1))
        return int(conn.scalar(select(counters.c.value).where(counters.c.name == "batch")))

    def _load_devices(self, conn: Connection, keys: set[tuple[str, str]], batch: int) -> dict[tuple[str, str], _Device]:
        found: dict[tuple[str, str], _Device] = {}
        stale: list[str] = []
        if self._committed is not None and batch == self._committed + 1:
            # Nobody else wrote since our last batch: the cache is the store; read only what it lacks.
            for key in keys:
                cached = self._rows.get(key)
                if cached is not None:
                    found[key] = _Device(row=dict(cached[0]), tracker=cached[1].copy(), is_new=False)
            keys = keys - found.keys()
        names = sorted({device for _, device in keys})
        for i in range(0, len(names), IN_CHUNK):
            query = select(devices.c.fleet, devices.c.device, devices.c.batch).where(devices.c.device.in_(names[i:i + IN_CHUNK]))
            for fleet, device, batch in conn.execute(query):
                cached = self._rows.get((fleet, device))
                if (fleet, device) not in keys:
                    continue
                if cached is not None and cached[0]["batch"] == batch:
                    found[(fleet, device)] = _Device(row=dict(cached[0]), tracker=cached[1].copy(), is_new=False)
                else:
                    stale.append(device)
        for i in range(0, len(stale), IN_CHUNK):
            for row in conn.execute(select(devices).where(devices.c.device.in_(stale[i:i + IN_CHUNK]))).mappings():
                key = (row["fleet"], row["device"])
                if key in keys:
                    found[key] = _Device(row=dict(row), tracker=SeqTracker.from_json(row["seq_state"]), is_new=False)
        return found

    def _load_sessions(self, conn: Connection, wanted: set[tuple[str, str, int]]) -> dict[tuple[str, str, int], dict[str, Any]]:
        found: dict[tuple[str, str, int], dict[str, Any]] = {}
        names = sorted({device for _, device, _ in wanted})
        for i in range(0, len(names), IN_CHUNK):
            query = select(sessions).where(sessions.c.device.in_(names[i:i + IN_CHUNK]),
                                           sessions.c.bd_seq.in_(sorted({bd for _, _, bd in wanted})))
            for row in conn.execute(query).mappings():
                key = (row["fleet"], row["device"], row["bd_seq"])
                if key in wanted:
                    found[key] = dict(row)
        return found

    def _ingest(self, conn: Connection, items: Sequence[Incoming], stored_ms: int,
                listener: BatchListener | None) -> tuple[BatchResult, dict[tuple[str, str], _Device]]:
        batch = self._numbered = self._next_batch(conn)
        if listener is not None:
            listener.batch_started(batch)
        result = BatchResult(batch=batch)
        result.dropped.update(i.dropped for i in items if i.dropped)
        for i in items:
            if i.dropped and i.fleet and i.device:
                entry = result.refusals.setdefault((i.fleet, i.device, i.dropped), [0, 0, None])
                entry[0] += 1
                entry[1] = max(entry[1], i.received_ms)
                entry[2] = i.detail or entry[2]
        accepted = [i for i in items if i.message is not None]
        state = self._load_devices(conn, {(i.message.fleet, i.message.device) for i in accepted}, batch)
        current = {key: dev.row["bd_seq"] for key, dev in state.items()}
        # Sessions to look at: births' and deaths' own, and those of windows from an older session.
        wanted = {(m.fleet, m.device, m.bdSeq) for m in (i.message for i in accepted)
                  if m.kind in (K.BIRTH, K.DEATH) or (m.kind == K.TELEMETRY and current.get((m.fleet, m.device)) != m.bdSeq)}
        known_sessions = self._load_sessions(conn, wanted)
        new_sessions: dict[tuple[str, str, int], dict[str, Any]] = {}
        changed_sessions: dict[tuple[str, str, int], dict[str, Any]] = {}
        window_rows: list[dict[str, Any]] = []
        message_rows: list[dict[str, Any]] = []
        reports: list[tuple[Incoming, Any]] = []

        def session(key: tuple[str, str, int]) -> dict[str, Any] | None:
            return new_sessions.get(key) or known_sessions.get(key)

        purged: set[tuple[str, str]] = set()  # devices re-imaged in this batch: their old sessions go
        for item in accepted:
            msg = item.message
            key = (msg.fleet, msg.device)
            dev = state.get(key)
            if dev is None:
                dev = state[key] = _Device.new(msg.fleet, msg.device, item.received_ms)
            row = dev.row
            row["last_seen_ms"] = max(row["last_seen_ms"], item.received_ms)
            skey = (msg.fleet, msg.device, msg.bdSeq)
            if dev.tracker.epoch is None:
                dev.tracker.epoch = msg.epoch
            elif msg.epoch != dev.tracker.epoch:
                if msg.epoch in dev.tracker.retired:  # late, from before the device's re-image
                    self._refuse(result, item, "stale_epoch", f"a {msg.kind} of spool epoch {msg.epoch}, since "
                                                              f"replaced by {dev.tracker.epoch}")
                    continue
                message_rows.append(self._reimaged(batch, item, msg, dev))
                result.reimaged.append(key)
                purged.add(key)
                for table in (known_sessions, new_sessions, changed_sessions):
                    for k in [k for k in table if k[:2] == key]:
                        del table[k]

            if msg.kind == K.DEATH:
                # A death repeats its birth's seq: it is deduplicated by its session, not by seq.
                sess = session(skey)
                if sess is not None and sess["death_reason"] is not None:
                    self._duplicate(row, item, result)
                    continue
                if sess is None:
                    sess = new_sessions[skey] = {"fleet": msg.fleet, "device": msg.device, "bd_seq": msg.bdSeq,
                                                 "birth_seq": None, "birth_ts_ms": None, "historical": None,
                                                 "birth": None, "received_ms": item.received_ms, "batch": batch}
                elif skey not in new_sessions:
                    changed_sessions[skey] = sess
                sess.update(death_reason=msg.reason, death_received_ms=item.received_ms, batch=batch)
                if not msg.historical and row["bd_seq"] == msg.bdSeq and row["session_open"]:
                    row["session_open"] = False
                    row["death_reason"] = msg.reason
                    dev.presence_changed = True
                message_rows.append(self._message_row(batch, item, msg))
            else:
                stored_birth = session(skey) or {}
                # This session's birth is stored already; a later one (higher seq) in the same session
                # is a device announcing a new artifact after a deployment switched it (deployment.md §5).
                if msg.kind == K.BIRTH and stored_birth.get("birth") is not None \
                        and msg.seq <= (stored_birth.get("birth_seq") or 0):
                    self._duplicate(row, item, result)
                    continue
                # A retained birth is the broker's memory of the device's state, not part of its
                # stream (a monitor subscribing late gets it long after): it does not take part in
                # the sequence bookkeeping, or everything the device sent since would count as gaps.
                if not (msg.kind == K.BIRTH and item.retained) and not dev.tracker.accept(msg.seq):
                    self._duplicate(row, item, result)
                    continue
                if msg.kind == K.BIRTH:
                    dev.presence_changed |= self._birth(batch, item, msg, row, skey, session(skey), new_sessions,
                                                        changed_sessions)
                elif msg.kind == K.TELEMETRY:
                    window = self._window(batch, item, msg, row, session(skey), stored_ms)
                    if not self._within_budget(row, window, item.received_ms):
                        self._refuse(result, item, "over_budget",
                                     f"the device stored {row['budget_windows']} windows ({row['budget_bytes']} bytes) "
                                     f"today, over its budget of {self.budget.windows_per_day} windows or "
                                     f"{self.budget.bytes_per_day} bytes a day (fleet monitor --device-windows-per-day, "
                                     "--device-mb-per-day); its windows are stored again from 00:00 UTC")
                        continue
                    self._count_window(row, msg)
                    window_rows.append(window)
                    result.windows.append((window, msg))
                else:
                    message_rows.append(self._message_row(batch, item, msg))
                    if msg.kind in (K.STATE, K.EVENT, K.SHADOW):
                        reports.append((item, msg))
            row["messages"] += 1
            result.stored += 1

        if purged:
            for fleet, device in purged:
                conn.execute(sessions.delete().where(sessions.c.fleet == fleet, sessions.c.device == device))
        for dev in state.values():
            dev.row["seq_state"] = dev.tracker.to_json()
            dev.row["gaps"] = dev.tracker.gaps
            dev.row["batch"] = batch
        self._write(conn, state, new_sessions, changed_sessions, window_rows, message_rows, result)
        self._record_reports(conn, reports)
        return result, state

    def _record_reports(self, conn: Connection, reports: list[tuple[Incoming, Any]]) -> None:
        """Inside the batch's transaction, after its rows are written: the state, event and shadow
        messages it stored, for what they report beyond telemetry (Store records deployments and
        shadows from them)."""

    @staticmethod
    def _reimaged(batch: int, item: Incoming, msg: Any, dev: _Device) -> dict[str, Any]:
        """A device's spool epoch changed (re-imaged, or its spool.db recreated): its seq and bdSeq
        start over, so its sequence bookkeeping and sessions do too; recorded as a monitor event."""
        old = dev.tracker
        log.warning("device %s/%s started spool epoch %s (was %s, up to seq %s): re-imaged or its spool was "
                    "recreated; its sequence numbers start over", msg.fleet, msg.device, msg.epoch, old.epoch,
                    old.highest)
        event = contract.Event(
            fleet=msg.fleet, device=msg.device, epoch=msg.epoch, bdSeq=msg.bdSeq, seq=0, ts_ms=item.received_ms,
            event=contract.EventKind.REIMAGED, message=f"device {msg.device} started a new spool epoch {msg.epoch} "
            f"(was {old.epoch}): it was re-imaged or its spool was recreated, and its sequence numbers start over",
            details={"previous_epoch": old.epoch, "previous_highest_seq": old.highest, "recorded_by": "monitor"})
        dev.tracker = old.restarted(msg.epoch)
        dev.row.update(bd_seq=None, session_open=False, death_reason=None)
        dev.presence_changed = True
        return {"batch": batch, "fleet": msg.fleet, "device": msg.device, "kind": event.kind.value,
                "bd_seq": msg.bdSeq, "seq": 0, "historical": False, "ts_ms": item.received_ms,
                "received_ms": item.received_ms, "payload": event.model_dump_json()}

    @staticmethod
    def _refuse(result: BatchResult, item: Incoming, reason: str, detail: str) -> None:
        """A message valid in itself that ingest refuses: counted under ``reason`` and against its device."""
        msg = item.message
        result.dropped[reason] += 1
        entry = result.refusals.setdefault((msg.fleet, msg.device, reason), [0, 0, None])
        entry[0], entry[1], entry[2] = entry[0] + 1, max(entry[1], item.received_ms), detail

    def _within_budget(self, row: dict[str, Any], window: dict[str, Any], received_ms: int) -> bool:
        """Count a window against its device's budget for the day; False (not counted) past it."""
        day = received_ms // DAY_MS
        if row["budget_day"] != day:
            row.update(budget_day=day, budget_windows=0, budget_bytes=0)
        windows, cost = row["budget_windows"] + 1, row["budget_bytes"] + window_bytes(window)
        if self.budget.over(windows, cost):
            if self._over_budget_logged.get((row["fleet"], row["device"])) != day:  # once a device and day
                self._over_budget_logged[(row["fleet"], row["device"])] = day
                log.warning("device %s/%s is over its budget for today (%d windows, %d bytes stored); its further "
                            "windows are refused until 00:00 UTC", row["fleet"], row["device"], row["budget_windows"],
                            row["budget_bytes"])
            return False
        row.update(budget_windows=windows, budget_bytes=cost)
        return True

    @staticmethod
    def _duplicate(row: dict[str, Any], item: Incoming, result: BatchResult) -> None:
        # A retained birth or death seen again (a new subscription) is the broker's memory, not a
        # second delivery: dropped, but not counted.
        if not item.retained:
            row["duplicates"] += 1
            result.duplicates += 1

    @staticmethod
    def _message_row(batch: int, item: Incoming, msg: Any) -> dict[str, Any]:
        return {"batch": batch, "fleet": msg.fleet, "device": msg.device, "kind": msg.kind, "bd_seq": msg.bdSeq,
                "seq": msg.seq, "historical": msg.historical, "ts_ms": msg.ts_ms, "received_ms": item.received_ms,
                "payload": msg.model_dump_json()}

    @staticmethod
    def _birth(batch: int, item: Incoming, msg: protocol.Birth, row: dict[str, Any], skey: tuple[str, str, int],
               sess: dict[str, Any] | None, new_sessions: dict, changed_sessions: dict) -> bool:
        """Record a birth; True when it became the device's current session."""
        birth_json = msg.model_dump_json()
        values = {"birth_seq": msg.seq, "birth_ts_ms": msg.ts_ms, "historical": msg.historical, "birth": birth_json,
                  "batch": batch}
        if sess is None:
            new_sessions[skey] = {"fleet": msg.fleet, "device": msg.device, "bd_seq": msg.bdSeq, "death_reason": None,
                                  "death_received_ms": None, "received_ms": item.received_ms, **values}
            died = False
        else:
            sess.update(values)
            if skey not in new_sessions:
                changed_sessions[skey] = sess
            died = sess["death_reason"] is not None  # its death overtook it
        # A replayed (historical) birth, or one from an older session, never changes presence.
        if msg.historical or (row["bd_seq"] is not None and msg.bdSeq < row["bd_seq"]):
            return False
        row.update(_session_labels(msg), bd_seq=msg.bdSeq, session_open=not died, death_reason=None, birth=birth_json,
                   interval_s=msg.metrics.interval_s, build_latency_us=msg.metrics.build_latency_us)
        return True

    @staticmethod
    def _window(batch: int, item: Incoming, msg: protocol.Telemetry, row: dict[str, Any],
                sess: dict[str, Any] | None, stored_ms: int) -> dict[str, Any]:
        # Labels and latency layout come from the window's own session (it may be replayed from an
        # older one), else from the current birth when it is the same artifact.
        if sess is not None and sess["birth"]:
            birth_json = sess["birth"]
        elif row["bd_seq"] == msg.bdSeq or row["manifest_sha256"] == msg.artifact_sha256:
            birth_json = row["birth"]
        else:
            birth_json = None
        labels, layout, sha = _birth_info(birth_json)
        if sha != msg.artifact_sha256:
            labels, layout = {}, None
        lat = msg.latency
        return {
            "batch": batch, "fleet": msg.fleet, "device": msg.device, "bd_seq": msg.bdSeq, "seq": msg.seq,
            "historical": msg.historical, "ts_ms": msg.ts_ms, "received_ms": item.received_ms, "stored_ms": stored_ms,
            "window_start_ms": msg.window_start_ms, "window_end_ms": msg.window_end_ms,
            "artifact_sha256": msg.artifact_sha256, "model": labels.get("model"),
            "model_version": labels.get("model_version"), "target": labels.get("target"),
            "runs": msg.runs, "errors": msg.errors, "nan_input_runs": msg.nan_input_runs,
            "p50_us": lat.p50_us, "p95_us": lat.p95_us, "p99_us": lat.p99_us,
            "latency": lat.model_dump_json(), "latency_layout": layout,
            "outputs": _OUTPUTS.dump_json(msg.outputs).decode(),
            "rss_bytes": msg.process.rss_bytes, "cpu_percent": msg.process.cpu_percent,
            "temperature_c": msg.temperature_c, "spool_queued": msg.spool.queued,
            "spool_dropped_total": msg.spool.dropped_total,
        }

    @staticmethod
    def _count_window(row: dict[str, Any], msg: protocol.Telemetry) -> None:
        """A stored window's part in its device's row: cumulative totals and the last window's latency."""
        lat = msg.latency
        # Cumulative totals saturate at the column's int64 bound (a window adds at most MAX_WINDOW_COUNT,
        # so only ~2^27 windows at that bound get here): an overflowing UPDATE would fail the whole batch.
        row["runs"] = min(row["runs"] + msg.runs, INT64_MAX)
        row["errors"] = min(row["errors"] + msg.errors, INT64_MAX)
        if row["last_window_end_ms"] is None or msg.window_end_ms >= row["last_window_end_ms"]:
            row.update(last_window_end_ms=msg.window_end_ms, p50_us=lat.p50_us, p95_us=lat.p95_us, p99_us=lat.p99_us)

    def _executemany(self, conn: Connection, name: str, statement: Any, rows: list[dict[str, Any]]) -> None:
        """``conn.execute(statement, rows)`` for the hot statements, at the driver: compiled once,
        rows passed as the driver takes them. Their values are plain ints, floats, strings, bools
        and None, which need none of SQLAlchemy's per-row type processing, and that processing
        was a tenth of the monitor's time."""
        cached = self._driver_sql.get(name)
        if cached is None:
            compiled = statement.compile(dialect=self.engine.dialect, column_keys=list(rows[0]))
            order = tuple(compiled.positiontup) if compiled.positional else None
            cached = self._driver_sql[name] = (str(compiled), order)
        sql, order = cached
        conn.exec_driver_sql(sql, [tuple(row[k] for k in order) for row in rows] if order is not None else rows)

    def _write(self, conn: Connection, state: dict[tuple[str, str], _Device], new_sessions: dict,
               changed_sessions: dict, window_rows: list, message_rows: list, result: BatchResult) -> None:
        if window_rows:
            self._executemany(conn, "windows", windows.insert(), window_rows)
        if message_rows:
            conn.execute(messages.insert(), message_rows)
        if new_sessions:
            conn.execute(sessions.insert(), list(new_sessions.values()))
        if changed_sessions:
            keyed = [{**{f"k_{k}": v for k, v in s.items() if k in ("fleet", "device", "bd_seq")},
                      **{k: v for k, v in s.items() if k not in ("fleet", "device", "bd_seq")}}
                     for s in changed_sessions.values()]
            conn.execute(update(sessions).where(sessions.c.fleet == bindparam("k_fleet"),
                                                sessions.c.device == bindparam("k_device"),
                                                sessions.c.bd_seq == bindparam("k_bd_seq")), keyed)
        inserts = [d.row for d in state.values() if d.is_new]
        if inserts:
            conn.execute(devices.insert(), inserts)
        for whole in (True, False):
            columns = [c for c in _DEVICE_COLUMNS if c not in ("fleet", "device")] if whole else _HOT_COLUMNS
            updates = [{"k_fleet": d.row["fleet"], "k_device": d.row["device"], **{c: d.row[c] for c in columns}}
                       for d in state.values() if not d.is_new and d.presence_changed == whole]
            if updates:
                self._executemany(conn, f"devices.{'whole' if whole else 'hot'}",
                                  update(devices).where(devices.c.fleet == bindparam("k_fleet"),
                                                        devices.c.device == bindparam("k_device")), updates)
        increments = {"stored": result.stored, "duplicates": result.duplicates, "reimaged": len(result.reimaged),
                      **{f"dropped.{reason}": n for reason, n in result.dropped.items()}}
        increments = [{"k_name": k, "delta": v} for k, v in increments.items() if v]
        if increments:
            conn.execute(update(counters).where(counters.c.name == bindparam("k_name"))
                         .values(value=counters.c.value + bindparam("delta")), increments)
        for (fleet, device, reason), (n, last_ms, detail) in result.refusals.items():
            where = (device_refusals.c.fleet == fleet, device_refusals.c.device == device,
                     device_refusals.c.reason == reason)
            values = {"last_ms": last_ms, "detail": detail[:500] if detail else None}
            if not conn.execute(update(device_refusals).where(*where).values(
                    count=device_refusals.c.count + n, **values)).rowcount:
                conn.execute(self._insert_ignore(device_refusals).values(fleet=fleet, device=device, reason=reason,
                                                                         count=n, **values))

    # ---- retention ---------------------------------------------------------------------------------

    def prune(self, before_ms: int, rows: int = PRUNE_ROWS, between: Callable[[], bool] | None = None) -> dict[str, int]:
        """Delete what arrived before ``before_ms`` (monitor clock): windows, messages (events,
        states, deaths) and sessions other than each device's current one. ``rows`` at a time, each
        in its own short transaction, so ingest (one writer at a time on SQLite) waits at most one
        of them; ``between`` runs after each and stops the prune when it returns True. What the
        view and alerts use is kept elsewhere: cumulative totals, presence and the last window in
        ``devices``, deployment results in the deployment tables, and the view's recent windows
        are younger than any retention the monitor accepts. Returns the rows deleted per table."""
        current = select(devices.c.bd_seq).where(devices.c.fleet == sessions.c.fleet,
                                                 devices.c.device == sessions.c.device).scalar_subquery()
        plans = [
            ("windows", windows, select(windows.c.id).where(windows.c.received_ms < before_ms).order_by(windows.c.id),
             lambda ids: windows.c.id.in_(ids)),
            # Ordered by id, which follows arrival: the scan stops at the first `rows` old ones.
            ("messages", messages, select(messages.c.id).where(messages.c.received_ms < before_ms).order_by(messages.c.id),
             lambda ids: messages.c.id.in_(ids)),
        ]
        deleted = {"windows": 0, "messages": 0, "sessions": 0}
        for name, table, query, where in plans:
            while True:
                with self.engine.begin() as conn:
                    ids = list(conn.scalars(query.limit(rows)))
                    if ids:
                        conn.execute(table.delete().where(where(ids)))
                        self._count_pruned(conn, len(ids))
                deleted[name] += len(ids)
                if len(ids) < rows:
                    break
                if between is not None and between():
                    return deleted
        old_sessions = (select(sessions.c.fleet, sessions.c.device, sessions.c.bd_seq)
                        .where(sessions.c.received_ms < before_ms,
                               sessions.c.death_received_ms.is_(None) | (sessions.c.death_received_ms < before_ms),
                               sessions.c.bd_seq.is_distinct_from(current)))
        while True:
            with self.engine.begin() as conn:
                keys = list(conn.execute(old_sessions.limit(rows)))
                for fleet, device, bd_seq in keys:
                    conn.execute(sessions.delete().where(sessions.c.fleet == fleet, sessions.c.device == device,
                                                         sessions.c.bd_seq == bd_seq))
                if keys:
                    self._count_pruned(conn, len(keys))
            deleted["sessions"] += len(keys)
            if len(keys) < rows or (between is not None and between()):
                return deleted

    @staticmethod
    def _count_pruned(conn: Connection, n: int) -> None:
        conn.execute(update(counters).where(counters.c.name == "pruned").values(value=counters.c.value + n))

    # ---- reads -------------------------------------------------------------------------------------

    def devices(self, since_batch: int | None = None, exclude_batches: Sequence[int] = ()) -> list[dict[str, Any]]:
        query = select(devices)
        if since_batch is not None:
            query = query.where(devices.c.batch > since_batch)
        if exclude_batches:
            query = query.where(devices.c.batch.not_in(list(exclude_batches)))
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(query.order_by(devices.c.fleet, devices.c.device)).mappings()]

    def windows(self, since_batch: int | None = None, received_after_ms: int | None = None,
                up_to_batch: int | None = None, columns: Sequence[str] | None = None,
                exclude_batches: Sequence[int] = ()) -> list[dict[str, Any]]:
        query = select(*(windows.c[name] for name in columns)) if columns else select(windows)
        if exclude_batches:
            query = query.where(windows.c.batch.not_in(list(exclude_batches)))
        if since_batch is not None:
            query = query.where(windows.c.batch > since_batch)
        if up_to_batch is not None:
            query = query.where(windows.c.batch <= up_to_batch)
        if received_after_ms is not None:
            query = query.where(windows.c.received_ms > received_after_ms)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(query.order_by(windows.c.id)).mappings()]

    def refusals(self) -> dict[tuple[str, str], dict[str, Any]]:
        """Per device: refused messages by reason, when the last was, and what was wrong with it."""
        out: dict[tuple[str, str], dict[str, Any]] = {}
        with self.engine.connect() as conn:
            if not self.engine.dialect.has_table(conn, "device_refusals"):
                return out
            for r in conn.execute(select(device_refusals).order_by(device_refusals.c.last_ms)).mappings():
                entry = out.setdefault((r["fleet"], r["device"]), {"total": 0, "by_reason": {}, "last_ms": 0,
                                                                    "last_detail": None})
                entry["by_reason"][r["reason"]] = int(r["count"])
                entry["total"] += int(r["count"])
                entry["last_ms"], entry["last_detail"] = r["last_ms"], r["detail"]
        return out

    def batch(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.scalar(select(counters.c.value).where(counters.c.name == "batch")))



def fleet_status(store: Store, default_interval_s: float, at_ms: int | None = None) -> list[dict[str, Any]]:
    """Every device with its presence, artifact and last window's latency (what `fleet status` prints)."""
    at_ms = at_ms if at_ms is not None else now_ms()
    rows = []
    refusals = store.refusals()
    for d in store.devices():
        silent = is_silent(d["last_seen_ms"], d["interval_s"], at_ms, default_interval_s)
        rows.append({
            "device": d["device"], "fleet": d["fleet"], "online": bool(d["session_open"]) and not silent,
            "silent": silent, "session_open": bool(d["session_open"]), "artifact": d["artifact"], "manifest_sha256": d["manifest_sha256"], "model": d["model"], "version": d["model_version"],
            "target": d["target"], "backend": d["backend"], "bd_seq": d["bd_seq"],
            "latency": {"p50_us": d["p50_us"], "p95_us": d["p95_us"], "p99_us": d["p99_us"],
                        "window_end_ms": d["last_window_end_ms"]},
            "runs": d["runs"], "errors": d["errors"], "messages": d["messages"], "duplicates": d["duplicates"],
            "gaps": d["gaps"], "last_seen_ms": d["last_seen_ms"],
            "refused": refusals.pop((d["fleet"], d["device"]), None),
        })
    for (fleet, device), refused in sorted(refusals.items()):  # heard from, but never in the contract
        rows.append({"device": device, "fleet": fleet, "online": False, "silent": True, "session_open": False,
                     "artifact": None, "manifest_sha256": None, "model": None, "version": None, "target": None,
                     "backend": None, "bd_seq": None,
                     "latency": {"p50_us": None, "p95_us": None, "p99_us": None, "window_end_ms": None},
                     "runs": 0, "errors": 0, "messages": 0, "duplicates": 0, "gaps": 0,
                     "last_seen_ms": refused["last_ms"], "refused": refused})
    return rows

