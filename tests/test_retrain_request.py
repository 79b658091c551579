"""Retrain requests (issue 19): a drift alert records one in the monitor's store, shown by `fleet status`,
`fleet retrain list`, /api/retrain and the dashboard; and the agent's camera stand-in
(`edgesmith-agent --load-from FILE.npy`) that makes the drift real.

The end-to-end test serves the trained digits CNN (the digits_trained fixture) on two real agents
replaying held-out digits from the training run's test split, one rotated by 90 degrees: the real
monitor flags that device's drift and records a retrain request for it, never for the other. The
request bookkeeping (a device's second alert, a second device, dismissal) runs with simulated
devices against the same real monitor, on SQLite and PostgreSQL; the store's bounds against a hostile
device (one active request per device whatever it claims, one row per alert subject, active requests
listed first) run on both stores directly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import BOTH_STORES, _once, build_json, run_cli
from test_agent import Agent, broker  # noqa: F401  (fixture: a real Mosquitto, down at teardown)
from test_fleet_monitor import (FLEET, MonitorProcess, broker_dir, classes, connected, devices,  # noqa: F401
                                monitor_client, query, start_monitor, wait_until)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

TARGET = "x86_64-avx2"
LOAD_RPS = "100"  # replayed inputs a second: 100 counted values (the drift minimum) in about a second


@pytest.fixture(scope="module")
def digits_served(shared_root, session_home, digits_trained, tmp_path_factory) -> dict:
    """The trained digits CNN built for the host (OpenVINO), and held-out digits of its training run's
    test split as --load-from files: as they are, rotated by 90 degrees, and hostile variants."""
    import mlflow

    from edgesmith.toolchain.train import tracking

    def make(out: Path) -> dict:
        env = {"EDGESMITH_HOME": str(session_home), "MLFLOW_TRACKING_URI": digits_trained["uri"]}
        (artifact,) = build_json(digits_trained["model_uri"], "-t", TARGET, "--backend", "openvino", "-o", str(out),
                                 env=env)["artifacts"]
        return {"path": artifact["path"]}

    built = _once(shared_root, "digits-trained-openvino", make)
    root = tmp_path_factory.mktemp("replay")
    mlflow.set_tracking_uri(digits_trained["uri"])
    split = mlflow.artifacts.download_artifacts(run_id=digits_trained["run_id"], artifact_path=tracking.TEST_SPLIT,
                                                dst_path=str(root / "split"))
    with np.load(split, allow_pickle=False) as data:
        x = np.ascontiguousarray(data["x"][:64], dtype=np.float32)  # the build's reference run saw these 64
    assert x.shape == (64, 1, 8, 8)
    np.save(root / "digits.npy", x)
    np.save(root / "rotated.npy", np.ascontiguousarray(np.rot90(x, 1, axes=(2, 3))))
    return {"path": Path(built["path"]), "pub": session_home / "keys" / "default.pub", "x": x,
            "digits": root / "digits.npy", "rotated": root / "rotated.npy", "root": root}


# ---- the camera stand-in against a real monitor ----------------------------------------------------

@BOTH_STORES
def test_rotated_digits_raise_drift_and_a_retrain_request(digits_served, tmp_path, store_url, broker):  # noqa: F811
    monitor = MonitorProcess(broker.dir, store_url, tmp_path / "monitor.log").start()
    agents: list[Agent] = []
    try:
        for device, replay in (("cam-ok", digits_served["digits"]), ("cam-rot", digits_served["rotated"])):
            agent = Agent(digits_served, broker.add_device(device), tmp_path / device, "--interval", "0.5",
                          "--synthetic-load", LOAD_RPS, "--load-from", str(replay))
            agents.append(agent)
            agent.ready()

        def drifted() -> bool:
            return any(a["alert"] == "drift" and a["subject"].startswith("cam-rot/") and a["active"]
                       for a in monitor.api()["alerts"])
        wait_until(drifted, 60, "the drift alert of cam-rot")
        (request,) = json.loads(monitor.get("/api/retrain"))
        # The unshifted device has been measured on at least as much as the shifted one was when it fired.
        fired_on = monitor.device("cam-rot")["drift"]
        needed = max(m["samples"] for m in fired_on.values() if m)
        ok = monitor.wait_device("cam-ok", lambda d: all(m and m["samples"] >= needed for m in d["drift"].values()),
                                 f"{needed} measured outputs")
        assert all(m["psi"] < 0.2 * 0.8 and m["js"] < 0.1 * 0.8 for m in ok["drift"].values()), ok["drift"]
        assert not any(a["subject"].startswith("cam-ok/") for a in monitor.api()["alerts"])
        manifest = json.loads((digits_served["path"] / "manifest.json").read_text())
        assert request["status"] == "open" and request["fleet"] == FLEET and request["devices"] == ["cam-rot"]
        assert (request["model"], request["model_version"]) == (manifest["model"]["name"], manifest["model"]["version"])
        assert request["manifest_sha256"] == monitor.device("cam-rot")["manifest_sha256"]
        assert request["alerts"] and all(a["alert"].startswith(f"{FLEET}/drift/cam-rot/") and a["alert"].endswith("#1")
                                         and a["firings"] == 1 for a in request["alerts"])
        assert all(request[k] is None for k in ("capture_id", "dataset_digest", "mlflow_run_id", "result_version"))
        html = monitor.get("/").decode()
        assert f'data-retrain="{request["id"]}"' in html
        status = {d["device"]: d for d in json.loads(run_cli("fleet", "status", "--db", store_url, "--json").stdout)}
        assert status["cam-rot"]["retrain"]["id"] == request["id"] and status["cam-ok"]["retrain"] is None
    finally:
        for agent in agents:
            assert agent.stop() == 0, agent.log()
        code = monitor.stop()
        assert "Traceback" not in monitor.log_text() and code == 0, monitor.log_text()
    for agent in agents:  # every replayed input ran: no run_error, nothing refused
        assert "error" not in agent.log().lower(), agent.log()


def test_hostile_load_from_files_are_refused_in_one_sentence(digits_served, tmp_path, broker):  # noqa: F811
    """Every byte of the file is hostile: the agent refuses it before serving, naming the file, what the
    model expects and what it found (the .npy header parser itself is fuzzed in test_npy.py)."""
    x, root = digits_served["x"], tmp_path
    credentials = broker.add_device("cam-bad")
    started = [0]

    def _agent_error(*flags: str) -> tuple[int, str]:
        started[0] += 1
        agent = Agent(digits_served, credentials, tmp_path / f"data-{started[0]}", *flags)
        try:
            code = agent.proc.wait(60)
        finally:
            if agent.proc.poll() is None:
                agent.proc.kill()
                agent.proc.wait(30)
            agent._log.close()
        return code, agent.log()
    cases: dict[str, tuple[bytes | None, str]] = {}

    def npy(array: np.ndarray) -> bytes:
        import io
        buffer = io.BytesIO()
        np.save(buffer, array)
        return buffer.getvalue()

    good = npy(x)
    cases["int64"] = (npy(x.astype(np.int64)), "found int64 (64, 1, 8, 8)")
    cases["shape"] = (npy(x.reshape(64, 64)), "found float32 (64, 64)")
    cases["empty"] = (npy(x[:0]), "found float32 (0, 1, 8, 8)")
    cases["many"] = (npy(np.zeros((65537, 1, 8, 8), np.float32)), "expected at most 65536 samples, found 65537")
    cases["magic"] = (b"PK\x03\x04" + good[4:], "expected a .npy file of float32 samples")
    cases["truncated"] = (good[:-5], "its header says float32 (64, 1, 8, 8), so expected 16384 bytes of data after it, "
                                     "found 16379")
    cases["trailing"] = (good + b"\0" * 8, "so expected 16384 bytes of data after it, found 16392")
    cases["header"] = (good[:10] + b"{'descr': '<f4', 'shape': (99999999999999999999,), }".ljust(len(good) - 10),
                       "expected a .npy file of float32 samples")
    for name, (content, expected) in cases.items():
        path = root / f"{name}.npy"
        path.write_bytes(content)
        code, log = _agent_error("--synthetic-load", "10", "--load-from", str(path))
        assert code == 1, (name, log)
        line = log.strip().splitlines()[-1]
        assert line.startswith(f"error: --load-from {path}") and expected in line, (name, line)
    big = root / "big.npy"  # sparse: its size is checked before a byte of it is read
    with open(big, "wb") as f:
        f.write(good[:128])
        f.truncate((64 << 20) + 1)
    code, log = _agent_error("--synthetic-load", "10", "--load-from", str(big))
    assert code == 1 and f"--load-from {big}: expected at most 67108864 bytes, found 67108865 bytes" in log, log
    code, log = _agent_error("--load-from", str(root / "int64.npy"))
    assert code == 2 and "needs --synthetic-load RPS" in log, log
    code, log = _agent_error("--synthetic-load", "10", "--load-from", str(root / "missing.npy"))
    assert code == 1 and f"--load-from {root / 'missing.npy'}: no such file" in log, log


# ---- the request's bookkeeping, simulated devices ---------------------------------------------------

SHIFTED = [100, 200, 300, 400]
STEADY = [400, 300, 200, 100]


def _requests(monitor: MonitorProcess) -> list[dict]:
    return json.loads(monitor.get("/api/retrain"))


def _firing(monitor, subject: str) -> bool:
    return ("drift", subject) in monitor.alerts()


@BOTH_STORES
def test_one_open_request_per_model_collects_devices_and_alerts(broker_dir, start_monitor, store_url):
    from edgesmith.toolchain.fleet.simulate import SimArtifact, output_window

    from edgesmith.toolchain.fleet import protocol

    monitor = start_monitor()
    listener, events = monitor_client(broker_dir, "test-retrain")
    listener.subscribe(protocol.alert_topic(FLEET), qos=1)
    art = SimArtifact(outputs=[classes([0.4, 0.3, 0.2, 0.1])])
    other = SimArtifact(model="other-model", outputs=[classes([0.4, 0.3, 0.2, 0.1])])
    c_a, c_b, c_c, c_o = devices(broker_dir, "cam-a", "cam-b", "cam-c", "cam-other")
    a, b, c = (connected(cred, artifact=art, interval_s=60) for cred in (c_a, c_b, c_c))
    o = connected(c_o, artifact=other, interval_s=60)

    def send(device, counts, n: int = 6) -> None:  # 6 windows of 60 s: the whole 300 s recent horizon
        for _ in range(n):
            device.send(device.telemetry(runs=1000, outputs={"logits": output_window(counts)}))

    send(a, SHIFTED)
    send(c, STEADY)
    wait_until(lambda: _firing(monitor, "cam-a/logits"), 30, "cam-a's drift alert")
    (first,) = wait_until(lambda: _requests(monitor), 30, "a retrain request")
    assert first["devices"] == ["cam-a"] and first["status"] == "open"
    assert [(a["alert"], a["firings"]) for a in first["alerts"]] == [(f"{FLEET}/drift/cam-a/logits#1", 1)]
    assert (first["model"], first["model_version"], first["manifest_sha256"]) == (art.model, art.model_version, art.sha256)

    send(b, SHIFTED)  # a second device of the same model joins the open request
    wait_until(lambda: _firing(monitor, "cam-b/logits"), 30, "cam-b's drift alert")
    send(a, STEADY)  # cam-a clears, then drifts again: its second alert adds to the same request
    wait_until(lambda: not _firing(monitor, "cam-a/logits"), 30, "cam-a's alert to clear")
    send(a, SHIFTED)
    wait_until(lambda: _firing(monitor, "cam-a/logits"), 30, "cam-a's second drift alert")
    send(o, SHIFTED)  # another model: a request of its own
    wait_until(lambda: _firing(monitor, "cam-other/logits"), 30, "cam-other's drift alert")

    rows = wait_until(lambda: (r := _requests(monitor)) and len(r) == 2 and r[-1]["alert_firings"] == 3 and r, 30,
                      "cam-other's request")
    mine = next(r for r in rows if r["id"] == first["id"])
    assert mine["devices"] == ["cam-a", "cam-b"] and mine["status"] == "open"
    # One row per alert subject, counting its firings: cam-a's second alert is a firing more, not a row.
    assert {a["alert"]: a["firings"] for a in mine["alerts"]} == {f"{FLEET}/drift/cam-a/logits#2": 2,
                                                                  f"{FLEET}/drift/cam-b/logits#1": 1}
    assert (mine["alert_subjects"], mine["device_count"]) == (2, 2)
    theirs = next(r for r in rows if r["id"] != first["id"])
    assert theirs["devices"] == ["cam-other"] and theirs["model"] == "other-model"
    assert query(store_url, "SELECT count(*) FROM retrain_request_subjects") == [(3,)]

    shown = run_cli("fleet", "status", "--db", store_url, "--fleet", FLEET).stdout
    assert first["id"] in shown and "retrain requests" in shown

    dismissed = json.loads(run_cli("fleet", "retrain", "dismiss", first["id"], "--db", store_url, "--note",
                                   "a lens was cleaned", "--json").stdout)
    assert dismissed["status"] == "dismissed" and dismissed["note"] == "a lens was cleaned"
    again = run_cli("fleet", "retrain", "dismiss", first["id"], "--db", store_url, check=False)
    assert again.returncode != 0 and "Traceback" not in again.stderr
    assert f"retrain request {first['id']} is dismissed, so it cannot become dismissed" in again.stderr, again.stderr
    unknown = run_cli("fleet", "retrain", "dismiss", "rr-nope", "--db", store_url, check=False)
    assert unknown.returncode != 0 and "there is no retrain request 'rr-nope'" in unknown.stderr, unknown.stderr

    send(a, STEADY)  # after the dismissal cam-a's next drift opens a new request
    wait_until(lambda: not _firing(monitor, "cam-a/logits"), 30, "cam-a's alert to clear")
    send(a, SHIFTED)
    wait_until(lambda: _firing(monitor, "cam-a/logits"), 30, "cam-a's third drift alert")
    rows = wait_until(lambda: (r := _requests(monitor)) and len(r) == 3 and r, 30, "a third request")
    newest = next(r for r in rows if r["id"] not in (first["id"], theirs["id"]))
    assert newest["devices"] == ["cam-a"]
    assert [a["alert"] for a in newest["alerts"]] == [f"{FLEET}/drift/cam-a/logits#3"]
    assert [r["id"] for r in rows] == [newest["id"], theirs["id"], first["id"]]  # the active ones first
    assert newest["status"] == "open"
    active = json.loads(run_cli("fleet", "retrain", "list", "--db", store_url, "--active", "--json").stdout)
    assert active == [r for r in rows if r["id"] != first["id"]]  # the CLI reads what /api/retrain shows
    # Each drift alert's firing names its request (on MQTT and the webhook); a resolution names none.
    wait_until(lambda: sum(json.loads(m.payload)["state"] == "firing" for m in events) == 5, 30, "5 firing alerts")
    named = [(e["subject"], e.get("retrain_request")) for e in map(json.loads, (m.payload for m in events))
             if e["state"] == "firing"]
    assert named == [("cam-a/logits", first["id"]), ("cam-b/logits", first["id"]), ("cam-a/logits", first["id"]),
                     ("cam-other/logits", theirs["id"]), ("cam-a/logits", newest["id"])], named
    assert not any("retrain_request" in json.loads(m.payload) for m in events if b'"resolved"' in m.payload)
    listener.loop_stop()
    listener.disconnect()
    for device in (a, b, c, o):
        device.shutdown()


@BOTH_STORES
def test_store_moves_a_request_only_forward(store_url):
    """The statuses the loop will set: open → capturing → training → done, with what it links."""
    from sqlalchemy import select

    from edgesmith.toolchain.errors import UserError
    from edgesmith.toolchain.fleet.store import Store, retrain

    store = Store.open(store_url)
    at = 1_700_000_000_000
    with store.engine.begin() as conn:
        info = {"device": "cam-1", "model": "digits", "model_version": "3", "manifest_sha256": "ab" * 32}
        rid = retrain.record_drift(conn, FLEET, "cam-1/logits", info, 1, at)
        assert retrain.record_drift(conn, FLEET, "cam-1/logits", info, 2, at + 1) == rid
    with pytest.raises(UserError, match="is open, so it cannot become done"):
        retrain.advance(store, rid, "done")
    retrain.advance(store, rid, "capturing", capture_id="cap-1")
    with store.engine.begin() as conn:  # capturing: the device's next alert still adds to it, another device opens anew
        assert retrain.record_drift(conn, FLEET, "cam-1/logits", info, 3, at + 2) == rid
        other = retrain.record_drift(conn, FLEET, "cam-2/logits", {**info, "device": "cam-2"}, 1, at + 3)
        assert other != rid
        assert conn.scalar(select(retrain.retrain_requests.c.open_key).where(retrain.retrain_requests.c.id == rid)) is None
    retrain.advance(store, rid, "training", dataset_digest="d" * 64, mlflow_run_id="r" * 32)
    row = retrain.advance(store, rid, "done", result_version="4")
    assert (row["status"], row["capture_id"], row["dataset_digest"], row["result_version"]) == ("done", "cap-1", "d" * 64, "4")
    (alert,) = row["alerts"]  # one subject that fired three times
    assert (alert["alert"], alert["firings"], alert["first_ms"], alert["last_ms"]) == (
        f"{FLEET}/drift/cam-1/logits#3", 3, at, at + 2)
    assert (row["alert_subjects"], row["alert_firings"], row["devices"]) == (1, 3, ["cam-1"])
    naming = retrain.naming(store)  # done: cam-1 is named by no request any more
    assert (FLEET, "cam-1") not in naming and naming[(FLEET, "cam-2")]["id"] == other
    with pytest.raises(ValueError):
        retrain.advance(store, other, "capturing", bogus="x")
    # The loop's way (toolchain/loop.py): every status up to done, links kept, each step recorded once.
    for status in ("capturing", "training", "building", "shadowing"):
        retrain.advance(store, other, status)
    row = retrain.link(store, other, note="shadow failed: the shadow's latency gate", result_version="5")
    assert (row["status"], row["result_version"], row["note"]) == ("shadowing", "5", "shadow failed: the shadow's latency gate")
    retrain.record_step(store, other, "shadow", "failed", at, 1500, {"error": "x"})
    retrain.record_step(store, other, "shadow", "done", at + 9, 2500, {"shadow_id": "sh-1"})  # run again: rewritten
    retrain.record_step(store, other, "build", "done", at, 10, {})
    assert retrain.steps(store, other) == {
        "shadow": {"status": "done", "started_ms": at + 9, "duration_ms": 2500, "detail": {"shadow_id": "sh-1"}},
        "build": {"status": "done", "started_ms": at, "duration_ms": 10, "detail": {}}}
    with pytest.raises(UserError, match="is shadowing, so it cannot become done"):
        retrain.advance(store, other, "done")
    retrain.advance(store, other, "rolling-out")
    assert retrain.advance(store, other, "done")["status"] == "done"
    with pytest.raises(UserError, match="is not active any more"):
        retrain.link(store, other, note="late")
    with pytest.raises(UserError, match="there is no retrain request 'rr-nope'"):
        retrain.get(store, "rr-nope")


@BOTH_STORES
def test_a_hostile_device_cannot_flood_retrain_requests(store_url):
    """A device re-birthing with a new model label (and manifest digest) for every drift cycle, over
    64 outputs, stays on the one active request naming it, in one row per subject; requests that are
    closed, however many and however new, never push an active one off the dashboard's list."""
    from sqlalchemy import func, select

    from edgesmith.toolchain.fleet.store import Store, retrain

    store = Store.open(store_url)
    at = 1_700_000_000_000
    honest = {"device": "cam-1", "model": "digits", "model_version": "3", "manifest_sha256": "ab" * 32}

    def drift(subject: str, info: dict, fired: int, when: int) -> str:
        with store.engine.begin() as conn:
            return retrain.record_drift(conn, FLEET, subject, info, fired, when)

    def claim(cycle: int) -> dict:
        return {"device": "evil", "model": f"m{cycle}", "model_version": str(cycle),
                "manifest_sha256": f"{cycle:02x}" * 32}

    rid = drift("evil/out0", claim(0), 1, at)
    for cycle in range(1, 4):  # each cycle: a new birth with a new model claim, every output fires again
        for output in range(64):
            assert drift(f"evil/out{output}", claim(cycle), cycle + 1, at + cycle * 1000 + output) == rid
    honest_rid = drift("cam-1/logits", honest, 1, at + 10_000)  # another model: a request of its own
    assert honest_rid != rid

    def count(table) -> int:
        with store.engine.connect() as conn:
            return conn.scalar(select(func.count()).select_from(table))
    assert count(retrain.retrain_requests) == 2
    assert count(retrain.retrain_request_subjects) == 64 + 1  # per subject, not per firing
    row = retrain.get(store, rid)
    assert (row["model"], row["devices"], row["device_count"]) == ("m0", ["evil"], 1)
    assert (row["alert_subjects"], row["alert_firings"]) == (64, 1 + 3 * 64)
    assert len(row["alerts"]) == retrain.SHOWN  # the newest subjects, newest first
    assert [a["subject"] for a in row["alerts"]] == [f"evil/out{o}" for o in range(63, 63 - retrain.SHOWN, -1)]
    assert row["alerts"][0]["alert"] == f"{FLEET}/drift/evil/out63#4" and row["alerts"][0]["firings"] == 3
    assert row["alerts"][-1]["first_ms"] == at + 1000 + 63 - retrain.SHOWN + 1
    # A request of many devices lists its newest SHOWN (sorted) and counts them all.
    for n in range(retrain.SHOWN + 5):
        assert drift(f"cam-{n + 100}/logits", {**honest, "device": f"cam-{n + 100}"}, 1, at + 20_000 + n) == honest_rid
    many = retrain.get(store, honest_rid)
    assert many["device_count"] == retrain.SHOWN + 6
    assert many["devices"] == sorted(f"cam-{n + 100}" for n in range(5, retrain.SHOWN + 5))
    assert retrain.naming(store)[(FLEET, "evil")]["id"] == rid

    # Closed requests, newer than both active ones: the active ones still come first.
    closed = []
    for n in range(5):
        closed.append(drift(f"gone-{n}/logits", {**honest, "device": f"gone-{n}", "model": f"gone-{n}"}, 1,
                            at + 30_000 + n))
        retrain.advance(store, closed[-1], "dismissed")
    shown = retrain.requests(store, limit=4)
    assert [r["id"] for r in shown] == [honest_rid, rid, closed[4], closed[3]]
    assert [r["id"] for r in retrain.requests(store, active_only=True)] == [honest_rid, rid]
    # Dismissed, the device is named by no request: its next drift (whatever it claims) opens one.
    retrain.advance(store, rid, "dismissed", note="a compromised device")
    again = drift("evil/out0", {"device": "evil", "model": "m9"}, 5, at + 40_000)
    assert again not in (rid, honest_rid) and retrain.get(store, again)["model"] == "m9"
    assert count(retrain.retrain_active_devices) == 1 + 1 + retrain.SHOWN + 5  # evil, cam-1, cam-100...
    # A dismissal racing an alert can leave a row naming the closed request: it names nothing.
    retrain.advance(store, again, "dismissed")
    with store.engine.begin() as conn:
        conn.execute(retrain.retrain_active_devices.insert().values(fleet=FLEET, device="evil", request_id=again))
    assert (FLEET, "evil") not in retrain.naming(store)
    fresh = drift("evil/out0", {"device": "evil", "model": "m10"}, 6, at + 50_000)
    assert fresh not in (again, rid) and retrain.naming(store)[(FLEET, "evil")]["id"] == fresh


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
def test_two_monitors_naming_one_device_at_once_make_one_request(store_url):
    """Two monitors record drift of one device at once, under two model claims (it re-birthed between
    their reads): the device's key lets one request name it, and the other monitor's freshly opened
    request is not left behind empty. PostgreSQL only: on SQLite the alert's transaction holds the
    write lock from its first statement, so the two never overlap."""
    import threading

    from sqlalchemy import func, select, text

    from edgesmith.toolchain.fleet.store import Store, retrain

    store = Store.open(store_url)
    at = 1_700_000_000_000
    claims = [{"device": "cam-1", "model": f"m{n}", "model_version": "1", "manifest_sha256": None} for n in (1, 2)]
    got: list[str] = []
    with store.engine.connect() as first:
        first.begin()
        mine = retrain.record_drift(first, FLEET, "cam-1/a", claims[0], 1, at)

        def second() -> None:
            with store.engine.begin() as conn:
                got.append(retrain.record_drift(conn, FLEET, "cam-1/b", claims[1], 1, at + 1))
        thread = threading.Thread(target=second)
        thread.start()
        with store.engine.connect() as watch:  # until the second waits for the first's key on the device
            wait_until(lambda: watch.scalar(text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                                 "AND datname = current_database()")), 30, "the second monitor to wait")
        first.commit()
        thread.join(30)
    assert got == [mine]
    with store.engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(retrain.retrain_requests)) == 1
    row = retrain.get(store, mine)
    assert (row["model"], [a["subject"] for a in row["alerts"]]) == ("m1", ["cam-1/b", "cam-1/a"])


def test_the_dashboard_reads_retrain_requests_outside_the_view_lock(broker_dir, tmp_path, monkeypatch):
    """A snapshot (the dashboard, /api/*) reads the store's retrain requests without holding the view
    lock alert evaluation takes, and one built across an evaluation tick is not kept."""
    from edgesmith.toolchain.fleet import monitor as monitor_mod
    from edgesmith.toolchain.fleet.store import retrain

    m = monitor_mod.Monitor(monitor_mod.MonitorConfig(broker_dir, f"sqlite:///{tmp_path / 'm.db'}"))
    real, reads = retrain.requests, []

    def requests(*args, **kwargs):
        reads.append(m._view_lock.locked())
        if len(reads) == 1 and not reads[0]:
            m.evaluate()  # a tick meanwhile (it takes the view lock)
        return real(*args, **kwargs)
    monkeypatch.setattr(retrain, "requests", requests)
    assert m.snapshot()["retrain"] == []
    m.snapshot()  # the first was built across a tick: built again
    assert reads == [False, False]
    m.store.engine.dispose()
