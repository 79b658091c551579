"""``edgesmith deploy`` and ``edgesmith rollback``: staged, signed rollouts over the fleet's broker
(docs/deployment.md §6). Thin bodies over toolchain/deploy/."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import typer

BROKER_HELP = "The broker's directory (`edgesmith broker up --dir`); desired states are published with its monitor login."
DB_HELP = "Database URL of the monitor's store, where deployments are recorded (default: the monitor's default)."
STORE_HELP = "Artifact store directory: archives served to devices (default $EDGESMITH_HOME/deploy/artifacts)."
SERVE_HELP = "Serve the artifact store over HTTP from this command, on HOST:PORT, while it runs."
BASE_URL_HELP = ("The URL devices download archives from (<URL>/artifacts/<sha256>.tar); default http://<--serve>. "
                 "Needed when --serve listens on 0.0.0.0 or with --no-serve.")
NO_SERVE_HELP = "Serve nothing here: devices download from --base-url (`edgesmith fleet serve-artifacts` on the same --store)."
KEY_HELP = "Deploy key (.key) signing the desired states (default $EDGESMITH_HOME/keys/deploy/default.key)."
TIMEOUT_HELP = "Seconds a wave waits for its devices' results; a device silent that long counts as failed."


def _say(line: str) -> None:
    from rich.markup import escape

    from edgesmith.toolchain.cli import out_console

    bad = line.startswith("ABORT") or any(f": {r}" in line for r in ("failed", "refused", "timeout"))
    style = "bold red" if bad else None
    out_console().print(escape(line), style=style, highlight=False, soft_wrap=True)


@contextlib.contextmanager
def _serving(store_dir: Path, serve: str, base_url: str | None, no_serve: bool) -> Iterator[str]:
    """The base URL devices download from; the store served from this process unless --no-serve."""
    from edgesmith.toolchain.errors import UserError

    if base_url and not base_url.startswith(("http://", "https://")):  # what devices download from (desired.cc)
        raise UserError(f"--base-url {base_url} is not an http:// or https:// URL, and devices download archives "
                        "only over those; pass e.g. --base-url https://<server>:8470")
    if no_serve:
        if not base_url:
            raise UserError("--no-serve needs --base-url: the URL of the server devices download the archives from "
                            "(`edgesmith fleet serve-artifacts` on the same --store)")
        yield base_url.rstrip("/")
        return
    from edgesmith.toolchain.deploy.server import ArtifactServer
    from edgesmith.toolchain.fleet.monitor import parse_http

    host, port = parse_http(serve)
    if host in ("0.0.0.0", "::") and not base_url:
        raise UserError(f"--serve {serve} listens on every address, so it names none devices can download from; "
                        f"also pass --base-url http://<an address devices reach>:{port or '<port>'}")
    with ArtifactServer(store_dir, host, port) as server:
        yield (base_url or server.url).rstrip("/")


def _config(fleet: str, broker: Path, waves: str, abort_on_failure: str, wave_timeout: float, key: Path | None,
            store_dir: Path, base_url: str, devices: list[str] | None):
    from edgesmith.toolchain.deploy.rollout import RolloutConfig, parse_share, parse_waves
    from edgesmith.toolchain.signing import load_deploy_key

    return RolloutConfig(fleet=fleet, broker_dir=broker, shares=parse_waves(waves),
                         abort_on_failure=parse_share(abort_on_failure, "--abort-on-failure"),
                         wave_timeout_s=wave_timeout, key=load_deploy_key(key), base_url=base_url,
                         store_dir=store_dir, devices=_split(devices))


def _split(values: list[str] | None) -> list[str] | None:
    names = [n.strip() for v in values or [] for n in v.split(",") if n.strip()]
    return names or None


def deploy(
    artifact: Path = typer.Argument(..., help="The artifact directory (`edgesmith build` output) to roll out."),
    fleet: str = typer.Option(..., "--fleet", envvar="EDGESMITH_FLEET", help="The fleet (topic level) to deploy to."),
    broker: Path = typer.Option(..., "--broker", envvar="EDGESMITH_BROKER_DIR", help=BROKER_HELP),
    waves: str = typer.Option("10%,50%,100%", "--waves", help="Cumulative shares of the devices per wave."),
    abort_on_failure: str = typer.Option("20%", "--abort-on-failure", help="Abort and roll back when more than this "
                                         "share of the devices targeted so far failed."),
    devices: list[str] = typer.Option(None, "--devices", help="Only these devices (comma-separated or repeated), in "
                                      "this order; default every device the broker has in the fleet, sorted."),
    wave_timeout: float = typer.Option(660.0, "--wave-timeout", min=0.1, help=TIMEOUT_HELP),
    previous: list[Path] = typer.Option(None, "--previous", help="Artifact directories devices may serve now (e.g. "
                                        "their factory artifact): archived so an abort can roll back to them."),
    key: Path = typer.Option(None, "--key", envvar="EDGESMITH_DEPLOY_KEY", help=KEY_HELP),
    db: str = typer.Option(None, "--db", envvar="EDGESMITH_FLEET_DB", help=DB_HELP),
    store: Path = typer.Option(None, "--store", envvar="EDGESMITH_ARTIFACT_STORE", help=STORE_HELP),
    serve: str = typer.Option("127.0.0.1:8470", "--serve", envvar="EDGESMITH_ARTIFACT_HTTP", help=SERVE_HELP),
    base_url: str = typer.Option(None, "--base-url", envvar="EDGESMITH_ARTIFACT_URL", help=BASE_URL_HELP),
    no_serve: bool = typer.Option(False, "--no-serve", help=NO_SERVE_HELP),
    require_shadow: str = typer.Option(None, "--require-shadow", help="Refuse, with the figures, unless the artifact "
                                       "was a candidate of this shadow and met the bounds below on every shadowed "
                                       "device (docs/shadow.md)."),
    min_agreement: float = typer.Option(0.99, "--min-agreement", help="With --require-shadow: the top-1 agreement "
                                        "with the serving model needed on every shadowed device."),
    max_latency_ratio: float = typer.Option(None, "--max-latency-ratio", help="With --require-shadow: the highest "
                                            "candidate p50 / serving p50 allowed on any shadowed device."),
    min_samples: int = typer.Option(100, "--min-samples", help="With --require-shadow: samples needed per device."),
) -> None:
    """Roll an artifact out in waves: signed desired states, each wave waits for its devices' reports;
    past --abort-on-failure the rollout aborts and rolls back (exit status 1)."""
    from edgesmith.runtime import artifact as runtime_artifact
    from edgesmith.toolchain.cli.artifacts import trusted_keys
    from edgesmith.toolchain.deploy import archive as archive_mod
    from edgesmith.toolchain.fleet.store import deployments as history
    from edgesmith.toolchain.deploy.rollout import deploy as run_deploy
    from edgesmith.toolchain.fleet.store import Store, default_url

    store_dir = store or archive_mod.default_store_dir()
    manifest, manifest_sha256 = archive_mod.read_manifest(artifact)  # a path that is no artifact: one sentence first
    runtime_artifact.verify(artifact, trusted_keys(None))  # what devices will check, checked here first
    config = _config(fleet, broker, waves, abort_on_failure, wave_timeout, key, store_dir, "", devices)
    fleet_store = Store.open(db or default_url())
    if require_shadow:
        from edgesmith.toolchain.shadow.results import require

        verdict = require(fleet_store, require_shadow, manifest_sha256, manifest.name, min_agreement,
                          max_latency_ratio, min_samples, fleet)
        _say(f"shadow {require_shadow}: {manifest.name} met the bounds on {len(verdict.figures)} device(s) (worst "
             f"latency ratio {verdict.worst_ratio:.3f})" if verdict.worst_ratio is not None else
             f"shadow {require_shadow}: {manifest.name} met the bounds on {len(verdict.figures)} device(s)")
    elif max_latency_ratio is not None:
        from edgesmith.toolchain.errors import UserError

        raise UserError("--max-latency-ratio bounds a shadow's figures; pass the shadow with --require-shadow SH-ID")
    info = archive_mod.archive(artifact, store_dir)
    for directory in previous or []:
        archive_mod.archive(directory, store_dir)
    with _serving(store_dir, serve, base_url, no_serve) as url:
        config.base_url = url
        result = run_deploy(info, config, fleet_store, _say)
    if info.model_uri and result.targeted:
        _log_lineage(fleet_store, info, result.deployment_id, result.rollback_id, history)
    if result.status == "completed":
        _say(f"deployment {result.deployment_id} completed: {result.applied} of {result.targeted} device(s) applied "
             f"{info.name}" + (f", {result.failed} failed" if result.failed else ""))
        return
    _say(f"deployment {result.deployment_id} {result.status}: {result.failed} of {result.targeted} device(s) failed"
         + (f"; rollback {result.rollback_id}" + (f" ({result.rollback_failed} not back)" if result.rollback_failed else "")
            if result.rollback_id else ""))
    raise typer.Exit(1)


def _log_lineage(fleet_store, info, deployment_id: str, rollback_id: str | None, history) -> None:
    from edgesmith.toolchain.deploy.lineage import log_deployment

    try:
        run_id = log_deployment(info, history.deployment(fleet_store, deployment_id),
                                history.targets(fleet_store, deployment_id), rollback_id)
    except Exception as e:  # noqa: BLE001 — the rollout happened; only its record in MLflow is missing
        _say(f"warning: the deployment was not logged to MLflow ({e})")
        return
    row = history.deployment(fleet_store, deployment_id)
    history.finish(fleet_store, deployment_id, row["status"], row["message"], mlflow_run_id=run_id)
    _say(f"  logged to MLflow: run {run_id} (model version {info.model_uri})")


def rollback(
    fleet: str = typer.Option(..., "--fleet", envvar="EDGESMITH_FLEET", help="The fleet whose deployment to undo."),
    broker: Path = typer.Option(..., "--broker", envvar="EDGESMITH_BROKER_DIR", help=BROKER_HELP),
    deployment: str = typer.Option(None, "--deployment", help="The deployment id to undo (default the fleet's latest)."),
    devices: list[str] = typer.Option(None, "--devices", help="Only these devices (comma-separated or repeated)."),
    timeout: float = typer.Option(660.0, "--timeout", min=0.1, help="Seconds to wait for the devices' results."),
    key: Path = typer.Option(None, "--key", envvar="EDGESMITH_DEPLOY_KEY", help=KEY_HELP),
    db: str = typer.Option(None, "--db", envvar="EDGESMITH_FLEET_DB", help=DB_HELP),
    store: Path = typer.Option(None, "--store", envvar="EDGESMITH_ARTIFACT_STORE", help=STORE_HELP),
    serve: str = typer.Option("127.0.0.1:8470", "--serve", envvar="EDGESMITH_ARTIFACT_HTTP", help=SERVE_HELP),
    base_url: str = typer.Option(None, "--base-url", envvar="EDGESMITH_ARTIFACT_URL", help=BASE_URL_HELP),
    no_serve: bool = typer.Option(False, "--no-serve", help=NO_SERVE_HELP),
) -> None:
    """Put a deployment's devices back on the artifact each served before it: a signed `rollback`
    desired state per device (exit status 1 if any device does not confirm it)."""
    from edgesmith.toolchain.deploy import archive as archive_mod
    from edgesmith.toolchain.deploy.rollout import rollback as run_rollback
    from edgesmith.toolchain.fleet.store import Store, default_url

    store_dir = store or archive_mod.default_store_dir()
    config = _config(fleet, broker, "100%", "0%", timeout, key, store_dir, "", devices)
    fleet_store = Store.open(db or default_url(), create=False)
    with _serving(store_dir, serve, base_url, no_serve) as url:
        config.base_url = url
        rollback_id, failed = run_rollback(config, fleet_store, _say, deployment)
    if failed:
        raise typer.Exit(1)
