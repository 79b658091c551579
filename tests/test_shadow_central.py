"""Shadow evaluation, the central side (docs/shadow.md), against a real Mosquitto, a real monitor
(`edgesmith fleet monitor`, a subprocess) over a real SQLite store, and the CLI run as a user runs
it. The devices are device logins publishing contract messages (births, `shadow` windows,
`shadow.*` events), as the agent does; the end-to-end test with real agents is elsewhere.

One broker, monitor and key set for the module; each test takes its own devices or shadow."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from pathlib import Path

import nacl.signing
import numpy as np
import pytest

from conftest import BOTH_STORES, EDGESMITH, run_cli
from deploy_helpers import make_artifact
from edgesmith.runtime import contract
from edgesmith.toolchain.deploy import desired
from edgesmith.toolchain.fleet import broker as fleet_broker
from edgesmith.toolchain.fleet.latency import LatencyHistogram
from edgesmith.toolchain.fleet.simulate import SimArtifact, SimulatedDevice
from edgesmith.toolchain.signing import generate_deploy_key, generate_key, load_deploy_key, load_signing_key
from test_fleet_monitor import MonitorProcess, query, wait_until

FLEET = "plant-a"
DEVICES = ("cam-01", "cam-02", "cam-03", "cam-04", "intruder")
pytestmark = [pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Keys (a trusted build key, a deploy key) in the module's home, a broker and monitor, the
    serving artifact v1 and candidates; devices announcing (births) that they serve v1."""
    root = tmp_path_factory.mktemp("shadow")
    home = root / "home"
    home.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGESMITH_HOME", str(home))
        build = load_signing_key(generate_key("default"))
        deploy_key_path = generate_deploy_key()
    deploy_key = load_deploy_key(deploy_key_path)
    broker = root / "broker"
    run_cli("broker", "up", "--dir", str(broker), "--json")
    db = f"sqlite:///{root / 'monitor.db'}"
    monitor = MonitorProcess(broker, db, root / "monitor.log").start()
    dist = root / "dist"
    serving = make_artifact(dist / "v1", build, "1")
    candidates = dist / "candidates"
    make_artifact(candidates / "a", build, "2")
    make_artifact(candidates / "b", build, "3")
    odd = {"other-outputs": make_artifact(dist / "odd" / "outputs", build, "4", output_shape=(1, 3)),
           "other-isa": make_artifact(dist / "odd" / "isa", build, "5", isa="aarch64")}
    credentials = {c["device"]: c for c in fleet_broker.add_devices(broker, [*DEVICES, "silent"], FLEET)}
    serving_art = SimArtifact.of_manifest((serving / "manifest.json").read_bytes())
    devices = {}
    for name in DEVICES:
        devices[name] = SimulatedDevice(credentials[name], artifact=serving_art, interval_s=60,
                                        seed=DEVICES.index(name))
        devices[name].connect()
        devices[name].subscribe(desired.shadow_topic(FLEET, name))
    wait_until(lambda: all(monitor.device(n) for n in DEVICES), 30, "the monitor to store every birth")
    common = ["--fleet", FLEET, "--broker", str(broker), "--db", db, "--key", str(deploy_key_path)]
    yield {"root": root, "home": home, "broker": broker, "db": db, "monitor": monitor, "serving": serving,
           "candidates": candidates, "odd": odd, "devices": devices, "deploy_key": deploy_key, "common": common,
           "store": root / "store", "build": build}
    for d in devices.values():
        d.shutdown()
    code = monitor.stop()
    assert "Traceback" not in monitor.log_text() and code == 0, monitor.log_text()
    run_cli("broker", "down", "--dir", str(broker))


def cli(env: dict, *args: str, check: bool = True):
    return run_cli(*args, env={"EDGESMITH_HOME": str(env["home"])}, check=check)


def start(env: dict, *args: str, artifact: Path | None = None, check: bool = True):
    return cli(env, "shadow", "start", str(artifact or env["candidates"]), *env["common"], "--store", str(env["store"]),
               "--no-serve", "--base-url", "http://127.0.0.1:9", "--wait", "0", "--serving", str(env["serving"]),
               *args, check=check)


def shadow_id_of(result) -> str:
    return next(w for w in result.stdout.split() if w.startswith("sh-")).rstrip(":")


