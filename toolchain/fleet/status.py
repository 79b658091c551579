"""What `edgesmith fleet status` shows: each device (presence, artifact, latency, deployment state,
its active retrain request), the fleet's artifact mix, recent deployments with their waves, and the
retrain requests drift alerts opened (from the monitor's store)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from edgesmith.toolchain.fleet.store import Store, fleet_status
from edgesmith.toolchain.fleet.store import deployments as history
from edgesmith.toolchain.fleet.store import retrain


def deploy_info(entry: dict[str, Any] | None) -> dict[str, Any]:
    """The device's last deployment as the store knows it: the newest of its reported state and the
    rollout's target row (a rollout may have recorded a result the monitor has not seen, or the reverse)."""
    if not entry:
        return {}
    state, target = entry["state"], entry["target"]
    info: dict[str, Any] = {}
    if state:
        info.update(slot=state["slot"], deployment_id=state["deployment_id"], result=state["result"],
                    phase=state["phase"], error=state["error"], desired_version=state["desired_version"],
                    reported_artifact=state["artifact"])
    if target and (not state or state["deployment_id"] != target["deployment_id"]
                   or (target["reported_ms"] or 0) >= state["received_ms"]):
        info.update(deployment_id=target["deployment_id"], result=target["result"], error=target["error"],
                    desired_version=target["version"], action=target["action"], wave=target["wave"])
        if target["slot"]:
            info["slot"] = target["slot"]
    elif target:
        info.update(action=target["action"], wave=target["wave"])
    return info


def fleet_overview(store: Store, fleet: str | None, default_interval_s: float,
                   deployments: int = 5, retrain_shown: int = 10) -> dict[str, Any]:
    rows = [r for r in fleet_status(store, default_interval_s) if fleet is None or r["fleet"] == fleet]
    deploy = history.device_states(store, fleet) if history.has_tables(store) else {}
    for r in rows:
        r["deploy"] = deploy_info(deploy.pop((r["fleet"], r["device"]), None))
    for (fleet_name, device), entry in sorted(deploy.items()):  # targeted, but the monitor never heard from it
        rows.append({"device": device, "fleet": fleet_name, "online": False, "silent": True, "session_open": False,
                     "artifact": None, "manifest_sha256": None, "model": None, "version": None, "target": None, "backend": None, "bd_seq": None,
                     "latency": {"p50_us": None, "p95_us": None, "p99_us": None, "window_end_ms": None},
                     "runs": 0, "errors": 0, "messages": 0, "duplicates": 0, "gaps": 0, "last_seen_ms": None,
                     "deploy": deploy_info(entry)})
    # Builds of one model for one target share a name: the manifest digest tells them apart.
    versions = Counter(f"{r['artifact']} ({r['manifest_sha256'][:8]})" if r["artifact"] and r["manifest_sha256"]
                       else r["artifact"] or "unknown" for r in rows)
    listed = history.deployments_list(store, fleet, deployments) if deployments and history.has_tables(store) else []
    naming = retrain.naming(store, fleet)
    for r in rows:
        r["retrain"] = naming.get((r["fleet"], r["device"]))
    shown = retrain.requests(store, fleet, limit=retrain_shown)  # the active ones first, then the newest closed
    return {"devices": rows, "versions": dict(versions.most_common()), "deployments": listed, "retrain": shown}
