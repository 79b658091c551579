"""A hostile device against the real monitor (issue 16): with one device's own login on a real
Mosquitto, publish the poison messages of the issue and a few hundred hypothesis-generated births,
windows and capture events (issue 19's ``capture.*`` events come from devices too); the monitor must count each refusal under its reason and against that device, keep
running, keep answering /api/fleet, and still fire a healthy device's drift alert, also after a
restart over a store holding rows it cannot use. Epochs: a re-imaged device's seq starting over is
not taken for duplicates.

The figures (sent, refused by reason, stored) are printed for the record (`pytest -s`).
"""

from __future__ import annotations

import copy
import json
import math
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import BOTH_STORES, run_cli
from edgesmith.runtime import contract
from edgesmith.toolchain.fleet.simulate import SimArtifact, SimulatedDevice, output_window
from test_fleet_monitor import (broker_dir, classes, connected, devices, query, start_monitor,  # noqa: F401
                                wait_until)

pytestmark = pytest.mark.integration

REFERENCE = [0.4, 0.3, 0.2, 0.1]
ART = SimArtifact(outputs=[classes(REFERENCE)])


def _poison(d: SimulatedDevice) -> list[tuple[str, bytes, str]]:
    """The issue's poison messages, as (kind, payload, the refusal reason they must get)."""
    birth = json.loads(d.birth().model_dump_json())
    window = json.loads(d.telemetry(runs=10).model_dump_json())
    state = {**{k: window[k] for k in ("v", "fleet", "device", "epoch", "bdSeq", "ts_ms")}, "seq": d.seq + 1,
             "kind": "state", "artifact_sha256": None,
             "details": {"deployment_id": "dep-1", "result": "applied", "desired_version": 2**63 - 1}}
    no_edges = copy.deepcopy(birth)
    no_edges["metrics"]["outputs"] = [{"name": "logits", "kind": "histogram"}]
    huge = copy.deepcopy(birth)
    huge["metrics"]["outputs"] = [{"name": "logits", "kind": "classes", "classes": 10**12}]
    big_count = {**window, "runs": 2**63}
    big_latency = copy.deepcopy(window)
    big_latency["latency"]["counts"][0] = 2**64
    newline_id = {**window, "device": d.device + "\n"}
    capture = _capture_event(d)
    capture_huge = copy.deepcopy(capture)
    capture_huge["details"]["stored_bytes"] = 2**64
    capture_forged = copy.deepcopy(capture)
    capture_forged["details"]["reason"] = "deleted-by-central"  # not a CaptureDrop
    return [("event", json.dumps(capture_huge).encode(), "invalid"),
            ("event", json.dumps(capture_forged).encode(), "invalid"),
            ("birth", json.dumps(no_edges).encode(), "invalid"), ("telemetry", json.dumps(window).encode(), None),
            ("birth", json.dumps(huge).encode(), "invalid"), ("telemetry", json.dumps(big_count).encode(), "invalid"),
            ("telemetry", json.dumps(big_latency).encode(), "invalid"),
            ("state", json.dumps(state).encode(), "invalid"),
            ("telemetry", json.dumps(newline_id).encode(), "invalid"),
            ("telemetry", b'{"v":1,' + b'[' * 100_000, "malformed"),
            ("telemetry", b"x" * (contract.MAX_PAYLOAD_BYTES + 1), "oversized")]


_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
                     | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
                     max_leaves=20)
_HOSTILE = (st.sampled_from([2**63, 2**64, 2**53, -1, 10**12, 4097, 1025, 0, 1e308, -1e308, "", "x" * 300,
                             "cam\n", None, [], {}, True])
            | _JSON)


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:3]):
            out += _paths(v, (*prefix, i))
    return out


def _mutate(doc: dict, path: tuple, value: Any, delete: bool) -> dict:
    doc = copy.deepcopy(doc)
    node = doc
    for p in path[:-1]:
        node = node[p]
    if delete and isinstance(node, dict):
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


