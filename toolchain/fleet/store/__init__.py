"""The monitor's store: SQLAlchemy Core over SQLite (default, WAL) or PostgreSQL, portable types only.

One module per concern, each with its tables on the one ``metadata``:

- engine.py: opening the database, ``metadata``, the ``counters`` table and the schema version;
- ingest.py: telemetry ingest (devices, sessions, windows, messages, refusals) and its reads;
- alerts.py: each alert condition and whether it is firing;
- deployments.py: deployments, waves, targets, desired-state versions and reported deploy states,
  written by `edgesmith deploy` (toolchain/deploy) and by ingest, read by `fleet status`;
- retrain.py: retrain requests, recorded when a drift alert fires, listed by `fleet status` and the
  dashboard, moved on by `fleet retrain` (and the closed loop);
- shadows.py: shadows, their windows and events, shadow-state versions and selections, written by
  `edgesmith shadow` (toolchain/shadow) and by ingest, read by `shadow report` and `select`.

toolchain/fleet and toolchain/deploy both import the store; it imports neither package's other
modules (tests/test_store_layout.py checks that the two packages do not import each other).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Connection

from edgesmith.runtime.contract import MessageKind as K

from edgesmith.toolchain.fleet.store import deployments, retrain, shadows
from edgesmith.toolchain.fleet.store.alerts import AlertKey, AlertStore
from edgesmith.toolchain.fleet.store.engine import (SCHEMA_VERSION, counters, default_url, metadata, now_ms,
                                                    open_engine)
from edgesmith.toolchain.fleet.store.ingest import (DEFAULT_BYTES_PER_DAY, DEFAULT_RETENTION_DAYS,
                                                    DEFAULT_WINDOWS_PER_DAY, DROP_REASONS, SILENT_INTERVALS,
                                                    BatchListener, BatchResult, DeviceBudget, Incoming, IngestStore,
                                                    fleet_status, is_silent)

__all__ = ["DEFAULT_BYTES_PER_DAY", "DEFAULT_RETENTION_DAYS", "DEFAULT_WINDOWS_PER_DAY", "DROP_REASONS",
           "SCHEMA_VERSION", "SILENT_INTERVALS", "AlertKey", "BatchListener", "BatchResult", "DeviceBudget",
           "Incoming", "Store", "counters", "default_url", "deployments", "fleet_status", "is_silent", "metadata",
           "now_ms", "open_engine", "retrain", "shadows"]


class Store(IngestStore, AlertStore):
    """The monitor's store: ``Store.open(url)`` creates (or checks) every table of every concern."""

    def _record_reports(self, conn: Connection, reports: list[tuple[Incoming, Any]]) -> None:
        for item, msg in reports:
            if msg.kind != K.SHADOW:
                deployments.record_report(conn, item.received_ms, msg)
        shadow_reports = [(item, msg) for item, msg in reports if shadows.is_shadow_report(msg)]
        if shadow_reports:
            shadows.record(conn, self._numbered, shadow_reports)
