"""Fleet telemetry under load: many simulated devices, one local Mosquitto, the monitor.

    .venv/bin/python bench/telemetry_load.py [--devices 10000] [--processes 4] [--duration-s 60]

Every simulated device is its own MQTT v5 client with its own login (light paho clients driven
from a selector, ``toolchain/fleet/simulate.py``, spread over a few processes). Three runs, each
against a fresh broker and store:

1. **steady**: every device sends one summary per 10 s (staggered), one monitor. Prints the
   rate ingested, p99 publish -> stored latency (the device's ``ts_ms`` to the monitor's
   ``stored_ms``, one clock), and lost / duplicated counts (stored vs published).
2. **ceiling, 1 monitor**: every device sends as often as ``--burst-interval-s`` allows, more than
   one monitor can take; prints what it ingests per second while the backlog drains.
3. **ceiling, 2 monitors** on an MQTT v5 shared subscription: the same offered load; the ratio to
   run 2 says how close a second monitor comes to doubling the ceiling.

Goals (issue 7): the full steady rate held with zero lost, p99 <= 100 ms; the second monitor near
doubling the ceiling. The figures depend on the machine and what else runs on it: quote them
with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
FLEET = "load"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # Mosquitto, started from here, inherits it
    return hard


def start_monitors(broker: Path, db: Path, count: int, workdir: Path) -> list[subprocess.Popen]:
    monitors = []
    for k in range(count):
        log = open(workdir / f"monitor-{k}.log", "w")
        cmd = [str(VENV_BIN / "edgesmith"), "fleet", "monitor", "--broker", str(broker), "--db", f"sqlite:///{db}",
               "--http", f"127.0.0.1:{free_port()}", "--interval-s", "10", "--client-id", f"bench-monitor-{k}"]
        if count > 1:
            cmd += ["--shared", "bench"]
        monitors.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        logs = [(workdir / f"monitor-{k}.log").read_text() for k in range(count)]
        if all("subscribed" in text for text in logs):
            return monitors
        if any(m.poll() is not None for m in monitors):
            break
        time.sleep(0.2)
    raise SystemExit("the monitor did not start:\n" + "\n".join(logs))


def run_swarm(broker: Path, devices: int, processes: int, interval_s: float, duration_s: float) -> dict:
    per = devices // processes
    procs = [subprocess.Popen([sys.executable, "-m", "edgesmith.toolchain.fleet.simulate", "--broker", str(broker),
                               "--fleet", FLEET, "--devices", str(per), "--first", str(k * per), "--prefix", "dev-",
                               "--interval-s", str(interval_s), "--duration-s", str(duration_s), "--seed", str(k)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(processes)]
    reports = []
    for p in procs:
        out, err = p.communicate(timeout=duration_s + 600)
        if p.returncode != 0:
            raise SystemExit(f"a simulator failed ({p.returncode}): {err.strip()[-2000:]}")
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return {"devices": sum(r["devices"] for r in reports), "published": sum(r["published"] for r in reports),
            "acked": sum(r["acked"] for r in reports)}


def stored_windows(db: Path) -> list[tuple[str, int, int, int, int]]:
    with sqlite3.connect(db) as con:
        return con.execute("SELECT device, bd_seq, seq, ts_ms, stored_ms FROM windows").fetchall()


def wait_settled(db: Path, expected: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        try:
            with sqlite3.connect(db) as con:
                n = con.execute("SELECT count(*) FROM windows").fetchone()[0]
        except sqlite3.Error:
            n = 0
        if n >= expected:
            return
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since > 20:  # nothing new for 20 s: what is missing is lost
            return
        time.sleep(0.5)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def one_run(name: str, args, monitors: int, interval_s: float, duration_s: float) -> dict:
    from edgesmith.toolchain.fleet import broker as fleet_broker

    workdir = Path(tempfile.mkdtemp(prefix=f"edgesmith-load-{name}-"))
    broker_dir, db = workdir / "broker", workdir / "monitor.db"
    fleet_broker.up(broker_dir)
    started = time.monotonic()
    fleet_broker.add_devices(broker_dir, [f"dev-{i:05d}" for i in range(args.devices)], FLEET)
    provision_s = time.monotonic() - started
    procs = start_monitors(broker_dir, db, monitors, workdir)
    try:
        swarm = run_swarm(broker_dir, args.devices, args.processes, interval_s, duration_s)
        # Births and deaths are published too: one each per device.
        telemetry_published = swarm["published"] - 2 * swarm["devices"]
        wait_settled(db, telemetry_published, timeout=600)
        rows = stored_windows(db)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
        fleet_broker.down(broker_dir)
    keys = {(d, b, s) for d, b, s, _, _ in rows}
    latencies = [stored - ts for _, _, _, ts, stored in rows]
    stored_ms = sorted(stored for *_, stored in rows)
    span_s = (stored_ms[-1] - stored_ms[0]) / 1000 if len(stored_ms) > 1 else float("nan")
    return {"run": name, "monitors": monitors, "devices": swarm["devices"], "interval_s": interval_s,
            "provision_s": round(provision_s, 1), "published": telemetry_published, "stored": len(rows),
            "lost": telemetry_published - len(keys), "duplicated": len(rows) - len(keys),
            "ingest_msg_per_s": round(len(rows) / span_s, 1) if span_s == span_s and span_s > 0 else None,
            "offered_msg_per_s": round(swarm["devices"] / interval_s, 1),
            "p50_publish_to_stored_ms": percentile(latencies, 0.50), "p99_publish_to_stored_ms": percentile(latencies, 0.99),
            "workdir": str(workdir)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--duration-s", type=float, default=60.0)
    parser.add_argument("--burst-interval-s", type=float, default=2.0, help="per-device interval of the ceiling runs")
    parser.add_argument("--burst-duration-s", type=float, default=30.0)
    args = parser.parse_args()
    limit = raise_fd_limit()
    if limit < args.devices + 1000:
        raise SystemExit(f"the open-file limit is {limit}; {args.devices} connections need more (ulimit -n)")
    print(f"machine: {os.cpu_count()} cores; {args.devices} devices over {args.processes} processes", flush=True)
    results = [one_run("steady", args, 1, 10.0, args.duration_s)]
    print(json.dumps(results[-1]), flush=True)
    results.append(one_run("ceiling-1", args, 1, args.burst_interval_s, args.burst_duration_s))
    print(json.dumps(results[-1]), flush=True)
    results.append(one_run("ceiling-2", args, 2, args.burst_interval_s, args.burst_duration_s))
    print(json.dumps(results[-1]), flush=True)
    steady, one, two = results
    print(f"\nsteady: {steady['stored']}/{steady['published']} stored at {steady['ingest_msg_per_s']} msg/s "
          f"(offered {steady['offered_msg_per_s']}), lost {steady['lost']}, duplicated {steady['duplicated']}, "
          f"p99 publish->stored {steady['p99_publish_to_stored_ms']} ms (goal <= 100)")
    if one["ingest_msg_per_s"] and two["ingest_msg_per_s"]:
        print(f"ceiling: 1 monitor {one['ingest_msg_per_s']} msg/s, 2 monitors {two['ingest_msg_per_s']} msg/s, "
              f"ratio {two['ingest_msg_per_s'] / one['ingest_msg_per_s']:.2f} (goal: near 2); "
              f"lost {one['lost']} / {two['lost']}, duplicated {one['duplicated']} / {two['duplicated']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