def _capture_event(d: SimulatedDevice) -> dict:
    """A valid ``capture.dropped`` event of the device, every field of its details filled."""
    envelope = json.loads(d.telemetry(runs=1).model_dump_json())
    event = {**{k: envelope[k] for k in ("v", "fleet", "device", "epoch", "bdSeq", "ts_ms")}, "seq": d.seq + 1,
             "kind": "event", "event": contract.EventKind.CAPTURE_DROPPED, "message": "3 samples dropped: disk full",
             "details": {"capture_id": "cap-20261208-a", "capture_version": 4, "samples": 3, "bytes": 3000,
                         "stored_samples": 10, "stored_bytes": 10000, "reason": contract.CaptureDrop.DISK_FULL,
                         "stop": None, "error": None}}
    contract.parse_message(json.dumps(event).encode())  # the base is valid: only the mutations are hostile
    return event


def _generated(d: SimulatedDevice, n: int) -> list[tuple[str, bytes]]:
    """``n`` births, windows and capture events of the device, each with one field replaced by a
    hostile value or deleted (hypothesis picks which and what), at seqs the device has not used."""
    birth = json.loads(d.birth().model_dump_json())
    window = json.loads(d.telemetry(runs=10).model_dump_json())
    capture = _capture_event(d)
    bases = {"birth": (birth, _paths(birth)), "telemetry": (window, _paths(window)),
             "event": (capture, _paths(capture))}
    made: list[tuple[str, bytes]] = []

    @settings(max_examples=n, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(kind=st.sampled_from(sorted(bases)), which=st.integers(0, 10**6), value=_HOSTILE, delete=st.booleans())
    def make(kind: str, which: int, value: Any, delete: bool) -> None:
        base, paths = bases[kind]
        doc = _mutate(base, paths[which % len(paths)], value, delete)
        if isinstance(doc.get("seq"), int) and doc.get("seq") == base["seq"]:
            doc["seq"] = 10_000 + len(made)  # not a duplicate of each other: each is judged on its content
        made.append((kind, json.dumps(doc, allow_nan=True).encode()))

    make()
    return made


@BOTH_STORES
@pytest.mark.timeout(300)
def test_a_hostile_device_cannot_blind_the_monitor(broker_dir, start_monitor, store_url):  # noqa: F811
    monitor = start_monitor()
    c_healthy, c_attacker = devices(broker_dir, "healthy", "attacker")
    healthy = connected(c_healthy, artifact=ART, interval_s=60)
    attacker = connected(c_attacker, artifact=ART, interval_s=60, seed=7)

    sent: list[tuple[str, bytes, str | None]] = _poison(attacker)
    sent += [(kind, payload, None) for kind, payload in _generated(attacker, 300)]
    random.Random(16).shuffle(sent)
    for kind, payload, _ in sent:
        assert attacker.send((attacker.topic(kind), payload)).value in (0, 16)  # the broker takes them all
    wait_until(lambda: monitor.api()["monitor"]["queued"] == 0 and sum(
        v for k, v in monitor.counters().items() if k.startswith("dropped.") or k in ("stored", "duplicates"))
        >= len(sent) + 2, 60, "every hostile message judged")

    # The healthy device still drifts, and is still told apart.
    for _ in range(3):
        healthy.send(healthy.telemetry(runs=1000, outputs={"logits": output_window([100, 200, 300, 400])}))
    wait_until(lambda: ("drift", "healthy/logits") in monitor.alerts(), 30, "the healthy device's drift alert")
    api = monitor.api()
    assert monitor.proc.poll() is None and api["bad_rows"] == 0
    marked = next(d for d in api["devices"] if d["device"] == "attacker")
    assert marked["refused"]["total"] >= sum(1 for _, _, r in sent if r)
    assert all(d["refused"] is None for d in api["devices"] if d["device"] == "healthy")
    counters = monitor.counters()
    refused = {k.removeprefix("dropped."): v for k, v in counters.items() if k.startswith("dropped.") and v}
    for _, _, reason in sent:
        if reason:
            assert refused.get(reason, 0) > 0, (reason, refused)
    status = {r["device"]: r for r in json.loads(run_cli("fleet", "status", "--db", store_url, "--json").stdout)}
    assert status["attacker"]["refused"]["total"] == marked["refused"]["total"] and status["healthy"]["refused"] is None
    assert "Refused messages" in monitor.get("/").decode()
    crafted = sum(1 for _, _, r in sent if r)
    print(f"\nhostile device: {len(sent)} messages sent ({crafted} poison messages of the issue, "
          f"{len(sent) - crafted} generated or valid); refused by reason {refused}; stored {counters['stored']} "
          f"(both devices), duplicates {counters['duplicates']}; the monitor survived: alive, /api/fleet answering, "
          "the healthy device's drift alert fired")

    # A store holding a row the view cannot use (written by an older monitor): skipped and reported.
    monitor.stop()
    row = query(store_url, "SELECT birth FROM devices WHERE device = 'healthy'")[0][0]
    poisoned = json.loads(row)
    poisoned["metrics"]["outputs"] = [{"name": "logits", "kind": "histogram", "edges": None}]
    from sqlalchemy import create_engine, text
    engine = create_engine(store_url)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO devices SELECT 'plant-a', 'ghost', bd_seq, session_open, death_reason, "
                          "interval_s, artifact, model, model_version, target, backend, manifest_sha256, "
                          "build_latency_us, :birth, seq_state, gaps, messages, duplicates, runs, errors, "
                          "first_seen_ms, last_seen_ms, last_window_end_ms, p50_us, p95_us, p99_us, batch, "
                          "budget_day, budget_windows, budget_bytes "
                          "FROM devices WHERE device = 'healthy'"), {"birth": json.dumps(poisoned)})
    engine.dispose()
    again = start_monitor(log_name="monitor2.log")
    api = again.api()
    assert api["bad_rows"] >= 1 and next(d for d in api["devices"] if d["device"] == "ghost")["view_error"]
    assert "skipped" in again.log_text()
    healthy.send(healthy.telemetry(runs=1000, outputs={"logits": output_window([100, 200, 300, 400])}))
    again.wait_device("healthy", lambda x: x["drift"]["logits"] is not None, "the healthy device's drift after restart")


