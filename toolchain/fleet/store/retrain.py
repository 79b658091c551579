"""Retrain requests in the monitor's store (issue 19, docs/telemetry.md "Retrain requests"): a drift
alert asks for the serving model to be retrained on what drifted.

A request names the fleet, the serving model (name, version, manifest digest), the drifted devices
and the alerts that asked for it (``retrain_request_subjects``: one row per alert subject, device/output,
with how many times it fired and when first and last). It moves open → capturing → training →
building → shadowing → rolling-out → done (training → done directly when no loop builds and rolls
out), or to dismissed from any active status; the closed loop (``edgesmith loop``, toolchain/loop.py)
fills in what it links: the capture id, the dataset digest, the MLflow run and the new model version,
and records each of its steps (``retrain_steps``: when, how long, done or failed, what it made), so a
re-run resumes at the first step not done.

There is one open request per fleet and model at a time, so every device whose drift alert fires
while it is open joins it. A device is named by at most one active request (any status but done
and dismissed) whatever model it claims: ``retrain_active_devices`` holds it, keyed by fleet and device,
until that request is done or dismissed, and the device's further alerts add to that request, never
a second row. The one-open rule is a unique ``open_key`` (a digest of fleet and model, NULL once the
request moves on); both keys hold for monitors sharing the store.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import defaultdict
from typing import Any

from sqlalchemy import BigInteger, Column, Index, String, Table, Text, case, delete, func, select, update
from sqlalchemy.engine import Connection

from edgesmith.toolchain.errors import UserError
from edgesmith.toolchain.fleet.store.engine import (IN_CHUNK, StoreBase, dialect_insert, insert_ignore, metadata,
                                                    now_ms)

STATUSES = ("open", "capturing", "training", "building", "shadowing", "rolling-out", "done", "dismissed")
ACTIVE = ("open", "capturing", "training", "building", "shadowing", "rolling-out")
NEXT = {"open": ("capturing", "dismissed"), "capturing": ("training", "dismissed"),
        "training": ("building", "done", "dismissed"), "building": ("shadowing", "dismissed"),
        "shadowing": ("rolling-out", "dismissed"), "rolling-out": ("done", "dismissed")}
LINKS = ("capture_id", "dataset_digest", "mlflow_run_id", "result_version")
SHOWN = 20  # per request: its newest alert subjects and devices (the counts cover them all)

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

# One row per request and alert subject (device/output: at most 64 per device), however often it fires.
retrain_request_subjects = Table(
    "retrain_request_subjects", metadata,
    Column("request_id", String(32), primary_key=True),
    Column("subject", String(200), primary_key=True),
    Column("device", String(64), nullable=False),
    Column("firings", BigInteger, nullable=False),  # on this request
    Column("fired", BigInteger, nullable=False),  # the alert's own count (alerts.fired) at its last firing
    Column("first_ms", BigInteger, nullable=False),
    Column("last_ms", BigInteger, nullable=False),
    Index("ix_retrain_request_subjects_device", "device"),
)

# The one active request naming each device; removed when that request is done or dismissed.
retrain_active_devices = Table(
    "retrain_active_devices", metadata,
    Column("fleet", String(64), primary_key=True),
    Column("device", String(64), primary_key=True),
    Column("request_id", String(32), nullable=False, index=True),
)


# The loop's steps on a request (toolchain/loop.py): one row per request and step, rewritten when a
# failed step is run again; ``detail`` is the step's JSON (what it made, its figures).
retrain_steps = Table(
    "retrain_steps", metadata,
    Column("request_id", String(32), primary_key=True),
    Column("step", String(32), primary_key=True),
    Column("status", String(16), nullable=False),  # done | failed
    Column("started_ms", BigInteger, nullable=False),
    Column("duration_ms", BigInteger, nullable=False),
    Column("detail", Text),
)


def _naming(*columns: Any) -> Any:
    """A select of ``columns`` over each device's row in retrain_active_devices whose request is active."""
    return (select(*columns).select_from(retrain_active_devices)
            .join(retrain_requests, retrain_requests.c.id == retrain_active_devices.c.request_id)
            .where(retrain_requests.c.status.in_(ACTIVE)))


def alert_id(fleet: str, alert: str, subject: str, fired: int) -> str:
    """One firing of an alert: its key and how many times it had fired then (the alerts table's ``fired``)."""
    return f"{fleet}/{alert}/{subject}#{fired}"


def _open_key(fleet: str, model: str | None, version: str | None, sha: str | None) -> str:
    return hashlib.sha256("\0".join((fleet, model or "", version or "", sha or "")).encode()).hexdigest()


def _new_id(at_ms: int) -> str:
    return f"rr-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(at_ms / 1000))}-{secrets.token_hex(3)}"


