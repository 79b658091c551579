"""The central capture store: upload grants, received samples and refusals in SQLite (SQLAlchemy
Core, portable types, so a PostgreSQL URL works too), the records themselves content-addressed in
``objects/<sha256>``, each written to a temporary file and renamed into place (docs/capture.md)."""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from edgesmith.runtime.keys import edgesmith_home
from edgesmith.toolchain.files import fsync

META = sa.MetaData()
GRANTS = sa.Table(
    "capture_grants", META,
    sa.Column("fleet", sa.String(64), primary_key=True),
    sa.Column("device", sa.String(64), primary_key=True),
    sa.Column("capture_id", sa.String(64), primary_key=True),
    sa.Column("token_sha256", sa.String(64), nullable=False),
    sa.Column("max_samples", sa.BigInteger, nullable=False),
    sa.Column("max_bytes", sa.BigInteger, nullable=False),
    sa.Column("issued_ms", sa.BigInteger, nullable=False),
    sa.Column("not_after", sa.BigInteger, nullable=False),  # Unix seconds: uploads after it are refused
    sa.Column("policy", sa.Text, nullable=False),  # contract.CapturePolicy JSON: what later upload states repeat
    sa.Column("retention_s", sa.BigInteger, nullable=False),
)
SAMPLES = sa.Table(
    "capture_samples", META,
    sa.Column("sha256", sa.String(64), primary_key=True),
    sa.Column("fleet", sa.String(64), nullable=False, index=True),
    sa.Column("device", sa.String(64), nullable=False),
    sa.Column("capture_id", sa.String(64), nullable=False),
    sa.Column("manifest_sha256", sa.String(64), nullable=False),
    sa.Column("model", sa.String(256), nullable=False),
    sa.Column("model_version", sa.String(256), nullable=False),
    sa.Column("ts_ms", sa.BigInteger, nullable=False),
    sa.Column("reason", sa.String(32), nullable=False),
    sa.Column("top1", sa.Integer, nullable=True),
    sa.Column("confidence", sa.Float, nullable=True),
    sa.Column("bytes", sa.BigInteger, nullable=False),
    sa.Column("received_ms", sa.BigInteger, nullable=False, index=True),
)
VERSIONS = sa.Table(  # the highest capture-state version issued per device (its own counter, reserved before use)
    "capture_versions", META,
    sa.Column("fleet", sa.String(64), primary_key=True),
    sa.Column("device", sa.String(64), primary_key=True),
    sa.Column("version", sa.BigInteger, nullable=False),
)
REFUSALS = sa.Table(
    "capture_refusals", META,
    sa.Column("fleet", sa.String(64), primary_key=True),
    sa.Column("device", sa.String(64), primary_key=True),
    sa.Column("reason", sa.String(32), primary_key=True),
    sa.Column("count", sa.BigInteger, nullable=False),
    sa.Column("last_ms", sa.BigInteger, nullable=False),
)


def default_dir() -> Path:
    return edgesmith_home() / "captures"


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Grant:
    fleet: str
    device: str
    capture_id: str
    token_sha256: str
    max_samples: int
    max_bytes: int
    issued_ms: int
    not_after: int
    policy: str
    retention_s: int


