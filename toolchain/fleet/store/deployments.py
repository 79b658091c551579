"""Deployments in the monitor's store (docs/deployment.md §6): deployments, their waves and
per-device targets, the highest desired-state version of each device, and each device's last
reported deployment state. Written by `edgesmith deploy`/`rollback` (toolchain/deploy/rollout.py)
and, from what devices report, by ingest (record_report); read by `fleet status` and the monitor.
Both toolchain/deploy and toolchain/fleet import this module; it imports neither's other modules.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any

from sqlalchemy import BigInteger, Column, Float, Integer, String, Table, Text, case, func, literal, select, update
from sqlalchemy.engine import Connection

from edgesmith.runtime import contract
from edgesmith.toolchain.errors import UserError
from edgesmith.toolchain.fleet.store.engine import StoreBase, dialect_insert, insert_ignore, metadata, now_ms
from edgesmith.toolchain.fleet.store.ingest import devices

deployments = Table(
    "deployments", metadata,
    Column("id", String(64), primary_key=True),  # dep-YYYYMMDD-HHMM-xxxxxx
    Column("fleet", String(64), nullable=False, index=True),
    Column("action", String(16), nullable=False),  # deploy | rollback
    Column("rolls_back", String(64)),  # the deployment a rollback undoes
    Column("artifact", Text, nullable=False), Column("archive_sha256", String(64), nullable=False),
    Column("manifest_sha256", String(64), nullable=False), Column("model", Text), Column("model_version", Text),
    Column("model_uri", Text), Column("url", Text, nullable=False), Column("key_id", String(16), nullable=False),
    Column("waves", Text, nullable=False),  # the plan: cumulative shares, JSON
    Column("abort_on_failure", Float),
    Column("status", String(16), nullable=False),  # running | completed | aborted | rolled-back | failed | interrupted
    Column("message", Text),
    Column("mlflow_run_id", String(64)),
    Column("started_ms", BigInteger, nullable=False), Column("finished_ms", BigInteger),
)

deploy_waves = Table(
    "deploy_waves", metadata,
    Column("deployment_id", String(64), primary_key=True),
    Column("wave", Integer, primary_key=True, autoincrement=False),
    Column("share", Float, nullable=False), Column("devices", Integer, nullable=False),
    Column("applied", Integer, nullable=False), Column("failed", Integer, nullable=False),
    Column("status", String(16), nullable=False),  # waiting | running | done | aborted | skipped
    Column("started_ms", BigInteger), Column("finished_ms", BigInteger),
)

deploy_targets = Table(
    "deploy_targets", metadata,
    Column("deployment_id", String(64), primary_key=True),
    Column("device", String(64), primary_key=True),
    Column("fleet", String(64), nullable=False),
    Column("wave", Integer, nullable=False),
    Column("version", BigInteger, nullable=False),  # the desired state's version
    Column("previous_manifest_sha256", String(64)),  # what it served before (a rollback's target)
    Column("previous_artifact", Text),
    Column("result", String(16), nullable=False),  # published | in-progress | applied | failed | refused | timeout
    Column("phase", String(16)), Column("error", Text), Column("slot", String(8)),
    Column("published_ms", BigInteger, nullable=False), Column("reported_ms", BigInteger),
)

desired_versions = Table(  # the highest desired-state version published per device (strictly increasing)
    "desired_versions", metadata,
    Column("fleet", String(64), primary_key=True),
    Column("device", String(64), primary_key=True),
    Column("version", BigInteger, nullable=False),
)

device_deploy = Table(  # each device's last reported deployment state (its newest `state` message)
    "device_deploy", metadata,
    Column("fleet", String(64), primary_key=True),
    Column("device", String(64), primary_key=True),
    Column("seq", BigInteger, nullable=False),
    Column("artifact_sha256", String(64)), Column("artifact", Text), Column("slot", String(8)),
    Column("desired_version", BigInteger), Column("deployment_id", String(64)),
    Column("result", String(16)), Column("phase", String(16)), Column("error", Text),
    Column("received_ms", BigInteger, nullable=False),
)

deployed_manifests = Table(  # what each deployed artifact's manifest says about its telemetry (model groups)
    "deployed_manifests", metadata,
    Column("manifest_sha256", String(64), primary_key=True),
    Column("monitoring", Text, nullable=False),  # the manifest's `monitoring` (latency layout, outputs, references), JSON
    Column("recorded_ms", BigInteger, nullable=False),
)

DEPLOY_TABLES = (deployments, deploy_waves, deploy_targets, desired_versions, device_deploy, deployed_manifests)
FINAL_RESULTS = tuple(r.value for r in contract.FINAL_RESULTS)


def deploy_report(msg: Any) -> dict[str, Any] | None:
    """What a device's ``state``/``event`` message says about a deployment (§5), or None."""
    if msg.kind == contract.MessageKind.EVENT:
        report = msg.deploy_report()
        if report is None:
            return None
        result = report.result or contract.EVENT_RESULTS.get(msg.event)
    elif msg.kind == contract.MessageKind.STATE:
        report = msg.details
        result = report.result
    else:
        return None
    if report.deployment_id is None or result is None:
        return None
    return {"deployment_id": report.deployment_id, "result": result.value,
            "phase": report.phase.value if report.phase else None,
            "error": report.error[:2000] if report.error is not None else None, "slot": report.slot}