def shadow_states(env: dict, device: str) -> list[dict]:
    """The shadow states this device received, checked as the device does: signature over
    SHADOW_DOMAIN with the deploy key, then the contract."""
    out = []
    for msg in env["devices"][device].received():
        if msg.topic != desired.shadow_topic(FLEET, device) or msg.retain:  # retained: a re-subscription's copy
            continue
        outer = json.loads(msg.payload)
        assert outer["key_id"] == env["deploy_key"].key_id
        nacl.signing.VerifyKey(env["deploy_key"].public_key).verify(
            desired.SHADOW_DOMAIN + outer["signed"].encode(), bytes.fromhex(outer["signature"]))
        with pytest.raises(ValueError, match="signature is not valid"):  # never valid as a desired state
            desired.verify(msg.payload, [env["deploy_key"].public_key])
        out.append(contract.ShadowState.model_validate_json(outer["signed"]))
    return out


def retained_state(env: dict, device: str) -> contract.ShadowState:
    """The retained shadow state, as a device subscribing now gets it (its own login: only it may read it)."""
    d = env["devices"][device]
    before = len(d.received())
    d.client.unsubscribe(desired.shadow_topic(FLEET, device))
    d.subscribe(desired.shadow_topic(FLEET, device))
    msg = wait_until(lambda: [m for m in d.received()[before:] if m.retain], 10, f"{device}'s retained state")[-1]
    return contract.ShadowState.model_validate_json(json.loads(msg.payload)["signed"])


@pytest.mark.integration
def test_start_signs_one_state_per_device_and_versions_increase(env):
    first = start(env, "--devices", "cam-01,cam-02", "--sample", "0.2", "--duration", "30m")
    sid = shadow_id_of(first)
    states = {d: wait_until(lambda d=d: shadow_states(env, d), 10, f"{d}'s shadow state") for d in ("cam-01", "cam-02")}
    for device, (state,) in states.items():
        assert (state.fleet, state.device, state.shadow_id, state.action) == (FLEET, device, sid, "start")
        assert (state.sample, state.duration_s, len(state.candidates)) == (0.2, 1800, 2)
        assert [c.name for c in state.candidates] == ["tiny-v2-x86_64-avx2-openvino", "tiny-v3-x86_64-avx2-openvino"]
        for c in state.candidates:
            assert c.url == f"http://127.0.0.1:9/artifacts/{c.sha256}.tar"
            assert hashlib.sha256((env["store"] / f"{c.sha256}.tar").read_bytes()).hexdigest() == c.sha256
    assert not shadow_states(env, "cam-03")  # not chosen: sent nothing
    assert retained_state(env, "cam-01").version == states["cam-01"][0].version

    cli(env, "shadow", "stop", sid, "--fleet", FLEET, "--broker", str(env["broker"]), "--db", env["db"],
        "--key", env["common"][-1])
    second = shadow_id_of(start(env, "--devices", "cam-01", "--duration", "2h", artifact=env["candidates"] / "a"))
    got = wait_until(lambda: len(shadow_states(env, "cam-01")) == 3 and shadow_states(env, "cam-01"), 10,
                     "the stop and the second start")
    assert [(s.action, s.shadow_id) for s in got] == [("start", sid), ("stop", sid), ("start", second)]
    assert got[0].version < got[1].version < got[2].version
    assert retained_state(env, "cam-01").version == got[2].version
    # Stopping the stopped one again must not publish a stop: the device would end the running one.
    again = cli(env, "shadow", "stop", sid, "--fleet", FLEET, "--broker", str(env["broker"]), "--db", env["db"],
                "--key", env["common"][-1], check=False)
    said = " ".join(again.stderr.split())
    assert again.returncode == 1 and "Traceback" not in again.stderr, again.stdout + again.stderr
    assert f"shadow {sid} is not running (it is stopped); nothing was published" in said, said
    assert f"`edgesmith shadow stop {second} --fleet {FLEET}` stops it" in said, said
    assert retained_state(env, "cam-01").version == got[2].version
    assert query(env["db"], f"SELECT status FROM shadows WHERE id = '{second}'") == [("running",)]
    cli(env, "shadow", "stop", "--fleet", FLEET, "--broker", str(env["broker"]), "--db", env["db"],
        "--key", env["common"][-1])  # the fleet's running one
    assert query(env["db"], f"SELECT status FROM shadows WHERE id = '{second}'") == [("stopped",)]


