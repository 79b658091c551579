"""``edgesmith fleet``: watch the fleet's telemetry (monitor), show what it stored (status: devices,
artifacts, deployments), serve artifacts to devices."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from edgesmith.toolchain.fleet.alerts import Thresholds
from edgesmith.toolchain.fleet.budget import (DEFAULT_BYTES_PER_DAY, DEFAULT_RETENTION_DAYS, DEFAULT_WINDOWS_PER_DAY,
                                             DeviceBudget)

app = typer.Typer(help="Watch the fleet: store telemetry, aggregate per model version × target, detect drift, alert.",
                  no_args_is_help=True)

DB_HELP = "Database URL of the monitor's store (default: sqlite:///<edgesmith home>/fleet/monitor.db; PostgreSQL works)."
INTERVAL_HELP = ("Telemetry interval (s) assumed for devices whose birth did not say (silent after 3), "
                 "and the step of the dashboard's charts.")


def _refused(refused: dict | None) -> str:
    """Messages of the device the monitor refused, by reason (the device is marked, never the monitor)."""
    if not refused:
        return "–"
    return "[red]" + ", ".join(f"{n} {reason}" for reason, n in sorted(refused["by_reason"].items())) + "[/]"


@app.command("monitor")
def monitor(
    broker: Path = typer.Option(..., "--broker", envvar="EDGESMITH_BROKER_DIR",
                                help="The broker's directory (`edgesmith broker up --dir`); the monitor logs in with its monitor.json."),
    db: str = typer.Option(None, "--db", envvar="EDGESMITH_FLEET_DB", help=DB_HELP),
    http: str = typer.Option("127.0.0.1:9110", "--http", envvar="EDGESMITH_MONITOR_HTTP",
                             help="Where to serve the dashboard (/), /metrics and /api/fleet (HOST:PORT; port 0 picks one)."),
    shared: str = typer.Option(None, "--shared", help="Share the stream with other monitors: MQTT v5 shared "
                               "subscription $share/GROUP/edgesmith/v1/# (give each monitor its own --client-id)."),
    client_id: str = typer.Option(None, "--client-id", help="MQTT client id and broker login (edgesmith-...; its own "
                                  "login is created on first use); the persistent session is kept under it "
                                  "(default edgesmith-monitor, or edgesmith-monitor-GROUP with --shared)."),
    ingest_only: bool = typer.Option(False, "--ingest-only", help="Only store what arrives (no dashboard, metrics "
                                     "or alerts): an extra worker on a --shared subscription, beside one full monitor "
                                     "on the same --db."),
    interval_s: float = typer.Option(10.0, "--interval-s", min=0.1, help=INTERVAL_HELP),
    recent_s: float = typer.Option(300.0, "--recent-s", min=1, help="How much of each device's recent telemetry (s, "
                                   "by its window end times) the percentiles, rates and drift are computed over."),
    drift_psi: float = typer.Option(Thresholds.drift_psi, "--drift-psi", min=0, help="Drift alert when an output's "
                                    "population stability index against the build's reference exceeds this."),
    drift_js: float = typer.Option(Thresholds.drift_js, "--drift-js", min=0, max=1, help="... or its Jensen-Shannon "
                                   "divergence (bits, 0..1) exceeds this."),
    error_rate: float = typer.Option(Thresholds.error_rate, "--error-rate", min=0, max=1,
                                     help="Error-rate alert above this share of failed runs."),
    latency_ratio: float = typer.Option(Thresholds.latency_ratio, "--latency-ratio", min=1,
                                        help="Latency alert when recent p50 exceeds this multiple of the build's p50."),
    webhook: str = typer.Option(None, "--webhook", envvar="EDGESMITH_ALERT_WEBHOOK",
                                help="POST every alert (JSON) to this URL, besides the log and MQTT."),
    retention_days: float = typer.Option(DEFAULT_RETENTION_DAYS, "--retention-days", min=0,
                                         envvar="EDGESMITH_FLEET_RETENTION_DAYS",
                                         help="Delete stored windows, events and states older than this (device "
                                         "totals, presence and deployment results are kept); 0 keeps everything."),
    windows_per_day: int = typer.Option(DEFAULT_WINDOWS_PER_DAY, "--device-windows-per-day", min=0,
                                        help="A device's telemetry windows stored per UTC day; past it (or past "
                                        "--device-mb-per-day) its windows are refused (over_budget) until the next "
                                        "day, counted against it in `fleet status`. 0: no bound."),
    mb_per_day: float = typer.Option(DEFAULT_BYTES_PER_DAY / 1e6, "--device-mb-per-day", min=0,
                                     help="A device's stored window bytes per UTC day (MB). 0: no bound."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log HTTP requests and more."),
) -> None:
    """Store the fleet's telemetry, aggregate, detect drift, alert; serve a dashboard, /metrics and /api/fleet.

    Runs until interrupted. Restarting resumes the same persistent MQTT session: nothing is lost and
    nothing is counted twice. Alerts go to the log, to edgesmith/v1/FLEET/_monitor/alert and to --webhook.
    """
    from edgesmith.toolchain.deploy.archive import lookup
    from edgesmith.toolchain.fleet.monitor import Monitor, MonitorConfig, parse_http
    from edgesmith.toolchain.fleet.store import default_url

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    host, port = parse_http(http)
    config = MonitorConfig(broker_dir=broker, db_url=db or default_url(), http_host=host, http_port=port,
                           shared_group=_group(shared), client_id=client_id, interval_s=interval_s, recent_s=recent_s,
                           thresholds=Thresholds(drift_psi=drift_psi, drift_js=drift_js, error_rate=error_rate,
                                                 latency_ratio=latency_ratio),
                           webhook=webhook, ingest_only=ingest_only, retention_s=retention_days * 86400,
                           budget=DeviceBudget(windows_per_day=windows_per_day, bytes_per_day=int(mb_per_day * 1e6)))
    Monitor(config, artifact_index=lookup).run()


def _group(value: str | None) -> str | None:
    from edgesmith.toolchain.errors import UserError

    if value is not None and (not value or any(c in value for c in "/+#")):
        raise UserError(f"--shared {value!r} is not a share group name; use letters and digits (no '/', '+' or '#')")
    return value


@app.command("status")
def status(
    db: str = typer.Option(None, "--db", envvar="EDGESMITH_FLEET_DB", help=DB_HELP),
    fleet: str = typer.Option(None, "--fleet", envvar="EDGESMITH_FLEET", help="Only this fleet."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list: device, fleet, online, artifact, latency "
                                 "{p50_us, p95_us, p99_us} of the last window, deploy {slot, deployment_id, result, "
                                 "error, desired_version}, retrain (the active retrain request naming the device, "
                                 "without its devices and alerts, or null), and more (deployments: `edgesmith fleet deployments --json`; retrain "
                                 "requests: `edgesmith fleet retrain list --json`)."),
    deployments_shown: int = typer.Option(5, "--deployments", min=0, help="How many recent deployments to list."),
    interval_s: float = typer.Option(10.0, "--interval-s", min=0.1, help=INTERVAL_HELP),
) -> None:
    """Show every device the monitor has stored (online or not, its artifact, slot, last deployment and
    result, the last window's latency, its retrain request), the fleet's artifact mix, recent deployments
    with their waves, and the retrain requests drift alerts opened."""
    from edgesmith.toolchain.cli import out_console
    from edgesmith.toolchain.fleet.store import Store, default_url
    from edgesmith.toolchain.fleet.status import fleet_overview

    store = Store.open(db or default_url(), create=False)
    overview = fleet_overview(store, fleet, default_interval_s=interval_s, deployments=deployments_shown)
    if as_json:
        print(json.dumps(overview["devices"], indent=2))
        return
    console = out_console()
    table = Table("device", "fleet", "online", "artifact", "version", "slot", "deployment", "result", "p50 ms",
                  "p95 ms", "runs", "errors", "refused", "retrain", "last seen")
    now = time.time()
    colours = {"applied": "green", "failed": "red", "refused": "red", "timeout": "red", "in-progress": "yellow",
               "published": "yellow"}
    for r in overview["devices"]:
        lat, dep = r["latency"], r["deploy"]
        ms = lambda us: "–" if us is None else f"{us / 1000:.3g}"  # noqa: E731
        online = "[green]online[/]" if r["online"] else "[red]silent[/]" if r["session_open"] else "[red]offline[/]"
        result = dep.get("result")
        shown = f"[{colours.get(result, 'white')}]{result}[/]" if result else "–"
        if result and dep.get("action") == "rollback":
            shown += " (rollback)"
        table.add_row(r["device"], r["fleet"], online, r["artifact"] or "–", r["version"] or "–", dep.get("slot") or "–",
                      dep.get("deployment_id") or "–", shown, ms(lat["p50_us"]), ms(lat["p95_us"]), str(r["runs"]),
                      str(r["errors"]), _refused(r.get("refused")),
                      f"[yellow]{r['retrain']['status']}[/]" if r.get("retrain") else "–",
                      "–" if r["last_seen_ms"] is None else f"{now - r['last_seen_ms'] / 1000:.0f} s ago")
    console.print(table)
    for r in overview["devices"]:
        if r.get("refused"):
            console.print(f"[red]{r['fleet']}/{r['device']}: {r['refused']['total']} message(s) refused[/] "
                          f"({escape(r['refused']['last_detail'] or 'see the monitor log')})", highlight=False,
                          soft_wrap=True)
    if not overview["devices"]:
        console.print("no devices yet: the monitor has stored nothing from any device")
        return
    mix = ", ".join(f"{artifact}: {n}" for artifact, n in overview["versions"].items())
    console.print(f"artifacts served: {mix}", highlight=False, soft_wrap=True)
    for d in overview["deployments"]:
        waves = "; ".join(f"wave {w['wave']} {w['share']:.0%}: {w['applied']}/{w['devices']} applied"
                          + (f", {w['failed']} failed" if w["failed"] else "") + ("" if w["status"] == "done" else f" ({w['status']})")
                          for w in d["wave_rows"])
        what = f"rollback of {d['rolls_back']}" if d["action"] == "rollback" else "deploy"
        console.print(f"{d['id']} {what} {d['artifact']} → {d['fleet']}: [bold]{d['status']}[/] "
                      f"({', '.join(f'{n} {k}' for k, n in sorted(d['results'].items()))}); {waves}", highlight=False,
                      soft_wrap=True)
    if overview["retrain"]:
        console.print(_retrain_table(overview["retrain"]))


def _retrain_table(rows: list[dict]) -> Table:
    """Retrain requests as a rich table (model names and devices are devices' words: escaped)."""
    colours = {"open": "yellow", "capturing": "cyan", "training": "cyan", "building": "cyan", "shadowing": "cyan",
               "rolling-out": "cyan", "done": "green", "dismissed": "dim"}
    table = Table("retrain request", "fleet", "status", "model", "devices", "alerts", "opened", "linked",
                  title="retrain requests (drift alerts)")
    for r in rows:
        model = f"{r['model'] or '?'} v{r['model_version'] or '?'}" + (f" ({r['manifest_sha256'][:8]})"
                                                                      if r["manifest_sha256"] else "")
        linked = ", ".join(f"{k} {r[k]}" for k in ("capture_id", "dataset_digest", "mlflow_run_id", "result_version")
                           if r[k]) or (r["note"] or "–")
        table.add_row(r["id"], r["fleet"], f"[{colours[r['status']]}]{r['status']}[/]", escape(model),
                      escape(", ".join(r["devices"]) + (f" and {r['device_count'] - len(r['devices'])} more"
                                                          if r["device_count"] > len(r["devices"]) else "")),
                      str(r["alert_firings"]),
                      time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["opened_ms"] / 1000)), escape(linked))
    return table


