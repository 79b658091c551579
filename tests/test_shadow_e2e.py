"""Shadow evaluation end to end (issue 18's "Done means"; docs/shadow.md): two real edgesmith-agent
binaries on x86 serving the FP32 artifact of a trained digits CNN, a real Mosquitto, a real monitor
(`edgesmith fleet monitor`, a subprocess) over SQLite, `edgesmith fleet serve-artifacts` on the
artifact store, and the central CLI run as a user runs it: `shadow start|stop|report`,
`select --from-shadow`, `deploy --require-shadow`.

- The INT8 build of the model agrees with FP32 on live (synthetic-load) requests and passes the
  deploy gate; the same architecture retrained on shuffled labels agrees on few and is refused.
- Over a host `--backend all` build, untuned TVM is the slowest against serving, and the pick is
  the candidate the build's own timing ranked fastest (when that timing is decisive).

Speed is measured by the benchmark, not here: latency ratios are checked as figures and orderings
that hold by a wide margin, never against a time bound."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from conftest import EDGESMITH, REPO, build_json, run_cli
from edgesmith.runtime.artifact import _core
from test_agent import FLEET, Agent, Broker
from test_fleet_monitor import MonitorProcess, free_port, wait_until
from test_shadow_central import shadow_id_of

DEVICES = ("e2e-01", "e2e-02")
TARGET = "x86_64-avx2"
MIN_SAMPLES = 30  # per device and candidate: enough for a top-1 agreement of 0.99 to mean something
LOAD_RPS = "50"  # synthetic requests a second on each agent; sampled at 0.9 (0.5 for the gate's shadow)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]


def _train_shuffled(root: Path) -> str:
    """The same architecture trained for 2 epochs on the digits with their labels shuffled: a wrong
    model with the serving model's inputs and outputs. Its registry URI's models:/ name."""
    from sklearn.datasets import load_digits

    from edgesmith.toolchain.train.config import load_config
    from edgesmith.toolchain.train.run import train_and_register

    digits = load_digits()
    data = root / "shuffled.npz"
    np.savez(data, x=digits.images.astype(np.float32), y=np.random.default_rng(18).permutation(digits.target))
    config = load_config(REPO / "examples" / "digits.toml").with_overrides(
        name="digits-shuffled", epochs=2, dataset={"source": str(data), "normalise": "standardise"})
    summary = train_and_register(config, f"sqlite:///{root / 'mlflow.db'}", progress=False)
    return f"models:/{summary.model_name}/{summary.version}"


def _only(result: dict) -> Path:
    (artifact,) = result["artifacts"]
    return Path(artifact["path"])


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path) -> None:
    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"serve-artifacts exited ({proc.returncode}):\n{log.read_text()}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0
    wait_until(up, 30, "the artifact server")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, digits_trained):
    """Keys, the builds (host --backend all, whose openvino artifact the agents serve; its INT8 build
    and the shuffled-label model, the gate's candidates), a broker, monitor and artifact server, and
    two agents serving FP32 under synthetic load with the deploy key trusted for shadow states."""
    from edgesmith.toolchain.signing import generate_deploy_key, generate_key, load_deploy_key, load_signing_key

    root = tmp_path_factory.mktemp("shadow-e2e")
    home = root / "home"
    home.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGESMITH_HOME", str(home))
        build_key = load_signing_key(generate_key("default"))
        deploy_key_path = generate_deploy_key()
    trust = root / "trust"
    for sub, key in (("build", build_key.public_key), ("deploy", load_deploy_key(deploy_key_path).public_key)):
        (trust / sub).mkdir(parents=True)
        (trust / sub / f"{sub}.pub").write_text(key.hex() + "\n")
        os.chmod(trust / sub, 0o700)
    os.chmod(trust, 0o700)

    env = {"EDGESMITH_HOME": str(home), "MLFLOW_TRACKING_URI": digits_trained["uri"]}
    dist = root / "dist"
    model = digits_trained["model_uri"]
    with ThreadPoolExecutor(2) as pool:  # two builds at once while the wrong model trains here
        every = pool.submit(build_json, model, "-t", TARGET, "--backend", "all", "-o", str(dist / "all"), env=env)
        int8 = pool.submit(build_json, model, "-t", TARGET, "--backend", "openvino", "--quantize", "int8",
                           "-o", str(dist / "gate"), env=env)
        shuffled_uri = _train_shuffled(root)
        every, int8 = every.result(), int8.result()
    shuffled = build_json(shuffled_uri, "-t", TARGET, "--backend", "openvino", "-o", str(dist / "gate"),
                          env={**env, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"})
    by_backend = {a["backend"]: Path(a["path"]) for a in every["artifacts"]}
    assert {"openvino", "ort", "tvm"} <= set(by_backend), every
    serving = by_backend["openvino"]

    broker = Broker(root / "broker")
    db = f"sqlite:///{root / 'monitor.db'}"
    monitor = MonitorProcess(broker.dir, db, root / "monitor.log").start()
    store = root / "store"
    port = free_port()
    server_log = root / "serve-artifacts.log"
    with open(server_log, "w") as out:
        server = subprocess.Popen([EDGESMITH, "fleet", "serve-artifacts", "--store", str(store), "--http",
                                   f"127.0.0.1:{port}"], stdout=out, stderr=subprocess.STDOUT,
                                  env={**os.environ, "EDGESMITH_HOME": str(home)})
    agents = []
    try:
        _wait_for_port(port, server, server_log)
        (root / "agents").mkdir()
        for device in DEVICES:
            agent = Agent({"path": serving, "pub": trust / "build" / "build.pub"}, broker.add_device(device),
                          root / "agents" / device, "--trust-dir", str(trust), "--interval", "1",
                          "--synthetic-load", LOAD_RPS)
            agents.append(agent)
            agent.ready()
        wait_until(lambda: all(monitor.device(d) for d in DEVICES), 60, "the monitor to store both births")
        common = ["--fleet", FLEET, "--broker", str(broker.dir), "--db", db, "--key", str(deploy_key_path)]
        yield {"root": root, "home": home, "db": db, "common": common, "store": store, "serving": serving,
               "url": f"http://127.0.0.1:{port}", "all": dist / "all", "by_backend": by_backend,
               "gate": dist / "gate", "int8": _only(int8), "shuffled": _only(shuffled), "monitor": monitor,
               "agents": agents}
    finally:
        for agent in agents:
            assert agent.stop() == 0, agent.log()
        server.terminate()
        server.wait(30)
        code = monitor.stop()
        assert "Traceback" not in monitor.log_text() and code == 0, monitor.log_text()
        broker.down()


def cli(fleet: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_cli(*args, env={"EDGESMITH_HOME": str(fleet["home"])}, check=check)


def figures(fleet: dict, sid: str) -> dict:
    return json.loads(cli(fleet, "shadow", "report", sid, "--db", fleet["db"], "--json").stdout)


def run_shadow(fleet: dict, candidates: Path, sample: str, duration: str) -> str:
    """Start a shadow of `candidates` on both agents through the CLI, wait until every device has run
    every candidate on MIN_SAMPLES samples (each candidate has its turn), stop it; its id."""
    from edgesmith.toolchain.fleet.store import Store
    from edgesmith.toolchain.shadow import results

    started = cli(fleet, "shadow", "start", str(candidates), *fleet["common"], "--store", str(fleet["store"]),
                  "--no-serve", "--base-url", fleet["url"], "--serving", str(fleet["serving"]),
                  "--devices", ",".join(DEVICES), "--sample", sample, "--duration", duration, "--wait", "60")
    sid = shadow_id_of(started)
    for device in DEVICES:
        assert f"{device}: shadow.started (candidate 0)" in started.stdout, started.stdout
    store = Store.open(fleet["db"])
    try:
        got: dict = {}

        def enough() -> bool:
            report = results.report(store, sid)
            got.clear()
            got.update({(f["device"], f["candidate"]): f["samples"] for f in report["figures"]})
            return len(report["candidates"]) > 0 and all(
                got.get((d, c["index"]), 0) >= MIN_SAMPLES for d in DEVICES for c in report["candidates"])
        try:
            wait_until(enough, 180, f"{MIN_SAMPLES} samples of every candidate on both devices")
        except AssertionError as e:
            logs = "\n".join(line for agent in fleet["agents"] for line in agent.log().splitlines() if "shadow" in line)
            raise AssertionError(f"{e}; samples by (device, candidate): {got}; the agents' shadow lines:\n{logs}") from None
    finally:
        store.engine.dispose()
    cli(fleet, "shadow", "stop", sid, *fleet["common"])
    return sid


@pytest.fixture(scope="module")
def gate_shadow(fleet) -> str:
    """The INT8 build and the shuffled-label model, in turn, shadowing FP32 on half the requests."""
    return run_shadow(fleet, fleet["gate"], "0.5", "12s")


def manifest_sha(artifact: Path) -> str:
    return hashlib.sha256((artifact / "manifest.json").read_bytes()).hexdigest()


def test_int8_agrees_with_fp32_and_a_wrong_model_is_refused_at_the_gate(fleet, gate_shadow):
    report = figures(fleet, gate_shadow)
    names = {c["manifest_sha256"]: c for c in report["candidates"]}
    int8, shuffled = names[manifest_sha(fleet["int8"])], names[manifest_sha(fleet["shuffled"])]
    assert report["ignored"] == {}
    by = {(f["device"], f["candidate"]): f for f in report["figures"]}
    for device in DEVICES:
        good, bad = by[(device, int8["index"])], by[(device, shuffled["index"])]
        assert good["samples"] >= MIN_SAMPLES and good["errors"] == 0, good
        assert good["agreement"] >= 0.99, good
        assert isinstance(good["latency_ratio"], float) and good["latency_ratio"] > 0, good
        assert bad["samples"] >= MIN_SAMPLES and bad["agreement"] < 0.5, bad
    table = cli(fleet, "shadow", "report", gate_shadow, "--db", fleet["db"]).stdout
    assert f"shadow {gate_shadow} of {FLEET}: stopped" in table

    refused = deploy(fleet, fleet["shuffled"], gate_shadow)
    said = " ".join(refused.stderr.split())
    assert refused.returncode == 1 and f"refused: {shuffled['name']} missed the bounds" in said, said
    for device in DEVICES:
        agreement = by[(device, shuffled["index"])]["agreement"]
        assert f"{device}: agreement {agreement:.4f} < 0.99" in said, said
    assert "deployment dep-" not in refused.stdout and "Traceback" not in refused.stderr


def deploy(fleet: dict, artifact: Path, sid: str) -> subprocess.CompletedProcess:
    """`deploy --require-shadow` to both agents; a wave that passed the gate is not waited for."""
    return cli(fleet, "deploy", str(artifact), *fleet["common"], "--store", str(fleet["store"]), "--no-serve",
               "--base-url", fleet["url"], "--devices", ",".join(DEVICES), "--wave-timeout", "0.5",
               "--abort-on-failure", "100%", "--require-shadow", sid, "--min-agreement", "0.99",
               "--min-samples", str(MIN_SAMPLES), check=False)


def _cpu_times() -> tuple[int, int]:
    """(idle, total) jiffies of all CPUs since boot (/proc/stat)."""
    fields = [int(v) for v in open("/proc/stat").readline().split()[1:]]
    return fields[3] + fields[4], sum(fields)


# The shadow child runs only on idle CPU (SCHED_IDLE): on a host whose cores are busy with other work
# (the suite's other worker), its paired timings are preempted mid-run and their ratios are noise
# (measured: TVM 0.24x and 0.05x of serving under a busy core, 1.4-1.7x on a quieter host). The
# ordering claims below are judged only when at least this share of the CPU stayed idle during the
# shadow; otherwise the test says so and checks the rest (docs/shadow.md, "Paired timing").
MIN_IDLE_SHARE = 0.35


def test_select_from_a_backend_all_shadow_picks_the_build_timings_fastest_and_tvm_is_slowest(fleet):
    before = _cpu_times()
    sid = run_shadow(fleet, fleet["all"], "0.9", "48s")
    after = _cpu_times()
    idle_share = (after[0] - before[0]) / max(1, after[1] - before[1])
    judged = idle_share >= MIN_IDLE_SHARE
    if not judged:
        warnings.warn(f"the host's CPU was {100 * idle_share:.0f}% idle during the shadow (< {100 * MIN_IDLE_SHARE:.0f}%): "
                      "the shadow's latency ordering was not judged, only its samples, agreement and measured_on")
    report = figures(fleet, sid)
    backend_of = {c["index"]: c["backend"] for c in report["candidates"]}
    assert sorted(backend_of.values()) == sorted(fleet["by_backend"]), report["candidates"]
    for device in DEVICES:
        mine = {backend_of[f["candidate"]]: f for f in report["figures"] if f["device"] == device}
        assert all(f["agreement"] >= 0.99 and f["errors"] == 0 for f in mine.values()), mine
        # Paired timing: every sample also ran the serving artifact beside the candidate in the child.
        assert all(f["paired_samples"] == f["samples"] for f in mine.values()), mine
        ratios = {b: f["latency_ratio"] for b, f in mine.items()}
        if judged:
            assert max(ratios, key=ratios.get) == "tvm", (ratios, idle_share)  # untuned: many times slower
            # Like for like: the serving artifact itself as a candidate, timed against its twin in the
            # child under the same scheduling, comes out near 1.
            assert 1 / 3 < ratios["openvino"] < 3, (mine["openvino"], idle_share)

    chosen = json.loads(cli(fleet, "select", "--from-shadow", sid, "--db", fleet["db"], "--min-samples",
                            str(MIN_SAMPLES), "--json").stdout)
    assert set(chosen["measured_on"]) == set(DEVICES)
    assert all((m["target"], m["isa"]) == (TARGET, "x86_64") and m["runtime"] for m in chosen["measured_on"].values())
    cpu = _core().cpu_model()  # each real agent names the CPU it measured on
    assert all(m["cpu"] == cpu for m in chosen["measured_on"].values()), chosen["measured_on"]
    picked = next(c for c in report["candidates"] if c["name"] == chosen["name"])
    for f in report["figures"]:
        if f["candidate"] == picked["index"]:
            assert f["samples"] >= MIN_SAMPLES and f["agreement"] >= 0.99, f
    if not judged:
        return
    assert picked["backend"] != "tvm", (chosen, idle_share)
    # The build timed each candidate through the device runtime (manifest build.latency_us): when it
    # is decisive (the fastest at least twice as fast as the next), the shadow must agree with it.
    timed = sorted((json.loads((p / "manifest.json").read_text())["build"]["latency_us"], b)
                   for b, p in fleet["by_backend"].items())
    if timed[1][0] > 2 * timed[0][0]:
        assert picked["backend"] == timed[0][1], (timed, chosen)


def test_deploy_gate_lets_the_int8_build_through(fleet, gate_shadow):
    """Last in the module: once through the gate the deployment goes out to the agents."""
    passed = deploy(fleet, fleet["int8"], gate_shadow)
    assert passed.returncode == 0, passed.stderr
    assert "met the bounds on 2 device(s)" in passed.stdout and "deployment dep-" in passed.stdout, passed.stdout