def record_drift(conn: Connection, fleet: str, subject: str, info: dict[str, Any], fired: int, at_ms: int) -> str:
    """Record a drift alert's firing (in the alert's transaction): on the active request already naming
    its device, whatever model the device claims now, else on the fleet and model's open request
    (opened now if there is none); returns its id."""
    device = info.get("device") or subject.split("/", 1)[0]
    model, version, sha = info.get("model"), info.get("model_version"), info.get("manifest_sha256")
    naming = _naming(retrain_active_devices.c.request_id).where(retrain_active_devices.c.fleet == fleet,
                                                               retrain_active_devices.c.device == device)
    request = conn.scalar(naming)
    if request is None:
        # A row naming a request that closed meanwhile (a dismissal racing an alert) names nothing: gone.
        conn.execute(delete(retrain_active_devices).where(
            retrain_active_devices.c.fleet == fleet, retrain_active_devices.c.device == device))
        key = _open_key(fleet, model, version, sha)
        # Another monitor may open it at the same moment: the unique open_key lets one row win.
        created = conn.execute(insert_ignore(conn.dialect, retrain_requests).values(
            id=_new_id(at_ms), fleet=fleet, model=model, model_version=version, manifest_sha256=sha, status="open",
            open_key=key, opened_ms=at_ms, changed_ms=at_ms)).rowcount
        opened = conn.scalar(select(retrain_requests.c.id).where(retrain_requests.c.open_key == key))
        # ... and the device's key lets one request name it: another monitor's, if it named the device first
        # (under another model claim), and then the request this opened has nothing on it.
        conn.execute(insert_ignore(conn.dialect, retrain_active_devices).values(
            fleet=fleet, device=device, request_id=opened))
        request = conn.scalar(naming) or opened  # (or: the winner's request closed meanwhile)
        if created and request != opened:
            conn.execute(delete(retrain_requests).where(retrain_requests.c.id == opened))
    subjects = retrain_request_subjects
    conn.execute(dialect_insert(conn.dialect, subjects).values(
        request_id=request, subject=subject, device=device, firings=1, fired=fired, first_ms=at_ms, last_ms=at_ms,
    ).on_conflict_do_update(index_elements=[subjects.c.request_id, subjects.c.subject],
                            set_={"firings": subjects.c.firings + 1, "fired": fired, "last_ms": at_ms}))
    conn.execute(update(retrain_requests).where(retrain_requests.c.id == request).values(changed_ms=at_ms))
    return request


def has_tables(store: StoreBase) -> bool:
    with store.engine.connect() as conn:  # a store created before retrain requests existed
        return all(store.engine.dialect.has_table(conn, t.name)
                   for t in (retrain_requests, retrain_request_subjects, retrain_active_devices))


def _row(r: Any) -> dict[str, Any]:
    row = dict(r)
    row.pop("open_key", None)
    return row


def requests(store: StoreBase, fleet: str | None = None, active_only: bool = False,
             limit: int | None = None) -> list[dict[str, Any]]:
    """Retrain requests, the active ones first (newest first), then the closed ones (newest first),
    so requests that are closed, however many, never push an active one out of ``limit``. Each has its
    counts (``device_count``, ``alert_subjects``, ``alert_firings``) and its SHOWN newest ``devices``
    (sorted) and ``alerts`` (newest first)."""
    if not has_tables(store):
        return []
    active = retrain_requests.c.status.in_(ACTIVE)
    query = select(retrain_requests).order_by(case((active, 0), else_=1), retrain_requests.c.opened_ms.desc(),
                                              retrain_requests.c.id)
    if fleet is not None:
        query = query.where(retrain_requests.c.fleet == fleet)
    if active_only:
        query = query.where(active)
    if limit is not None:
        query = query.limit(limit)
    with store.engine.connect() as conn:
        rows = [_row(r) for r in conn.execute(query).mappings()]
        _add_subjects(conn, rows)
    return rows


