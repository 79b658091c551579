"""``edgesmith shadow start|stop|report`` and ``edgesmith select --from-shadow`` (docs/shadow.md).
Thin bodies over toolchain/shadow/; the broker, key, artifact store and server options are
`edgesmith deploy`'s (toolchain/cli/deploy.py)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from edgesmith.toolchain.cli.deploy import (BASE_URL_HELP, BROKER_HELP, DB_HELP, KEY_HELP, NO_SERVE_HELP, SERVE_HELP,
                                            STORE_HELP, _say, _serving, _split)

app = typer.Typer(help="Shadow evaluation: candidates run beside the serving model on the devices' live inputs.",
                  no_args_is_help=True)

MIN_AGREEMENT_HELP = "Top-1 agreement with the serving model a candidate needs on every device."
MAX_RATIO_HELP = "Candidate p50 / serving p50 (same samples) a candidate may reach on any device (default: no bound)."
MIN_SAMPLES_HELP = "Samples a candidate needs on every device."


@app.command("start")
def start(
    artifact: Path = typer.Argument(..., help="A candidate artifact directory, or a directory of them (a `--backend "
                                    "all` build): each runs in turn, for an equal share of --duration."),
    fleet: str = typer.Option(..., "--fleet", envvar="EDGESMITH_FLEET", help="The fleet whose devices shadow it."),
    broker: Path = typer.Option(..., "--broker", envvar="EDGESMITH_BROKER_DIR", help=BROKER_HELP),
    devices: list[str] = typer.Option(None, "--devices", help="Only these devices (comma-separated or repeated); "
                                      "default every device the broker has in the fleet."),
    canary: str = typer.Option(None, "--canary", help="Only this share of the (chosen) devices, e.g. 5% "
                               "(at least one)."),
    sample: float = typer.Option(0.1, "--sample", help="Fraction of served requests the candidate also runs (0..1]."),
    duration: str = typer.Option("1h", "--duration", help="How long the whole shadow runs: 90s, 30m, 2h, 1d."),
    cpu_share: float = typer.Option(0.5, "--cpu-share", help="At most this fraction of one core for the candidate "
                                    "(0..1]."),
    queue: int = typer.Option(4, "--queue", help="Samples waiting for the shadow worker; more are dropped and "
                              "counted."),
    serving: list[Path] = typer.Option(None, "--serving", help="Artifact directories devices serve now, when the "
                                       "artifact store lacks them (their inputs and outputs are checked against)."),
    wait: float = typer.Option(60.0, "--wait", min=0, help="Seconds to wait for each device to say it started (or "
                               "refused) the shadow, while serving the candidates; 0: do not wait."),
    key: Path = typer.Option(None, "--key", envvar="EDGESMITH_DEPLOY_KEY", help=KEY_HELP),
    db: str = typer.Option(None, "--db", envvar="EDGESMITH_FLEET_DB", help=DB_HELP),
    store: Path = typer.Option(None, "--store", envvar="EDGESMITH_ARTIFACT_STORE", help=STORE_HELP),
    serve: str = typer.Option("127.0.0.1:8470", "--serve", envvar="EDGESMITH_ARTIFACT_HTTP", help=SERVE_HELP),
    base_url: str = typer.Option(None, "--base-url", envvar="EDGESMITH_ARTIFACT_URL", help=BASE_URL_HELP),
    no_serve: bool = typer.Option(False, "--no-serve", help=NO_SERVE_HELP),
) -> None:
    """Sign and publish a shadow state to each device: it runs the candidates beside its serving model on a
    sample of its requests and reports agreement, errors, latency and memory per window."""
    from edgesmith.toolchain.cli.artifacts import trusted_keys
    from edgesmith.toolchain.deploy import archive as archive_mod
    from edgesmith.toolchain.deploy.rollout import parse_share
    from edgesmith.toolchain.fleet.store import Store, default_url
    from edgesmith.toolchain.shadow import central
    from edgesmith.toolchain.signing import load_deploy_key

    store_dir = store or archive_mod.default_store_dir()
    paths = central.candidate_dirs(artifact)
    config = central.ShadowConfig(fleet=fleet, broker_dir=broker, key=load_deploy_key(key), base_url="",
                                  store_dir=store_dir, duration_s=central.parse_duration(duration), sample=sample,
                                  cpu_share=cpu_share, queue=queue, devices=_split(devices),
                                  canary=parse_share(canary, "--canary") if canary else None, wait_s=wait)
    central.check_share(sample, "--sample")
    central.check_share(cpu_share, "--cpu-share")
    fleet_store = Store.open(db or default_url())
    with _serving(store_dir, serve, base_url, no_serve) as url:
        config.base_url = url
        shadow_id = central.start(paths, config, fleet_store, _say, trusted_keys(None), serving)
    _say(f"shadow {shadow_id} started; see `edgesmith shadow report {shadow_id}`, end it early with "
         f"`edgesmith shadow stop {shadow_id} --fleet {fleet}`")


@app.command("stop")
def stop(
    shadow_id: str = typer.Argument(None, help="The shadow (default: the fleet's newest running one)."),
    fleet: str = typer.Option(..., "--fleet", envvar="EDGESMITH_FLEET", help="The shadow's fleet."),
    broker: Path = typer.Option(..., "--broker", envvar="EDGESMITH_BROKER_DIR", help=BROKER_HELP),
    key: Path = typer.Option(None, "--key", envvar="EDGESMITH_DEPLOY_KEY", help=KEY_HELP),
    db: str = typer.Option(None, "--db", envvar="EDGESMITH_FLEET_DB", help=DB_HELP),
) -> None:
    """Publish a signed `stop` shadow state to each of the shadow's devices (their figures stay in the store)."""
    from edgesmith.toolchain.fleet.store import Store, default_url
    from edgesmith.toolchain.shadow import central
    from edgesmith.toolchain.signing import load_deploy_key

    signing_key = load_deploy_key(key)
    central.stop(shadow_id, fleet, broker, signing_key, Store.open(db or default_url(), create=False), _say)