@pytest.mark.integration
def test_refusals_are_one_sentence_naming_what_to_do(env):
    def refused(*args: str, artifact: Path | None = None) -> str:
        result = start(env, *args, artifact=artifact, check=False)
        assert result.returncode == 1, result.stdout + result.stderr
        assert "Traceback" not in result.stderr
        return " ".join(result.stderr.split())

    assert "cannot shadow tiny-v1-x86_64-avx2-openvino on cam-03" in refused(
        "--devices", "cam-03", artifact=env["odd"]["other-outputs"])
    assert "is built for target aarch64-avx2 (aarch64), but device cam-03 is x86_64-avx2" in refused(
        "--devices", "cam-03", artifact=env["odd"]["other-isa"])
    assert "device ghost is not provisioned in fleet plant-a" in refused("--devices", "ghost")
    assert "has not announced what it serves" in refused("--devices", "silent")
    assert "--sample 1.5 is out of range" in refused("--devices", "cam-03", "--sample", "1.5")
    assert "--cpu-share 0 is out of range" in refused("--devices", "cam-03", "--cpu-share", "0")
    assert "--duration '0s' is not a duration" in refused("--devices", "cam-03", "--duration", "0s")
    other_fleet = start(env, "--devices", "cam-03", check=False)
    assert other_fleet.returncode == 0, other_fleet.stderr
    sid = shadow_id_of(other_fleet)
    busy = refused("--devices", "cam-03,cam-04")
    assert f"device cam-03 is already in shadow {sid}" in busy
    assert f"edgesmith shadow stop {sid} --fleet plant-a" in busy
    nowhere = cli(env, "shadow", "start", str(env["candidates"]), "--fleet", "nowhere", "--broker", str(env["broker"]),
                  "--db", env["db"], "--key", env["common"][-1], "--no-serve", "--base-url", "http://127.0.0.1:9",
                  check=False)
    assert nowhere.returncode == 1 and "fleet nowhere has no devices" in " ".join(nowhere.stderr.split())
    cli(env, "shadow", "stop", sid, "--fleet", FLEET, "--broker", str(env["broker"]), "--db", env["db"],
        "--key", env["common"][-1])
    # Nothing half-made: the refused starts recorded no shadow and published nothing.
    assert query(env["db"], "SELECT count(*) FROM shadows WHERE devices LIKE '%cam-04%'") == [(0,)]
    assert not shadow_states(env, "cam-04")


# ---- figures -------------------------------------------------------------------------------------

def latency_window(samples_us: list[float], layout: contract.LatencyLayout) -> contract.LatencyWindow:
    hist = LatencyHistogram.of_samples(samples_us, layout)
    q = hist.quantiles()
    return contract.LatencyWindow(counts=hist.counts, underflow=hist.underflow, overflow=hist.overflow,
                                  sum_us=hist.sum_us, max_us=hist.max_us, p50_us=q["p50_us"] or 0.0,
                                  p95_us=q["p95_us"] or 0.0, p99_us=q["p99_us"] or 0.0)


def shadow_window(device: SimulatedDevice, state: contract.ShadowState, candidate: int, agree: int, rows: int,
                  latency_us: list[float], serving_us: list[float], served_us: list[float] | None = None,
                  **override) -> contract.ShadowWindow:
    """`serving_us`: the serving model timed beside the candidate (paired_serving_latency);
    `served_us`: the serving path's own latency (serving_latency), the same unless given."""
    layout = device.artifact.latency
    fields = dict(
        shadow_id=state.shadow_id, shadow_version=state.version, candidate=candidate,
        candidate_sha256=state.candidates[min(candidate, len(state.candidates) - 1)].manifest_sha256,
        serving_sha256=device.artifact.sha256, window_start_ms=1, window_end_ms=2, offered=rows + 3, samples=rows,
        dropped=3, errors=0, latency=latency_window(latency_us, layout),
        serving_latency=latency_window(serving_us if served_us is None else served_us, layout),
        paired_samples=rows, paired_serving_latency=latency_window(serving_us, layout),
        outputs={"y": contract.ShadowOutput(compared=min(rows * 2, contract.MAX_SAFE_INT), rows=rows, agree=agree,
                                            max_abs_err=0.01, max_rel_err=0.002, nan=0)},
        rss_increase_bytes=3 << 20, cpu_seconds=0.5)
    fields.update(override)
    return contract.ShadowWindow(**device._envelope(False), **fields)


def figures_of(env: dict, sid: str) -> dict:
    return json.loads(cli(env, "shadow", "report", sid, "--db", env["db"], "--json").stdout)


