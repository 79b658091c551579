"""What a shadow costs the serving path: p50/p99 with the shadow off and on, on the same agent in one run.

Sets up, in a temporary directory, what a user does: keys (a private EDGESMITH_HOME), `edgesmith
broker up`, `broker add-device`, `edgesmith fleet monitor` (`shadow start` reads the device's
serving model from its store), `edgesmith fleet serve-artifacts`, and one x86 edgesmith-agent
(--trust-dir, --http 127.0.0.1:0) serving an FP32 artifact. The candidate is the same model built
with another backend (default: ResNet-18 at 1x3x64x64, serving OpenVINO FP32, candidate ONNX
Runtime FP32). A client sends `POST /v1/infer` at a fixed rate (open loop: requests are sent on a
schedule whether or not earlier ones answered, by a few worker threads) and times each round trip;
the agent's own serving latency comes from `GET /v1/stats` (its latency histogram, differenced
over the phase). Phases alternate on the same agent to cancel drift: off, on, off, on, ..., off.
"on" is `edgesmith shadow start CANDIDATE --sample 0.2 --cpu-share ...` (measured after the
device's `/v1/stats` says the candidate runs), "off" follows `edgesmith shadow stop`.

Prints per phase and pooled: client and agent p50/p99, the on/off ratios, the samples the shadow
ran and dropped (`edgesmith shadow report --json`), the machine and the load average before and
after each phase. `--markdown FILE` writes the table for BENCHMARKS.md.

    .venv/bin/python bench/shadow_overhead.py                         # ResNet-18, 30 rps, 3 rounds of 20 s
    .venv/bin/python bench/shadow_overhead.py --rps 50 --phase-s 30 --cpu-share 0.5 --markdown shadow.md

Goal (issue 18): serving p50 with the shadow on within 5% of p50 with it off. Figures taken on a
loaded machine (load average >= 1) are not evidence.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

BIN = Path(sys.executable).parent
EDGESMITH = str(BIN / "edgesmith")
AGENT = str(BIN / "edgesmith-agent")
FLEET = "bench"
DEVICE = "bench-01"
RESNET18 = "edgesmith.toolchain.models.resnet:resnet18"


T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f} s] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check, timeout: float, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


class Stack:
    """Every process the bench starts; `close()` (also on Ctrl-C or SIGTERM) stops them in reverse order
    and the broker with `edgesmith broker down`."""

    def __init__(self, work: Path):
        self.work = work
        self.home = work / "home"
        self.env = {**os.environ, "EDGESMITH_HOME": str(self.home), "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
        self.procs: list[tuple[str, subprocess.Popen, object]] = []
        self.broker_dir: Path | None = None

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([EDGESMITH, *args], capture_output=True, text=True, env=self.env)
        if check and result.returncode != 0:
            raise SystemExit(f"`edgesmith {' '.join(args)}` failed ({result.returncode}):\n{result.stdout}{result.stderr}")
        return result

    def spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        out = open(self.work / f"{name}.log", "w")  # noqa: SIM115 - closed in close()
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.procs.append((name, proc, out))
        return proc

    def log_of(self, name: str) -> str:
        return (self.work / f"{name}.log").read_text(errors="replace")

    def alive(self, name: str, proc: subprocess.Popen) -> None:
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited ({proc.returncode}):\n{self.log_of(name)[-3000:]}")

    def close(self) -> None:
        for name, proc, out in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    log(f"{name} did not stop within 30 s of SIGTERM; killing it")
                    proc.kill()
                    proc.wait(10)
            out.close()
        self.procs.clear()
        if self.broker_dir is not None:
            self.cli("broker", "down", "--dir", str(self.broker_dir), check=False)
            self.broker_dir = None


def build(stack: Stack, model: str, shape: str, backend: str, precision: str, out: Path, extra: list[str]) -> Path:
    log(f"building {model} {shape} --backend {backend} --precision {precision} ...")
    result = stack.cli("build", model, "--input-shape", shape, "-t", "host", "--backend", backend, "--precision",
                       precision, "-o", str(out), "--num-samples", "2", "--json", *extra)
    return Path(json.loads(result.stdout)["artifacts"][0]["path"])


@dataclass
class Setup:
    serving: Path
    candidate: Path
    url: str  # the agent's HTTP API
    common: list[str]  # --fleet/--broker/--db/--key for `shadow start|stop`
    base_url: str
    db: str
    inputs: list[dict]
    agent: subprocess.Popen


def set_up(stack: Stack, args: argparse.Namespace) -> Setup:
    work = stack.work
    stack.cli("keys", "generate")
    stack.cli("keys", "generate", "--deploy")
    keys = stack.home / "keys"
    build_pub = keys / "default.pub"
    if args.artifacts:  # built elsewhere: trust the key that signed them, centrally and on the device
        serving, candidate = args.artifacts
        build_pub = stack.home / "trusted" / "build.pub"
        build_pub.parent.mkdir()
        shutil.copy(args.build_key, build_pub)
    else:
        serving, candidate = build_pair(stack, args, work)
    trust = work / "trust"
    for sub, pub in (("build", build_pub), ("deploy", keys / "deploy" / "default.pub")):
        (trust / sub).mkdir(parents=True)
        shutil.copy(pub, trust / sub / "default.pub")
        os.chmod(trust / sub, 0o700)
    os.chmod(trust, 0o700)

    stack.broker_dir = work / "broker"
    stack.cli("broker", "up", "--dir", str(stack.broker_dir), "--json")
    creds_file = Path(json.loads(stack.cli("broker", "add-device", DEVICE, "--fleet", FLEET, "--dir",
                                           str(stack.broker_dir), "--json").stdout)["credentials"])

    db = f"sqlite:///{work / 'monitor.db'}"
    monitor_url = f"http://127.0.0.1:{free_port()}"
    monitor = stack.spawn("monitor", [EDGESMITH, "fleet", "monitor", "--broker", str(stack.broker_dir), "--db", db,
                                      "--http", monitor_url.removeprefix("http://"), "--interval-s", "1"])

    def monitor_connected():
        stack.alive("monitor", monitor)
        try:
            return get_json(f"{monitor_url}/api/fleet")["monitor"]["connected"]
        except OSError:
            return False
    wait_for("the monitor to connect to the broker", monitor_connected, 60)

    store = work / "store"
    store.mkdir()
    serve = f"127.0.0.1:{free_port()}"
    artifacts = stack.spawn("serve-artifacts", [EDGESMITH, "fleet", "serve-artifacts", "--store", str(store), "--http",
                                                serve])

    data_dir = work / "agent"
    agent = stack.spawn("agent", [AGENT, "--artifact", str(serving), "--credentials", str(creds_file), "--data-dir",
                                  str(data_dir), "--key", str(build_pub), "--trust-dir", str(trust),
                                  "--http", "127.0.0.1:0", "--interval", str(args.interval)])

    def agent_json():
        stack.alive("agent", agent)
        path = data_dir / "agent.json"
        return json.loads(path.read_text()) if path.is_file() else None
    url = wait_for("the agent's agent.json", agent_json, 120)["url"]

    def birth_stored():
        stack.alive("monitor", monitor)
        return any(d["device"] == DEVICE for d in get_json(f"{monitor_url}/api/fleet")["devices"])
    wait_for("the monitor to store the agent's birth", birth_stored, 60)
    stack.alive("serve-artifacts", artifacts)
    common = ["--fleet", FLEET, "--broker", str(stack.broker_dir), "--db", db, "--key",
              str(keys / "deploy" / "default.key")]
    manifest = json.loads((serving / "manifest.json").read_text())
    return Setup(serving=serving, candidate=candidate, url=url, common=common, base_url=f"http://{serve}", db=db,
                 inputs=manifest["inputs"], agent=agent)


def build_pair(stack: Stack, args: argparse.Namespace, work: Path) -> tuple[Path, Path]:
    dist = work / "dist"
    serving = build(stack, args.model, args.input_shape, args.serving_backend, "fp32", dist / "serving", [])
    extra = []
    if args.candidate_precision == "int8":  # synthetic calibration inputs: the shadow measures cost, not accuracy
        manifest = json.loads((serving / "manifest.json").read_text())
        rng = np.random.default_rng(0)
        np.savez(work / "calib.npz", **{s["name"]: rng.standard_normal((16, *s["shape"])).astype(s["dtype"])
                                         for s in manifest["inputs"]})
        extra = ["--calib", str(work / "calib.npz")]
    candidate = build(stack, args.model, args.input_shape, args.candidate_backend, args.candidate_precision,
                      dist / "candidate", extra)
    return serving, candidate


# ---- load ------------------------------------------------------------------------------------------------------------

class Client:
    """Open loop: request i is due at start + i / rps; `workers` threads take due requests, each on its own
    keep-alive connection, and time the round trip from the moment they send it. A request sent more than
    one interval after it was due is counted `late` (the client, not the agent, fell behind)."""

    def __init__(self, url: str, bodies: list[bytes], rps: float, workers: int):
        self.host, port = url.removeprefix("http://").split(":")
        self.port = int(port.rstrip("/"))
        self.bodies, self.rps, self.workers = bodies, rps, workers

    def run(self, seconds: float) -> dict:
        n = max(1, int(seconds * self.rps))
        lock = threading.Lock()
        state = {"next": 0}
        latencies: list[float] = []
        errors: list[str] = []
        late = [0]
        start = time.perf_counter() + 0.05

        def worker():
            conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
            while True:
                with lock:
                    i = state["next"]
                    state["next"] += 1
                if i >= n:
                    break
                due = start + i / self.rps
                now = time.perf_counter()
                if due > now:
                    time.sleep(due - now)
                elif now - due > 1 / self.rps:
                    with lock:
                        late[0] += 1
                body = self.bodies[i % len(self.bodies)]
                t0 = time.perf_counter()
                try:
                    conn.request("POST", "/v1/infer", body=body, headers={"Content-Type": "application/octet-stream"})
                    response = conn.getresponse()
                    response.read()
                    ok = response.status == 200
                except (OSError, http.client.HTTPException) as e:
                    ok = False
                    conn.close()
                    conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
                    response = e
                elapsed = time.perf_counter() - t0
                with lock:
                    if ok:
                        latencies.append(elapsed * 1e3)
                    else:
                        errors.append(str(getattr(response, "status", response)))
            conn.close()

        threads = [threading.Thread(target=worker, daemon=True) for _ in range(self.workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return {"sent": n, "latencies_ms": latencies, "errors": errors, "late": late[0]}


def request_bodies(inputs: list[dict], count: int = 8) -> list[bytes]:
    rng = np.random.default_rng(18)
    bodies = []
    for _ in range(count):
        buffer = io.BytesIO()
        for spec in inputs:
            np.save(buffer, rng.standard_normal(spec["shape"]).astype(spec["dtype"]))
        bodies.append(buffer.getvalue())
    return bodies


def agent_histogram(url: str) -> dict:
    return get_json(f"{url}/v1/stats")


def agent_percentiles(before: dict, after: dict) -> dict:
    """p50/p99 of the runs between two `/v1/stats` snapshots: the difference of the cumulative latency
    histograms, by the device runtime's percentile rule (through the binding). The estimate is capped at
    the agent's maximum since it started (the histogram keeps no per-phase maximum)."""
    from edgesmith.toolchain.fleet.latency import percentiles_us
    from edgesmith.toolchain.fleet.protocol import LatencyLayout

    a, b = before["latency"], after["latency"]
    layout = LatencyLayout(start_us=float(b["start_us"]), factor=float(b["factor"]), count=int(b["count"]))
    slots = np.array(b["buckets"] + [b["underflow"], b["overflow"]], dtype=np.int64) - \
        np.array(a["buckets"] + [a["underflow"], a["overflow"]], dtype=np.int64)
    p50, p99 = percentiles_us(slots, layout, b["max_us"], [0.5, 0.99])
    return {"runs": int(slots.sum()), "slots": slots, "layout": layout, "max_us": b["max_us"],
            "p50_ms": None if p50 is None else p50 / 1e3, "p99_ms": None if p99 is None else p99 / 1e3}