@pytest.mark.timeout(180)
def test_a_reimaged_device_starts_a_new_epoch(broker_dir, start_monitor, store_url):  # noqa: F811
    monitor = start_monitor()
    (creds,) = devices(broker_dir, "cam-01")
    d = connected(creds, artifact=ART, interval_s=60)
    for _ in range(5):
        d.send(d.telemetry(runs=10))
    monitor.wait_device("cam-01", lambda x: x["messages"] == 6, "the first epoch's birth and 5 windows")
    old_window = d.telemetry(runs=10)  # made before the re-image, delivered after it
    d.shutdown()
    d.reimage()  # a new spool: seq and bdSeq start over at 1
    d.connect()
    for _ in range(3):
        d.send(d.telemetry(runs=10))
    got = monitor.wait_device("cam-01", lambda x: x["messages"] == 11 and x["online"],
                              "the new epoch's birth and windows stored, not dropped as duplicates")
    assert got["duplicates"] == 0 and got["runs_total"] == 80 and got["bd_seq"] == 1
    d.send(old_window)  # from the retired epoch: refused, not counted as a gap or a duplicate
    wait_until(lambda: monitor.counters()["dropped.stale_epoch"] == 1, 30, "the late message refused")
    assert monitor.counters()["reimaged"] == 1
    events = [json.loads(p) for (p,) in query(store_url, "SELECT payload FROM messages WHERE kind = 'event'")]
    reimaged = [e for e in events if e["event"] == contract.EventKind.REIMAGED]
    assert len(reimaged) == 1 and reimaged[0]["epoch"] == d.epoch and reimaged[0]["details"]["previous_highest_seq"] >= 6
    assert not math.isnan(monitor.device("cam-01")["runs_total"])


# ---- central logic distrusts device claims --------------------------------------------------------

