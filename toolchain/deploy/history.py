"""Deployment history in the monitor's store (tables in toolchain/fleet/store.py): deployments,
their waves and per-device targets, and the highest desired-state version of each device."""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any

from sqlalchemy import BigInteger, case, func, literal, select, update

from edgesmith.runtime import contract
from edgesmith.toolchain.errors import UserError
from edgesmith.toolchain.fleet.store import (DEPLOY_TABLES, FINAL_RESULTS, Store, deploy_targets, deploy_waves,
                                             deployments, desired_versions, device_deploy, devices, metadata, now_ms)


class TargetResult(StrEnum):
    """A deployment target's result in the store: the device's words (contract.DeployResult), and
    the central side's own: published (sent, nothing heard yet) and timeout (nothing heard in time)."""

    PUBLISHED = "published"
    IN_PROGRESS = contract.DeployResult.IN_PROGRESS.value
    APPLIED = contract.DeployResult.APPLIED.value
    FAILED = contract.DeployResult.FAILED.value
    REFUSED = contract.DeployResult.REFUSED.value
    TIMEOUT = "timeout"


def ensure_tables(store: Store) -> None:
    """Stores made before deployments existed get the tables (the monitor's create_all does too)."""
    metadata.create_all(store.engine, tables=list(DEPLOY_TABLES))


def has_tables(store: Store) -> bool:
    with store.engine.connect() as conn:
        return all(store.engine.dialect.has_table(conn, t.name) for t in DEPLOY_TABLES)


def issued_version(store: Store, fleet: str, device: str) -> int:
    """The highest desired-state version the store has issued to a device (0: none)."""
    with store.engine.connect() as conn:
        version = conn.scalar(select(desired_versions.c.version).where(desired_versions.c.fleet == fleet,
                                                                      desired_versions.c.device == device))
    return int(version or 0)


def reserve_version(store: Store, fleet: str, device: str, at_least: int = 0, table: Any = desired_versions) -> int:
    """The next desired-state version of a device, above every one published (stored before use,
    so a crash after publishing never reuses it) and above ``at_least`` (what the broker knows, in
    case the store is newer than the fleet; a device's own claim is clamped to what was issued
    before it gets here: FleetWatch.version_floor). ``table``: the counter's table (shadow states
    keep their own, toolchain/shadow/tables.py shadow_versions)."""
    if not 0 <= at_least < contract.MAX_SAFE_INT:
        raise UserError(f"device {device}'s desired-state version floor {at_least} is past the contract's limit "
                        f"{contract.MAX_SAFE_INT}; clear its retained desired state on the broker")
    dialect = store.engine.dialect.name
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    elif dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        raise UserError(f"the monitor's store supports SQLite and PostgreSQL, not {dialect}")
    # One statement (an upsert), so two commands at once (a deploy and a rollback) never get the same version.
    current = table.c.version
    statement = insert(table).values(fleet=fleet, device=device, version=at_least + 1)
    statement = statement.on_conflict_do_update(
        index_elements=[table.c.fleet, table.c.device],
        set_={"version": case((current > at_least, current), else_=literal(at_least, BigInteger)) + 1},
    ).returning(current)
    with store.engine.begin() as conn:
        version = conn.execute(statement).scalar_one()
    return version


def create_deployment(store: Store, row: dict[str, Any], waves: list[tuple[float, list[str]]]) -> None:
    with store.engine.begin() as conn:
        conn.execute(deployments.insert().values(**row, status="running", started_ms=now_ms()))
        conn.execute(deploy_waves.insert(), [
            {"deployment_id": row["id"], "wave": i + 1, "share": share, "devices": len(names), "applied": 0,
             "failed": 0, "status": "waiting"} for i, (share, names) in enumerate(waves)])


def add_target(store: Store, deployment_id: str, fleet: str, device: str, wave: int, version: int,
               previous: tuple[str | None, str | None]) -> None:
    with store.engine.begin() as conn:
        conn.execute(deploy_targets.insert().values(
            deployment_id=deployment_id, device=device, fleet=fleet, wave=wave, version=version,
            previous_manifest_sha256=previous[0], previous_artifact=previous[1], result=TargetResult.PUBLISHED.value,
            published_ms=now_ms()))


def set_result(store: Store, deployment_id: str, device: str, result: str, error: str | None = None,
               phase: str | None = None, slot: str | None = None) -> None:
    values: dict[str, Any] = {"result": result, "error": error, "reported_ms": now_ms()}
    if phase is not None:
        values["phase"] = phase
    if slot is not None:
        values["slot"] = slot
    where = [deploy_targets.c.deployment_id == deployment_id, deploy_targets.c.device == device]
    if result in (TargetResult.IN_PROGRESS, TargetResult.TIMEOUT):  # never undoes what the device reported (the monitor may be first)
        where.append(deploy_targets.c.result.not_in(FINAL_RESULTS))
    with store.engine.begin() as conn:
        conn.execute(update(deploy_targets).where(*where).values(**values))