def _add_subjects(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """Each request's counts and its newest SHOWN alert subjects and devices: a bounded read however
    many times its alerts fired."""
    s = retrain_request_subjects
    counts: dict[str, tuple[int, int, int]] = {}
    alerts: dict[str, list[dict[str, Any]]] = defaultdict(list)
    devices: dict[str, list[str]] = defaultdict(list)
    ids = [r["id"] for r in rows]
    for start in range(0, len(ids), IN_CHUNK):
        chunk = s.c.request_id.in_(ids[start:start + IN_CHUNK])
        for rid, subjects, device_count, firings in conn.execute(
                select(s.c.request_id, func.count(), func.count(s.c.device.distinct()), func.sum(s.c.firings))
                .where(chunk).group_by(s.c.request_id)):
            counts[rid] = (int(subjects), int(device_count), int(firings))
        newest = select(s, func.row_number().over(partition_by=s.c.request_id,
                                                  order_by=(s.c.last_ms.desc(), s.c.subject)).label("rank")
                        ).where(chunk).subquery()
        for a in conn.execute(select(newest).where(newest.c.rank <= SHOWN)
                              .order_by(newest.c.request_id, newest.c.rank)).mappings():
            alerts[a["request_id"]].append({"subject": a["subject"], "device": a["device"], "firings": a["firings"],
                                            "fired": a["fired"], "first_ms": a["first_ms"], "last_ms": a["last_ms"]})
        per_device = (select(s.c.request_id, s.c.device, func.max(s.c.last_ms).label("last_ms")).where(chunk)
                      .group_by(s.c.request_id, s.c.device).subquery())
        ranked = select(per_device, func.row_number().over(
            partition_by=per_device.c.request_id, order_by=(per_device.c.last_ms.desc(), per_device.c.device)
        ).label("rank")).subquery()
        for rid, device in conn.execute(select(ranked.c.request_id, ranked.c.device).where(ranked.c.rank <= SHOWN)):
            devices[rid].append(device)
    for r in rows:
        r["alert_subjects"], r["device_count"], r["alert_firings"] = counts.get(r["id"], (0, 0, 0))
        r["devices"] = sorted(devices[r["id"]])
        r["alerts"] = [{"alert": alert_id(r["fleet"], "drift", a["subject"], a["fired"]), **a} for a in alerts[r["id"]]]


def get(store: StoreBase, request_id: str) -> dict[str, Any]:
    row = None
    if has_tables(store):
        with store.engine.connect() as conn:
            found = conn.execute(select(retrain_requests).where(retrain_requests.c.id == request_id)).mappings().first()
            if found is not None:
                row = _row(found)
                _add_subjects(conn, [row])
    if row is None:
        raise UserError(f"there is no retrain request {request_id!r} in {store.engine.url.render_as_string()}; "
                        "`edgesmith fleet retrain list` shows them")
    return row


def advance(store: StoreBase, request_id: str, status: str, note: str | None = None, **links: str | None) -> dict[str, Any]:
    """Move a request to ``status`` (one of NEXT's steps) and record what the loop links (LINKS);
    a request that is done or dismissed stays so, and no longer names its devices. Returns the
    request as it is now."""
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
        if status not in ACTIVE:  # its devices' next drift alert opens a new request
            conn.execute(delete(retrain_active_devices).where(retrain_active_devices.c.request_id == request_id))
    return get(store, request_id)


def naming(store: StoreBase, fleet: str | None = None) -> dict[tuple[str, str], dict[str, Any]]:
    """The active request naming each (fleet, device), for `fleet status` (without its subjects)."""
    if not has_tables(store):
        return {}
    query = _naming(retrain_active_devices.c.device, retrain_requests)
    if fleet is not None:
        query = query.where(retrain_active_devices.c.fleet == fleet)
    with store.engine.connect() as conn:
        out = {}
        for r in conn.execute(query).mappings():
            row = _row(r)
            out[(row["fleet"], row.pop("device"))] = row
        return out


def link(store: StoreBase, request_id: str, note: str | None = None, **links: str | None) -> dict[str, Any]:
    """Record what the loop links (LINKS) and its note on an active request, keeping its status."""
    unknown = set(links) - set(LINKS)
    if unknown:
        raise ValueError(f"unknown retrain request links {sorted(unknown)}; known: {LINKS}")
    values: dict[str, Any] = {"changed_ms": now_ms(), **{k: v for k, v in links.items() if v is not None}}
    if note is not None:
        values["note"] = note
    with store.engine.begin() as conn:
        if not conn.execute(update(retrain_requests).where(retrain_requests.c.id == request_id,
                                                           retrain_requests.c.status.in_(ACTIVE))
                            .values(**values)).rowcount:
            raise UserError(f"retrain request {request_id} is not active any more; look at it again "
                            "(`edgesmith fleet retrain list`)")
    return get(store, request_id)


def record_step(store: StoreBase, request_id: str, step: str, status: str, started_ms: int, duration_ms: int,
                detail: dict[str, Any] | None = None) -> None:
    """The loop's step ``step`` on the request ended ``status`` (done or failed), with what it made."""
    import json

    if status not in ("done", "failed"):
        raise ValueError(f"a step ends done or failed, not {status!r}")
    retrain_steps.create(store.engine, checkfirst=True)  # a store created before the loop existed
    values = {"status": status, "started_ms": started_ms, "duration_ms": duration_ms,
              "detail": json.dumps(detail or {}, sort_keys=True)}
    with store.engine.begin() as conn:
        conn.execute(dialect_insert(conn.dialect, retrain_steps).values(request_id=request_id, step=step, **values)
                     .on_conflict_do_update(index_elements=[retrain_steps.c.request_id, retrain_steps.c.step],
                                            set_=values))


def steps(store: StoreBase, request_id: str) -> dict[str, dict[str, Any]]:
    """The loop's recorded steps on the request: {step: {status, started_ms, duration_ms, detail}}."""
    import json

    with store.engine.connect() as conn:
        if not store.engine.dialect.has_table(conn, retrain_steps.name):
            return {}
        return {r["step"]: {"status": r["status"], "started_ms": r["started_ms"], "duration_ms": r["duration_ms"],
                            "detail": json.loads(r["detail"] or "{}")}
                for r in conn.execute(select(retrain_steps).where(retrain_steps.c.request_id == request_id)).mappings()}