def stored_windows(env: dict, sid: str) -> int:
    return query(env["db"], f"SELECT count(*) FROM shadow_windows WHERE shadow_id = '{sid}'")[0][0] + \
        query(env["db"], f"SELECT count(*) FROM shadow_ignored WHERE shadow_id = '{sid}'")[0][0]


@pytest.mark.integration
def test_report_select_and_deploy_gate(env):
    sid = shadow_id_of(start(env, "--devices", "cam-01,cam-02", "--sample", "0.2", "--duration", "1h"))
    rng = np.random.default_rng(18)
    sent: dict[tuple[str, int], dict] = {}
    # Candidate 0 (v2): agrees on 995 of 1000 rows, half serving's time; candidate 1 (v3): agrees on
    # all, 0.8 of it. Two windows per device x candidate, merged by the report. The ratio is against
    # the serving model timed beside the candidate (paired), never against the serving path's own
    # latency, here 3x that (a loaded device), which the report shows beside it.
    plan = {0: (0.995, 0.5), 1: (1.0, 0.8)}
    for name in ("cam-01", "cam-02"):
        device = env["devices"][name]
        state = wait_until(lambda n=name: [s for s in shadow_states(env, n) if s.shadow_id == sid], 10, "state")[0]
        for cand, (share, speed) in plan.items():
            for rows in (600, 400):
                serving = rng.lognormal(np.log(2000.0), 0.1, size=rows).tolist()
                mine = [v * speed for v in serving]
                served = [v * 3 for v in serving]
                device.send(shadow_window(device, state, cand, round(rows * share), rows, mine, serving, served))
                entry = sent.setdefault((name, cand), {"agree": 0, "rows": 0, "lat": [], "serving": [], "served": []})
                entry["agree"] += round(rows * share)
                entry["rows"] += rows
                entry["lat"] += mine
                entry["serving"] += serving
                entry["served"] += served
    wait_until(lambda: stored_windows(env, sid) == 8, 30, "the monitor to store the 8 windows")

    report = figures_of(env, sid)
    layout = env["devices"]["cam-01"].artifact.latency
    assert report["status"] == "running" and report["ignored"] == {}
    assert len(report["figures"]) == 4
    for f in report["figures"]:
        want = sent[(f["device"], f["candidate"])]
        assert (f["samples"], f["offered"], f["dropped"], f["windows"]) == (1000, 1006, 6, 2)
        assert f["agreement"] == pytest.approx(want["agree"] / want["rows"])
        p50 = LatencyHistogram.of_samples(want["lat"], layout).percentile_us(0.5)
        serving_p50 = LatencyHistogram.of_samples(want["serving"], layout).percentile_us(0.5)
        served_p50 = LatencyHistogram.of_samples(want["served"], layout).percentile_us(0.5)
        assert f["p50_us"] == pytest.approx(p50) and f["paired_serving_p50_us"] == pytest.approx(serving_p50)
        assert f["serving_p50_us"] == pytest.approx(served_p50) and f["paired_samples"] == 1000
        assert f["latency_ratio"] == pytest.approx(p50 / serving_p50)
        assert f["rss_increase_bytes"] == 3 << 20 and f["max_abs_err"] == pytest.approx(0.01)
    table = cli(env, "shadow", "report", sid, "--db", env["db"]).stdout
    assert f"shadow {sid} of plant-a: running" in table

    # The dashboard's panel: per candidate, each window's agreement and latency ratio over time.
    def panel() -> dict | None:
        return next((s for s in json.loads(env["monitor"].get("/api/shadows")) if s["id"] == sid
                     and sum(len(c["points"]) for c in s["candidates"]) == 8), None)

    shown = wait_until(panel, 30, "the shadow on /api/shadows")
    for c in shown["candidates"]:
        assert len(c["points"]) == 4
        assert {round(p["agreement"], 3) for p in c["points"]} == {plan[c["index"]][0]}
        assert all(abs(p["latency_ratio"] - plan[c["index"]][1]) < 0.1 for p in c["points"])
    page = env["monitor"].get("/").decode()
    assert f'data-shadow="{sid}"' in page and "latency ratio" in page

    # The fastest candidate that passed everywhere; a stricter bound leaves only the slower one.
    chosen = json.loads(cli(env, "select", "--from-shadow", sid, "--db", env["db"], "--json").stdout)
    assert chosen["name"] == "tiny-v2-x86_64-avx2-openvino" and chosen["worst_latency_ratio"] < 0.6
    assert chosen["measured_on"] == {d: {"target": "x86_64-avx2", "isa": "x86_64", "cpu": "simulated device",
                                         "runtime": "0.1.0"} for d in ("cam-01", "cam-02")}
    strict = json.loads(cli(env, "select", "--from-shadow", sid, "--db", env["db"], "--min-agreement", "0.999",
                            "--json").stdout)
    assert strict["name"] == "tiny-v3-x86_64-avx2-openvino"
    assert query(env["db"], f"SELECT name FROM shadow_selections WHERE shadow_id = '{sid}' ORDER BY id") == [
        ("tiny-v2-x86_64-avx2-openvino",), ("tiny-v3-x86_64-avx2-openvino",)]
    none = cli(env, "select", "--from-shadow", sid, "--db", env["db"], "--min-samples", "5000", check=False)
    said = " ".join(none.stderr.split())
    assert none.returncode == 1 and "no candidate of shadow" in said and "1000 samples < 5000" in said

    def deploy(artifact: Path, *bounds: str):
        return cli(env, "deploy", str(artifact), *env["common"], "--store", str(env["store"]), "--serve",
                   "127.0.0.1:0", "--devices", "cam-01", "--wave-timeout", "0.5", "--abort-on-failure", "100%",
                   "--require-shadow", sid, *bounds, check=False)

    low = deploy(env["candidates"] / "a", "--min-agreement", "0.999", "--max-latency-ratio", "1.05")
    said = " ".join(low.stderr.split())
    assert low.returncode == 1 and "refused: tiny-v2-x86_64-avx2-openvino missed the bounds" in said
    assert "cam-01: agreement 0.9950 < 0.999" in said and "cam-02: agreement 0.9950 < 0.999" in said
    assert "deployment" not in low.stdout  # nothing was published
    slow = deploy(env["candidates"] / "b", "--max-latency-ratio", "0.7")
    assert slow.returncode == 1 and re.search(r"cam-0\d: latency ratio 0\.\d+ > 0\.7", " ".join(slow.stderr.split()))
    other_fleet = cli(env, "deploy", str(env["candidates"] / "b"), *env["common"][2:], "--fleet", "plant-b",
                      "--store", str(env["store"]), "--serve", "127.0.0.1:0", "--require-shadow", sid, check=False)
    said = " ".join(other_fleet.stderr.split())
    assert other_fleet.returncode == 1 and f"no shadow {sid} of fleet plant-b in the store" in said, said
    not_candidate = deploy(env["serving"])
    assert not_candidate.returncode == 1 and "was not a candidate of shadow" in " ".join(not_candidate.stderr.split())
    passing = deploy(env["candidates"] / "b", "--min-agreement", "0.999", "--max-latency-ratio", "1.05")
    assert passing.returncode == 0, passing.stderr
    assert f"shadow {sid}: tiny-v3-x86_64-avx2-openvino met the bounds on 2 device(s)" in passing.stdout
    assert "deployment dep-" in passing.stdout
    cli(env, "shadow", "stop", sid, "--fleet", FLEET, "--broker", str(env["broker"]), "--db", env["db"],
        "--key", env["common"][-1])