# ---- phases ----------------------------------------------------------------------------------------------------------

@dataclass
class Phase:
    name: str  # off / on
    index: int
    load_before: float = 0.0
    load_after: float = 0.0
    client: dict = field(default_factory=dict)
    agent: dict = field(default_factory=dict)
    shadow_id: str | None = None
    shadow: dict = field(default_factory=dict)  # samples, dropped, offered (shadow report --json)

    def row(self) -> dict:
        lat = np.array(self.client["latencies_ms"])
        return {"phase": f"{self.name} {self.index}", "shadow": self.name == "on", "requests": len(lat),
                "errors": len(self.client["errors"]), "late": self.client["late"],
                "client_p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
                "client_p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
                "agent_runs": self.agent["runs"], "agent_p50_ms": self.agent["p50_ms"],
                "agent_p99_ms": self.agent["p99_ms"], "shadow_id": self.shadow_id, **self.shadow,
                "load_before": self.load_before, "load_after": self.load_after}


def shadow_status(setup: Setup) -> dict:
    return agent_histogram(setup.url).get("shadow") or {}


def shadow_on(stack: Stack, setup: Setup, args: argparse.Namespace) -> str:
    result = stack.cli("shadow", "start", str(setup.candidate), *setup.common, "--devices", DEVICE, "--sample",
                       str(args.sample), "--cpu-share", str(args.cpu_share), "--duration", f"{args.max_duration}s",
                       "--serving", str(setup.serving), "--store", str(stack.work / "store"), "--no-serve",
                       "--base-url", setup.base_url, "--wait", "120")
    shadow_id = next(w for w in result.stdout.split() if w.startswith("sh-")).rstrip(":")

    def running():
        stack.alive("agent", setup.agent)
        s = shadow_status(setup)
        return s.get("active") and s.get("shadow_id") == shadow_id
    wait_for(f"the agent to run shadow {shadow_id} (agent log: {stack.work / 'agent.log'})", running, 120)
    log(f"shadow {shadow_id} runs")
    return shadow_id