class CaptureStore:
    """``DIR/index.db`` (or ``url``) and ``DIR/objects/``."""

    def __init__(self, directory: Path | None = None, url: str | None = None):
        self.dir = Path(directory) if directory else default_dir()
        self.objects = self.dir / "objects"
        self.objects.mkdir(parents=True, exist_ok=True)
        self.engine = sa.create_engine(url or f"sqlite:///{(self.dir / 'index.db').resolve()}")
        META.create_all(self.engine)
        self._lock = threading.Lock()  # budget check and insert are one step per process

    def reserve_version(self, fleet: str, device: str, at_least: int = 0) -> int:
        """The next capture-state version of a device: above every one this store issued and above
        ``at_least`` (what the broker retains), stored before it is used, so a lost retained message
        or two commands at once never reuse one (the device would refuse it as a replay)."""
        from edgesmith.toolchain.fleet.store.deployments import reserve_version

        return reserve_version(self, fleet, device, at_least, table=VERSIONS)

    # ---- grants -------------------------------------------------------------------------------------
    def grant(self, fleet: str, device: str, capture_id: str, token: str, max_samples: int, max_bytes: int,
              not_after: int, policy: str = "{}", retention_s: int = 7 * 24 * 3600) -> None:
        """Allow ``device`` to upload for ``capture_id`` with ``token`` (only its SHA-256 is kept)."""
        row = {"token_sha256": token_digest(token), "max_samples": max_samples, "max_bytes": max_bytes,
               "issued_ms": int(time.time() * 1000), "not_after": not_after, "policy": policy,
               "retention_s": retention_s}
        key = (GRANTS.c.fleet == fleet) & (GRANTS.c.device == device) & (GRANTS.c.capture_id == capture_id)
        with self.engine.begin() as db:
            if db.execute(sa.update(GRANTS).where(key).values(**row)).rowcount == 0:
                db.execute(sa.insert(GRANTS).values(fleet=fleet, device=device, capture_id=capture_id, **row))

    def find_grant(self, fleet: str, device: str, capture_id: str) -> Grant | None:
        with self.engine.connect() as db:
            row = db.execute(sa.select(GRANTS).where((GRANTS.c.fleet == fleet) & (GRANTS.c.device == device)
                                                     & (GRANTS.c.capture_id == capture_id))).first()
        return Grant(**row._mapping) if row else None

    def known(self, fleet: str, device: str) -> bool:
        """Whether any capture was granted to this device."""
        with self.engine.connect() as db:
            return db.execute(sa.select(GRANTS.c.capture_id).where((GRANTS.c.fleet == fleet)
                                                                   & (GRANTS.c.device == device)).limit(1)).first() is not None

    def latest_grant(self, fleet: str, device: str) -> Grant | None:
        with self.engine.connect() as db:
            row = db.execute(sa.select(GRANTS).where((GRANTS.c.fleet == fleet) & (GRANTS.c.device == device))
                             .order_by(GRANTS.c.issued_ms.desc(), GRANTS.c.capture_id.desc())).first()
        return Grant(**row._mapping) if row else None

    def authorised(self, grant: Grant | None, token: str | None) -> bool:
        """Constant-time comparison of the token's SHA-256 with the grant's (a dummy one when there is none)."""
        offered = token_digest(token or "")
        expected = grant.token_sha256 if grant else "0" * 64
        return hmac.compare_digest(offered, expected) and grant is not None and token is not None

    # ---- samples ------------------------------------------------------------------------------------
    def has(self, sha256: str) -> dict | None:
        with self.engine.connect() as db:
            row = db.execute(sa.select(SAMPLES).where(SAMPLES.c.sha256 == sha256)).first()
        return dict(row._mapping) if row else None

    def used(self, grant: Grant) -> tuple[int, int]:
        """(samples, bytes) already stored under the grant."""
        with self.engine.connect() as db:
            row = db.execute(sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(SAMPLES.c.bytes), 0)).where(
                (SAMPLES.c.fleet == grant.fleet) & (SAMPLES.c.device == grant.device)
                & (SAMPLES.c.capture_id == grant.capture_id))).one()
        return int(row[0]), int(row[1])

    def new_temp(self) -> Path:
        return self.objects / f".upload-{uuid.uuid4().hex}.tmp"

    def commit(self, grant: Grant, temp: Path, row: dict) -> str:
        """Store an uploaded record: ``stored``, ``duplicate`` (already stored: the temp file is
        removed) or ``budget`` (the grant's budget is used up; nothing is stored)."""
        with self._lock:
            if self.has(row["sha256"]) is not None:
                temp.unlink(missing_ok=True)
                return "duplicate"
            samples, used_bytes = self.used(grant)
            if samples + 1 > grant.max_samples or used_bytes + row["bytes"] > grant.max_bytes:
                temp.unlink(missing_ok=True)
                return "budget"
            os.replace(temp, self.objects / row["sha256"])
            fsync(self.objects)
            with self.engine.begin() as db:
                db.execute(sa.insert(SAMPLES).values(**row, received_ms=int(time.time() * 1000)))
        return "stored"

    def samples(self, fleet: str, since_ms: int = 0) -> list[dict]:
        with self.engine.connect() as db:
            rows = db.execute(sa.select(SAMPLES).where((SAMPLES.c.fleet == fleet) & (SAMPLES.c.received_ms >= since_ms))
                              .order_by(SAMPLES.c.sha256)).all()
        return [dict(r._mapping) for r in rows]

    def object_path(self, sha256: str) -> Path:
        return self.objects / sha256

    # ---- refusals -----------------------------------------------------------------------------------
    def refuse(self, fleet: str, device: str, reason: str) -> None:
        """Count one refused upload of ``device`` under ``reason``."""
        now = int(time.time() * 1000)
        key = (REFUSALS.c.fleet == fleet) & (REFUSALS.c.device == device) & (REFUSALS.c.reason == reason)
        with self._lock, self.engine.begin() as db:
            if db.execute(sa.update(REFUSALS).where(key).values(count=REFUSALS.c.count + 1, last_ms=now)).rowcount == 0:
                db.execute(sa.insert(REFUSALS).values(fleet=fleet, device=device, reason=reason, count=1, last_ms=now))

    def refusals(self, fleet: str | None = None) -> dict[tuple[str, str], dict[str, int]]:
        """{(fleet, device): {reason: count}}."""
        query = sa.select(REFUSALS)
        if fleet is not None:
            query = query.where(REFUSALS.c.fleet == fleet)
        out: dict[tuple[str, str], dict[str, int]] = {}
        with self.engine.connect() as db:
            for r in db.execute(query):
                out.setdefault((r.fleet, r.device), {})[r.reason] = int(r.count)
        return out