@BOTH_STORES
@pytest.mark.timeout(120)
def test_reported_versions_are_clamped_to_what_the_store_issued(broker_dir, store_url):  # noqa: F811
    from edgesmith.toolchain.deploy.rollout import FleetWatch
    from edgesmith.toolchain.errors import UserError
    from edgesmith.toolchain.fleet.broker import Broker
    from edgesmith.toolchain.fleet.store import Store
    from edgesmith.toolchain.fleet.store import deployments as history

    store = Store.open(store_url)
    history.ensure_tables(store)
    (creds,) = devices(broker_dir, "liar")
    d = connected(creds)
    watch = FleetWatch(Broker(broker_dir), "plant-a").start()
    try:
        envelope = {"v": 1, "fleet": "plant-a", "device": "liar", "epoch": d.epoch, "bdSeq": 1, "ts_ms": 1,
                    "kind": "state", "artifact_sha256": None}
        for seq, claim in ((50, 2**63 - 1), (51, contract.MAX_SAFE_INT)):  # the first is refused by the contract
            payload = json.dumps({**envelope, "seq": seq, "details": {"desired_version": claim}}).encode()
            d.send((d.topic("state"), payload))
        wait_until(lambda: watch.reported_versions.get("liar") == contract.MAX_SAFE_INT, 20, "the claim seen")
        issued = history.issued_version(store, "plant-a", "liar")
        assert issued == 0 and watch.version_floor("liar", issued) == 0
        assert history.reserve_version(store, "plant-a", "liar", watch.version_floor("liar", issued)) == 1
        issued = history.issued_version(store, "plant-a", "liar")
        assert history.reserve_version(store, "plant-a", "liar", watch.version_floor("liar", issued)) == 2
        with pytest.raises(UserError, match="past the contract's limit"):
            history.reserve_version(store, "plant-a", "liar", 2**63 - 1)
    finally:
        watch.stop()


@pytest.mark.timeout(120)
def test_a_birth_naming_an_unknown_artifact_is_skipped_not_blocking(broker_dir, store_url, tmp_path,  # noqa: F811
                                                                    _isolated_home):
    from deploy_helpers import make_artifact
    from edgesmith.toolchain.deploy import archive as archive_mod
    from edgesmith.toolchain.deploy import rollout
    from edgesmith.toolchain.fleet.store import Store
    from edgesmith.toolchain.fleet.store import deployments as history
    from edgesmith.toolchain.signing import generate_deploy_key, generate_key, load_deploy_key, load_signing_key

    build = load_signing_key(generate_key("default"))
    key = load_deploy_key(generate_deploy_key())
    v1 = archive_mod.archive(make_artifact(tmp_path / "v1", build, version="1"), tmp_path / "store")
    v2 = archive_mod.archive(make_artifact(tmp_path / "v2", build, version="2"), tmp_path / "store")
    honest_creds, liar_creds = devices(broker_dir, "honest", "liar")
    honest_art = SimArtifact(outputs=[classes(REFERENCE)], name=v1.name, manifest_sha256=v1.manifest_sha256)
    connected(honest_creds, artifact=honest_art)
    connected(liar_creds, artifact=ART)  # its birth names a manifest no build or deployment made
    store = Store.open(store_url)
    said: list[str] = []
    config = rollout.RolloutConfig("plant-a", broker_dir, [1.0], 1.0, 1.0, key, "http://127.0.0.1:9/",
                                   tmp_path / "store")
    result = rollout.deploy(v2, config, store, said.append)
    assert result.skipped == 1 and result.targeted == 1, said
    assert any(line.startswith("  warning: liar says it serves") for line in said), said
    (target,) = history.targets(store, result.deployment_id)
    assert target["device"] == "honest"