retrain_app = typer.Typer(help="Retrain requests: a drift alert records one (docs/telemetry.md); list or dismiss them.",
                          no_args_is_help=True)
app.add_typer(retrain_app, name="retrain")


@retrain_app.command("list")
def retrain_list(
    db: str = typer.Option(None, "--db", envvar="EDGESMITH_FLEET_DB", help=DB_HELP),
    fleet: str = typer.Option(None, "--fleet", envvar="EDGESMITH_FLEET", help="Only this fleet."),
    active: bool = typer.Option(False, "--active", help="Only active ones (open, or on their way through `edgesmith loop`)."),
    limit: int = typer.Option(50, "--limit", min=1,
                              help="How many: the active ones first (newest first), then the newest closed ones."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list: id, fleet, model, model_version, "
                                 "manifest_sha256, status, devices (the newest 20), device_count, alerts (the newest 20 "
                                 "alert subjects, each with its firings), alert_subjects, alert_firings, opened_ms, "
                                 "changed_ms, note, capture_id, dataset_digest, mlflow_run_id, result_version."),
) -> None:
    """List retrain requests (the active ones first, each newest first): which drift alerts of which devices
    asked to retrain which model."""
    from edgesmith.toolchain.cli import out_console
    from edgesmith.toolchain.fleet.store import Store, default_url, retrain

    store = Store.open(db or default_url(), create=False)
    rows = retrain.requests(store, fleet, active_only=active, limit=limit)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    console = out_console()
    console.print(_retrain_table(rows) if rows else "no retrain requests: no drift alert has fired")


