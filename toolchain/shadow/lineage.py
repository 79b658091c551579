"""MLflow lineage of a measured selection (`edgesmith select --from-shadow`), when the chosen
candidate was built from a registered model; as a deployment's (toolchain/deploy/lineage.py): one
run in the model's experiment, tagged with the model version, holding which candidates were
measured on which devices and the choice."""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Any


def log_selection(shadow: dict[str, Any], candidate: dict[str, Any], selection: dict[str, Any]) -> str:
    """One run ``select-<shadow id>``; the model version gets a tag naming the choice. Returns the run id."""
    import mlflow

    from edgesmith.toolchain.registry import resolve
    from edgesmith.toolchain.train import tracking

    version = resolve(candidate["model_uri"])
    client = tracking.connect(version.tracking_uri)
    experiment = client.get_run(version.run_id).info.experiment_id if version.run_id else \
        tracking.experiment_id(client, "edgesmith", version.tracking_uri)
    measured_on = json.loads(selection["measured_on"])
    with contextlib.redirect_stdout(sys.stderr), \
            mlflow.start_run(experiment_id=experiment, run_name=f"select-{shadow['id']}") as run, \
            tracking.ending_status():
        mlflow.set_tags({"edgesmith.kind": "select", "edgesmith.model_version_uri": candidate["model_uri"],
                         "edgesmith.shadow_id": shadow["id"], "edgesmith.fleet": shadow["fleet"],
                         "edgesmith.artifact": candidate["name"],
                         "edgesmith.manifest_sha256": candidate["manifest_sha256"],
                         "edgesmith.measured_on": ",".join(sorted(measured_on))})
        mlflow.log_params({"min_agreement": selection["min_agreement"],
                           "max_latency_ratio": selection["max_latency_ratio"], "min_samples": selection["min_samples"],
                           "target": candidate["target"], "backend": candidate["backend"],
                           "candidates": len(shadow["candidates"]), "devices": len(measured_on)})
        mlflow.log_dict({"measured_on": measured_on, "candidates": shadow["candidates"],
                         "chosen": candidate["name"], "figures": json.loads(selection["figures"])},
                        "selection/shadow.json")
    devices = ",".join(sorted(measured_on))
    client.set_model_version_tag(version.name, version.version, f"edgesmith.select.{shadow['id']}",
                                 f"{candidate['name']} measured on {devices} run {run.info.run_id}")
    return run.info.run_id