def shadow_off(stack: Stack, setup: Setup, shadow_id: str) -> dict:
    """Stop the shadow; once the agent says it stopped, wait for its last window in the store; the
    shadow's figures as `shadow report --json` gives them."""
    stack.cli("shadow", "stop", shadow_id, *setup.common)
    wait_for(f"the agent to stop shadow {shadow_id}", lambda: not shadow_status(setup).get("active"), 60)

    def figures():
        report = json.loads(stack.cli("shadow", "report", shadow_id, "--db", setup.db, "--json").stdout)
        return report if report["status"] != "running" and report["figures"] else None
    try:
        report = wait_for(f"shadow {shadow_id}'s last window in the store", figures, 30, 0.5)
    except SystemExit:
        report = json.loads(stack.cli("shadow", "report", shadow_id, "--db", setup.db, "--json").stdout)
    f = report["figures"][0] if report["figures"] else {}
    return {"shadow_samples": f.get("samples", 0), "shadow_dropped": f.get("dropped", 0),
            "shadow_offered": f.get("offered", 0), "shadow_agreement": f.get("agreement"),
            "shadow_latency_ratio": f.get("latency_ratio")}


def measure(client: Client, setup: Setup, phase: Phase, seconds: float) -> None:
    phase.load_before = os.getloadavg()[0]
    before = agent_histogram(setup.url)
    phase.client = client.run(seconds)
    phase.agent = agent_percentiles(before, agent_histogram(setup.url))
    phase.load_after = os.getloadavg()[0]