@pytest.mark.timeout(120)
def test_model_groups_are_keyed_on_manifests_not_claims(broker_dir, start_monitor):  # noqa: F811
    """An impostor announcing the honest devices' model, version and target under another manifest
    gets a group of its own: its shifted outputs never reach the honest group's drift."""
    monitor = start_monitor()
    c1, c2, c3 = devices(broker_dir, "cam-01", "cam-02", "impostor")
    honest = [connected(c, artifact=ART, interval_s=60, seed=i) for i, c in enumerate((c1, c2))]
    fake = SimArtifact(outputs=[classes(REFERENCE)], manifest_sha256="e" * 64)  # same labels as ART
    impostor = connected(c3, artifact=fake, interval_s=60)
    for d in honest:
        d.send(d.telemetry(runs=1000, outputs={"logits": output_window([400, 300, 200, 100])}))
    impostor.send(impostor.telemetry(runs=100_000, outputs={"logits": output_window([0, 0, 0, 100_000])}))
    wait_until(lambda: len(monitor.api()["groups"]) == 2 and all(g["recent"]["windows"] for g in monitor.api()["groups"]),
               30, "two groups with their windows")
    groups = {g["manifest_sha256"]: g for g in monitor.api()["groups"]}
    mine = groups[ART.sha256]
    assert (mine["devices"], mine["model"], mine["verified"]) == (2, ART.model, False)
    assert mine["drift"]["logits"]["samples"] == 2000 and mine["drift"]["logits"]["psi"] == pytest.approx(0, abs=1e-9)
    assert groups["e" * 64]["devices"] == 1


@pytest.mark.timeout(120)
def test_a_group_is_labelled_from_the_artifact_store(broker_dir, start_monitor, tmp_path):  # noqa: F811
    """`edgesmith fleet monitor` gets the artifact store's index from the CLI (the fleet package does
    not import the deploy package): a group whose manifest was archived takes the archive's labels,
    verified, whatever its devices' births claim."""
    from deploy_helpers import make_artifact
    from edgesmith.toolchain.deploy import archive as archive_mod
    from edgesmith.toolchain.signing import generate_key, load_signing_key

    info = archive_mod.archive(make_artifact(tmp_path / "v7", load_signing_key(generate_key("default")), version="7"))
    monitor = start_monitor()
    (creds,) = devices(broker_dir, "cam-07")
    claims = SimArtifact(outputs=[classes(REFERENCE)], model="another", model_version="99",
                         manifest_sha256=info.manifest_sha256)
    device = connected(creds, artifact=claims, interval_s=60)
    device.send(device.telemetry(runs=10, outputs={"logits": output_window([1, 2, 3, 4])}))
    wait_until(lambda: [g for g in monitor.api()["groups"] if g["recent"]["windows"]], 30, "the device's group")
    (group,) = monitor.api()["groups"]
    assert (group["model"], group["version"], group["verified"]) == (info.model, "7", True)
    assert info.model != "another"


@pytest.mark.timeout(180)
def test_a_device_past_its_daily_budget_is_refused_and_shown(broker_dir, start_monitor, store_url):  # noqa: F811
    """Before: every valid window was stored, so one device could fill the monitor's disk at ingest
    speed. Past its daily budget a device's windows are refused (over_budget), counted against it
    in `fleet status`, and another device's windows are stored as before."""
    monitor = start_monitor("--device-windows-per-day", "3")
    c1, c2 = devices(broker_dir, "honest", "hog")
    honest, hog = connected(c1, artifact=ART, interval_s=60), connected(c2, artifact=ART, interval_s=60)
    for _ in range(8):
        hog.send(hog.telemetry(runs=10))
    for _ in range(3):
        honest.send(honest.telemetry(runs=10))
    wait_until(lambda: monitor.counters().get("dropped.over_budget") == 5, 30, "5 of the hog's windows refused")
    monitor.wait_device("honest", lambda x: x["runs_total"] == 30, "the honest device's 3 windows")
    status = {r["device"]: r for r in json.loads(run_cli("fleet", "status", "--db", store_url, "--json").stdout)}
    assert status["hog"]["runs"] == 30 and status["hog"]["refused"]["by_reason"] == {"over_budget": 5}
    assert status["honest"]["runs"] == 30 and status["honest"]["refused"] is None
    table = run_cli("fleet", "status", "--db", store_url).stdout
    assert "5 over_budget" in table and "over its budget of 3 windows" in table


