"""The shadow tables of the monitor's store (docs/shadow.md), and ingest's record of what devices
report about shadows: ``shadow`` windows and ``shadow.*`` events. Written by `edgesmith shadow`
(toolchain/shadow) and by ingest, read by `shadow report`, `select --from-shadow` and the dashboard.

A device's report counts only for a shadow it is in, for a candidate of that shadow (index and
manifest digest both), at the shadow-state version it was sent: anything else (a device reporting
for a shadow it was not in, a candidate digest the shadow never named, a stale version) is not
stored as a figure but counted in ``shadow_ignored`` with its reason."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import BigInteger, Column, Float, Index, Integer, String, Table, Text, desc, select
from sqlalchemy.engine import Connection

from edgesmith.runtime import contract
from edgesmith.toolchain.fleet.store.engine import RowId, StoreBase, metadata, now_ms
from edgesmith.toolchain.fleet.store.ingest import devices

shadows = Table(
    "shadows", metadata,
    Column("id", String(64), primary_key=True),  # sh-YYYYMMDD-HHMM-xxxxxx
    Column("fleet", String(64), nullable=False, index=True),
    # {device: {"version": shadow-state version, "serving_sha256", "serving", "target", "isa", "cpu"}} (JSON)
    Column("devices", Text, nullable=False),
    # [{"index", "name", "manifest_sha256", "archive_sha256", "size", "model", "model_version", "target",
    #   "backend", "precision", "build_latency_us", "model_uri"}] (JSON), in the order devices run them
    Column("candidates", Text, nullable=False),
    Column("sample", Float, nullable=False),
    Column("duration_s", BigInteger, nullable=False),
    Column("cpu_share", Float, nullable=False),
    Column("queue", Integer, nullable=False),
    Column("url", Text, nullable=False),  # the artifact server's base URL
    Column("key_id", String(16), nullable=False),
    Column("status", String(16), nullable=False),  # running | stopped (past ends_ms it is finished)
    Column("created_ms", BigInteger, nullable=False),
    Column("starts_ms", BigInteger, nullable=False),
    Column("ends_ms", BigInteger, nullable=False),
    Column("stopped_ms", BigInteger),
)

shadow_windows = Table(
    "shadow_windows", metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("batch", BigInteger, nullable=False),
    Column("shadow_id", String(64), nullable=False),
    Column("fleet", String(64), nullable=False),
    Column("device", String(64), nullable=False),
    Column("candidate", Integer, nullable=False),
    Column("candidate_sha256", String(64), nullable=False),
    Column("serving_sha256", String(64), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("window_start_ms", BigInteger, nullable=False),
    Column("window_end_ms", BigInteger, nullable=False),
    Column("received_ms", BigInteger, nullable=False),
    Column("offered", BigInteger, nullable=False), Column("samples", BigInteger, nullable=False),
    Column("dropped", BigInteger, nullable=False), Column("errors", BigInteger, nullable=False),
    Column("rows", BigInteger, nullable=False),  # classes outputs' rows compared
    Column("agree", BigInteger, nullable=False),  # of them, top-1 equal to serving's (at most rows)
    Column("max_abs_err", Float, nullable=False), Column("max_rel_err", Float, nullable=False),
    Column("nan", BigInteger, nullable=False),
    Column("latency", Text, nullable=False),  # the candidate's LatencyWindow (JSON)
    Column("serving_latency", Text, nullable=False),  # serving's on the same samples, as served (JSON)
    # Paired timing: the serving model run in the shadow child beside the candidate (JSON
    # LatencyWindow; null: the device sent none) and how many samples it ran.
    Column("paired_serving_latency", Text),
    Column("paired_samples", BigInteger),
    Column("latency_layout", Text),  # the device's birth layout [start_us, factor, count] (JSON); null if unknown
    Column("outputs", Text, nullable=False),  # {name: ShadowOutput} (JSON)
    Column("rss_increase_bytes", BigInteger, nullable=False),
    Column("cpu_seconds", Float, nullable=False),
    Index("ix_shadow_windows_shadow", "shadow_id", "device", "candidate"),
)

shadow_events = Table(
    "shadow_events", metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("shadow_id", String(64), nullable=False, index=True),
    Column("fleet", String(64), nullable=False),
    Column("device", String(64), nullable=False),
    Column("event", String(64), nullable=False),  # shadow.started | refused | failed | ended (the contract allows 64)
    Column("candidate", Integer), Column("candidate_sha256", String(64)),
    Column("reason", String(32)), Column("error", Text), Column("message", Text),
    Column("rss_increase_bytes", BigInteger),
    Column("seq", BigInteger, nullable=False),
    Column("received_ms", BigInteger, nullable=False),
)

shadow_ignored = Table(  # device reports that count for nothing, by reason (a hostile or confused device)
    "shadow_ignored", metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("fleet", String(64), nullable=False),
    Column("device", String(64), nullable=False),
    Column("shadow_id", String(64), nullable=False, index=True),
    Column("kind", String(16), nullable=False),  # shadow | event
    Column("reason", String(32), nullable=False),  # IGNORE_REASONS
    Column("received_ms", BigInteger, nullable=False),
)

shadow_versions = Table(  # the highest shadow-state version published per device (its own counter)
    "shadow_versions", metadata,
    Column("fleet", String(64), primary_key=True),
    Column("device", String(64), primary_key=True),
    Column("version", BigInteger, nullable=False),
)

shadow_selections = Table(  # `edgesmith select --from-shadow`: the measured choice
    "shadow_selections", metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("shadow_id", String(64), nullable=False, index=True),
    Column("fleet", String(64), nullable=False),
    Column("candidate", Integer, nullable=False),
    Column("name", Text, nullable=False),
    Column("manifest_sha256", String(64), nullable=False),
    Column("archive_sha256", String(64), nullable=False),
    Column("min_agreement", Float, nullable=False),
    Column("max_latency_ratio", Float),
    Column("min_samples", BigInteger, nullable=False),
    Column("measured_on", Text, nullable=False),  # {device: {"target", "isa", "cpu", "runtime"}} (JSON)
    Column("figures", Text, nullable=False),  # the report's rows the choice was made from (JSON)
    Column("mlflow_run_id", String(64)),
    Column("created_ms", BigInteger, nullable=False),
)

SHADOW_TABLES = (shadows, shadow_windows, shadow_events, shadow_ignored, shadow_versions, shadow_selections)
# A window against another serving model than the one the device served when the shadow started
# (its agreement and latency ratio would be against a different baseline) is `other_serving`.
IGNORE_REASONS = ("foreign_shadow", "foreign_device", "foreign_candidate", "stale_version", "other_serving")


def ensure_tables(store: StoreBase) -> None:
    """Stores made before shadows existed get the tables (the monitor's create_all does too)."""
    metadata.create_all(store.engine, tables=list(SHADOW_TABLES))


def is_shadow_report(msg: Any) -> bool:
    """A ``shadow`` window, or a ``shadow.*`` event (whose details the contract checked as a ShadowReport)."""
    return msg.kind == contract.MessageKind.SHADOW or (
        msg.kind == contract.MessageKind.EVENT and msg.event.startswith("shadow."))


def _layout_of(birth_json: str | None) -> str | None:
    if not birth_json:
        return None
    latency = json.loads(birth_json)["metrics"]["latency"]
    return json.dumps([latency["start_us"], latency["factor"], latency["count"]])


def _why_ignored(shadow: dict[str, Any] | None, msg: Any, candidate: int | None, candidate_sha: str | None,
                 version: int | None, serving_sha: str | None = None) -> str | None:
    if shadow is None or shadow["fleet"] != msg.fleet:
        return "foreign_shadow"
    device = shadow["devices"].get(msg.device)
    if device is None:
        return "foreign_device"
    if candidate is not None or candidate_sha is not None:
        known = shadow["candidates"]
        if candidate is None or candidate >= len(known) or \
                (candidate_sha is not None and known[candidate]["manifest_sha256"] != candidate_sha):
            return "foreign_candidate"
    if version is not None and version != device["version"]:
        return "stale_version"
    if serving_sha is not None and serving_sha != device["serving_sha256"]:
        return "other_serving"
    return None


def record(conn: Connection, batch: int, items: Sequence[tuple[Any, Any]]) -> None:
    """Store a batch's shadow windows and events (inside the ingest transaction, after its device
    rows are written: each device's current birth gives the layout of its windows' histograms)."""
    wanted = {msg.shadow_id if msg.kind == contract.MessageKind.SHADOW else msg.shadow_report().shadow_id
              for _, msg in items}
    known: dict[str, dict[str, Any]] = {}
    for row in conn.execute(select(shadows.c.id, shadows.c.fleet, shadows.c.devices, shadows.c.candidates)
                            .where(shadows.c.id.in_(sorted(wanted)))).mappings():
        known[row["id"]] = {"fleet": row["fleet"], "devices": json.loads(row["devices"]),
                            "candidates": json.loads(row["candidates"])}
    births = {(r.fleet, r.device): r.birth for r in conn.execute(
        select(devices.c.fleet, devices.c.device, devices.c.birth).where(
            devices.c.device.in_(sorted({msg.device for _, msg in items}))))}
    windows, events, ignored = [], [], []
    for item, msg in items:
        if msg.kind == contract.MessageKind.SHADOW:
            shadow_id, candidate, candidate_sha, version = (msg.shadow_id, msg.candidate, msg.candidate_sha256,
                                                            msg.shadow_version)
            serving_sha = msg.serving_sha256
        else:
            report = msg.shadow_report()
            shadow_id, candidate, candidate_sha, version = (report.shadow_id, report.candidate,
                                                            report.candidate_sha256, report.shadow_version)
            serving_sha = None
        why = _why_ignored(known.get(shadow_id), msg, candidate, candidate_sha, version, serving_sha)
        if why is not None:
            ignored.append({"fleet": msg.fleet, "device": msg.device, "shadow_id": shadow_id, "kind": msg.kind.value,
                            "reason": why, "received_ms": item.received_ms})
        elif msg.kind == contract.MessageKind.SHADOW:
            windows.append(_window_row(batch, item, msg, births.get((msg.fleet, msg.device))))
        else:
            events.append({"shadow_id": shadow_id, "fleet": msg.fleet, "device": msg.device, "event": msg.event,
                           "candidate": candidate, "candidate_sha256": candidate_sha,
                           "reason": report.reason.value if report.reason else None, "error": report.error,
                           "message": msg.message, "rss_increase_bytes": report.rss_increase_bytes, "seq": msg.seq,
                           "received_ms": item.received_ms})
    for table, rows in ((shadow_windows, windows), (shadow_events, events), (shadow_ignored, ignored)):
        if rows:
            conn.execute(table.insert(), rows)


def _window_row(batch: int, item: Any, msg: contract.ShadowWindow, birth_json: str | None) -> dict[str, Any]:
    classes = [o for o in msg.outputs.values() if o.agree is not None]
    rows = sum(o.rows for o in classes)
    return {
        "batch": batch, "shadow_id": msg.shadow_id, "fleet": msg.fleet, "device": msg.device,
        "candidate": msg.candidate, "candidate_sha256": msg.candidate_sha256, "serving_sha256": msg.serving_sha256,
        "seq": msg.seq, "window_start_ms": msg.window_start_ms, "window_end_ms": msg.window_end_ms,
        "received_ms": item.received_ms, "offered": msg.offered, "samples": min(msg.samples, msg.offered),
        "dropped": msg.dropped, "errors": msg.errors, "rows": rows,
        # A device cannot agree on more rows than it compared.
        "agree": sum(min(o.agree or 0, o.rows) for o in classes),
        "max_abs_err": max((o.max_abs_err for o in msg.outputs.values()), default=0.0),
        "max_rel_err": max((o.max_rel_err for o in msg.outputs.values()), default=0.0),
        "nan": sum(o.nan for o in msg.outputs.values()),
        "latency": msg.latency.model_dump_json(), "serving_latency": msg.serving_latency.model_dump_json(),
        "paired_serving_latency": (msg.paired_serving_latency.model_dump_json()
                                   if msg.paired_serving_latency is not None else None),
        "paired_samples": (min(msg.paired_samples, msg.samples, msg.offered)
                           if msg.paired_serving_latency is not None and msg.paired_samples is not None else None),
        "latency_layout": _layout_of(birth_json),
        "outputs": json.dumps({k: v.model_dump(mode="json") for k, v in msg.outputs.items()}),
        "rss_increase_bytes": msg.rss_increase_bytes, "cpu_seconds": msg.cpu_seconds,
    }


PANEL_SHADOWS = 5
PANEL_POINTS = 200


def panel(store: StoreBase, shadows_shown: int = PANEL_SHADOWS) -> list[dict[str, Any]]:
    """The dashboard's shadow panel (and /api/shadows): the newest shadows, per candidate a time
    series of its windows' top-1 agreement and paired latency ratio (the window's candidate p50
    over its paired serving p50, as its device reported them; none without paired figures), all
    devices together, newest PANEL_POINTS windows."""
    with store.engine.connect() as conn:
        if not store.engine.dialect.has_table(conn, "shadows"):
            return []
        rows = [dict(r) for r in conn.execute(select(shadows).order_by(desc(shadows.c.created_ms))
                                              .limit(shadows_shown)).mappings()]
        out = []
        for shadow in rows:
            windows = conn.execute(
                select(shadow_windows.c.device, shadow_windows.c.candidate, shadow_windows.c.received_ms,
                       shadow_windows.c.rows, shadow_windows.c.agree, shadow_windows.c.latency,
                       shadow_windows.c.paired_serving_latency)
                .where(shadow_windows.c.shadow_id == shadow["id"]).order_by(desc(shadow_windows.c.id))
                .limit(PANEL_POINTS)).mappings().all()
            candidates = []
            for cand in json.loads(shadow["candidates"]):
                points = []
                for w in reversed([w for w in windows if w["candidate"] == cand["index"]]):
                    p50 = json.loads(w["latency"])["p50_us"]
                    paired = w["paired_serving_latency"]
                    serving = json.loads(paired)["p50_us"] if paired is not None else None
                    points.append({"t_ms": w["received_ms"], "device": w["device"],
                                   "agreement": w["agree"] / w["rows"] if w["rows"] else None,
                                   "latency_ratio": p50 / serving if serving else None})
                candidates.append({"index": cand["index"], "name": cand["name"], "points": points})
            status = shadow["status"]
            if status == "running" and shadow["ends_ms"] <= now_ms():
                status = "finished"
            out.append({"id": shadow["id"], "fleet": shadow["fleet"], "status": status,
                        "created_ms": shadow["created_ms"], "devices": sorted(json.loads(shadow["devices"])),
                        "candidates": candidates})
    return out