class TargetResult(StrEnum):
    """A deployment target's result in the store: the device's words (contract.DeployResult), and
    the central side's own: published (sent, nothing heard yet) and timeout (nothing heard in time)."""

    PUBLISHED = "published"
    IN_PROGRESS = contract.DeployResult.IN_PROGRESS.value
    APPLIED = contract.DeployResult.APPLIED.value
    FAILED = contract.DeployResult.FAILED.value
    REFUSED = contract.DeployResult.REFUSED.value
    TIMEOUT = "timeout"


def record_report(conn: Connection, received_ms: int, msg: Any) -> None:
    """A device's report of a deployment: its deploy state (newest state message wins) and the
    result of that deployment's target row, if `edgesmith deploy` made one."""
    report = deploy_report(msg)
    if msg.kind == contract.MessageKind.STATE:
        d: contract.DeployReport = msg.details  # bounded by the contract
        values = {"seq": msg.seq, "artifact_sha256": msg.artifact_sha256,
                  "artifact": d.artifact[:200] if d.artifact is not None else None, "slot": d.slot,
                  "deployment_id": d.deployment_id, "desired_version": d.desired_version,
                  "result": d.result.value if d.result else None, "phase": d.phase.value if d.phase else None,
                  "error": d.error[:2000] if d.error is not None else None, "received_ms": received_ms}
        key = (device_deploy.c.fleet == msg.fleet, device_deploy.c.device == msg.device)
        if not conn.execute(update(device_deploy).where(*key, device_deploy.c.seq < msg.seq)
                            .values(**values)).rowcount:
            conn.execute(insert_ignore(conn.dialect, device_deploy).values(fleet=msg.fleet, device=msg.device,
                                                                           **values))
    if report is None:
        return
    where = [deploy_targets.c.deployment_id == report["deployment_id"], deploy_targets.c.device == msg.device,
             deploy_targets.c.fleet == msg.fleet]
    if report["result"] == "in-progress":  # never undoes a final result
        where.append(deploy_targets.c.result.not_in(FINAL_RESULTS))
    values = {k: v for k, v in report.items() if k != "deployment_id" and (v is not None or k == "error")}
    conn.execute(update(deploy_targets).where(*where).values(**values, reported_ms=received_ms))


def ensure_tables(store: StoreBase) -> None:
    """Stores made before deployments existed get the tables (the monitor's create_all does too)."""
    metadata.create_all(store.engine, tables=list(DEPLOY_TABLES))