@BOTH_STORES
@pytest.mark.timeout(180)
def test_a_hostile_first_birth_cannot_shape_a_deployed_group(broker_dir, start_monitor, store_url, tmp_path):  # noqa: F811
    """Before: a model group took its latency layout and drift reference from its first member's
    birth, so a device that births first with a deployed digest and a bogus layout and reference
    poisoned the group's view for every honest device serving it. Now the group of a deployed
    digest takes both from the manifest the deployment recorded, and counts only devices a
    deployment of it was applied to; the hostile device is kept per device."""
    from deploy_helpers import make_artifact
    from edgesmith.toolchain.deploy import archive as archive_mod
    from edgesmith.toolchain.fleet import protocol
    from edgesmith.toolchain.fleet.store import Store
    from edgesmith.toolchain.fleet.store import deployments as history
    from edgesmith.toolchain.signing import generate_key, load_signing_key

    reference = [0.75, 0.25]
    info = archive_mod.archive(make_artifact(tmp_path / "v1", load_signing_key(generate_key("default")),
                                             reference=reference), tmp_path / "archives")
    monitoring = archive_mod.monitoring(info)
    assert monitoring["outputs"][0]["reference"] == reference
    # What `edgesmith deploy` records: the manifest's monitoring, a deployment, its targets and results.
    store = Store.open(store_url)
    history.record_manifest(store, info.manifest_sha256, monitoring)
    history.create_deployment(store, {
        "id": "dep-1", "fleet": "plant-a", "action": "deploy", "rolls_back": None, "artifact": info.name,
        "archive_sha256": info.sha256, "manifest_sha256": info.manifest_sha256, "model": info.model,
        "model_version": info.model_version, "model_uri": None, "url": "http://127.0.0.1:9/a.tar", "key_id": "k" * 16,
        "waves": "[1.0]", "abort_on_failure": 1.0}, [(1.0, ["cam-01", "cam-02"])])
    for version, name in enumerate(("cam-01", "cam-02"), start=1):
        history.add_target(store, "dep-1", "plant-a", name, 1, version, (None, None))
    history.set_result(store, "dep-1", "cam-01", "applied")
    store.engine.dispose()

    monitor = start_monitor()
    c1, c2, c3 = devices(broker_dir, "cam-01", "cam-02", "liar")
    served = SimArtifact(name=info.name, model=info.model, model_version=info.model_version, target=info.target,
                         backend=info.backend, manifest_sha256=info.manifest_sha256,
                         latency=protocol.LatencyLayout(**monitoring["latency"]),
                         outputs=[protocol.OutputLayout(**o) for o in monitoring["outputs"]], build_latency_us=None)
    bogus = SimArtifact(name=info.name, model=info.model, model_version=info.model_version, target=info.target,
                        backend=info.backend, manifest_sha256=info.manifest_sha256,  # the deployed digest, and:
                        latency=protocol.LatencyLayout(start_us=1e6, factor=16.0, count=3),
                        outputs=[protocol.OutputLayout(name="y", kind="classes", classes=2, reference=[0.0001, 0.9999])])
    liar = connected(c3, artifact=bogus, interval_s=60)  # births first, with a real device login
    liar.send(liar.telemetry(runs=1000, outputs={"y": output_window([1000, 0])}))
    wait_until(lambda: (monitor.device("liar") or {}).get("recent", {}).get("windows") == 1, 30, "the liar's window")
    honest = [connected(c, artifact=served, interval_s=60, seed=i) for i, c in enumerate((c1, c2))]
    for d in honest:
        d.send(d.telemetry(runs=400, latency_us=[3000.0] * 400, outputs={"y": output_window([300, 100])}))

    def group() -> dict | None:
        return next((g for g in monitor.api()["groups"] if g["manifest_sha256"] == info.manifest_sha256), None)

    # cam-01 is a member at once; cam-02 joins when its deployment's result says applied.
    wait_until(lambda: (group() or {}).get("recent", {}).get("windows") == 1, 30, "cam-01's window in the group")
    assert group()["devices"] == 1
    later = Store.open(store_url)
    history.set_result(later, "dep-1", "cam-02", "applied")
    later.engine.dispose()
    wait_until(lambda: (group() or {}).get("devices") == 2 and group()["recent"]["windows"] == 2, 30,
               "cam-02 joins once applied")
    g = group()
    assert (g["verified"], g["model"], g["recent"]["runs"]) == (True, info.model, 800)
    # The manifest's reference and layout: the honest outputs match it, the liar's windows are left out.
    assert g["drift"]["y"]["samples"] == 800 and g["drift"]["y"]["psi"] == pytest.approx(0, abs=1e-9)
    assert 2048 <= g["recent"]["p50_us"] < 4096  # the manifest's buckets (factor 2 from 1 us), not the liar's
    # Per device nothing changed: the liar has its own view, against its own claims.
    mine = monitor.device("liar")
    assert mine["recent"]["runs"] == 1000 and mine["drift"]["y"]["psi"] > 1
    wait_until(lambda: ("drift", "liar/y") in monitor.alerts(), 30, "the liar's own drift alert")
    assert not {a for a in monitor.alerts() if a[1].startswith("cam-")}


