"""Retrain requests in the monitor's store (issue 19, docs/telemetry.md "Retrain requests"): a drift
alert asks for the serving model to be retrained on what drifted.

A request names the fleet, the serving model (name, version, manifest digest), the drifted devices
and the alerts that asked for it (``retrain_request_alerts``, one row per alert firing). It moves
open → capturing → training → done, or to dismissed from any of the first three; the closed loop
(``edgesmith loop``) fills in what it links later: the capture id, the dataset digest, the MLflow
run and the new model version.

There is one open request per fleet and model at a time, so every device whose drift alert fires
while it is open joins it, and a device's further alerts while a request naming it is active
(open, capturing or training) add to that request, never a second row. The one-open rule is a
unique ``open_key`` (a digest of fleet and model, NULL once the request moves on), so monitors
sharing the store cannot open two at once.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import defaultdict
from typing import Any

from sqlalchemy import BigInteger, Column, Index, String, Table, Text, select, update
from sqlalchemy.engine import Connection

from edgesmith.toolchain.errors import UserError
from edgesmith.toolchain.fleet.store.engine import StoreBase, insert_ignore, metadata, now_ms

STATUSES = ("open", "capturing", "training", "done", "dismissed")
ACTIVE = ("open", "capturing", "training")
NEXT = {"open": ("capturing", "dismissed"), "capturing": ("training", "dismissed"),
        "training": ("done", "dismissed")}
LINKS = ("capture_id", "dataset_digest", "mlflow_run_id", "result_version")

retrain_requests = Table(
    "retrain_requests", metadata,
    Column("id", String(32), primary_key=True),  # rr-YYYYMMDD-HHMMSS-xxxxxx
    Column("fleet", String(64), nullable=False, index=True),
    Column("model", Text), Column("model_version", Text), Column("manifest_sha256", String(64)),
    Column("status", String(16), nullable=False),
    Column("open_key", String(64), unique=True),  # while open: sha256 of fleet and model; else NULL
    Column("opened_ms", BigInteger, nullable=False),
    Column("changed_ms", BigInteger, nullable=False),
    Column("note", Text),  # why it was dismissed, or what the loop said last
    # What the loop links later (NULL until then):
    Column("capture_id", String(64)),
    Column("dataset_digest", String(64)),
    Column("mlflow_run_id", String(64)),
    Column("result_version", Text),  # the retrained model's registry version
)

retrain_request_alerts = Table(
    "retrain_request_alerts", metadata,
    Column("request_id", String(32), primary_key=True),
    Column("alert_id", String(300), primary_key=True),  # <fleet>/drift/<device>/<output>#<firing>
    Column("device", String(64), nullable=False),
    Column("subject", String(200), nullable=False),
    Column("at_ms", BigInteger, nullable=False),
    Index("ix_retrain_request_alerts_device", "device"),
)


def alert_id(fleet: str, alert: str, subject: str, fired: int) -> str:
    """One firing of an alert: its key and how many times it had fired then (the alerts table's ``fired``)."""
    return f"{fleet}/{alert}/{subject}#{fired}"


def _open_key(fleet: str, model: str | None, version: str | None, sha: str | None) -> str:
    return hashlib.sha256("\0".join((fleet, model or "", version or "", sha or "")).encode()).hexdigest()


def _new_id(at_ms: int) -> str:
    return f"rr-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(at_ms / 1000))}-{secrets.token_hex(3)}"


def record_drift(conn: Connection, fleet: str, subject: str, info: dict[str, Any], fired: int, at_ms: int) -> str:
    """Record a drift alert's firing (in the alert's transaction): on the active request already naming
    its device, else on the fleet and model's open request (opened now if there is none); returns its id."""
    device = info.get("device") or subject.split("/", 1)[0]
    model, version, sha = info.get("model"), info.get("model_version"), info.get("manifest_sha256")
    same_model = (retrain_requests.c.fleet == fleet, retrain_requests.c.model.is_not_distinct_from(model),
                  retrain_requests.c.model_version.is_not_distinct_from(version),
                  retrain_requests.c.manifest_sha256.is_not_distinct_from(sha))
    naming = conn.scalar(
        select(retrain_requests.c.id)
        .join(retrain_request_alerts, retrain_request_alerts.c.request_id == retrain_requests.c.id)
        .where(*same_model, retrain_requests.c.status.in_(ACTIVE), retrain_request_alerts.c.device == device)
        .order_by(retrain_requests.c.opened_ms).limit(1))
    request = naming
    if request is None:
        key = _open_key(fleet, model, version, sha)
        new = _new_id(at_ms)
        # Another monitor may open it at the same moment: the unique open_key lets one row win.
        conn.execute(insert_ignore(conn.dialect, retrain_requests).values(
            id=new, fleet=fleet, model=model, model_version=version, manifest_sha256=sha, status="open",
            open_key=key, opened_ms=at_ms, changed_ms=at_ms))
        request = conn.scalar(select(retrain_requests.c.id).where(retrain_requests.c.open_key == key))
    conn.execute(insert_ignore(conn.dialect, retrain_request_alerts).values(
        request_id=request, alert_id=alert_id(fleet, "drift", subject, fired), device=device, subject=subject,
        at_ms=at_ms))
    conn.execute(update(retrain_requests).where(retrain_requests.c.id == request).values(changed_ms=at_ms))
    return request


def has_tables(store: StoreBase) -> bool:
    with store.engine.connect() as conn:  # a store created before retrain requests existed
        return store.engine.dialect.has_table(conn, "retrain_requests")


def requests(store: StoreBase, fleet: str | None = None, active_only: bool = False,
             limit: int | None = None) -> list[dict[str, Any]]:
    """Retrain requests, newest first, each with its alerts and devices (sorted)."""
    if not has_tables(store):
        return []
    query = select(retrain_requests).order_by(retrain_requests.c.opened_ms.desc(), retrain_requests.c.id)
    if fleet is not None:
        query = query.where(retrain_requests.c.fleet == fleet)
    if active_only:
        query = query.where(retrain_requests.c.status.in_(ACTIVE))
    if limit is not None:
        query = query.limit(limit)
    with store.engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(query).mappings()]
        alerts: dict[str, list[dict[str, Any]]] = defaultdict(list)
        ids = [r["id"] for r in rows]
        for start in range(0, len(ids), 500):
            for a in conn.execute(select(retrain_request_alerts)
                                  .where(retrain_request_alerts.c.request_id.in_(ids[start:start + 500]))
                                  .order_by(retrain_request_alerts.c.at_ms, retrain_request_alerts.c.alert_id)).mappings():
                alerts[a["request_id"]].append(dict(a))
    for r in rows:
        r.pop("open_key")
        r["alerts"] = [a["alert_id"] for a in alerts[r["id"]]]
        r["devices"] = sorted({a["device"] for a in alerts[r["id"]]})
    return rows


