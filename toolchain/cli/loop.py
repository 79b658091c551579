"""``edgesmith loop``: a drift alert's retrain request carried to a retrained model on the devices
(docs/loop.md). A thin body over toolchain/loop.py."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from edgesmith.toolchain.cli.capture import BROKER_HELP, DIR_HELP, KEY_HELP
from edgesmith.toolchain.cli.deploy import BASE_URL_HELP, NO_SERVE_HELP, STORE_HELP, TIMEOUT_HELP, _say


def loop(
    fleet: str = typer.Option(..., "--fleet", envvar="EDGESMITH_FLEET", help="The fleet."),
    on_alert: str = typer.Option("drift", "--on-alert", help="The alert whose retrain requests to act on (drift)."),
    labels_from: Path = typer.Option(..., "--labels-from", help="The labelling source: a CSV of 'key,class' lines, "
                                     "a key being a sample id or an input digest (docs/capture.md); keys matching "
                                     "no captured sample are skipped."),
    config: Path = typer.Option(Path("examples/digits.toml"), "--config", help="The training config (TOML)."),
    request: str = typer.Option(None, "--request", help="The retrain request (default: the fleet's oldest active one)."),
    broker: Path = typer.Option(..., "--broker", envvar="EDGESMITH_BROKER_DIR", help=BROKER_HELP),
    db: str = typer.Option(None, "--db", envvar="EDGESMITH_FLEET_DB", help="The monitor's store (retrain requests)."),
    receiver: str = typer.Option(None, "--receiver", envvar="EDGESMITH_CAPTURE_URL",
                                 help="A running `edgesmith capture serve` devices upload to; default: a receiver "
                                      "in this process on --listen."),
    listen: str = typer.Option("127.0.0.1:0", "--listen", help="HOST:PORT of the receiver run here (no --receiver)."),
    directory: Path = typer.Option(None, "--dir", envvar="EDGESMITH_CAPTURE_DIR", help=DIR_HELP),
    datasets: Path = typer.Option(None, "--datasets", envvar="EDGESMITH_DATASETS", help="Dataset directory (default $EDGESMITH_HOME/datasets)."),
    policy: str = typer.Option("drift:1.0", "--policy", help="What the devices capture (`capture start --policy`)."),
    max_samples: int = typer.Option(300, "--max-samples", min=1, help="Samples per drifted device."),
    capture_timeout: float = typer.Option(300.0, "--capture-timeout", min=1, help="Seconds to wait for the samples."),
    alias: str = typer.Option("challenger", "--alias", help="Registered-model alias of the retrained version."),
    target: str = typer.Option(None, "--target", "-t", help="Build for this target (default: the drifted devices')."),
    backend: str = typer.Option(None, "--backend", help="Build only this backend (default: the build's default "
                                "selection among the target's backends)."),
    precision: str = typer.Option(None, "--precision", help="Build this precision (default: the build's default)."),
    output: Path = typer.Option(Path("dist/loop"), "--output", "-o", help="Where the retrained model is built."),
    min_accuracy: float = typer.Option(0.9, "--min-accuracy", help="Gate: top-1 accuracy of the built model on the "
                                       "labelled captured samples training held out."),
    shadow_duration: int = typer.Option(20, "--shadow-duration", min=1, help="Seconds the shadow runs."),
    shadow_sample: float = typer.Option(0.5, "--shadow-sample", help="Share of served requests the shadow runs."),
    shadow_min_samples: int = typer.Option(20, "--shadow-min-samples", min=1, help="Gate: shadow samples per device."),
    max_latency_ratio: float = typer.Option(3.0, "--max-latency-ratio", help="Gate: candidate p50 / serving p50 in "
                                            "the shadow, on every drifted device."),
    waves: str = typer.Option("34%,100%", "--waves", help="The canary rollout's cumulative shares of the fleet."),
    abort_on_failure: str = typer.Option("34%", "--abort-on-failure", help="Abort and roll back past this share failed."),
    wave_timeout: float = typer.Option(120.0, "--wave-timeout", min=0.1, help=TIMEOUT_HELP),
    previous: list[Path] = typer.Option(None, "--previous", help="Artifact directories devices serve now (rollback "
                                        "targets, and the serving model's accuracy for comparison)."),
    key: Path = typer.Option(None, "--key", envvar="EDGESMITH_DEPLOY_KEY", help=KEY_HELP),
    store: Path = typer.Option(None, "--store", envvar="EDGESMITH_ARTIFACT_STORE", help=STORE_HELP),
    serve: str = typer.Option("127.0.0.1:0", "--serve", envvar="EDGESMITH_ARTIFACT_HTTP",
                              help="Serve the artifact store over HTTP from this command, on HOST:PORT."),
    base_url: str = typer.Option(None, "--base-url", envvar="EDGESMITH_ARTIFACT_URL", help=BASE_URL_HELP),
    no_serve: bool = typer.Option(False, "--no-serve", help=NO_SERVE_HELP),
    tracking_uri: str = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI", help="MLflow tracking URI."),
    as_json: bool = typer.Option(False, "--json", help="Print the retrain request and its steps as JSON at the end."),
) -> None:
    """Close the loop on a retrain request: capture -> upload -> pull -> label -> train -> build -> held-out
    gate -> shadow (latency gate) -> canary rollout. Each step is recorded on the request; run again to
    resume at the first step not done. Stops at the first failed gate."""
    from edgesmith.toolchain.errors import UserError
    from edgesmith.toolchain.fleet.store import default_url, retrain
    from edgesmith.toolchain.loop import Loop, LoopConfig

    if on_alert != "drift":
        raise UserError(f"--on-alert {on_alert}: only drift alerts open retrain requests; pass --on-alert drift")
    cfg = LoopConfig(fleet=fleet, broker_dir=broker, db_url=db or default_url(), config=config, labels=labels_from,
                     request=request, receiver=receiver, listen=listen, capture_dir=directory, datasets=datasets,
                     store_dir=store, key=key, tracking_uri=tracking_uri, policy=policy, max_samples=max_samples,
                     capture_timeout_s=capture_timeout, alias=alias, target=target, backend=backend, precision=precision,
                     output=output,
                     min_accuracy=min_accuracy, shadow_duration_s=shadow_duration, shadow_sample=shadow_sample,
                     shadow_min_samples=shadow_min_samples, max_latency_ratio=max_latency_ratio, waves=waves,
                     abort_on_failure=abort_on_failure, wave_timeout_s=wave_timeout, previous=list(previous or []),
                     serve=serve, base_url=base_url, no_serve=no_serve)
    from edgesmith.toolchain.cli import err_console, stdout_reserved

    say = (lambda line: err_console.print(line, markup=False, highlight=False, soft_wrap=True)) if as_json else _say
    with stdout_reserved(as_json):  # engines and child processes may write to descriptor 1
        runner = Loop(cfg, say)
        row = runner.run()
    if as_json:
        print(json.dumps({**row, "steps": retrain.steps(runner.store, row["id"])}, indent=2))