def pooled(phases: list[Phase], on: bool) -> dict:
    from edgesmith.toolchain.fleet.latency import percentiles_us

    chosen = [p for p in phases if (p.name == "on") == on]
    lat = np.concatenate([np.array(p.client["latencies_ms"]) for p in chosen]) if chosen else np.array([])
    slots = sum(p.agent["slots"] for p in chosen)
    layout = chosen[-1].agent["layout"]
    p50, p99 = percentiles_us(slots, layout, max(p.agent["max_us"] for p in chosen), [0.5, 0.99])
    return {"phase": "pooled " + ("on" if on else "off"), "shadow": on, "requests": len(lat),
            "errors": sum(len(p.client["errors"]) for p in chosen), "late": sum(p.client["late"] for p in chosen),
            "client_p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
            "client_p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
            "agent_runs": int(slots.sum()), "agent_p50_ms": None if p50 is None else p50 / 1e3,
            "agent_p99_ms": None if p99 is None else p99 / 1e3,
            "shadow_samples": sum(p.shadow.get("shadow_samples", 0) for p in chosen),
            "shadow_dropped": sum(p.shadow.get("shadow_dropped", 0) for p in chosen),
            "load_before": float(np.mean([p.load_before for p in chosen])),  # the phases' means
            "load_after": float(np.mean([p.load_after for p in chosen]))}


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _ms(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def table(rows: list[dict]) -> str:
    lines = ["| phase | requests | client p50 ms | client p99 ms | agent p50 ms | agent p99 ms | shadow samples | "
             "dropped | load before → after (pooled: means) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        shadow = (str(r.get("shadow_samples", 0)), str(r.get("shadow_dropped", 0))) if r["shadow"] else ("–", "–")
        lines.append(f"| {r['phase']} | {r['requests']} | {_ms(r['client_p50_ms'])} | {_ms(r['client_p99_ms'])} | "
                     f"{_ms(r['agent_p50_ms'])} | {_ms(r['agent_p99_ms'])} | {shadow[0]} | {shadow[1]} | "
                     f"{r['load_before']:.2f} → {r['load_after']:.2f} |")
    return "\n".join(lines)


def report(result: dict) -> str:
    ratios = result["ratios"]
    out = [result["header"], "", table(result["phases"] + result["pooled"]), "",
           "On / off (pooled): client p50 " + _num(ratios["client_p50"]) + ", client p99 " + _num(ratios["client_p99"])
           + "; agent p50 " + _num(ratios["agent_p50"]) + ", agent p99 " + _num(ratios["agent_p99"])
           + f". Goal: p50 within 5% (ratio <= 1.05): {result['verdict']}."]
    errors = sum(r["errors"] for r in result["phases"])
    late = sum(r["late"] for r in result["phases"])
    if errors or late:
        out.append(f"{errors} request(s) failed and {late} were sent more than one interval late (the client fell "
                   f"behind).")
    if result["loaded"]:
        out.append(f"The load average reached {result['max_load']:.2f} (>= 1): figures taken on a loaded machine are "
                   f"not evidence.")
    return "\n".join(out)


def _num(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=RESNET18, help="Model reference for `edgesmith build` (default ResNet-18).")
    parser.add_argument("--input-shape", default="1,3,64,64")
    parser.add_argument("--serving-backend", default="openvino", choices=["openvino", "ort", "tvm"])
    parser.add_argument("--candidate-backend", default="ort", choices=["openvino", "ort", "tvm"])
    parser.add_argument("--candidate-precision", default="fp32", choices=["fp32", "fp16", "bf16", "int8"],
                        help="int8: calibrated on synthetic inputs.")
    parser.add_argument("--artifacts", nargs=2, type=Path, metavar=("SERVING", "CANDIDATE"), default=None,
                        help="Artifacts built already (skips the builds); with --build-key.")
    parser.add_argument("--build-key", type=Path, default=None, help="The .pub that signed --artifacts.")
    parser.add_argument("--rps", type=float, default=30.0, help="Requests per second the client sends.")
    parser.add_argument("--workers", type=int, default=3, help="Client threads (keep <= the agent's 4 at once).")
    parser.add_argument("--rounds", type=int, default=3, help="off/on pairs; one more off closes the run.")
    parser.add_argument("--phase-s", type=float, default=20.0, help="Seconds measured per phase.")
    parser.add_argument("--warmup-s", type=float, default=5.0, help="Unmeasured load before the first phase.")
    parser.add_argument("--settle-s", type=float, default=2.0, help="Unmeasured load after each start or stop.")
    parser.add_argument("--sample", type=float, default=0.2, help="The shadow's --sample.")
    parser.add_argument("--cpu-share", type=float, default=0.5, help="The shadow's --cpu-share.")
    parser.add_argument("--interval", type=float, default=2.0, help="The agent's telemetry interval (s).")
    parser.add_argument("--markdown", type=Path, default=None, help="Write the table here (for BENCHMARKS.md).")
    parser.add_argument("--json", type=Path, default=None, help="Write every figure here as JSON.")
    args = parser.parse_args(argv)
    if args.artifacts and not args.build_key:
        parser.error("--artifacts needs --build-key FILE.pub, the key that signed them")
    args.max_duration = int(args.phase_s + args.settle_s + 600)  # `shadow stop` ends it; this is a backstop

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt
    previous = None
    if threading.current_thread() is threading.main_thread():  # Ctrl-C and SIGTERM tear everything down
        previous = signal.signal(signal.SIGTERM, on_sigterm), signal.signal(signal.SIGINT, signal.default_int_handler)
    load_start = os.getloadavg()[0]
    machine = {"cpu": _cpu(), "cores": os.cpu_count(), "load_start": load_start}
    log(f"{machine['cpu']}, {machine['cores']} cores; load average {load_start:.2f}"
        f"{'' if load_start < 1 else ' — the machine is busy: figures are not evidence'}")
    with tempfile.TemporaryDirectory(prefix="edgesmith-shadow-bench-") as tmp:
        stack = Stack(Path(tmp))
        log(f"working in {tmp}")
        try:
            setup = set_up(stack, args)
            client = Client(setup.url, request_bodies(setup.inputs), args.rps, args.workers)
            log(f"warm-up {args.warmup_s:g} s at {args.rps:g} rps")
            client.run(args.warmup_s)
            phases: list[Phase] = []
            names = ["off", "on"] * args.rounds + ["off"]
            for i, name in enumerate(names):
                phase = Phase(name, i // 2 + 1)
                if name == "on":
                    phase.shadow_id = shadow_on(stack, setup, args)
                client.run(args.settle_s)
                measure(client, setup, phase, args.phase_s)
                if name == "on":
                    phase.shadow = shadow_off(stack, setup, phase.shadow_id)
                    client.run(args.settle_s)
                phases.append(phase)
                r = phase.row()
                log(f"{r['phase']:6} client p50 {_ms(r['client_p50_ms'])} p99 {_ms(r['client_p99_ms'])} ms, agent p50 "
                    f"{_ms(r['agent_p50_ms'])} p99 {_ms(r['agent_p99_ms'])} ms"
                    + (f", shadow ran {r['shadow_samples']} dropped {r['shadow_dropped']}" if name == "on" else "")
                    + f"; load {r['load_before']:.2f} -> {r['load_after']:.2f}")
        finally:
            stack.close()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous[0])
                signal.signal(signal.SIGINT, previous[1])
    rows = [p.row() for p in phases]
    off, on = pooled(phases, False), pooled(phases, True)
    ratios = {k: _ratio(on[f"{k}_ms"], off[f"{k}_ms"]) for k in ("client_p50", "client_p99", "agent_p50", "agent_p99")}
    max_load = max([load_start] + [r["load_before"] for r in rows] + [r["load_after"] for r in rows])
    goal = ratios["client_p50"] is not None and ratios["client_p50"] <= 1.05 and \
        ratios["agent_p50"] is not None and ratios["agent_p50"] <= 1.05
    header = (f"Measured {time.strftime('%Y-%m-%d')} by bench/shadow_overhead.py on {machine['cpu']} "
              f"({machine['cores']} cores): {args.model} {args.input_shape}, serving {args.serving_backend} fp32, "
              f"candidate {args.candidate_backend} {args.candidate_precision}; {args.rps:g} rps open loop, "
              f"{args.workers} client threads, {len(rows)} phases of {args.phase_s:g} s; shadow --sample "
              f"{args.sample:g} --cpu-share {args.cpu_share:g}. Load average {load_start:.2f} at the start, "
              f"{os.getloadavg()[0]:.2f} at the end.")
    result = {"machine": machine, "args": {k: str(v) for k, v in vars(args).items()}, "header": header,
              "phases": rows, "pooled": [off, on], "ratios": ratios, "max_load": max_load, "loaded": max_load >= 1,
              "verdict": "met" if goal else "missed"}
    text = report(result)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        log("interrupted; everything the bench started was stopped")
        sys.exit(130)