ERROR_WITH_MARKUP = "shadow slot [/x] budget [bold]exceeded"  # as markup: a closing tag that closes nothing


@pytest.mark.integration
def test_a_hostile_devices_reports_are_ignored_and_counted(env):
    # --canary 50% of the two named devices: the first, cam-04, alone; --wait prints what it says.
    cam, intruder = env["devices"]["cam-04"], env["devices"]["intruder"]
    before = len(shadow_states(env, "cam-04"))
    args = [EDGESMITH, "shadow", "start", str(env["candidates"]), *env["common"], "--store", str(env["store"]),
            "--no-serve", "--base-url", "http://127.0.0.1:9", "--serving", str(env["serving"]), "--devices",
            "cam-04,cam-03", "--canary", "50%", "--duration", "1h", "--wait", "60"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "EDGESMITH_HOME": str(env["home"])})
    state = wait_until(lambda: shadow_states(env, "cam-04")[before:], 60, "cam-04's shadow state")[0]
    sid = state.shadow_id
    cam.send(contract.Event(**cam._envelope(False), event="shadow.started", message="candidate 0 running",
                            details={"shadow_id": sid, "shadow_version": state.version, "candidate": 0,
                                     "candidate_sha256": state.candidates[0].manifest_sha256}))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "cam-04: shadow.started (candidate 0): candidate 0 running" in out and "cam-03" not in out
    assert sorted(figures_of(env, sid)["devices"]) == ["cam-04"]
    lat = [1000.0] * 10
    # Not in the shadow; a candidate digest the shadow never named; an index past its candidates; a
    # shadow that does not exist; a stale version; another serving model; an event for a shadow it is not in.
    intruder.send(shadow_window(intruder, state, 0, 10, 10, lat, lat))
    cam.send(shadow_window(cam, state, 0, 10, 10, lat, lat, candidate_sha256="e" * 64))
    cam.send(shadow_window(cam, state, 7, 10, 10, lat, lat))
    cam.send(shadow_window(cam, state, 0, 10, 10, lat, lat, shadow_id="sh-20260101-0000-abcdef"))
    cam.send(shadow_window(cam, state, 0, 10, 10, lat, lat, shadow_version=state.version + 5))
    cam.send(shadow_window(cam, state, 0, 10, 10, lat, lat, serving_sha256="f" * 64))  # another baseline
    intruder.send(contract.Event(**intruder._envelope(False), event="shadow.failed", message="crash",
                                 details={"shadow_id": sid, "candidate": 0, "error": "made up"}))
    # Huge counts (the contract's caps: MAX_SAFE_INT, a latency window's MAX_WINDOW_COUNT) from the
    # device itself: counted, and nothing crashes.
    huge, top = contract.MAX_SAFE_INT, contract.MAX_WINDOW_COUNT
    big = contract.LatencyWindow(counts=[top] * cam.artifact.latency.count, underflow=top, overflow=top,
                                 sum_us=contract.MAX_MICROS, max_us=contract.MAX_MICROS, p50_us=1.0, p95_us=1.0,
                                 p99_us=1.0)
    cam.send(shadow_window(cam, state, 1, huge, huge, lat, lat, offered=huge, samples=huge, latency=big,
                           serving_latency=big))
    cam.send(contract.Event(**cam._envelope(False), event="shadow.refused", message="no room",
                            details={"shadow_id": sid, "candidate": 0, "error": ERROR_WITH_MARKUP}))
    wait_until(lambda: stored_windows(env, sid) == 7
               and query(env["db"], f"SELECT count(*) FROM shadow_events WHERE shadow_id = '{sid}'") == [(2,)]
               and query(env["db"], "SELECT count(*) FROM shadow_ignored WHERE reason = 'foreign_shadow' "
                                    "AND device = 'cam-04'")[0][0] >= 1, 30, "every report judged")
    report = figures_of(env, sid)
    assert report["ignored"] == {"intruder": {"foreign_device": 2},
                                 "cam-04": {"foreign_candidate": 2, "stale_version": 1, "other_serving": 1}}
    by_cand = {f["candidate"]: f for f in report["figures"]}
    assert by_cand[0]["samples"] == 0 and by_cand[0]["refused"] == 1 and by_cand[0]["failed"] == 0
    assert by_cand[0]["last_error"] == ERROR_WITH_MARKUP
    # A device's text is shown as it is: markup in it neither breaks the report nor styles it.
    text = cli(env, "shadow", "report", sid, "--db", env["db"], check=False)
    assert text.returncode == 0 and "Traceback" not in text.stderr, text.stdout + text.stderr
    assert f"cam-04 / tiny-v2-x86_64-avx2-openvino: {ERROR_WITH_MARKUP}" in text.stdout, text.stdout
    assert by_cand[1]["samples"] == huge and by_cand[1]["agreement"] == 1.0 and by_cand[1]["p50_us"] is not None
    assert env["monitor"].proc.poll() is None
    cli(env, "shadow", "stop", sid, "--fleet", FLEET, "--broker", str(env["broker"]), "--db", env["db"],
        "--key", env["common"][-1])


