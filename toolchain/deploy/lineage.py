"""MLflow lineage of a deployment (model version → artifact → devices), when the artifact was
built from a registered model (its manifest's ``model.source.model_uri``); as ``log_build`` in
toolchain/registry.py, one run in the training run's experiment, tagged with the model version."""

from __future__ import annotations

import contextlib
import sys
from typing import Any

from edgesmith.toolchain.deploy.archive import ArchiveInfo


def log_deployment(archive: ArchiveInfo, deployment: dict[str, Any], targets: list[dict[str, Any]],
                   rollback_id: str | None = None) -> str:
    """One run ``deploy-<deployment id>``; the model version gets a tag naming it. Returns the run id."""
    import mlflow

    from edgesmith.toolchain.registry import resolve
    from edgesmith.toolchain.train import tracking

    version = resolve(archive.model_uri)
    client = tracking.connect(version.tracking_uri)
    experiment = client.get_run(version.run_id).info.experiment_id if version.run_id else \
        tracking.experiment_id(client, "edgesmith", version.tracking_uri)
    results = {t["device"]: {"result": t["result"], "wave": t["wave"], "version": t["version"], "slot": t["slot"],
                             "error": t["error"], "previous_artifact": t["previous_artifact"]} for t in targets}
    with contextlib.redirect_stdout(sys.stderr), \
            mlflow.start_run(experiment_id=experiment, run_name=f"deploy-{deployment['id']}") as run, \
            tracking.ending_status():
        mlflow.set_tags({"edgesmith.kind": "deploy", "edgesmith.model_version_uri": archive.model_uri,
                         "edgesmith.model_run_id": version.run_id or "", "edgesmith.deployment_id": deployment["id"],
                         "edgesmith.fleet": deployment["fleet"], "edgesmith.artifact": archive.name,
                         "edgesmith.manifest_sha256": archive.manifest_sha256, "edgesmith.archive_sha256": archive.sha256,
                         "edgesmith.status": deployment["status"], "edgesmith.rollback_id": rollback_id or ""})
        mlflow.log_params({"waves": deployment["waves"], "abort_on_failure": deployment["abort_on_failure"],
                           "target": archive.target, "backend": archive.backend})
        counts: dict[str, int] = {}
        for t in targets:
            counts[t["result"]] = counts.get(t["result"], 0) + 1
        mlflow.log_metrics({"devices": len(targets), "applied": counts.get("applied", 0),
                            "failed": len(targets) - counts.get("applied", 0)})
        mlflow.log_dict(results, "deployment/devices.json")
    client.set_model_version_tag(version.name, version.version, f"edgesmith.deploy.{deployment['id']}",
                                 f"{deployment['status']} {deployment['fleet']} run {run.info.run_id}")
    return run.info.run_id