def update_wave(store: Store, deployment_id: str, wave: int, **values: Any) -> None:
    with store.engine.begin() as conn:
        conn.execute(update(deploy_waves).where(deploy_waves.c.deployment_id == deployment_id,
                                                deploy_waves.c.wave == wave).values(**values))


def finish(store: Store, deployment_id: str, status: str, message: str | None = None,
           mlflow_run_id: str | None = None) -> None:
    values: dict[str, Any] = {"status": status, "message": message, "finished_ms": now_ms()}
    if mlflow_run_id:
        values["mlflow_run_id"] = mlflow_run_id
    with store.engine.begin() as conn:
        conn.execute(update(deployments).where(deployments.c.id == deployment_id).values(**values))


def set_status(store: Store, deployment_id: str, status: str) -> None:
    with store.engine.begin() as conn:
        conn.execute(update(deployments).where(deployments.c.id == deployment_id).values(status=status))


# ---- reads ---------------------------------------------------------------------------------------

def deployment(store: Store, deployment_id: str) -> dict[str, Any] | None:
    with store.engine.connect() as conn:
        row = conn.execute(select(deployments).where(deployments.c.id == deployment_id)).mappings().first()
    return dict(row) if row else None


def latest_deployment(store: Store, fleet: str, action: str = "deploy") -> dict[str, Any] | None:
    with store.engine.connect() as conn:
        row = conn.execute(select(deployments).where(deployments.c.fleet == fleet, deployments.c.action == action)
                           .order_by(deployments.c.started_ms.desc(), deployments.c.id.desc()).limit(1)).mappings().first()
    return dict(row) if row else None


def deployments_list(store: Store, fleet: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
    query = select(deployments).order_by(deployments.c.started_ms.desc()).limit(limit)
    if fleet:
        query = query.where(deployments.c.fleet == fleet)
    with store.engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(query).mappings()]
        for r in rows:
            r["waves"] = json.loads(r["waves"])
            r["wave_rows"] = [dict(w) for w in conn.execute(select(deploy_waves).where(
                deploy_waves.c.deployment_id == r["id"]).order_by(deploy_waves.c.wave)).mappings()]
            counts = conn.execute(select(deploy_targets.c.result, func.count()).where(
                deploy_targets.c.deployment_id == r["id"]).group_by(deploy_targets.c.result)).all()
            r["results"] = {result: n for result, n in counts}
    return rows


def targets(store: Store, deployment_id: str) -> list[dict[str, Any]]:
    with store.engine.connect() as conn:
        return [dict(r) for r in conn.execute(select(deploy_targets).where(
            deploy_targets.c.deployment_id == deployment_id).order_by(deploy_targets.c.wave,
                                                                      deploy_targets.c.device)).mappings()]


def device_states(store: Store, fleet: str | None = None) -> dict[tuple[str, str], dict[str, Any]]:
    """Per device: its last reported deploy state, and its last deployment target row."""
    with store.engine.connect() as conn:
        query = select(device_deploy)
        if fleet:
            query = query.where(device_deploy.c.fleet == fleet)
        states = {(r["fleet"], r["device"]): dict(r) for r in conn.execute(query).mappings()}
        last = select(deploy_targets, deployments.c.action, deployments.c.artifact.label("deployment_artifact"),
                      deployments.c.started_ms).join(deployments, deployments.c.id == deploy_targets.c.deployment_id)
        if fleet:
            last = last.where(deploy_targets.c.fleet == fleet)
        targets_by_device: dict[tuple[str, str], dict[str, Any]] = {}
        for r in conn.execute(last.order_by(deployments.c.started_ms)).mappings():
            targets_by_device[(r["fleet"], r["device"])] = dict(r)
    return {key: {"state": states.get(key), "target": targets_by_device.get(key)}
            for key in states.keys() | targets_by_device.keys()}


def served_artifacts(store: Store, fleet: str) -> dict[str, dict[str, Any]]:
    """Per device of the fleet, what its current birth says it serves (the monitor's devices table)."""
    with store.engine.connect() as conn:
        return {r["device"]: dict(r) for r in conn.execute(
            select(devices.c.device, devices.c.artifact, devices.c.manifest_sha256, devices.c.model_version)
            .where(devices.c.fleet == fleet)).mappings()}