def test_a_full_queue_refuses_and_counts(broker_dir, tmp_path, monkeypatch):  # noqa: F811
    """The monitor's in-memory queue is bounded: past it a message is acknowledged, refused under
    queue_full and counted against its device, and the rest of the stream goes on."""
    from types import SimpleNamespace

    from edgesmith.toolchain.fleet import monitor as monitor_mod

    monkeypatch.setattr(monitor_mod, "MAX_QUEUED_MESSAGES", 3)
    monkeypatch.setattr(monitor_mod, "DEVICE_SHARE", 1.0)  # the whole queue (the fair share is tested below)
    m = monitor_mod.Monitor(monitor_mod.MonitorConfig(broker_dir, f"sqlite:///{tmp_path / 'm.db'}"))
    acked: list[int] = []
    monkeypatch.setattr(m.client, "ack", lambda mid, qos: acked.append(mid))
    d = SimulatedDevice({"fleet": "plant-a", "device": "flooder"}, artifact=ART)
    for mid in range(1, 6):
        payload = d.telemetry(runs=1).model_dump_json().encode()
        m._on_message(None, None, SimpleNamespace(mid=mid, qos=1, topic=d.topic("telemetry"), payload=payload,
                                                  retain=False))
    assert m.received.qsize() == 3 and acked == [4, 5] and m.queued_bytes > 0
    assert m._ingest(m._next_batch())
    assert m.queued_bytes == 0
    counters = m.store.counters()
    assert counters["dropped.queue_full"] == 2 and counters["stored"] == 3
    assert m.store.refusals()[("plant-a", "flooder")]["by_reason"] == {"queue_full": 2}
    m.store.engine.dispose()


def test_a_flooding_device_cannot_crowd_out_the_others(broker_dir, tmp_path, monkeypatch):  # noqa: F811
    """Once the monitor's queue is over half full, a device holding more than its share of it
    (DEVICE_SHARE) is refused as `flooding`, while another device's messages are still queued; below
    half full nobody is refused (a device flushing a long outage is not a flooder)."""
    from types import SimpleNamespace

    from edgesmith.toolchain.fleet import monitor as monitor_mod

    monkeypatch.setattr(monitor_mod, "MAX_QUEUED_MESSAGES", 32)
    m = monitor_mod.Monitor(monitor_mod.MonitorConfig(broker_dir, f"sqlite:///{tmp_path / 'm.db'}"))
    acked: list[int] = []
    monkeypatch.setattr(m.client, "ack", lambda mid, qos: acked.append(mid))
    flooder = SimulatedDevice({"fleet": "plant-a", "device": "flooder"}, artifact=ART)
    healthy = SimulatedDevice({"fleet": "plant-a", "device": "healthy"}, artifact=ART, seed=3)

    def deliver(device: SimulatedDevice, mid: int) -> None:
        payload = device.telemetry(runs=1).model_dump_json().encode()
        m._on_message(None, None, SimpleNamespace(mid=mid, qos=1, topic=device.topic("telemetry"), payload=payload,
                                                  retain=False))

    for mid in range(1, 21):  # 16 fill half the queue; the next 4 are the flooder's excess
        deliver(flooder, mid)
    assert m.received.qsize() == 16 and acked == [17, 18, 19, 20]
    deliver(healthy, 100)
    deliver(healthy, 101)
    assert m.received.qsize() == 18 and 100 not in acked and 101 not in acked
    assert m._ingest(m._next_batch())
    while m.received.qsize():
        assert m._ingest(m._next_batch())
    assert m.queued_bytes == 0 and m.queued_by_device == {}
    refusals = m.store.refusals()
    assert refusals[("plant-a", "flooder")]["by_reason"] == {"flooding": 4}
    assert ("plant-a", "healthy") not in refusals
    assert m.store.counters()["stored"] == 18
    m.store.engine.dispose()