@pytest.mark.integration
def test_durations_and_candidate_folders(tmp_path, env):
    from edgesmith.toolchain.errors import UserError
    from edgesmith.toolchain.shadow.central import candidate_dirs, parse_duration

    assert [parse_duration(t) for t in ("90s", "30m", "2h", "1d", "45", "1.5h")] == [90, 1800, 7200, 86400, 45, 5400]
    for bad in ("0s", "31d", "-1m", "soon", ""):
        with pytest.raises(UserError, match="is not a duration"):
            parse_duration(bad)
    assert [p.name for p in candidate_dirs(env["candidates"])] == ["a", "b"]
    assert candidate_dirs(env["serving"]) == [env["serving"]]
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither an artifact directory nor a directory of them"):
        candidate_dirs(tmp_path / "empty")


def test_selection_lineage_logged_to_mlflow(tmp_path, monkeypatch):
    """A choice among candidates built from models:/tiny/1: a run in the training run's experiment
    naming the devices it was measured on and the figures; the model version is tagged with it."""
    import mlflow

    from edgesmith.toolchain.shadow.lineage import log_selection

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = mlflow.MlflowClient(uri, uri)
    experiment = client.create_experiment("train", artifact_location=(tmp_path / "mlartifacts").as_uri())
    training = client.create_run(experiment)
    client.create_registered_model("tiny")
    client.create_model_version("tiny", f"{training.info.artifact_uri}/onnx", run_id=training.info.run_id)
    candidate = {"index": 1, "name": "tiny-v1-x86_64-avx2-ort", "manifest_sha256": "a" * 64, "target": "x86_64-avx2",
                 "backend": "ort", "model_uri": "models:/tiny/1"}
    shadow = {"id": "sh-20261207-2000-abcdef", "fleet": "plant-a",
              "candidates": [{**candidate, "index": 0, "name": "tiny-v1-x86_64-avx2-tvm"}, candidate]}
    measured_on = {d: {"target": "x86_64-avx2", "isa": "x86_64", "runtime": "0.1.0"} for d in ("cam-01", "cam-02")}
    selection = {"min_agreement": 0.99, "max_latency_ratio": None, "min_samples": 100,
                 "measured_on": json.dumps(measured_on), "figures": json.dumps([{"device": "cam-01", "samples": 500}])}
    run_id = log_selection(shadow, candidate, selection)
    run = client.get_run(run_id)
    assert run.info.experiment_id == experiment and run.data.tags["edgesmith.kind"] == "select"
    assert run.data.tags["edgesmith.measured_on"] == "cam-01,cam-02"
    assert run.data.tags["edgesmith.artifact"] == "tiny-v1-x86_64-avx2-ort"
    assert client.get_model_version("tiny", "1").tags[f"edgesmith.select.{shadow['id']}"].startswith(
        "tiny-v1-x86_64-avx2-ort measured on cam-01,cam-02")
    logged = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="selection/shadow.json",
                                                                 dst_path=str(tmp_path / "dl"))).read_text())
    assert logged["measured_on"] == measured_on and len(logged["candidates"]) == 2