def has_tables(store: StoreBase) -> bool:
    with store.engine.connect() as conn:
        return all(store.engine.dialect.has_table(conn, t.name) for t in DEPLOY_TABLES)


def issued_version(store: StoreBase, fleet: str, device: str) -> int:
    """The highest desired-state version the store has issued to a device (0: none)."""
    with store.engine.connect() as conn:
        version = conn.scalar(select(desired_versions.c.version).where(desired_versions.c.fleet == fleet,
                                                                      desired_versions.c.device == device))
    return int(version or 0)


def reserve_version(store: StoreBase, fleet: str, device: str, at_least: int = 0, table: Table | None = None) -> int:
    """The next desired-state version of a device, above every one published (stored before use,
    so a crash after publishing never reuses it) and above ``at_least`` (what the broker knows, in
    case the store is newer than the fleet; a device's own claim is clamped to what was issued
    before it gets here: FleetWatch.version_floor). ``table``: the counter's table, default
    ``desired_versions`` (shadow states keep their own: shadows.shadow_versions)."""
    table = desired_versions if table is None else table
    if not 0 <= at_least < contract.MAX_SAFE_INT:
        raise UserError(f"device {device}'s desired-state version floor {at_least} is past the contract's limit "
                        f"{contract.MAX_SAFE_INT}; clear its retained desired state on the broker")
    # One statement (an upsert), so two commands at once (a deploy and a rollback) never get the same version.
    current = table.c.version
    statement = dialect_insert(store.engine.dialect, table).values(fleet=fleet, device=device, version=at_least + 1)
    statement = statement.on_conflict_do_update(
        index_elements=[table.c.fleet, table.c.device],
        set_={"version": case((current > at_least, current), else_=literal(at_least, BigInteger)) + 1},
    ).returning(current)
    with store.engine.begin() as conn:
        version = conn.execute(statement).scalar_one()
    return version


def create_deployment(store: StoreBase, row: dict[str, Any], waves: list[tuple[float, list[str]]]) -> None:
    with store.engine.begin() as conn:
        conn.execute(deployments.insert().values(**row, status="running", started_ms=now_ms()))
        conn.execute(deploy_waves.insert(), [
            {"deployment_id": row["id"], "wave": i + 1, "share": share, "devices": len(names), "applied": 0,
             "failed": 0, "status": "waiting"} for i, (share, names) in enumerate(waves)])


def add_target(store: StoreBase, deployment_id: str, fleet: str, device: str, wave: int, version: int,
               previous: tuple[str | None, str | None]) -> None:
    with store.engine.begin() as conn:
        conn.execute(deploy_targets.insert().values(
            deployment_id=deployment_id, device=device, fleet=fleet, wave=wave, version=version,
            previous_manifest_sha256=previous[0], previous_artifact=previous[1], result=TargetResult.PUBLISHED.value,
            published_ms=now_ms()))