def get(store: StoreBase, request_id: str) -> dict[str, Any]:
    found = [r for r in requests(store) if r["id"] == request_id]
    if not found:
        raise UserError(f"there is no retrain request {request_id!r} in {store.engine.url.render_as_string()}; "
                        "`edgesmith fleet retrain list` shows them")
    return found[0]


def advance(store: StoreBase, request_id: str, status: str, note: str | None = None, **links: str | None) -> dict[str, Any]:
    """Move a request to ``status`` (one of NEXT's steps) and record what the loop links (LINKS);
    a request that is done or dismissed stays so. Returns the request as it is now."""
    unknown = set(links) - set(LINKS)
    if unknown:
        raise ValueError(f"unknown retrain request links {sorted(unknown)}; known: {LINKS}")
    if status not in STATUSES:
        raise UserError(f"{status!r} is not a retrain request status; use one of {', '.join(STATUSES)}")
    current = get(store, request_id)["status"]
    if status not in NEXT.get(current, ()):
        raise UserError(f"retrain request {request_id} is {current}, so it cannot become {status}"
                        + (f" (next: {' or '.join(NEXT[current])})" if current in NEXT else ""))
    values: dict[str, Any] = {"status": status, "changed_ms": now_ms(), "open_key": None,
                              **{k: v for k, v in links.items() if v is not None}}
    if note is not None:
        values["note"] = note
    with store.engine.begin() as conn:  # only from the status read: a concurrent change wins, this one is refused
        if not conn.execute(update(retrain_requests).where(retrain_requests.c.id == request_id,
                                                           retrain_requests.c.status == current)
                            .values(**values)).rowcount:
            raise UserError(f"retrain request {request_id} changed while this ran; look at it again "
                            "(`edgesmith fleet retrain list`)")
    return get(store, request_id)


def by_device(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """The newest active request naming each (fleet, device), for `fleet status`."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:  # newest first
        if r["status"] in ACTIVE:
            for device in r["devices"]:
                out.setdefault((r["fleet"], device), r)
    return out
