"""``edgesmith train``: train a model from a TOML config, track it in MLflow, register it."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import typer

from edgesmith.toolchain.cli import out_console


def train(
    config: Path = typer.Argument(..., help="Training config (TOML); see docs/training.md and examples/digits.toml."),
    search: int = typer.Option(0, "--search", min=0, help="Run an Optuna search of N trials over the config's [search] space; the best trial is registered."),
    tracking_uri: str = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI",
                                     help="MLflow tracking URI (default sqlite:///<edgesmith home>/mlflow.db)."),
    seed: int = typer.Option(None, "--seed", help="Override the config's seed."),
    epochs: int = typer.Option(None, "--epochs", min=1, help="Override the config's epochs."),
    alias: str = typer.Option(None, "--alias", help="Also point this registered-model alias (e.g. champion) at the new version."),
    extra_data: str = typer.Option(None, "--extra-data", help="A labelled captured dataset (digest or directory; "
                                   "`edgesmith data label`) mixed into training and evaluation, split by the seed."),
    alert: str = typer.Option(None, "--alert", help="The alert this training answers; named in the new version's lineage."),
    datasets: Path = typer.Option(None, "--datasets", envvar="EDGESMITH_DATASETS", help="Dataset directory (default $EDGESMITH_HOME/datasets)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
) -> None:
    """Train (data-parallel under torchrun), log to MLflow and register the ONNX export as a model version."""
    from edgesmith.toolchain.train.config import load_config
    from edgesmith.toolchain.train.run import train_and_register
    from edgesmith.toolchain.train.search import run_search
    from edgesmith.toolchain.train.loop import world

    cfg = load_config(config).with_overrides(seed=seed, epochs=epochs)
    lead = world()[0] == 0
    # a tracking server's client prints run URLs on stdout: keep stdout for the JSON with --json
    with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
        if search:
            if extra_data or alert:
                from edgesmith.toolchain.errors import UserError

                raise UserError("--extra-data and --alert train one model; run them without --search")
            summary = run_search(cfg, search, tracking_uri, alias, progress=not as_json)
        else:
            summary = train_and_register(cfg, tracking_uri, alias, progress=lead and not as_json,
                                         extra_data=extra_data, alert=alert, datasets_dir=datasets)
    if not lead:
        return
    if as_json:
        print(json.dumps(summary.__dict__, indent=2))
        return
    what = f"trial {summary.best_trial} of {summary.trials}" if summary.best_trial is not None else \
        f"{summary.epochs_run} epochs on {summary.world_size} process(es), best epoch {summary.best_epoch}"
    out_console().print(f"[bold]{summary.model_name}[/] version {summary.version}: test accuracy "
                        f"{summary.test_accuracy:.2%} ({what}, {summary.duration_s:.1f} s); run {summary.run_id}; "
                        f"build it with: edgesmith build models:/{summary.model_name}/{summary.version}", highlight=False, soft_wrap=True)


def main() -> None:
    """Entry point of ``python -m edgesmith.toolchain.train`` (and so of torchrun)."""
    from edgesmith.toolchain.cli import run

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(train)
    run(app, "interrupted; the MLflow run was ended as KILLED")