def _ms(us: float | None) -> str:
    return "–" if us is None else f"{us / 1000:.3g}"


def _num(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


@app.command("report")
def report(
    shadow_id: str = typer.Argument(None, help="The shadow (default: the newest, of --fleet if given)."),
    fleet: str = typer.Option(None, "--fleet", envvar="EDGESMITH_FLEET", help="Only this fleet's shadows."),
    db: str = typer.Option(None, "--db", envvar="EDGESMITH_FLEET_DB", help=DB_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the shadow and its figures as JSON: id, status, devices, "
                                 "candidates, figures [{device, candidate, samples, dropped, agreement, max_abs_err, "
                                 "p50_us, serving_p50_us, paired_serving_p50_us, paired_samples, latency_ratio "
                                 "(p50_us / paired_serving_p50_us), rss_increase_bytes, refused, failed, ...}], "
                                 "ignored {device: {reason: count}}."),
) -> None:
    """Per device x candidate: samples, dropped, top-1 agreement, max abs/rel error, latency p50/p95 against
    serving timed beside the candidate (paired ratio) and as served, RSS increase, refusals and failures."""
    from edgesmith.toolchain.cli import out_console
    from edgesmith.toolchain.fleet.store import Store, default_url
    from edgesmith.toolchain.shadow import results

    data = results.report(Store.open(db or default_url(), create=False), shadow_id, fleet)
    if as_json:
        print(json.dumps(data, indent=2))
        return
    console = out_console()
    console.print(f"shadow {data['id']} of {data['fleet']}: [bold]{data['status']}[/], sample {data['sample']:g}, "
                  f"{data['duration_s']} s, {len(data['devices'])} device(s), {len(data['candidates'])} candidate(s)",
                  highlight=False, soft_wrap=True)
    for c in data["candidates"]:
        console.print(f"  candidate {c['index']}: {c['name']} ({c.get('backend')}, {c.get('precision')})",
                      highlight=False, soft_wrap=True)
    console.print("latencies in ms; paired: the serving model run beside the candidate in the shadow child, on the "
                  "same samples under the same scheduling; ratio: p50 / paired p50; served: the serving path's own "
                  "latency on those requests (what users saw)", style="dim", soft_wrap=True)
    table = Table("device", "cand", "samples", "dropped", "errors", "agree", "max abs", "max rel", "p50", "paired p50",
                  "ratio", "p95", "paired p95", "served p50", "RSS +MB", "refused", "failed")
    for f in data["figures"]:
        table.add_row(f["device"], str(f["candidate"]), str(f["samples"]), str(f["dropped"]),
                      str(f["errors"]), _num(f["agreement"], ".4f"), _num(f["max_abs_err"], ".3g"),
                      _num(f["max_rel_err"], ".3g"), _ms(f["p50_us"]), _ms(f["paired_serving_p50_us"]),
                      _num(f["latency_ratio"], ".3f"), _ms(f["p95_us"]), _ms(f["paired_serving_p95_us"]),
                      _ms(f["serving_p50_us"]),
                      _num(None if f["rss_increase_bytes"] is None else f["rss_increase_bytes"] / 2**20, ".1f"),
                      str(f["refused"]), str(f["failed"]))
    console.print(table)
    for f in data["figures"]:
        if f["last_error"]:
            # A device's words: never read as markup (a '[/]' in them would end the report in a traceback).
            console.print(f"{f['device']} / {f['name']}: {f['last_error']}", style="red", markup=False, highlight=False,
                          soft_wrap=True)
    for device, reasons in sorted(data["ignored"].items()):
        console.print(f"[yellow]{device}: ignored reports: "
                      + ", ".join(f"{n} {r}" for r, n in sorted(reasons.items())) + "[/]", highlight=False)


def select(
    from_shadow: str = typer.Option(..., "--from-shadow", help="The shadow whose candidates to choose from."),
    min_agreement: float = typer.Option(0.99, "--min-agreement", help=MIN_AGREEMENT_HELP),
    max_latency_ratio: float = typer.Option(None, "--max-latency-ratio", help=MAX_RATIO_HELP),
    min_samples: int = typer.Option(100, "--min-samples", help=MIN_SAMPLES_HELP),
    db: str = typer.Option(None, "--db", envvar="EDGESMITH_FLEET_DB", help=DB_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the choice as JSON: shadow_id, candidate, name, "
                                 "manifest_sha256, worst_latency_ratio, measured_on, mlflow_run_id, figures."),
) -> None:
    """Choose, measured on the devices, the fastest candidate of a shadow that agreed with the serving model
    on every device; recorded in the monitor's store and in MLflow (exit status 1 when none passed)."""
    from edgesmith.toolchain.cli import out_console, stdout_reserved
    from edgesmith.toolchain.fleet.store import Store, default_url
    from edgesmith.toolchain.shadow import results

    fleet_store = Store.open(db or default_url(), create=False)
    with stdout_reserved(as_json):
        chosen, verdicts, shadow = results.select_candidate(fleet_store, from_shadow, min_agreement,
                                                            max_latency_ratio, min_samples)
        row = results.record_selection(fleet_store, shadow, chosen, verdicts, min_agreement, max_latency_ratio,
                                       min_samples)
        run_id = _log_selection(fleet_store, shadow, chosen, row)
    out = {"shadow_id": shadow["id"], "candidate": chosen.candidate["index"], "name": chosen.candidate["name"],
           "manifest_sha256": chosen.candidate["manifest_sha256"], "worst_latency_ratio": chosen.worst_ratio,
           "measured_on": json.loads(row["measured_on"]), "mlflow_run_id": run_id,
           "candidates": [{"name": v.candidate["name"], "passed": v.passed, "worst_latency_ratio": v.worst_ratio,
                           "misses": v.misses} for v in verdicts]}
    if as_json:
        print(json.dumps(out, indent=2))
        return
    console = out_console()
    for v in verdicts:
        mark = "[green]passed[/]" if v.passed else "[red]missed[/]"
        misses = "; ".join(f"{d}: {w}" for d, w in sorted(v.misses.items()))
        console.print(f"{v.candidate['index']} {v.candidate['name']}: {mark}, worst latency ratio "
                      f"{_num(v.worst_ratio, '.3f')}" + (f"; {misses}" if misses else ""), highlight=False,
                      soft_wrap=True)
    devices = ", ".join(f"{d} ({m['target']}, {m.get('cpu') or m['isa']})" for d, m in out["measured_on"].items())
    console.print(f"selected {out['name']} (worst latency ratio {_num(chosen.worst_ratio, '.3f')}), measured on "
                  f"{devices}", highlight=False, soft_wrap=True)


def _log_selection(fleet_store, shadow, chosen, row) -> str | None:
    """MLflow lineage of the choice, when the candidate was built from a registered model."""
    from edgesmith.toolchain.shadow import results
    from edgesmith.toolchain.shadow.lineage import log_selection

    if not chosen.candidate.get("model_uri"):
        return None
    try:
        run_id = log_selection(shadow, chosen.candidate, row)
    except Exception as e:  # noqa: BLE001 — the choice is recorded in the store; only its MLflow copy is missing
        _say(f"warning: the selection was not logged to MLflow ({e})")
        return None
    results.set_selection_run(fleet_store, row["id"], run_id)
    return run_id
