"""Alerts in the store: each alert condition and whether it is firing, so an alert fires once per
condition across monitor restarts and across monitors sharing the store (fleet/alerts.py decides
when; this module records it). A drift alert's firing also records a retrain request (retrain.py)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger, Boolean, Column, Float, String, Table, Text, select, update

from edgesmith.toolchain.fleet.store import retrain
from edgesmith.toolchain.fleet.store.engine import StoreBase, metadata

AlertKey = tuple[str, str, str]  # fleet, alert, subject

alerts = Table(
    "alerts", metadata,
    Column("fleet", String(64), primary_key=True),
    Column("alert", String(32), primary_key=True),
    Column("subject", String(200), primary_key=True),  # the device, or device/output for drift
    Column("device", String(64)),
    Column("model", Text), Column("model_version", Text), Column("target", Text),
    Column("active", Boolean, nullable=False),
    Column("value", Float), Column("threshold", Float),
    Column("message", Text),
    Column("since_ms", BigInteger), Column("changed_ms", BigInteger, nullable=False),
    Column("fired", BigInteger, nullable=False),  # how many times it went from clear to firing
)


class AlertStore(StoreBase):
    """The Store's alert methods: fire once per condition, across restarts and monitors."""

    def alert_transitions(self, firing: dict[AlertKey, dict[str, Any]], clearing: list[AlertKey],
                          at_ms: int, retrain_ids: dict[AlertKey, str] | None = None) -> tuple[list[AlertKey], list[AlertKey]]:
        """Mark alerts firing and cleared, in one transaction; returns the ones this call changed
        (an alert already firing, or fired by another monitor first, is not returned again).
        ``retrain_ids``, if given, gets the retrain request each fired drift alert was recorded on."""
        fired, cleared = [], []
        with self.engine.begin() as conn:
            for key, info in firing.items():
                fleet, alert, subject = key
                where = (alerts.c.fleet == fleet, alerts.c.alert == alert, alerts.c.subject == subject)
                values = {k: info.get(k) for k in ("device", "model", "model_version", "target", "value", "threshold",
                                                   "message")}
                if conn.execute(update(alerts).where(*where, alerts.c.active.is_(False)).values(
                        active=True, since_ms=at_ms, changed_ms=at_ms, fired=alerts.c.fired + 1, **values)).rowcount:
                    fired.append(key)
                elif conn.execute(self._insert_ignore(alerts).values(
                        fleet=fleet, alert=alert, subject=subject, active=True, since_ms=at_ms, changed_ms=at_ms,
                        fired=1, **values)).rowcount:
                    fired.append(key)
                else:
                    continue
                if alert == "drift":  # a drift alert asks for a retrain, in the same transaction
                    request = retrain.record_drift(conn, fleet, subject, info,
                                                   conn.scalar(select(alerts.c.fired).where(*where)), at_ms)
                    if retrain_ids is not None:
                        retrain_ids[key] = request
            for key in clearing:
                fleet, alert, subject = key
                if conn.execute(update(alerts).where(alerts.c.fleet == fleet, alerts.c.alert == alert,
                                                     alerts.c.subject == subject, alerts.c.active.is_(True))
                                .values(active=False, changed_ms=at_ms)).rowcount:
                    cleared.append(key)
        return fired, cleared

    def active_alerts(self) -> set[AlertKey]:
        with self.engine.connect() as conn:
            return {tuple(r) for r in conn.execute(select(alerts.c.fleet, alerts.c.alert, alerts.c.subject)
                                                   .where(alerts.c.active.is_(True)))}

    def alerts(self, active_only: bool = False) -> list[dict[str, Any]]:
        query = select(alerts).order_by(alerts.c.fleet, alerts.c.alert, alerts.c.subject)
        if active_only:
            query = query.where(alerts.c.active.is_(True))
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(query).mappings()]

