"""Capture, central side (docs/capture.md): the receiver over real HTTP with a Python uploader standing
in for the device (the C++ agent's capture is written against the same contract later), the
content-addressed store and its SQLite index, `capture pull` → an immutable dataset, `data label`,
`train --extra-data` in a real MLflow store, and `capture start|upload` signed and published on a
real Mosquitto, read back with the device's own login."""

from __future__ import annotations

import hashlib
import json
import socket
import threading

import numpy as np
import pytest
import requests

from conftest import run_cli
from edgesmith.runtime import contract
from edgesmith.toolchain.capture import record
from edgesmith.toolchain.capture.receiver import CaptureReceiver
from edgesmith.toolchain.capture.store import CaptureStore, token_digest
from edgesmith.toolchain.data import datasets as ds
from edgesmith.toolchain.errors import UserError
from test_fleet_monitor import broker_dir  # noqa: F401  (fixture: a real Mosquitto)

FLEET = "plant-a"
CAPTURE = "cap-20261207-1200-abc123"
MANIFEST = "d" * 64  # a model the artifact store does not hold: no input check
pytestmark = [pytest.mark.timeout(180)]


def _digits(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    pick = np.random.default_rng(seed).choice(len(digits.target), n, replace=False)
    return digits.images[pick].astype(np.float32), digits.target[pick].astype(np.int64)


def _record(device: str, image: np.ndarray, ts_ms: int, reason: str = "drift", capture_id: str = CAPTURE,
            manifest: str = MANIFEST, input_name: str = "input") -> bytes:
    """One sample, written exactly per the contract (what the device's capture store uploads)."""
    x = image.reshape(1, 1, 8, 8).astype(np.float32)
    logits = np.linspace(-1, 1, 10, dtype=np.float32).reshape(1, 10)
    header = record.header_for(FLEET, device, capture_id, manifest, "digits", ts_ms, reason, {input_name: x},
                               {"logits": logits}, model_version="1", top1=9, confidence=0.31)
    return record.encode(header, [x, logits])


class Uploader:
    """The device's side of an upload: PUT <receiver>/v1/captures/<fleet>/<device>/<capture>/<sha256>."""

    def __init__(self, url: str, device: str, token: str):
        self.url, self.device, self.token = url, device, token

    def put(self, body: bytes, sha: str | None = None, device: str | None = None, capture_id: str = CAPTURE,
            headers: dict | None = None) -> requests.Response:
        sha = sha or hashlib.sha256(body).hexdigest()
        return requests.put(f"{self.url}/v1/captures/{FLEET}/{device or self.device}/{capture_id}/{sha}", data=body,
                            headers={"Authorization": f"Bearer {self.token}", **(headers or {})}, timeout=30)


@pytest.fixture
def receiver(tmp_path):
    store = CaptureStore(tmp_path / "captures")
    tokens = {d: hashlib.sha256(d.encode()).hexdigest() for d in ("cam-01", "cam-02", "cam-03")}
    for device, token in tokens.items():
        store.grant(FLEET, device, CAPTURE, token, max_samples=4, max_bytes=1 << 20, not_after=2**40)
    with CaptureReceiver(store, artifacts=tmp_path / "artifacts") as server:
        yield {"store": store, "url": server.url, "tokens": tokens,
               "up": {d: Uploader(server.url, d, t) for d, t in tokens.items()}}


# --- the record format ------------------------------------------------------------------------------

def test_record_round_trips_and_every_lie_is_caught():
    image, _ = _digits(1)
    body = _record("cam-01", image[0], 1765000000000)
    header = record.parse(body)
    assert header.device == "cam-01" and header.reason == contract.CaptureReason.DRIFT
    assert np.array_equal(record.tensors(body, header)["input"].reshape(8, 8), image[0])
    assert body.startswith(contract.CAPTURE_MAGIC)
    bad = {
        "no magic": b"x" + body[1:],
        "truncated data": body[:-1],
        "trailing bytes": body + b"\0",
        "header length not hex": body[:len(contract.CAPTURE_MAGIC)] + b"zzzzzzzz" + body[record.PREFIX - 1:],
        "header length past the end": body[:len(contract.CAPTURE_MAGIC)] + b"00ffffff\n" + body[record.PREFIX:],
        "header over the cap": body[:len(contract.CAPTURE_MAGIC)] + b"ffffffff\n" + body[record.PREFIX:],
        "header not JSON": body[:record.PREFIX] + b"[" + body[record.PREFIX + 1:],
    }
    for name, payload in bad.items():
        with pytest.raises(record.RecordError):
            record.parse(payload)
            pytest.fail(f"{name} was accepted")


# --- the receiver --------------------------------------------------------------------------------------

def test_upload_is_stored_once_content_addressed_and_indexed(receiver):
    image, _ = _digits(1)
    body = _record("cam-01", image[0], 1765000000000)
    sha = hashlib.sha256(body).hexdigest()
    first = receiver["up"]["cam-01"].put(body)
    assert first.status_code == 201, first.text
    again = receiver["up"]["cam-01"].put(body)
    assert again.status_code == 200 and again.json() == {"sha256": sha, "stored": False}
    store = receiver["store"]
    assert store.object_path(sha).read_bytes() == body
    assert [p.name for p in store.objects.iterdir()] == [sha]  # once, no temp file left
    (row,) = store.samples(FLEET)
    assert (row["device"], row["reason"], row["bytes"], row["top1"]) == ("cam-01", "drift", len(body), 9)
    assert store.used(store.find_grant(FLEET, "cam-01", CAPTURE)) == (1, len(body))


def test_another_devices_token_is_refused_and_counted(receiver):
    image, _ = _digits(1)
    body = _record("cam-01", image[0], 1765000000000)
    thief = Uploader(receiver["url"], "cam-01", receiver["tokens"]["cam-02"])  # cam-02's token on cam-01's path
    assert thief.put(body).status_code == 403
    assert Uploader(receiver["url"], "cam-01", "").put(body).status_code == 403
    assert receiver["up"]["cam-01"].put(body, capture_id="cap-other").status_code == 403  # no such capture
    stranger = Uploader(receiver["url"], "cam-99", receiver["tokens"]["cam-01"])  # a device no capture was granted to
    assert stranger.put(body).status_code == 403
    assert receiver["store"].refusals() == {(FLEET, "cam-01"): {"token": 3}, ("-", "-"): {"token": 1}}
    assert receiver["store"].samples(FLEET) == []  # nothing stored by a refusal
    # cam-02, with its own token, naming cam-01's stored record's digest: not told "already stored"
    assert receiver["up"]["cam-01"].put(body).status_code == 201
    assert receiver["up"]["cam-02"].put(body).status_code == 400  # a record of cam-01's under cam-02's login
    assert receiver["store"].refusals(FLEET)[(FLEET, "cam-02")] == {"invalid": 1}
    assert receiver["store"].find_grant(FLEET, "cam-01", CAPTURE).token_sha256 == token_digest(receiver["tokens"]["cam-01"])


def test_over_budget_is_refused_and_counted(receiver):
    images, _ = _digits(6)
    up = receiver["up"]["cam-02"]
    codes = [up.put(_record("cam-02", im, 1765000000000 + i)).status_code for i, im in enumerate(images)]
    assert codes == [201, 201, 201, 201, 409, 409]  # max_samples 4
    store = receiver["store"]
    assert store.refusals(FLEET)[(FLEET, "cam-02")] == {"budget": 2}
    assert len(store.samples(FLEET)) == 4
    # a declared length over the byte budget is refused before the body is read
    store.grant(FLEET, "cam-03", "cap-small", receiver["tokens"]["cam-03"], max_samples=10, max_bytes=100, not_after=2**40)
    body = _record("cam-03", images[0], 1, capture_id="cap-small")
    assert receiver["up"]["cam-03"].put(body, capture_id="cap-small").status_code == 413
    assert store.refusals(FLEET)[(FLEET, "cam-03")] == {"too-large": 1}


def test_corrupt_bodies_and_wrong_digests_are_refused_and_counted(receiver, tmp_path):
    images, _ = _digits(2)
    up = receiver["up"]["cam-03"]
    body = _record("cam-03", images[0], 1765000000000)
    assert up.put(body, sha="0" * 64).status_code == 400  # not the body's SHA-256
    corrupt = body[:-5]
    assert up.put(corrupt).status_code == 400  # its own digest, but not a record
    impostor = _record("cam-01", images[1], 1765000000000)  # a record of cam-01 under cam-03's login
    assert up.put(impostor).status_code == 400
    # a record whose inputs are not its model's (the artifact store knows the manifest)
    from deploy_helpers import make_artifact
    from edgesmith.toolchain.deploy import archive
    from edgesmith.toolchain.signing import generate_key, load_signing_key

    info = archive.archive(make_artifact(tmp_path / "art", load_signing_key(generate_key("b"))), tmp_path / "artifacts")
    wrong_model = _record("cam-03", images[1], 1765000000000, manifest=info.manifest_sha256)
    assert up.put(wrong_model).status_code == 422
    assert receiver["store"].refusals(FLEET)[(FLEET, "cam-03")] == {"digest": 1, "invalid": 2, "model": 1}
    assert receiver["store"].samples(FLEET) == []
    assert not [p for p in receiver["store"].objects.iterdir()]  # nothing half-written


def test_concurrent_identical_uploads_store_one_object(receiver):
    image, _ = _digits(1)
    body = _record("cam-01", image[0], 1765000000000)
    codes: list[int] = []
    threads = [threading.Thread(target=lambda: codes.append(receiver["up"]["cam-01"].put(body).status_code))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes).count(201) == 1 and set(codes) <= {200, 201}
    assert len(receiver["store"].samples(FLEET)) == 1
    # six different samples at once against a budget of four: exactly four are stored
    images, _ = _digits(6, seed=1)
    bodies = [_record("cam-02", im, 1765000000000 + i) for i, im in enumerate(images)]
    codes.clear()
    threads = [threading.Thread(target=lambda b=b: codes.append(receiver["up"]["cam-02"].put(b).status_code))
               for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == [201] * 4 + [409] * 2
    assert len([r for r in receiver["store"].samples(FLEET) if r["device"] == "cam-02"]) == 4
    assert len(list(receiver["store"].objects.iterdir())) == 5  # no temporary file left


def _start_upload(url: str, token: str, body: bytes, send: int) -> socket.socket:
    """An upload whose headers (Expect: 100-continue) and first ``send`` body bytes are sent; returns
    once the receiver has taken it (its 100 Continue: it passed the checks and reads the body)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=60)
    sock.sendall(f"PUT /v1/captures/{FLEET}/cam-01/{CAPTURE}/{hashlib.sha256(body).hexdigest()} HTTP/1.1\r\n"
                 f"Host: {host}\r\nAuthorization: Bearer {token}\r\nContent-Length: {len(body)}\r\n"
                 "Expect: 100-continue\r\n\r\n".encode())
    assert sock.recv(64).startswith(b"HTTP/1.1 100 ")
    sock.sendall(body[:send])
    return sock


def test_uploads_in_progress_hold_the_budget_and_a_stalled_one_lets_it_go(tmp_path):
    """Concurrent uploads of one capture hold at most its budget in memory (not one hard cap each),
    and one whose body stops arriving is ended (408) and no longer holds any."""
    images, _ = _digits(3, seed=7)
    bodies = [_record("cam-01", im, 1765000000000 + i) for i, im in enumerate(images)]
    token = "ab" * 32
    for read_timeout_s in (600.0, 0.2):
        store = CaptureStore(tmp_path / f"captures-{read_timeout_s}")
        store.grant(FLEET, "cam-01", CAPTURE, token, max_samples=10, max_bytes=2 * len(bodies[0]) - 1, not_after=2**40)
        with CaptureReceiver(store, read_timeout_s=read_timeout_s) as server:
            up = Uploader(server.url, "cam-01", token)
            held = _start_upload(server.url, token, bodies[0], 100)
            if read_timeout_s > 1:
                second = up.put(bodies[1])  # fits what is stored, not with the one in progress
                assert second.status_code == 409 and "1 uploads of" in second.json()["detail"], second.text
                held.sendall(bodies[0][100:])
                assert held.recv(4096).startswith(b"HTTP/1.1 201 ")
                assert store.refusals(FLEET) == {(FLEET, "cam-01"): {"budget": 1}}
            else:
                assert held.recv(4096).startswith(b"HTTP/1.1 408 ")  # stalled: ended
                assert up.put(bodies[1]).status_code == 201  # and its reservation freed
                assert store.refusals(FLEET) == {(FLEET, "cam-01"): {"stalled": 1}}
            held.close()
        assert len(store.samples(FLEET)) == 1


def test_an_expired_grant_is_refused_and_counted(receiver):
    image, _ = _digits(1)
    store = receiver["store"]
    store.grant(FLEET, "cam-01", "cap-old", receiver["tokens"]["cam-01"], 10, 1 << 20, not_after=1)
    assert receiver["up"]["cam-01"].put(_record("cam-01", image[0], 1, capture_id="cap-old"),
                                        capture_id="cap-old").status_code == 410
    assert store.refusals(FLEET) == {(FLEET, "cam-01"): {"expired": 1}} and store.samples(FLEET) == []


# --- pull, label ---------------------------------------------------------------------------------------

def _upload_some(receiver, n: int = 6) -> tuple[np.ndarray, np.ndarray, list[str]]:
    images, labels = _digits(n, seed=3)
    shas = []
    for i, image in enumerate(images):
        device = ("cam-01", "cam-02", "cam-03")[i % 3]
        body = _record(device, np.rot90(image).copy(), 1765000000000 + i, reason=("drift", "uniform")[i % 2])
        assert receiver["up"][device].put(body).status_code == 201
        shas.append(hashlib.sha256(body).hexdigest())
    return images, labels, shas


def test_pull_makes_a_stable_content_addressed_dataset(receiver, tmp_path):
    _, _, shas = _upload_some(receiver)
    first = ds.pull(receiver["store"], FLEET, None, tmp_path / "a")
    again = ds.pull(receiver["store"], FLEET, 3600, tmp_path / "b")  # elsewhere, another time window: same samples
    assert first.digest == again.digest == hashlib.sha256("".join(f"{s}\n" for s in sorted(shas)).encode()).hexdigest()
    assert (first.path / ds.DATA_FILE).read_bytes() == (again.path / ds.DATA_FILE).read_bytes()
    assert first.meta["devices"] == ["cam-01", "cam-02", "cam-03"] and first.meta["reasons"] == {"drift": 3, "uniform": 3}
    assert first.meta["models"] == [{"model": "digits", "version": "1", "manifest_sha256": MANIFEST}]
    assert first.meta["classes"] == 10 and first.arrays()["input"].shape == (6, 1, 8, 8)
    assert list(first.arrays()["ids"]) == sorted(shas)
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]
    with pytest.raises(UserError, match="no captured samples of fleet elsewhere"):
        ds.pull(receiver["store"], "elsewhere", None, tmp_path / "a")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / ds.META_FILE).write_text("{")
    with pytest.raises(UserError, match=r"dataset .*broken is damaged \(.*meta.json: Expecting"):
        ds.open_dataset(str(tmp_path / "broken"))


def test_one_device_with_other_inputs_names_itself_and_the_others_still_pull(receiver, tmp_path):
    """A model the receiver's artifact store lacks is not checked, so one device can upload samples
    of any inputs; the pull says whose they are, and --model pulls the others."""
    _, _, shas = _upload_some(receiver)
    odd = _record("cam-03", _digits(1, seed=9)[0][0], 1765000000099, manifest="e" * 64, input_name="other")
    assert receiver["up"]["cam-03"].put(odd).status_code == 201
    with pytest.raises(UserError, match=r"different inputs \(model dddddddddddd from cam-01, cam-02, cam-03: inputs "
                                        r"\[\('input', .*; model eeeeeeeeeeee from cam-03: inputs \[\('other', .*"
                                        r"pull one model's with --model MANIFEST"):
        ds.pull(receiver["store"], FLEET, None, tmp_path / "d")
    dataset = ds.pull(receiver["store"], FLEET, None, tmp_path / "d", model=MANIFEST[:8])
    assert list(dataset.arrays()["ids"]) == sorted(shas)
    with pytest.raises(UserError, match="no captured samples of fleet plant-a and model 0123"):
        ds.pull(receiver["store"], FLEET, None, tmp_path / "d", model="0123")


@pytest.mark.integration  # runs the CLI
def test_label_csv_errors_name_the_first_bad_line(receiver, tmp_path):
    _, labels, _ = _upload_some(receiver)
    dataset = ds.pull(receiver["store"], FLEET, None, tmp_path / "d")
    ids = [str(i) for i in dataset.arrays()["ids"]]
    csv = tmp_path / "labels.csv"
    cases = {
        f"id,class\n{ids[0]},1\n{'f' * 64},2\n": r"line 3: 'f{64}' is neither a sample id nor an input digest of dataset",
        f"{ids[0]},1\n{ids[1]},10\n": r"line 2: class '10' is not one of the model's classes \(0..9\)",
        f"{ids[0]},1\n{ids[1]},2\n{ids[0]},3\n": r"line 3: sample [0-9a-f]{64} is labelled twice",
        f"{ids[0]},1,extra\n": r"line 1 has 3 fields",
        f"{ids[0]},\u00b2\n": r"line 1: class '\u00b2' is not one of the model's classes",  # isdigit(), not int()
        f"{ids[0]},cat\n": r"line 1: class 'cat' is not one of the model's classes",
    }
    for text, message in cases.items():
        csv.write_text(text)
        with pytest.raises(UserError, match=message):
            ds.label(dataset, csv)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [dataset.digest]  # nothing written by a refusal
    # the CLI says it in one sentence
    result = run_cli("data", "label", str(dataset.path), "--labels", str(csv), check=False)
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "class 'cat'" in result.stderr
    # A spreadsheet's "CSV UTF-8" starts with a byte-order mark: the header row is still a header row.
    csv.write_text("\ufeffid,class\n" + "".join(f"{i},{int(labels[n])}\n" for n, i in enumerate(ids)), encoding="utf-8")
    labelled = ds.label(dataset, csv)
    assert labelled.digest != dataset.digest and labelled.meta["parent"] == dataset.digest
    assert labelled.labelled and len(labelled.arrays()["y"]) == 6
    assert ds.label(dataset, csv).digest == labelled.digest  # same labels, same dataset


# --- train --extra-data ------------------------------------------------------------------------------------

@pytest.fixture
def labelled(receiver, tmp_path):
    images, labels = _digits(60, seed=5)
    ids = []
    for i, image in enumerate(images):
        device = ("cam-01", "cam-02", "cam-03")[i % 3]
        body = _record(device, np.rot90(image).copy(), 1765000000000 + i)
        receiver["store"].grant(FLEET, device, CAPTURE, receiver["tokens"][device], 100, 1 << 20, 2**40)
        assert receiver["up"][device].put(body).status_code == 201
        ids.append(hashlib.sha256(body).hexdigest())
    dataset = ds.pull(receiver["store"], FLEET, None, tmp_path / "datasets")
    csv = tmp_path / "labels.csv"
    csv.write_text("".join(f"{sid},{int(y)}\n" for sid, y in zip(ids, labels)))
    return ds.label(dataset, csv)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_same_captured_dataset_and_seed_give_identical_weights(labelled, tmp_path):
    import torch

    from edgesmith.toolchain.train.config import load_config
    from edgesmith.toolchain.train.data import load_dataset, load_extra, split
    from edgesmith.toolchain.train.loop import train
    from conftest import REPO

    cfg = load_config(REPO / "examples" / "digits.toml").with_overrides(epochs=1)
    base = load_dataset(cfg)
    extra = load_extra(labelled.digest, cfg, base.classes, tmp_path / "datasets")
    plain, mixed = split(base, cfg), split(base, cfg, extra)
    assert sum(len(s[1]) for s in (mixed.train, mixed.val, mixed.test)) == sum(
        len(s[1]) for s in (plain.train, plain.val, plain.test)) + 60
    assert len(mixed.test[1]) - len(plain.test[1]) == 12  # the extra samples are evaluated on too (20%)
    a = train(cfg, mixed).model.state_dict()
    b = train(cfg, split(base, cfg, load_extra(labelled.digest[:12], cfg, base.classes, tmp_path / "datasets"))).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = train(cfg, plain).model.state_dict()
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_train_extra_data_logs_the_dataset_and_lineage_in_mlflow(labelled, tmp_path):
    import mlflow

    from conftest import REPO

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    pulled_run = ds.log_to_mlflow(labelled, uri)
    result = run_cli("train", str(REPO / "examples" / "digits.toml"), "--epochs", "1", "--tracking-uri", uri,
                     "--extra-data", labelled.digest[:12], "--datasets", str(tmp_path / "datasets"),
                     "--alert", "drift-plant-a-cam-03", "--alias", "challenger", "--json")
    summary = json.loads(result.stdout)
    client = mlflow.MlflowClient(uri, uri)
    run = client.get_run(summary["run_id"])
    inputs = {(d.dataset.name, d.dataset.digest) for d in run.inputs.dataset_inputs}
    assert (f"capture-{labelled.digest[:12]}", labelled.digest[:16]) in inputs
    assert client.get_run(pulled_run).inputs.dataset_inputs[0].dataset.digest == labelled.digest[:16]
    version = client.get_model_version_by_alias("digits", "challenger")
    assert version.tags["edgesmith.extra_dataset_digest"] == labelled.digest
    assert version.tags["edgesmith.extra_dataset_devices"] == "cam-01,cam-02,cam-03"
    assert version.tags["edgesmith.alert"] == "drift-plant-a-cam-03"
    bad = run_cli("train", str(REPO / "examples" / "digits.toml"), "--epochs", "1", "--tracking-uri", uri,
                  "--extra-data", labelled.meta["parent"], "--datasets", str(tmp_path / "datasets"), check=False)
    assert bad.returncode == 1 and "is not labelled" in bad.stderr and bad.stderr.count("\n") == 1


# --- capture start / upload over a real broker ---------------------------------------------------------------

def _retained(credentials: dict, topics: list[str], want: str) -> dict[str, bytes]:
    """The retained messages a device's own login receives on ``topics`` (waits for ``want``)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from test_fleet_monitor import wait_until

    got: dict[str, bytes] = {}
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=credentials.get("client_id", credentials["device"]),
                         protocol=mqtt.MQTTv5)
    client.username_pw_set(credentials["username"], credentials["password"])
    client.on_message = lambda _c, _u, m: got.__setitem__(m.topic, m.payload)
    suback = threading.Event()
    client.on_subscribe = lambda *_: suback.set()
    client.connect(credentials["host"], credentials["port"])
    client.loop_start()
    try:
        client.subscribe([(t, 1) for t in topics])
        assert suback.wait(15)
        wait_until(lambda: got.get(want), 15, f"the retained message on {want}")
    finally:
        client.disconnect()
        client.loop_stop()
    return got


def _state(envelope: bytes, public_key: bytes) -> contract.CaptureState:
    import nacl.signing

    outer = json.loads(envelope)
    nacl.signing.VerifyKey(public_key).verify(contract.CAPTURE_DOMAIN.encode() + outer["signed"].encode(),
                                              bytes.fromhex(outer["signature"]))
    return contract.CaptureState.model_validate_json(outer["signed"])


@pytest.mark.integration
def test_capture_start_and_upload_are_signed_retained_and_readable_by_the_device_only(tmp_path, broker_dir):  # noqa: F811
    from edgesmith.toolchain.deploy import desired
    from edgesmith.toolchain.fleet import broker as fleet_broker
    from edgesmith.toolchain.fleet.store import Store
    from edgesmith.toolchain.signing import generate_deploy_key, load_deploy_key

    key = load_deploy_key(generate_deploy_key())
    creds = {c["device"]: c for c in fleet_broker.add_devices(broker_dir, ["cam-01", "cam-02"], FLEET)}
    monitor_db = f"sqlite:///{tmp_path / 'monitor.db'}"  # the monitor flagged cam-02's inputs as drifted
    Store.open(monitor_db).alert_transitions({(FLEET, "drift", "cam-02/logits"): {"device": "cam-02"}}, [], 1)
    common = ["--fleet", FLEET, "--broker", str(broker_dir), "--dir", str(tmp_path / "captures"),
              "--receiver", "https://central:8471"]
    run_cli("capture", "start", "--devices", "cam-01,cam-02", "--policy", "drift:0.5,low-confidence:0.6,uniform:0.01",
            "--max-samples", "50", "--retention", "2d", "--db", monitor_db, *common)
    run_cli("capture", "upload", "--devices", "cam-01", *common)

    mine, theirs = desired.capture_topic(FLEET, "cam-01"), desired.capture_topic(FLEET, "cam-02")
    got = _retained(creds["cam-01"], [mine, theirs], mine)
    assert theirs not in got  # the ACL: a device reads its own capture state only
    envelope = got[mine]
    with pytest.raises(ValueError):  # never valid as a desired state
        desired.verify(envelope, [key.public_key])
    state = _state(envelope, key.public_key)
    assert (state.action, state.version, state.upload_token) == (contract.CaptureAction.UPLOAD, 2, None)
    assert state.policy.low_confidence == 0.6 and state.max_samples == 50 and state.retention_s == 2 * 86400
    assert not state.policy.drift  # cam-01 was not flagged
    other = _state(_retained(creds["cam-02"], [theirs], theirs)[theirs], key.public_key)
    assert (other.action, other.version, other.policy.drift, other.policy.drift_rate) == ("start", 1, True, 0.5)
    store = CaptureStore(tmp_path / "captures")
    assert store.find_grant(FLEET, "cam-02", other.capture_id).token_sha256 == token_digest(other.upload_token)
    assert other.capture_id == state.capture_id and store.find_grant(FLEET, "cam-01", state.capture_id).max_samples == 50
    bad = run_cli("capture", "start", "--devices", "cam-01", "--policy", "uniform:2", *common, check=False)
    assert bad.returncode == 1 and "--policy" in bad.stderr and bad.stderr.count("\n") == 1


@pytest.mark.integration
def test_capture_serve_and_pull_as_a_user_runs_them(tmp_path):
    import signal
    import subprocess

    from conftest import EDGESMITH

    store = CaptureStore(tmp_path / "captures")
    token = "ab" * 32
    store.grant(FLEET, "cam-03", CAPTURE, token, 10, 1 << 20, 2**40)
    server = subprocess.Popen([EDGESMITH, "capture", "serve", "--dir", str(tmp_path / "captures"), "--listen",
                               "127.0.0.1:0", "--store", str(tmp_path / "artifacts")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = json.loads(server.stdout.readline())["receiver"]
        images, _ = _digits(3)
        up = Uploader(url, "cam-03", token)
        assert [up.put(_record("cam-03", im, 1765000000000 + i)).status_code for i, im in enumerate(images)] == [201] * 3
        assert Uploader(url, "cam-03", "cd" * 32).put(_record("cam-03", images[0], 1)).status_code == 403
    finally:
        server.send_signal(signal.SIGTERM)  # handled like Ctrl-C, as every command (toolchain/cli run())
        assert server.wait(timeout=30) == 130, server.stderr.read()
    common = ["--fleet", FLEET, "--dir", str(tmp_path / "captures"), "--datasets", str(tmp_path / "datasets"),
              "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--json"]
    first = json.loads(run_cli("capture", "pull", *common).stdout)
    again = json.loads(run_cli("capture", "pull", "--since", "1h", *common).stdout)
    assert first["digest"] == again["digest"] and first["samples"] == 3 and first["devices"] == ["cam-03"]
    assert store.refusals() == {(FLEET, "cam-03"): {"token": 1}}
    typo = run_cli("capture", "pull", *common, "--dir", str(tmp_path / "captrues"), check=False)
    assert typo.returncode == 1 and "captrues is not a capture store (no index.db)" in " ".join(typo.stderr.split())
    assert not (tmp_path / "captrues").exists()  # nothing made


def test_the_receiver_serves_https_with_the_fleet_ca(tmp_path):
    from edgesmith.toolchain.fleet import broker as fleet_broker

    pki = fleet_broker.certs(tmp_path / "fleet-pki", [])  # the fleet CA devices already trust, a cert for 127.0.0.1
    store = CaptureStore(tmp_path / "captures")
    token = "ef" * 32
    store.grant(FLEET, "cam-01", CAPTURE, token, 10, 1 << 20, 2**40)
    image, _ = _digits(1)
    body = _record("cam-01", image[0], 1765000000000)
    sha = hashlib.sha256(body).hexdigest()
    with CaptureReceiver(store, certfile=pki["certfile"], keyfile=pki["keyfile"]) as server:
        assert server.url.startswith("https://")
        url = f"{server.url}/v1/captures/{FLEET}/cam-01/{CAPTURE}/{sha}"
        with pytest.raises(requests.exceptions.SSLError):  # not a CA the client trusts
            requests.put(url, data=body, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        answer = requests.put(url, data=body, headers={"Authorization": f"Bearer {token}"}, timeout=30,
                              verify=pki["cafile"])
    assert answer.status_code == 201 and store.object_path(sha).read_bytes() == body


def test_capture_versions_are_reserved_in_the_store(tmp_path):
    """Before: a capture state's version was the broker's retained one + 1, so a lost retained
    message restarted at 1 (a device refuses that as a replay) and two commands at once could send
    the same version. Now each is reserved in the receiver's store, above what the broker retains."""
    store = CaptureStore(tmp_path / "captures")
    assert [store.reserve_version("plant-a", "cam-01") for _ in range(3)] == [1, 2, 3]
    assert store.reserve_version("plant-a", "cam-01", at_least=10) == 11  # the broker knew a newer one
    assert store.reserve_version("plant-a", "cam-01", at_least=0) == 12  # retained message lost: still above
    assert store.reserve_version("plant-a", "cam-02") == 1  # per device
    again = CaptureStore(tmp_path / "captures")  # a new process: the counter is on disk
    assert again.reserve_version("plant-a", "cam-01") == 13
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(store.reserve_version("plant-a", "cam-03")))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == list(range(1, 9))  # concurrent commands never share a version


def test_a_plain_http_receiver_off_the_loopback_is_refused(tmp_path):
    """The upload token travels in the request: `capture start|stop|upload` refuse a plain http://
    --receiver whose host is not the loopback, by the devices' own rule (csrc/common/url.h, bound)."""
    from edgesmith.runtime.capture import url_https_or_loopback
    from edgesmith.toolchain.capture import command

    cmd = command.CaptureCommand(fleet=FLEET, broker_dir=tmp_path / "no-broker", key=None)
    store = CaptureStore(tmp_path / "captures")
    for url in ("http://central:8471", "http://10.0.0.5:8471", "http://user@127.0.0.1:8471", "http://127.0.0.1.example.org"):
        assert not url_https_or_loopback(url), url
        with pytest.raises(UserError, match="in clear"):
            command.publish(cmd, contract.CaptureAction.START, store, receiver=url)
    for url in ("https://central:8471", "http://127.0.0.1:8471", "http://127.9.9.9", "http://[::1]:8471", "http://localhost:1"):
        assert url_https_or_loopback(url), url
    with pytest.raises(Exception) as refused:  # past this check: then the missing broker stops it
        command.publish(cmd, contract.CaptureAction.START, store, receiver="http://127.0.0.1:8471")
    assert "in clear" not in str(refused.value)


def test_labels_keyed_by_input_digest_label_every_sample_of_that_input(receiver, tmp_path):
    """A labelling source knows the inputs, not the sample ids: a key may be the SHA-256 of a sample's
    input bytes (the record's input tensor, exactly), labelling every sample of that input; with
    --skip-unknown keys of inputs never captured are skipped, without it the first one is refused."""
    images, labels, _ = _upload_some(receiver)
    again = _record("cam-01", np.rot90(images[0]).copy(), 1765000000050)  # the same input served again: another sample
    assert receiver["up"]["cam-01"].put(again).status_code == 201
    dataset = ds.pull(receiver["store"], FLEET, None, tmp_path / "d")

    def digest(image: np.ndarray) -> str:  # what a labeller computes from the input alone
        return hashlib.sha256(np.ascontiguousarray(np.rot90(image), dtype="<f4").tobytes()).hexdigest()
    unseen = digest(_digits(1, seed=11)[0][0] + 1)
    csv = tmp_path / "oracle.csv"
    csv.write_text("id,class\n" + "".join(f"{digest(i)},{int(c)}\n" for i, c in zip(images, labels)) + f"{unseen},4\n")
    with pytest.raises(UserError, match=r"line 8: '[0-9a-f]{64}' is neither a sample id nor an input digest"):
        ds.label(dataset, csv)
    labelled = ds.label(dataset, csv, skip_unknown=True)
    assert labelled.meta["samples"] == 7  # 6 inputs, one of them captured twice
    arrays = labelled.arrays()
    by_input = {digest(i): int(c) for i, c in zip(images, labels)}
    assert [by_input[d] for d in ds.input_digests(labelled, arrays)] == list(arrays["y"])
    # A sample labelled by its id and by its input digest is labelled twice.
    sample = str(dataset.arrays()["ids"][0])
    csv.write_text(f"{sample},1\n" + "".join(f"{digest(i)},{int(c)}\n" for i, c in zip(images, labels)))
    with pytest.raises(UserError, match=r"is labelled twice \(by its id or its input digest\)"):
        ds.label(dataset, csv)
    result = run_cli("data", "label", str(dataset.path), "--labels", str(tmp_path / "oracle.csv"), check=False)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
