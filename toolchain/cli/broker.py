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
       host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; off loopback TLS is required."),
       public_host: str = typer.Option(None, "--public-host", help="The name or address devices connect to, written "
                                       "into their credentials (default: --host); with TLS, one the certificate names."),
       tls: bool = typer.Option(False, "--tls", help="TLS with the directory's certificates (`edgesmith broker certs`)."),
       mutual_tls: bool = typer.Option(False, "--mutual-tls", help="Also require a client certificate: its Common "
                                       "Name is the login (each device and central login is issued one)."),
       certfile: str = typer.Option(None, "--certfile", help="TLS certificate (PEM) of your own PKI; with --keyfile."),
       keyfile: str = typer.Option(None, "--keyfile", help="TLS private key (PEM)."),
       cafile: str = typer.Option(None, "--cafile", help="CA certificate clients verify the broker with."),
       insecure_plaintext: bool = typer.Option(False, "--insecure-plaintext", help="Listen off loopback without TLS "
                                               "(passwords cross the network in clear; agents refuse it)."),
       as_json: bool = typer.Option(False, "--json", help="Print {host, port, dir, monitor: {username, password}}.")) -> None:
    """Create (first time) and start the broker; a running one is left as it is."""
    info = fleet_broker.up(directory, port=port, host=host, cafile=cafile, certfile=certfile, keyfile=keyfile, tls=tls,
                           mutual_tls=mutual_tls, insecure_plaintext=insecure_plaintext, public_host=public_host)
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        security = " (mutual TLS)" if info["mutual_tls"] else " (TLS)" if info["tls"] else ""
        print(f"broker up on {info['host']}:{info['port']}{security}, directory {info['dir']}; "
              f"monitor login in {Path(info['dir']) / 'monitor.json'}")


@app.command("certs")
def certs(directory: Path = DIR_OPTION,
          host: list[str] = typer.Option(None, "--host", help="A DNS name or IP address devices connect to "
                                         "(repeat for several; loopback is always included)."),
          as_json: bool = typer.Option(False, "--json", help="Print {cafile, certfile, keyfile, hosts}.")) -> None:
    """Create the fleet CA (kept once made) and issue the broker's certificate; then `broker up --tls`."""
    info = fleet_broker.certs(directory, list(host or []))
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        print(f"fleet CA {info['cafile']}; broker certificate {info['certfile']} for {', '.join(info['hosts'])}; "
              f"start with `edgesmith broker up --dir {directory} --tls` (add --mutual-tls for device certificates)")


@app.command("down")
def down(directory: Path = DIR_OPTION) -> None:
    """Stop the broker (queued messages are kept on disk)."""
    stopped = fleet_broker.down(directory)
    print("broker stopped" if stopped else "broker was not running")


@app.command("add-device")
def add_device(device: str = typer.Argument(..., help="Device id (letters, digits, '_', '.', '-'; "
                                                "'edgesmith-...' is reserved for central logins)."),
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
