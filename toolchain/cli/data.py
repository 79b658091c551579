"""``edgesmith data``: datasets made from captured samples (docs/capture.md)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(help="Label and inspect captured datasets (docs/capture.md).", no_args_is_help=True)


@app.command("label")
def label(
    dataset: str = typer.Argument(..., help="The dataset: its digest (or a prefix of 8+ digits) or its directory."),
    labels: Path = typer.Option(..., "--labels", help="CSV of 'key,class' lines (class: the class index); a key is a "
                                "sample id or an input digest (the SHA-256 of the sample's input bytes)."),
    skip_unknown: bool = typer.Option(False, "--skip-unknown", help="Skip lines whose key matches no sample (a "
                                      "labelling source that labels more inputs than were captured)."),
    classes: int = typer.Option(None, "--classes", min=1, help="The model's class count, when the samples carry no output."),
    datasets: Path = typer.Option(None, "--datasets", envvar="EDGESMITH_DATASETS", help="Dataset directory (default $EDGESMITH_HOME/datasets)."),
    tracking_uri: str = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI", help="MLflow tracking URI."),
    as_json: bool = typer.Option(False, "--json", help="Print the new dataset's metadata as one JSON object."),
) -> None:
    """A new labelled dataset (new digest, lineage to the unlabelled one), logged in MLflow."""
    from edgesmith.toolchain.cli import out_console
    from edgesmith.toolchain.data import datasets as ds

    labelled = ds.label(ds.open_dataset(dataset, datasets), labels, classes, skip_unknown=skip_unknown)
    run_id = ds.log_to_mlflow(labelled, tracking_uri)
    if as_json:
        print(json.dumps({**labelled.meta, "path": str(labelled.path), "mlflow_run": run_id}, indent=2))
        return
    out_console().print(f"dataset {labelled.digest}: {labelled.meta['samples']} labelled samples (from "
                        f"{labelled.meta['parent'][:12]}) in {labelled.path}; MLflow run {run_id}; train with: "
                        f"edgesmith train CONFIG --extra-data {labelled.digest[:12]}", highlight=False, soft_wrap=True)
