"""Fleet telemetry under load: many simulated devices, one local Mosquitto, the monitor.

    .venv/bin/python bench/telemetry_load.py [--devices 10000] [--processes 4] [--duration-s 60]

Every simulated device is its own MQTT v5 client with its own login (light paho clients driven
from a selector, ``toolchain/fleet/simulate.py``, spread over a few processes). Three runs, each
against a fresh broker and store:

1. **steady**: the devices connect and send their births (the time until the monitor has stored
   every birth is printed: the connection storm a broker restart causes), then every device
   sends one summary per 10 s (staggered), one monitor. Prints the rate ingested, p99 publish -> stored latency (the device's ``ts_ms`` to the monitor's
   ``stored_ms``, one clock), and lost / duplicated counts (stored vs published).
2. **ceiling, 1 monitor**: the monitor's persistent session is made, the monitor stopped, and
   every device sends a window per ``--burst-interval-s`` for ``--burst-duration-s`` into the
   broker's queue; then the monitor starts and drains the backlog. Its rate while draining is the
   ceiling of one monitor, measured without the simulators competing for the cores.
3. **ceiling, 2 monitors** on an MQTT v5 shared subscription, the same way (Mosquitto queues a
   shared subscription's messages for its offline members in turn): two full monitors, then one
   full monitor and one ``--ingest-only`` worker. The ratio to run 2 says how close a second
   process comes to doubling the ceiling; it cannot where the cores are already busy (one
   monitor uses about one core), so compare the CPU seconds per 1,000 messages too: a second
   process that keeps them level doubles the ceiling once it has a core of its own.

Each run also prints the CPU time each part used per 1,000 telemetry messages (monitors,
simulators, Mosquitto): on shared cores that, not the wall-clock rate, says what a part costs.

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


def start_monitors(broker: Path, db: Path, count: int, workdir: Path, workers: str = "full") -> list[subprocess.Popen]:
    """``count`` monitors; with ``workers="ingest"`` all but the first are --ingest-only."""
    monitors = []
    for k in range(count):
        log = open(workdir / f"monitor-{k}.log", "w")
        cmd = [str(VENV_BIN / "edgesmith"), "fleet", "monitor", "--broker", str(broker), "--db", f"sqlite:///{db}",
               "--http", f"127.0.0.1:{free_port()}", "--interval-s", "10", "--client-id", f"edgesmith-bench-monitor-{k}"]
        if count > 1:
            cmd += ["--shared", "bench"]
        if k > 0 and workers == "ingest":
            cmd += ["--ingest-only"]
        monitors.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        logs = [(workdir / f"monitor-{k}.log").read_text() for k in range(count)]
        if all("subscribed" in text for text in logs):
            return monitors
        if any(m.poll() is not None for m in monitors):
            break
        time.sleep(0.2)
    for m in monitors:
        m.terminate()
    raise SystemExit("the monitor did not start:\n" + "\n".join(logs))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop_monitors(monitors: list[subprocess.Popen]) -> float:
    """Stop the monitors (their sessions kept); the CPU seconds they used."""
    used = sum(cpu_seconds(m.pid) for m in monitors if m.poll() is None)
    for m in monitors:
        m.terminate()
    for m in monitors:
        m.wait(timeout=60)
    return used


def run_swarm(broker: Path, db: Path, devices: int, processes: int, interval_s: float, duration_s: float,
              warm_up: bool) -> dict:
    """Run the simulators. With ``warm_up`` they connect and send their births first, and the
    windows start together once the monitor has stored every birth (the connection storm is then
    measured on its own, not mixed into the windows' latency)."""
    per = devices // processes
    procs = [subprocess.Popen([sys.executable, "-m", "edgesmith.toolchain.fleet.simulate", "--broker", str(broker),
                               "--fleet", FLEET, "--devices", str(per), "--first", str(k * per), "--prefix", "dev-",
                               "--interval-s", str(interval_s), "--duration-s", str(duration_s), "--seed", str(k),
                               *(["--wait-for-go"] if warm_up else [])],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k in range(processes)]
    started, births_s = time.monotonic(), None
    if warm_up:
        for p in procs:
            line = p.stdout.readline()
            if not line:
                raise SystemExit(f"a simulator failed ({p.wait()}): {p.stderr.read().strip()[-2000:]}")
        wait_count(db, "sessions", per * processes, timeout=600)
        births_s = time.monotonic() - started
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
    reports = []
    for p in procs:
        out, err = p.communicate(timeout=duration_s + 600)
        if p.returncode != 0:
            raise SystemExit(f"a simulator failed ({p.returncode}): {err.strip()[-2000:]}")
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return {"devices": sum(r["devices"] for r in reports), "published": sum(r["published"] for r in reports),
            "acked": sum(r["acked"] for r in reports), "cpu_s": sum(r.get("cpu_s", 0.0) for r in reports),
            "births_s": births_s}


def stored_windows(db: Path) -> list[tuple[str, int, int, int, int]]:
    with sqlite3.connect(db) as con:
        return con.execute("SELECT device, bd_seq, seq, ts_ms, stored_ms FROM windows").fetchall()


def wait_count(db: Path, table: str, expected: int, timeout: float) -> None:
    """Until ``table`` holds ``expected`` rows, or nothing new came for 20 s (what is missing is lost)."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        try:
            with sqlite3.connect(db) as con:
                n = con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        except sqlite3.Error:
            n = 0
        if n >= expected:
            return
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since > 20:  # nothing new for 20 s: what is missing is lost
            return
        time.sleep(0.2)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def one_run(name: str, args, monitors: int, interval_s: float, duration_s: float, backlog: bool = False,
            workers: str = "full") -> dict:
    """One run against a fresh broker and store. ``backlog``: queue everything first, then drain."""
    from edgesmith.toolchain.fleet import broker as fleet_broker

    workdir = Path(tempfile.mkdtemp(prefix=f"edgesmith-load-{name}-"))
    broker_dir, db = workdir / "broker", workdir / "monitor.db"
    fleet_broker.up(broker_dir)
    started = time.monotonic()
    fleet_broker.add_devices(broker_dir, [f"dev-{i:05d}" for i in range(args.devices)], FLEET)
    provision_s = time.monotonic() - started
    broker_pid = fleet_broker.Broker(broker_dir).pid()
    broker_cpu0 = cpu_seconds(broker_pid)
    procs: list[subprocess.Popen] = []
    monitor_cpu = 0.0
    try:  # the broker and monitors are stopped whatever happens
        procs = start_monitors(broker_dir, db, monitors, workdir, workers)
        if backlog:  # the sessions exist now: stop the monitors, fill their queues, then drain
            monitor_cpu += stop_monitors(procs)
        swarm = run_swarm(broker_dir, db, args.devices, args.processes, interval_s, duration_s, warm_up=not backlog)
        if backlog:
            procs = start_monitors(broker_dir, db, monitors, workdir, workers)
        # Births and deaths are published too: one each per device.
        telemetry_published = swarm["published"] - 2 * swarm["devices"]
        wait_count(db, "windows", telemetry_published, timeout=600)
        rows = stored_windows(db)
    finally:
        monitor_cpu += stop_monitors(procs)
        broker_cpu = cpu_seconds(broker_pid) - broker_cpu0
        fleet_broker.down(broker_dir)
    keys = {(d, b, s) for d, b, s, _, _ in rows}
    latencies = [stored - ts for _, _, _, ts, stored in rows]
    stored_ms = sorted(stored for *_, stored in rows)
    span_s = (stored_ms[-1] - stored_ms[0]) / 1000 if len(stored_ms) > 1 else float("nan")
    per_k = 1000 / max(1, len(rows))
    return {"run": name, "monitors": monitors, "devices": swarm["devices"], "interval_s": interval_s,
            "provision_s": round(provision_s, 1),
            "births_stored_s": round(swarm["births_s"], 1) if swarm["births_s"] is not None else None, "published": telemetry_published, "stored": len(rows),
            "lost": telemetry_published - len(keys), "duplicated": len(rows) - len(keys),
            "ingest_msg_per_s": round(len(rows) / span_s, 1) if span_s == span_s and span_s > 0 else None,
            "offered_msg_per_s": None if backlog else round(swarm["devices"] / interval_s, 1),
            "p50_publish_to_stored_ms": None if backlog else percentile(latencies, 0.50),
            "p99_publish_to_stored_ms": None if backlog else percentile(latencies, 0.99),
            "cpu_s_per_1000": {"monitors": round(monitor_cpu * per_k, 3), "simulators": round(swarm["cpu_s"] * per_k, 3),
                               "mosquitto": round(broker_cpu * per_k, 3)},
            "workdir": str(workdir)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--duration-s", type=float, default=60.0)
    parser.add_argument("--burst-interval-s", type=float, default=2.0, help="per-device interval of the ceiling runs")
    parser.add_argument("--burst-duration-s", type=float, default=10.0, help="how long the ceiling runs' backlog is queued")
    parser.add_argument("--only", choices=("steady", "ceiling"), help="run only the steady run or the two ceiling runs")
    args = parser.parse_args()
    limit = raise_fd_limit()
    if limit < args.devices + 1000:
        raise SystemExit(f"the open-file limit is {limit}; {args.devices} connections need more (ulimit -n)")
    print(f"machine: {os.cpu_count()} cores; {args.devices} devices over {args.processes} processes", flush=True)
    results = {}
    if args.only in (None, "steady"):
        results["steady"] = one_run("steady", args, 1, 10.0, args.duration_s)
        print(json.dumps(results["steady"]), flush=True)
    if args.only in (None, "ceiling"):
        for name, monitors, workers in (("ceiling-1", 1, "full"), ("ceiling-2", 2, "full"), ("ceiling-2-ingest", 2, "ingest")):
            results[name] = one_run(name, args, monitors, args.burst_interval_s, args.burst_duration_s, backlog=True,
                                    workers=workers)
            print(json.dumps(results[name]), flush=True)
    print()
    if "steady" in results:
        steady = results["steady"]
        print(f"births: {steady['devices']} stored {steady['births_stored_s']} s after the simulators started")
        print(f"steady: {steady['stored']}/{steady['published']} stored at {steady['ingest_msg_per_s']} msg/s "
              f"(offered {steady['offered_msg_per_s']}), lost {steady['lost']}, duplicated {steady['duplicated']}, "
              f"p50 / p99 publish->stored {steady['p50_publish_to_stored_ms']} / "
              f"{steady['p99_publish_to_stored_ms']} ms (goal p99 <= 100); CPU s per 1,000 messages "
              f"{steady['cpu_s_per_1000']}")
    if "ceiling-1" in results:
        one = results["ceiling-1"]
        print(f"ceiling (a backlog of {one['published']} windows drained): 1 monitor {one['ingest_msg_per_s']} msg/s, "
              f"monitor CPU {one['cpu_s_per_1000']['monitors']} s per 1,000 messages, lost {one['lost']}, "
              f"duplicated {one['duplicated']}")
        for name, label in (("ceiling-2", "2 full monitors"), ("ceiling-2-ingest", "1 full monitor + 1 --ingest-only")):
            two = results[name]
            ratio = (two["ingest_msg_per_s"] / one["ingest_msg_per_s"]
                     if one["ingest_msg_per_s"] and two["ingest_msg_per_s"] else float("nan"))
            print(f"  {label} on a shared subscription: {two['ingest_msg_per_s']} msg/s, ratio {ratio:.2f} (goal: near 2); "
                  f"monitor CPU {two['cpu_s_per_1000']['monitors']} s per 1,000 messages, lost {two['lost']}, "
                  f"duplicated {two['duplicated']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