def set_result(store: StoreBase, deployment_id: str, device: str, result: str, error: str | None = None,
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


def update_wave(store: StoreBase, deployment_id: str, wave: int, **values: Any) -> None:
    with store.engine.begin() as conn:
        conn.execute(update(deploy_waves).where(deploy_waves.c.deployment_id == deployment_id,
                                                deploy_waves.c.wave == wave).values(**values))


def finish(store: StoreBase, deployment_id: str, status: str, message: str | None = None,
           mlflow_run_id: str | None = None) -> None:
    values: dict[str, Any] = {"status": status, "message": message, "finished_ms": now_ms()}
    if mlflow_run_id:
        values["mlflow_run_id"] = mlflow_run_id
    with store.engine.begin() as conn:
        conn.execute(update(deployments).where(deployments.c.id == deployment_id).values(**values))


def set_status(store: StoreBase, deployment_id: str, status: str) -> None:
    with store.engine.begin() as conn:
        conn.execute(update(deployments).where(deployments.c.id == deployment_id).values(status=status))


def record_manifest(store: StoreBase, manifest_sha256: str, monitoring: dict[str, Any]) -> None:
    """What a deployed artifact's manifest says its devices report (written by `edgesmith deploy`
    and `rollback` from the signed archive): the model group of that digest takes its latency
    layout and drift references from here, never from a device's birth."""
    with store.engine.begin() as conn:
        conn.execute(insert_ignore(store.engine.dialect, deployed_manifests).values(
            manifest_sha256=manifest_sha256, monitoring=json.dumps(monitoring), recorded_ms=now_ms()))


# ---- reads ---------------------------------------------------------------------------------------

def manifest_monitoring(store: StoreBase, sha: str) -> dict[str, Any] | None:
    """The stored `monitoring` of a deployed manifest (record_manifest), or None."""
    with store.engine.connect() as conn:
        if not store.engine.dialect.has_table(conn, "deployed_manifests"):
            return None
        text = conn.scalar(select(deployed_manifests.c.monitoring).where(deployed_manifests.c.manifest_sha256 == sha))
    return json.loads(text) if text else None


def applied_devices(store: StoreBase, fleet: str, sha: str, names: list[str]) -> set[str]:
    """Which of ``names`` (devices of ``fleet``) a deployment of manifest ``sha`` was applied to."""
    found: set[str] = set()
    with store.engine.connect() as conn:
        for i in range(0, len(names), 500):
            found.update(conn.scalars(
                select(deploy_targets.c.device).join(deployments, deployments.c.id == deploy_targets.c.deployment_id)
                .where(deployments.c.manifest_sha256 == sha, deploy_targets.c.fleet == fleet,
                       deploy_targets.c.result == TargetResult.APPLIED.value,
                       deploy_targets.c.device.in_(names[i:i + 500]))))
    return found


def deployed_manifest(store: StoreBase, sha: str) -> dict[str, Any] | None:
    """Labels of a manifest digest some deployment sent (None when no deployment names it)."""
    with store.engine.connect() as conn:
        if not store.engine.dialect.has_table(conn, "deployments"):
            return None
        row = conn.execute(select(deployments.c.model, deployments.c.model_version, deployments.c.artifact)
                           .where(deployments.c.manifest_sha256 == sha).limit(1)).first()
    if row is None:
        return None
    return {"model": row.model, "version": row.model_version, "target": "unknown", "artifact": row.artifact}


def deployment(store: StoreBase, deployment_id: str) -> dict[str, Any] | None:
    with store.engine.connect() as conn:
        row = conn.execute(select(deployments).where(deployments.c.id == deployment_id)).mappings().first()
    return dict(row) if row else None


def latest_deployment(store: StoreBase, fleet: str, action: str = "deploy") -> dict[str, Any] | None:
    with store.engine.connect() as conn:
        row = conn.execute(select(deployments).where(deployments.c.fleet == fleet, deployments.c.action == action)
                           .order_by(deployments.c.started_ms.desc(), deployments.c.id.desc()).limit(1)).mappings().first()
    return dict(row) if row else None


def deployments_list(store: StoreBase, fleet: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
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


def targets(store: StoreBase, deployment_id: str) -> list[dict[str, Any]]:
    with store.engine.connect() as conn:
        return [dict(r) for r in conn.execute(select(deploy_targets).where(
            deploy_targets.c.deployment_id == deployment_id).order_by(deploy_targets.c.wave,
                                                                      deploy_targets.c.device)).mappings()]


def device_states(store: StoreBase, fleet: str | None = None) -> dict[tuple[str, str], dict[str, Any]]:
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


def served_artifacts(store: StoreBase, fleet: str) -> dict[str, dict[str, Any]]:
    """Per device of the fleet, what its current birth says it serves (the monitor's devices table)."""
    with store.engine.connect() as conn:
        return {r["device"]: dict(r) for r in conn.execute(
            select(devices.c.device, devices.c.artifact, devices.c.manifest_sha256, devices.c.model_version)
            .where(devices.c.fleet == fleet)).mappings()}