def test_a_devices_error_text_is_shown_as_text_by_fleet_deployments(tmp_path):
    """A deploy report's error is the device's words: markup in them ('[/x]' closes nothing) neither
    ends `fleet deployments` in a traceback nor styles its table."""
    from edgesmith.toolchain.fleet.store import Store
    from edgesmith.toolchain.fleet.store import deployments as history

    url = f"sqlite:///{tmp_path / 'monitor.db'}"
    store = Store.open(url)
    history.ensure_tables(store)
    history.create_deployment(store, {"id": "dep-20261207-2100-abcdef", "fleet": "plant-a", "action": "deploy",
                                      "artifact": "tiny-v2", "archive_sha256": "a" * 64, "manifest_sha256": "b" * 64,
                                      "url": "http://127.0.0.1:9", "key_id": "c" * 16, "waves": "[1.0]"},
                              [(1.0, ["cam-01"])])
    history.add_target(store, "dep-20261207-2100-abcdef", "plant-a", "cam-01", 1, 3, (None, None))
    error = "self-test [/x] failed [bold]"
    history.set_result(store, "dep-20261207-2100-abcdef", "cam-01", "failed", error=error)
    history.finish(store, "dep-20261207-2100-abcdef", "failed", message="wave 1: [/y] cam-01 failed")
    result = run_cli("fleet", "deployments", "--db", url, check=False)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stdout + result.stderr
    assert error in result.stdout and "wave 1: [/y] cam-01 failed" in result.stdout, result.stdout


@BOTH_STORES
@pytest.mark.timeout(180)
def test_window_counts_past_their_bound_are_refused_so_no_sum_can_wrap(broker_dir, start_monitor, store_url):  # noqa: F811
    """Window counters are at most MAX_WINDOW_COUNT (2^36). Before that bound a device could report
    2^53 - 1 per window, and 1,024 such windows wrapped the monitor's int64 sums (the group's histograms
    went negative) and overflowed the devices table's totals, failing every batch holding one. Now
    those windows are refused as invalid, and windows at the bound are summed exactly."""
    monitor = start_monitor()
    (creds,) = devices(broker_dir, "greedy")
    greedy = connected(creds, artifact=ART, interval_s=0.01)

    def window(count: int) -> bytes:
        w = json.loads(greedy.telemetry(runs=10).model_dump_json())
        w["runs"] = count
        w["latency"].update(counts=[0] * (len(w["latency"]["counts"]) - 1) + [count], underflow=0, overflow=0)
        w["outputs"] = {name: {**o, "counts": [count] + [0] * (len(o["counts"]) - 1), "seen": count, "binned": count}
                        for name, o in w["outputs"].items()}
        return json.dumps(w).encode()

    top = contract.MAX_WINDOW_COUNT
    over = [window(contract.MAX_SAFE_INT) for _ in range(1030)] + [window(top + 1)]
    at_bound = [window(top) for _ in range(20)]
    for payload in over + at_bound:
        greedy.send((greedy.topic("telemetry"), payload))

    def judged() -> dict | None:
        d = monitor.device("greedy")
        return d if (monitor.api()["monitor"]["queued"] == 0 and d is not None
                     and d["runs_total"] == len(at_bound) * top) else None
    d = wait_until(judged, 60, "every window judged")
    assert monitor.counters().get("dropped.invalid", 0) >= len(over), monitor.counters()
    assert d["refused"]["total"] >= len(over), d["refused"]
    assert d["recent"]["runs"] == len(at_bound) * top and d["recent"]["p99_us"] > 0, d["recent"]
    group = next(g for g in monitor.api()["groups"] if g["manifest_sha256"] == d["manifest_sha256"])
    assert group["recent"]["runs"] == len(at_bound) * top and group["recent"]["p50_us"] > 0, group["recent"]
    assert monitor.proc.poll() is None
