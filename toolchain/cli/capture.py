"""``edgesmith capture``: collect inputs from devices (docs/capture.md). Thin bodies over toolchain/capture/."""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(help="Capture inputs on devices and receive their uploads (docs/capture.md).", no_args_is_help=True)

BROKER_HELP = "The broker's directory (`edgesmith broker up --dir`); capture states are published with a central login."
DIR_HELP = "The capture store: upload grants, the received samples' index and objects (default $EDGESMITH_HOME/captures)."
KEY_HELP = "Deploy key (.key) signing the capture states (default $EDGESMITH_HOME/keys/deploy/default.key)."
RECEIVER_HELP = ("The receiver's base URL devices upload to (`edgesmith capture serve`), e.g. https://central:8471; "
                 "plain http:// only to the loopback (devices refuse to send their tokens in clear).")


def _split(values: list[str] | None) -> list[str] | None:
    names = [n.strip() for v in values or [] for n in v.split(",") if n.strip()]
    return names or None


def _command(fleet: str, broker: Path, key: Path | None, devices: list[str] | None):
    from edgesmith.toolchain.capture.command import CaptureCommand
    from edgesmith.toolchain.signing import load_deploy_key

    return CaptureCommand(fleet=fleet, broker_dir=broker, key=load_deploy_key(key), devices=_split(devices))


def _print(action: str, capture_id: str, versions: dict[str, int]) -> None:
    from edgesmith.toolchain.cli import out_console

    out_console().print(f"capture {capture_id}: {action} sent to {len(versions)} device(s): "
                        + ", ".join(f"{d} (version {v})" for d, v in versions.items()), highlight=False, soft_wrap=True)


@app.command("start")
def start(
    fleet: str = typer.Option(..., "--fleet", envvar="EDGESMITH_FLEET", help="The fleet."),
    devices: list[str] = typer.Option(None, "--devices", help="Only these devices (comma-separated or repeated); default all."),
    policy: str = typer.Option("drift,low-confidence:0.6,uniform:0.01", "--policy",
                               help="What to capture: uniform:RATE, low-confidence:THRESHOLD (max softmax below it), "
                                    "drift[:RATE] (devices the monitor flagged), disagreement (with a running shadow)."),
    max_samples: int = typer.Option(500, "--max-samples", min=1, help="Samples per device at most."),
    max_bytes: int = typer.Option(64 << 20, "--max-bytes", min=1, help="Record bytes per device at most."),
    retention: str = typer.Option("7d", "--retention", help="Samples not uploaded within this are deleted on the device."),
    receiver: str = typer.Option(..., "--receiver", envvar="EDGESMITH_CAPTURE_URL", help=RECEIVER_HELP),
    broker: Path = typer.Option(..., "--broker", envvar="EDGESMITH_BROKER_DIR", help=BROKER_HELP),
    key: Path = typer.Option(None, "--key", envvar="EDGESMITH_DEPLOY_KEY", help=KEY_HELP),
    directory: Path = typer.Option(None, "--dir", envvar="EDGESMITH_CAPTURE_DIR", help=DIR_HELP),
    db: str = typer.Option(None, "--db", envvar="EDGESMITH_FLEET_DB", help="The monitor's store (which devices drifted)."),
) -> None:
    """Switch capture on: one signed capture state per device, each with its own upload token."""
    from edgesmith.runtime.contract import CaptureAction
    from edgesmith.toolchain.capture import command
    from edgesmith.toolchain.capture.store import CaptureStore
    from edgesmith.toolchain.data.datasets import parse_duration

    rules = command.parse_policy(policy)
    drifted = command.drifted_devices(fleet, db) if rules.get("drift") else None
    capture_id, versions = command.publish(_command(fleet, broker, key, devices), CaptureAction.START,
                                           CaptureStore(directory), receiver=receiver, policy=rules, drifted=drifted,
                                           max_samples=max_samples, max_bytes=max_bytes,
                                           retention_s=parse_duration(retention, "--retention"))
    _print("start", capture_id, versions)