@retrain_app.command("dismiss")
def retrain_dismiss(
    request_id: str = typer.Argument(..., metavar="ID", help="The request's id (rr-...; `fleet retrain list`)."),
    db: str = typer.Option(None, "--db", envvar="EDGESMITH_FLEET_DB", help=DB_HELP),
    note: str = typer.Option(None, "--note", help="Why (kept with the request)."),
    as_json: bool = typer.Option(False, "--json", help="Print the request as it is now (JSON)."),
) -> None:
    """Dismiss an active retrain request (any status but done and dismissed): the next drift alert of its
    devices opens a new one."""
    from edgesmith.toolchain.cli import out_console
    from edgesmith.toolchain.fleet.store import Store, default_url, retrain

    store = Store.open(db or default_url(), create=False)
    row = retrain.advance(store, request_id, "dismissed", note=note)
    if as_json:
        print(json.dumps(row, indent=2))
        return
    out_console().print(f"retrain request {row['id']} dismissed ({escape(', '.join(row['devices']))})", highlight=False)


@app.command("deployments")
def deployments_cmd(
    db: str = typer.Option(None, "--db", envvar="EDGESMITH_FLEET_DB", help=DB_HELP),
    fleet: str = typer.Option(None, "--fleet", envvar="EDGESMITH_FLEET", help="Only this fleet."),
    limit: int = typer.Option(20, "--limit", min=1, help="How many, newest first."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list: id, fleet, action, artifact, status, "
                                 "waves, wave_rows, results, and per-device targets."),
) -> None:
    """List deployments and rollbacks (newest first) with their waves and every device's result."""
    from edgesmith.toolchain.cli import out_console
    from edgesmith.toolchain.fleet.store import deployments as history
    from edgesmith.toolchain.fleet.store import Store, default_url

    store = Store.open(db or default_url(), create=False)
    rows = history.deployments_list(store, fleet, limit) if history.has_tables(store) else []
    for r in rows:
        r["targets"] = history.targets(store, r["id"])
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    console = out_console()
    if not rows:
        console.print("no deployments yet")
    for r in rows:
        what = f"rollback of {r['rolls_back']}" if r["action"] == "rollback" else "deploy"
        # Messages and errors carry devices' words: escaped, never read as markup ('[/x]' was a traceback).
        console.print(f"[bold]{r['id']}[/] {what} {escape(r['artifact'])} → {r['fleet']}: {r['status']}"
                      + (f" — {escape(r['message'])}" if r["message"] else ""), highlight=False)
        table = Table("wave", "device", "desired version", "result", "slot", "error")
        for t in r["targets"]:
            table.add_row(str(t["wave"]), t["device"], str(t["version"]), t["result"], t["slot"] or "–",
                          escape(t["error"] or ""))
        console.print(table)


