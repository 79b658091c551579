"""``edgesmith broker``: run the fleet's MQTT broker (Mosquitto) and give devices their logins."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from edgesmith.toolchain.fleet import broker as fleet_broker

app = typer.Typer(help="Run the fleet's MQTT broker (Mosquitto: logins, ACL, persistence).", no_args_is_help=True)

DIR_OPTION = typer.Option(..., "--dir", envvar="EDGESMITH_BROKER_DIR", help="The broker's directory (config, logins, data).")


@app.command("up")
def up(directory: Path = DIR_OPTION,
       port: int = typer.Option(None, "--port", help="TCP port (default: a free one, then kept)."),
       host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
       certfile: str = typer.Option(None, "--certfile", help="TLS certificate (PEM); with --keyfile."),
       keyfile: str = typer.Option(None, "--keyfile", help="TLS private key (PEM)."),
       cafile: str = typer.Option(None, "--cafile", help="CA certificate clients verify the broker with."),
       as_json: bool = typer.Option(False, "--json", help="Print {host, port, dir, monitor: {username, password}}.")) -> None:
    """Create (first time) and start the broker; a running one is left as it is."""
    info = fleet_broker.up(directory, port=port, host=host, cafile=cafile, certfile=certfile, keyfile=keyfile)
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        print(f"broker up on {info['host']}:{info['port']}{' (TLS)' if info['tls'] else ''}, directory {info['dir']}; "
              f"monitor login in {Path(info['dir']) / 'monitor.json'}")


@app.command("down")
def down(directory: Path = DIR_OPTION) -> None:
    """Stop the broker (queued messages are kept on disk)."""
    stopped = fleet_broker.down(directory)
    print("broker stopped" if stopped else "broker was not running")


@app.command("add-device")
def add_device(device: str = typer.Argument(..., help="Device id (letters, digits, '_', '.', '-')."),
               fleet: str = typer.Option(..., "--fleet", help="Fleet the device belongs to."),
               directory: Path = DIR_OPTION,
               rotate: bool = typer.Option(False, "--rotate", help="Give an existing device a new password."),
               as_json: bool = typer.Option(False, "--json", help="Print the credentials as JSON.")) -> None:
    """Create a device's login, limited by the ACL to its own topics; writes its credentials file."""
    info = fleet_broker.add_device(directory, device, fleet, rotate=rotate)
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        print(f"device {info['device']} (fleet {info['fleet']}): credentials in {info['credentials']} (mode 0600)")