def _other(action_name: str):
    def body(
        fleet: str = typer.Option(..., "--fleet", envvar="EDGESMITH_FLEET", help="The fleet."),
        devices: list[str] = typer.Option(None, "--devices", help="Only these devices; default all."),
        capture_id: str = typer.Option(None, "--capture", help="The capture (default: each device's newest)."),
        receiver: str = typer.Option(..., "--receiver", envvar="EDGESMITH_CAPTURE_URL", help=RECEIVER_HELP),
        broker: Path = typer.Option(..., "--broker", envvar="EDGESMITH_BROKER_DIR", help=BROKER_HELP),
        key: Path = typer.Option(None, "--key", envvar="EDGESMITH_DEPLOY_KEY", help=KEY_HELP),
        directory: Path = typer.Option(None, "--dir", envvar="EDGESMITH_CAPTURE_DIR", help=DIR_HELP),
    ) -> None:
        from edgesmith.runtime.contract import CaptureAction
        from edgesmith.toolchain.capture import command
        from edgesmith.toolchain.capture.store import CaptureStore

        cid, versions = command.publish(_command(fleet, broker, key, devices), CaptureAction(action_name),
                                        CaptureStore(directory), receiver=receiver, capture_id=capture_id)
        _print(action_name, cid, versions)

    body.__doc__ = {"stop": "Switch capture off (what devices stored stays until uploaded or past retention).",
                    "upload": "Ask the devices to upload what they captured to the receiver."}[action_name]
    return body


app.command("stop")(_other("stop"))
app.command("upload")(_other("upload"))


@app.command("serve")
def serve(
    directory: Path = typer.Option(None, "--dir", envvar="EDGESMITH_CAPTURE_DIR", help=DIR_HELP),
    listen: str = typer.Option("127.0.0.1:8471", "--listen", envvar="EDGESMITH_CAPTURE_HTTP", help="HOST:PORT to listen on."),
    tls_cert: Path = typer.Option(None, "--tls-cert", help="Serve HTTPS with this certificate (e.g. from `edgesmith broker certs`)."),
    tls_key: Path = typer.Option(None, "--tls-key", help="The certificate's private key."),
    store: Path = typer.Option(None, "--store", envvar="EDGESMITH_ARTIFACT_STORE",
                               help="Artifact store whose manifests uploads are checked against (default $EDGESMITH_HOME/deploy/artifacts)."),
) -> None:
    """Receive devices' capture uploads (PUT /v1/captures/<fleet>/<device>/<capture>/<sha256>) until interrupted."""
    from edgesmith.toolchain.capture.receiver import serve_forever
    from edgesmith.toolchain.capture.store import default_dir
    from edgesmith.toolchain.errors import UserError
    from edgesmith.toolchain.fleet.monitor import parse_http

    if (tls_cert is None) != (tls_key is None):
        raise UserError("--tls-cert and --tls-key go together; give both, or neither for plain HTTP")
    host, port = parse_http(listen)
    serve_forever(directory or default_dir(), host, port, str(tls_cert) if tls_cert else None,
                  str(tls_key) if tls_key else None, store)


@app.command("pull")
def pull(
    fleet: str = typer.Option(..., "--fleet", envvar="EDGESMITH_FLEET", help="The fleet."),
    since: str = typer.Option(None, "--since", help="Only samples received within this (e.g. 1h, 7d); default all."),
    directory: Path = typer.Option(None, "--dir", envvar="EDGESMITH_CAPTURE_DIR", help=DIR_HELP),
    datasets: Path = typer.Option(None, "--datasets", envvar="EDGESMITH_DATASETS", help="Dataset directory (default $EDGESMITH_HOME/datasets)."),
    tracking_uri: str = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI", help="MLflow tracking URI."),
    as_json: bool = typer.Option(False, "--json", help="Print the dataset's metadata as one JSON object."),
    model: str = typer.Option(None, "--model", help="Only samples of this model: its manifest SHA-256 (or a prefix)."),
) -> None:
    """Turn received samples into an immutable, content-addressed dataset, logged in MLflow."""
    from edgesmith.toolchain.capture.store import CaptureStore
    from edgesmith.toolchain.cli import out_console
    from edgesmith.toolchain.data import datasets as ds

    from edgesmith.toolchain.capture.store import default_dir
    from edgesmith.toolchain.errors import UserError

    where = Path(directory) if directory else default_dir()
    if not (where / "index.db").is_file():  # a mistyped --dir must not become a new, empty store
        raise UserError(f"{where} is not a capture store (no index.db); give the --dir `edgesmith capture serve` "
                        "receives into (default $EDGESMITH_HOME/captures)")
    dataset = ds.pull(CaptureStore(where), fleet, ds.parse_duration(since) if since else None, datasets,
                      model=model)
    run_id = ds.log_to_mlflow(dataset, tracking_uri)
    if as_json:
        print(json.dumps({**dataset.meta, "path": str(dataset.path), "mlflow_run": run_id}, indent=2))
        return
    m = dataset.meta
    out_console().print(f"dataset {dataset.digest}: {m['samples']} samples from {', '.join(m['devices'])} "
                        f"(reasons {', '.join(f'{k} {v}' for k, v in sorted(m['reasons'].items()))}) in {dataset.path}; "
                        f"MLflow run {run_id}; label it with: edgesmith data label {dataset.digest[:12]} --labels FILE.csv",
                        highlight=False, soft_wrap=True)