@app.command("serve-artifacts")
def serve_artifacts(
    store: Path = typer.Option(None, "--store", envvar="EDGESMITH_ARTIFACT_STORE",
                               help="Artifact store directory (default $EDGESMITH_HOME/deploy/artifacts)."),
    http: str = typer.Option("0.0.0.0:8470", "--http", envvar="EDGESMITH_ARTIFACT_HTTP", help="HOST:PORT to listen on."),
    certfile: str = typer.Option(None, "--certfile", help="Serve https:// with this certificate (PEM; e.g. one the "
                                 "fleet CA issued, which devices already trust); with --keyfile."),
    keyfile: str = typer.Option(None, "--keyfile", help="The certificate's private key (PEM)."),
) -> None:
    """Serve the artifact store to devices (GET/HEAD /artifacts/<sha256>.tar, Range resumes) until interrupted;
    point `edgesmith deploy --base-url` at it."""
    from edgesmith.toolchain.deploy.archive import default_store_dir
    from edgesmith.toolchain.deploy.server import serve_forever
    from edgesmith.toolchain.fleet.monitor import parse_http

    host, port = parse_http(http)
    directory = store or default_store_dir()
    directory.mkdir(parents=True, exist_ok=True)
    if (certfile is None) != (keyfile is None):
        from edgesmith.toolchain.errors import UserError

        raise UserError("https needs both --certfile and --keyfile")
    serve_forever(directory, host, port, certfile=certfile, keyfile=keyfile)