def test_shadow_tables_compile_for_postgresql():
    """Portable types only: the shadow tables' DDL on PostgreSQL (64-bit ids, no SQLite-isms)."""
    from sqlalchemy.dialects import postgresql
    from sqlalchemy.schema import CreateIndex, CreateTable

    from edgesmith.toolchain.fleet.store.shadows import SHADOW_TABLES

    dialect = postgresql.dialect()
    ddl = "\n".join(str(CreateTable(t).compile(dialect=dialect)) for t in SHADOW_TABLES)
    ddl += "\n".join(str(CreateIndex(i).compile(dialect=dialect)) for t in SHADOW_TABLES for i in t.indexes)
    assert ddl.count("BIGSERIAL") == 4 and "AUTOINCREMENT" not in ddl.upper()


@pytest.mark.integration
@BOTH_STORES
def test_shadow_ingest_report_and_select_on_both_stores(store_url):
    """What depends on the database, on SQLite and PostgreSQL: shadow-state versions (the upsert),
    ingest of windows and events (a 64-character event name, counts at the contract's cap, reports
    ignored), the report's figures, a selection's row and the dashboard's panel."""
    from edgesmith.toolchain.fleet.store import Incoming, Store, deployments, shadows
    from edgesmith.toolchain.shadow import results

    store = Store.open(store_url)
    assert [deployments.reserve_version(store, FLEET, "cam-01", at, table=shadows.shadow_versions)
            for at in (0, 0, 7)] == [1, 2, 8]
    assert deployments.reserve_version(store, FLEET, "cam-01") == 1  # desired states count apart
    cam = SimulatedDevice({"fleet": FLEET, "device": "cam-01"}, interval_s=60)
    intruder = SimulatedDevice({"fleet": FLEET, "device": "intruder"}, interval_s=60)
    sid = "sh-20261207-2000-0a0b0c"
    cand = {"index": 0, "name": "tiny-v2", "manifest_sha256": "c" * 64, "archive_sha256": "d" * 64,
            "model_uri": None}
    with store.engine.begin() as conn:
        conn.execute(shadows.shadows.insert().values(
            id=sid, fleet=FLEET, devices=json.dumps({"cam-01": {"version": 8, "serving_sha256": cam.artifact.sha256,
                                                                "target": "x86_64-avx2", "isa": "x86_64"}}),
            candidates=json.dumps([cand]), sample=0.2, duration_s=60, cpu_share=0.5, queue=4, url="http://x",
            key_id="0" * 16, status="running", created_ms=1, starts_ms=1, ends_ms=2**52))
    state = contract.ShadowState(fleet=FLEET, device="cam-01", version=8, shadow_id=sid, action="start",
                                 issued_at_ms=1, candidates=[contract.DesiredArtifact(
                                     url="http://x", sha256="d" * 64, size=1, manifest_sha256="c" * 64,
                                     name="tiny-v2")])
    huge = contract.MAX_SAFE_INT
    lat = [1000.0] * 20
    # Paired windows: the candidate at half the paired serving time, the serving path itself 4x
    # slower (a loaded device); and one window of an agent without paired timing: its samples
    # count, its latencies stay out of the ratio.
    messages = [cam.birth(), shadow_window(cam, state, 0, 19, 20, [v / 2 for v in lat], lat, [v * 4 for v in lat]),
                shadow_window(cam, state, 0, 20, 20, lat, [v * 8 for v in lat], paired_samples=None,
                              paired_serving_latency=None),
                shadow_window(cam, state, 0, huge, huge, lat, lat, offered=huge, samples=huge),
                shadow_window(intruder, state, 0, 20, 20, lat, lat),
                contract.Event(**cam._envelope(False), event="shadow." + "x" * 57, message="m",
                               details={"shadow_id": sid, "candidate": 0})]
    store.ingest([Incoming(received_ms=1000 + i, message=m) for i, m in enumerate(messages)])
    report = results.report(store, sid)
    (f,) = report["figures"]
    assert f["samples"] == huge + 40 and f["windows"] == 3 and f["agreement"] == pytest.approx(1.0)
    assert f["paired_samples"] == huge + 20 and f["paired_serving_p50_us"] is not None
    layout = cam.artifact.latency
    paired_p50 = LatencyHistogram.of_samples(lat + lat, layout).percentile_us(0.5)
    assert f["paired_serving_p50_us"] == pytest.approx(paired_p50)
    assert f["latency_ratio"] == pytest.approx(
        LatencyHistogram.of_samples([v / 2 for v in lat] + lat, layout).percentile_us(0.5) / paired_p50)
    assert f["events"] == ["shadow." + "x" * 57] and report["ignored"] == {"intruder": {"foreign_device": 1}}
    chosen, verdicts, shadow = results.select_candidate(store, sid, 0.9, None, 10)
    row = results.record_selection(store, shadow, chosen, verdicts, 0.9, None, 10)
    assert json.loads(row["measured_on"]) == {"cam-01": {"target": "x86_64-avx2", "isa": "x86_64", "cpu": None,
                                                         "runtime": None}}
    (panel,) = shadows.panel(store)
    assert panel["id"] == sid and [p["agreement"] for p in panel["candidates"][0]["points"]] == [0.95, 1.0, 1.0]
    # Each point's ratio is against its window's paired serving p50; none for the unpaired window.
    ratios = [p["latency_ratio"] for p in panel["candidates"][0]["points"]]
    assert ratios[0] == pytest.approx(0.5, rel=0.2) and ratios[1] is None and ratios[2] == pytest.approx(1.0)
    store.engine.dispose()


def test_huge_latency_counts_keep_their_quantiles():
    """Every bucket of a 4096-bucket layout at the contract's cap: the merged total is past 64 bits,
    and the quantiles must still be those of the shape (here: every bucket equal), not a wrapped sum's."""
    from edgesmith.toolchain.shadow.results import _latency

    count = contract.MAX_LATENCY_BUCKETS
    layout = json.dumps([10.0, 1.001, count])

    def row(c: int) -> dict:
        w = {"counts": [c] * count, "underflow": 0, "overflow": 0, "sum_us": 1.0, "max_us": 1e9}
        return {"latency_layout": layout, "latency": json.dumps(w)}

    same_shape = _latency([row(1)], "latency")
    huge = _latency([row(contract.MAX_SAFE_INT)] * 3, "latency")
    assert same_shape[0] > 10.0 * 1.001 ** 2000  # the middle bucket
    assert huge == pytest.approx(same_shape, rel=1e-3)
