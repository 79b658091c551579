"""Capture on real agents (docs/capture.md, "On the device"): a real Mosquitto, real edgesmith-agent
binaries serving a signed testecho artifact under synthetic load, the real receiver (`edgesmith
capture serve` in a subprocess) and the real `edgesmith capture start|stop|upload|pull` commands.
Checked through what a central login reads (`capture.*` events validated with runtime/contract.py),
the agents' HTTP API, the device's store on disk and the receiver's store: nothing is captured
while capture is off; uniform:1 stores served samples that upload and pull into a dataset of the
served input shape; SIGKILL during capture and during upload loses and duplicates nothing; a tiny
--capture-max-bytes, and a disk that fills (a tmpfs), drop the oldest while every request is still
answered.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import EDGESMITH, run_cli
from deploy_helpers import CaptureReceiver as Receiver, make_echo_artifact
from edgesmith.runtime import contract
from edgesmith.toolchain.capture import record as capture_record
from edgesmith.toolchain.capture.store import CaptureStore
from edgesmith.toolchain.signing import SigningKey, generate_deploy_key, load_deploy_key
from test_agent import FLEET, Agent, Broker, wait_for
from test_session_core import backend_dir  # noqa: F401  (fixture: the testecho plugin)
from test_deploy_agent import Store
from test_shadow_agent import Central

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def world(tmp_path_factory, backend_dir):  # noqa: F811
    root = tmp_path_factory.mktemp("capture-agent")
    build_key = SigningKey(seed=os.urandom(32))
    deploy_key_path = generate_deploy_key(directory=root / "keys" / "deploy")
    trust = root / "trust"
    (trust / "build").mkdir(parents=True)
    (trust / "deploy").mkdir(parents=True)
    (trust / "build" / "build.pub").write_text(build_key.public_key.hex() + "\n")
    (trust / "deploy" / "central.pub").write_text(load_deploy_key(deploy_key_path).public_key.hex() + "\n")
    for d in (trust, trust / "build", trust / "deploy"):
        os.chmod(d, 0o700)
    artifact = make_echo_artifact(root / "dist" / "v1", build_key, version="1")
    negated = make_echo_artifact(root / "dist" / "v2", build_key, version="2", mode="negate-double")
    broker = Broker(root / "broker")
    central = Central(broker, load_deploy_key(deploy_key_path))
    receiver = Receiver(root / "captures", root / "artifacts")
    world = {"root": root, "build_key": build_key, "broker": broker, "central": central, "receiver": receiver, "trust": trust,
             "artifact": artifact, "negated": negated, "backend_dir": backend_dir, "deploy_key": load_deploy_key(deploy_key_path),
             "cli": ["--fleet", FLEET, "--broker", str(broker.dir), "--key", str(deploy_key_path),
                     "--dir", str(receiver.dir), "--receiver", receiver.url]}
    yield world
    assert not central.invalid, central.invalid[:3]  # every capture.* event met the contract
    receiver.stop()
    central.close()
    broker.down()


def _start(world, device: str, *extra: str) -> tuple[Agent, dict, Path]:
    data_dir = world["root"] / "agents" / device
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    (data_dir / "agent.json").unlink(missing_ok=True)  # what a SIGKILLed agent left
    credentials = world.setdefault("credentials", {})
    if device not in credentials:
        credentials[device] = world["broker"].add_device(device)
    agent = Agent({"path": world["artifact"], "pub": world["trust"] / "build" / "build.pub"}, credentials[device],
                  data_dir, "--trust-dir", str(world["trust"]), "--interval", "1",
                  "--backend-path", str(world["backend_dir"]), *extra)
    return agent, agent.ready(), data_dir


def _stats(info: dict) -> dict:
    with urllib.request.urlopen(f"{info['url']}/v1/stats", timeout=10) as response:
        return json.loads(response.read())


def _capture(world, action: str, device: str, *extra: str) -> None:
    run_cli("capture", action, "--devices", device, *world["cli"], *extra)


def _event(world, device: str, name: str, timeout: float = 30, after: int = 0, **details) -> dict:
    def found():
        events = [m for m in world["central"].of(device, "event") if m["event"].startswith("capture.")]
        for m in events[after:]:
            if m["event"] == name and all(m["details"].get(k) == v for k, v in details.items()):
                return m
        return None
    return wait_for(found, timeout, f"{name} {details} from {device}")


def _capture_events(world, device: str) -> list[dict]:
    return [m for m in world["central"].of(device, "event") if m["event"].startswith("capture.")]


def _stored(data_dir: Path) -> dict[str, bytes]:
    """The device's capture store: {sha256: record} over every capture, temporary files apart."""
    root = data_dir / "capture" / "samples"
    return {p.name: p.read_bytes() for p in root.glob("*/*") if not p.name.startswith(".")} if root.exists() else {}


def _runs(info: dict, more_than: int, timeout: float = 30) -> int:
    return wait_for(lambda: (lambda r: r if r > more_than else None)(_stats(info)["runs"]), timeout,
                    f"more than {more_than} served requests")


def _shadow_the_negated_model(world, device: str, store, shadow_id: str) -> None:
    """Start a shadow of the negate-double model (it disagrees with serving on every sample) on ``device``."""
    from edgesmith.toolchain.deploy import archive as deploy_archive
    from edgesmith.toolchain.deploy import desired as deploy_desired

    state = deploy_desired.shadow_state(FLEET, device, 1, shadow_id, [deploy_archive.archive(world["negated"], store.dir)],
                                        store.server.url, duration_s=600, sample=1.0)
    world["central"].publish(device, deploy_desired.sign(state, world["deploy_key"], domain=contract.SHADOW_DOMAIN.encode()))


def test_capture_off_then_uniform_then_upload_and_pull(world):
    """Off by default: served requests store nothing. `capture start --policy uniform:1` stores
    records of the contract (the central parser reads them, the served inputs inside); `stop` stops
    sampling; `upload` moves every stored sample to the receiver (deleted on the device only after
    it answered), and `capture pull` makes a dataset whose inputs have the served shape."""
    device = "cap-flow"
    agent, info, data_dir = _start(world, device, "--synthetic-load", "30")
    try:
        # Off: requests are served, nothing is offered to capture, nothing is stored.
        _runs(info, 30)
        status = _stats(info)["capture"]
        assert (status["active"], status["offered"], status["taken"], status["stored_samples"]) == (False, 0, 0, 0)
        assert _stored(data_dir) == {}

        _capture(world, "start", device, "--policy", "uniform:1", "--max-samples", "40")
        started = _event(world, device, "capture.started")
        capture_id = started["details"]["capture_id"]
        assert contract.CaptureReport.model_validate(started["details"]).capture_version == 1
        wait_for(lambda: _stats(info)["capture"]["stored_samples"] >= 12 or None, 30, "12 stored samples")
        _capture(world, "stop", device)
        stopped = _event(world, device, "capture.stopped")
        assert stopped["details"]["stop"] == "stopped" and stopped["details"]["capture_id"] == capture_id
        kept = _stored(data_dir)
        assert 12 <= len(kept) <= 40
        for sha, body in kept.items():
            assert capture_record.sha256(body) == sha  # named by its content
            header = capture_record.parse(body)
            assert (header.fleet, header.device, header.capture_id, header.reason) == (FLEET, device, capture_id, "uniform")
            x = capture_record.tensors(body, header)["x"]
            y = capture_record.tensors(body, header, "outputs")["y"]
            assert x.shape == (1, 4) and np.allclose(y, 2 * x)  # the served input and the serving answer
            assert header.top1 == int(np.argmax(y)) and 0 < header.confidence <= 1
        # Off again: more requests, no more samples.
        runs = _stats(info)["runs"]
        _runs(info, runs + 30)
        assert set(_stored(data_dir)) == set(kept)

        _capture(world, "upload", device)
        uploaded = _event(world, device, "capture.uploaded")
        assert uploaded["details"]["samples"] == len(kept) and uploaded["details"]["stored_samples"] == 0
        assert uploaded["details"]["bytes"] == sum(len(b) for b in kept.values())
        assert sorted(world["receiver"].shas(device)) == sorted(kept)
        assert _stored(data_dir) == {}
    finally:
        assert agent.stop() == 0, agent.log()
    pulled = json.loads(run_cli("capture", "pull", "--fleet", FLEET, "--dir", str(world["receiver"].dir),
                                "--datasets", str(world["root"] / "datasets"),
                                "--tracking-uri", f"sqlite:///{world['root'] / 'mlflow.db'}", "--json").stdout)
    with np.load(Path(pulled["path"]) / "data.npz") as data:
        assert data["x"].shape == (len(kept), 4)  # samples on the first axis, then the served input's shape
        assert sorted(data["ids"].tolist()) == sorted(kept)


def test_sigkill_during_capture_and_during_upload_loses_and_duplicates_nothing(world):
    """SIGKILL while sampling: the restarted agent keeps every stored sample, cleans what a crash
    left half-written and samples on (the capture and its token survive). SIGKILL while an upload
    hangs (the receiver is paused): the restarted agent resumes the upload, and the receiver ends up
    with exactly the device's samples, once each."""
    device = "cap-kill"
    receiver = world["receiver"]
    agent, info, data_dir = _start(world, device, "--synthetic-load", "20")
    try:
        _capture(world, "start", device, "--policy", "uniform:1", "--max-samples", "1000")
        _event(world, device, "capture.started")
        wait_for(lambda: _stats(info)["capture"]["stored_samples"] >= 5 or None, 30, "5 stored samples")
        agent.kill()
        before = _stored(data_dir)
        half = next((data_dir / "capture" / "samples").iterdir()) / (".tmp-" + "0" * 64)
        half.write_bytes(b"half a record")  # as a crash between write and rename leaves it
        agent, info, _ = _start(world, device, "--synthetic-load", "20")
        # The capture store is indexed (and cleaned) just after agent.json is written, not before.
        wait_for(lambda: not half.exists() or None, 30, "the half-written record removed")
        wait_for(lambda: _stats(info)["capture"]["stored_samples"] > len(before) or None, 30, "sampling resumed")
        assert set(before) <= set(_stored(data_dir))  # nothing lost
        _capture(world, "stop", device)
        _event(world, device, "capture.stopped")
        stored = _stored(data_dir)

        receiver.proc.send_signal(signal.SIGSTOP)  # the upload now hangs mid-request
        try:
            _capture(world, "upload", device)
            wait_for(lambda: _stats(info)["capture"]["uploading"] or None, 30, "the upload to start")
            time.sleep(0.5)  # the first PUT is under way (it waits for the paused receiver)
            agent.kill()
        finally:
            receiver.proc.send_signal(signal.SIGCONT)
        seen = len(_capture_events(world, device))
        agent, info, _ = _start(world, device)
        uploaded = _event(world, device, "capture.uploaded", timeout=60, after=seen)
        assert uploaded["details"]["stored_samples"] == 0
        shas = receiver.shas(device)
        assert sorted(shas) == sorted(stored) and len(set(shas)) == len(shas)  # every sample, once
        assert _stored(data_dir) == {}
    finally:
        agent.stop()


def test_a_tiny_store_drops_the_oldest_and_serving_goes_on(world):
    """--capture-max-bytes 2048 holds two or three records: under uniform:1 the oldest go first
    (capture.dropped, reason budget), the store never passes its budget, and every request
    (synthetic and over HTTP) is still answered."""
    device = "cap-tiny"
    agent, info, data_dir = _start(world, device, "--synthetic-load", "40", "--capture-max-bytes", "2048")
    try:
        _capture(world, "start", device, "--policy", "uniform:1")
        _event(world, device, "capture.started")
        dropped = _event(world, device, "capture.dropped", reason="budget")
        assert dropped["details"]["samples"] >= 1 and dropped["details"]["stored_bytes"] <= 2048
        import io

        for i in range(20):
            buffer = io.BytesIO()
            np.save(buffer, np.full((1, 4), i, dtype=np.float32))
            request = urllib.request.Request(f"{info['url']}/v1/infer", data=buffer.getvalue(), method="POST")
            with urllib.request.urlopen(request, timeout=30) as response:
                assert np.allclose(np.load(io.BytesIO(response.read())), 2 * i)
        stats = _stats(info)
        assert stats["errors"] == 0
        stored = _stored(data_dir)
        assert 1 <= len(stored) and sum(len(b) for b in stored.values()) <= 2048
        newest = max(capture_record.parse(b).ts_ms for b in stored.values())
        assert newest >= dropped["ts_ms"] - 1000  # what stays is recent: the oldest went
    finally:
        assert agent.stop() == 0, agent.log()


def test_a_full_disk_drops_the_oldest_and_serving_goes_on(world):
    """The capture store on a 256 KiB tmpfs (a disk that fills long before --capture-max-bytes):
    under uniform:1 the writes meet ENOSPC, the oldest samples go first (capture.dropped, reason
    disk-full), newer ones keep being stored, and every request is still answered."""
    device = "cap-diskfull"
    data_dir = world["root"] / "agents" / device
    store = data_dir / "capture"
    store.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(store)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"a tmpfs cannot be mounted here (needs root): {mounted.stderr.strip()}")
    try:
        agent, info, _ = _start(world, device, "--synthetic-load", "40")
        try:
            _capture(world, "start", device, "--policy", "uniform:1")
            _event(world, device, "capture.started")
            dropped = _event(world, device, "capture.dropped", timeout=60, reason="disk-full")
            assert dropped["details"]["samples"] >= 1
            runs = _runs(info, _stats(info)["runs"] + 40)  # serving goes on with the disk full
            later = wait_for(lambda: (lambda s: s if s and max(capture_record.parse(b).ts_ms for b in s.values())
                                      > dropped["ts_ms"] else None)(_stored(data_dir)), 30,
                             "a sample stored after the disk filled")
            assert len(later) >= 2
            stats = _stats(info)
            assert stats["errors"] == 0 and stats["runs"] >= runs
            assert stats["capture"]["active"], stats["capture"]
        finally:
            assert agent.stop() == 0, agent.log()
    finally:
        subprocess.run(["umount", str(store)], check=False)


def test_disagreement_with_a_running_shadow_is_captured(world):
    """`--policy disagreement` takes the requests on which a running shadow's top-1 differed from
    serving's (a candidate computing -2x against serving's 2x: every sampled one), nothing else."""
    device = "cap-shadow"
    store = Store(world["root"] / "store")
    agent, info, data_dir = _start(world, device, "--synthetic-load", "20")
    try:
        _capture(world, "start", device, "--policy", "disagreement")
        _event(world, device, "capture.started")
        _shadow_the_negated_model(world, device, store, "sh-capture")
        wait_for(lambda: _stats(info)["capture"]["stored_samples"] >= 3 or None, 60, "3 samples the shadow disagreed on")
        _capture(world, "stop", device)
        _event(world, device, "capture.stopped")
        for body in _stored(data_dir).values():
            header = capture_record.parse(body)
            x = capture_record.tensors(body, header)["x"]
            assert header.reason == "disagreement" and header.top1 == int(np.argmax(2 * x)) != int(np.argmax(-2 * x))
    finally:
        assert agent.stop() == 0, agent.log()
        store.server.stop()


def test_sigterm_at_any_moment_with_capture_shadow_and_load_on_exits_cleanly(world):
    """An agent with everything on (synthetic load, a uniform + disagreement capture storing
    samples, a shadow running a candidate in its child) is stopped with SIGTERM at a random moment
    after it came up, again and again: each time it exits with 0, never an abort (the heap corruption
    once seen at shutdown). Run against the sanitized agent (scripts/sanitize-agent.sh) a
    use-after-free or race there fails the exit status too."""
    import random

    device = "cap-sigterm"
    store = Store(world["root"] / "store-sigterm")
    rng = random.Random(20261208)
    try:
        agent, info, data_dir = _start(world, device, "--synthetic-load", "50")
        try:
            _capture(world, "start", device, "--policy", "uniform:0.5,disagreement")
            _event(world, device, "capture.started")
            _shadow_the_negated_model(world, device, store, "sh-sigterm")
            wait_for(lambda: _stats(info).get("shadow", {}).get("samples", 0) >= 1 or None, 60, "the shadow running its candidate")
        finally:
            assert agent.stop() == 0, agent.log()
        # The capture and the shadow resume from the agent's state at each start (and the retained states).
        for _ in range(4):
            agent, info, data_dir = _start(world, device, "--synthetic-load", "50")
            time.sleep(rng.uniform(0.0, 1.5))  # a random moment: the shadow's child starting, samples queued, an upload...
            code = agent.stop()
            assert code == 0, f"exit status {code} after SIGTERM:\n{agent.log()}"
    finally:
        store.server.stop()


def test_refused_capture_states_capture_nothing_and_retention_deletes_old_samples(world):
    """On the device's own topic: a state for another device, one signed over the shadow domain and
    an expired one are refused (logged) and capture stays off; then a real `start --retention 2s`
    captures, and samples older than 2 s go (capture.dropped, reason retention)."""
    from edgesmith.toolchain.deploy import desired as deploy_desired

    device = "cap-refuse"
    agent, info, data_dir = _start(world, device, "--synthetic-load", "20")
    try:
        now_ms = int(time.time() * 1000)
        token = "ab" * 32

        def state(version: int, target: str = device, **extra) -> dict:
            return deploy_desired.capture_state(FLEET, target, version, deploy_desired.new_capture_id(), "start",
                                                upload_url=world["receiver"].url, upload_token=token,
                                                policy={"uniform": 1.0}, **extra)

        # Its first telemetry message: connected, and the capture-desired subscription made before it.
        wait_for(lambda: world["central"].of(device, "telemetry") or None, 30, f"telemetry from {device}")
        key, capture_domain = world["deploy_key"], deploy_desired.CAPTURE_DOMAIN
        bad = [deploy_desired.sign(state(100, "cap-other"), key, domain=capture_domain),
               deploy_desired.sign(state(101), key, domain=contract.SHADOW_DOMAIN.encode()),
               deploy_desired.sign(state(102, issued_at_ms=now_ms - 3600_000, valid_for_s=60), key, domain=capture_domain)]
        for envelope in bad:
            world["central"].publish(device, envelope, topic=deploy_desired.capture_topic)
        wait_for(lambda: agent.log().count("capture: refused") >= 3 or None, 30, "three refusals in the agent's log")
        log = agent.log()
        assert "for device cap-other" in log and "signature" in log and "expired" in log
        _runs(info, _stats(info)["runs"] + 10)
        status = _stats(info)["capture"]
        assert (status["active"], status["taken"], status["stored_samples"]) == (False, 0, 0)
        assert _stored(data_dir) == {}

        _capture(world, "start", device, "--policy", "uniform:1", "--retention", "2s")
        _event(world, device, "capture.started")
        dropped = _event(world, device, "capture.dropped", reason="retention")
        assert dropped["details"]["samples"] >= 1
    finally:
        assert agent.stop() == 0, agent.log()


def test_upload_over_https_verified_with_the_fleet_ca(world, tmp_path):
    """A TLS broker's devices upload to an HTTPS receiver whose certificate the fleet CA issued:
    the agent verifies it with the CA file of its broker credentials (the artifact download's TLS
    options), and the receiver ends up with exactly the stored samples."""
    from edgesmith.toolchain.fleet import broker as fleet_broker

    pki = fleet_broker.certs(tmp_path / "tls-broker", ["127.0.0.1"])  # the fleet CA, a cert for 127.0.0.1
    broker = Broker(tmp_path / "tls-broker", "--tls")
    receiver = None
    agent = None
    try:
        receiver = subprocess.Popen([EDGESMITH, "capture", "serve", "--dir", str(tmp_path / "captures"), "--listen",
                                     "127.0.0.1:0", "--tls-cert", pki["certfile"], "--tls-key", pki["keyfile"],
                                     "--store", str(tmp_path / "artifacts")], stdout=subprocess.PIPE, text=True)
        url = json.loads(receiver.stdout.readline())["receiver"]
        assert url.startswith("https://")
        device = "cap-tls"
        credentials = broker.add_device(device)
        data_dir = tmp_path / device
        agent = Agent({"path": world["artifact"], "pub": world["trust"] / "build" / "build.pub"}, credentials, data_dir,
                      "--trust-dir", str(world["trust"]), "--interval", "1", "--backend-path", str(world["backend_dir"]),
                      "--synthetic-load", "30")
        info = agent.ready()
        cli = [*world["cli"][:2], "--broker", str(broker.dir), *world["cli"][4:6], "--dir", str(tmp_path / "captures"),
               "--receiver", url]
        run_cli("capture", "start", "--devices", device, "--policy", "uniform:1", *cli)
        wait_for(lambda: _stats(info)["capture"]["stored_samples"] >= 3 or None, 30, "3 stored samples")
        run_cli("capture", "stop", "--devices", device, *cli)
        wait_for(lambda: not _stats(info)["capture"]["active"] or None, 30, "capture off")
        stored = _stored(data_dir)
        run_cli("capture", "upload", "--devices", device, *cli)
        wait_for(lambda: _stats(info)["capture"]["stored_samples"] == 0 or None, 30, "every sample uploaded")
        shas = [s["sha256"] for s in CaptureStore(tmp_path / "captures").samples(FLEET)]
        assert sorted(shas) == sorted(stored) and "failed" not in agent.log()
    finally:
        if agent is not None:
            assert agent.stop() == 0, agent.log()
        if receiver is not None:
            receiver.send_signal(signal.SIGTERM)
            receiver.wait(timeout=30)
        broker.down()


class HostileReceiver:
    """A receiver that does not speak the capture protocol: it answers every PUT by `mode`:
    "404", "endless" (a 200 with a chunked body that never ends) or "trickle" (a 200 whose body
    comes one byte at a time, each well within the agent's read time-out)."""

    def __init__(self):
        import socketserver
        import threading

        self.mode = "404"
        self.puts = 0
        self.trickling = threading.Event()
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                sock = self.request
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = sock.recv(65536)
                    if not chunk:
                        return
                    head += chunk
                header, _, body = head.partition(b"\r\n\r\n")
                length = next((int(line.split(b":", 1)[1]) for line in header.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                while len(body) < length:
                    chunk = sock.recv(65536)
                    if not chunk:
                        return
                    body += chunk
                outer.puts += 1
                try:
                    if outer.mode == "404":
                        sock.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    elif outer.mode == "endless":
                        sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                        block = b"10000\r\n" + b"x" * 65536 + b"\r\n"
                        while True:
                            sock.sendall(block)
                    else:
                        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
                        while True:
                            sock.sendall(b"x")
                            outer.trickling.set()
                            time.sleep(0.5)
                except OSError:  # the agent hung up
                    return

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_hostile_receiver_neither_loses_samples_nor_grows_memory_nor_holds_sigterm(world):
    """Uploading to a receiver that is not one: a 404 ends the round (named, samples kept); an
    endless answer is cut at 64 KiB (the agent's memory stays small, the sample is kept for a
    later try) and while that round runs, sampling at max_samples drops the new samples instead of
    evicting the ones the round sends; a receiver trickling its answer does not hold SIGTERM."""
    device = "cap-hostile"
    hostile = HostileReceiver()
    agent, info, data_dir = _start(world, device, "--synthetic-load", "30")
    to_hostile = [*world["cli"][:8], "--receiver", hostile.url]
    try:
        _capture(world, "start", device, "--policy", "uniform:1", "--max-samples", "4")
        _event(world, device, "capture.started")
        wait_for(lambda: _stats(info)["capture"]["stored_samples"] == 4 or None, 30, "4 stored samples")

        seen = len(_capture_events(world, device))
        run_cli("capture", "upload", "--devices", device, *to_hostile)
        ended = _event(world, device, "capture.uploaded", after=seen)
        assert "HTTP 404" in ended["details"]["error"] and ended["details"]["samples"] == 0
        assert _stats(info)["capture"]["stored_samples"] == 4

        hostile.mode = "endless"
        run_cli("capture", "upload", "--devices", device, *to_hostile)
        wait_for(lambda: "answer is over 65536 bytes" in agent.log() or None, 30, "the endless answer cut")
        round_samples = set(_stored(data_dir))
        assert len(round_samples) == 4
        seen = len(_capture_events(world, device))
        _event(world, device, "capture.dropped", after=seen, reason="budget")  # new samples dropped...
        wait_for(lambda: agent.log().count("answer is over 65536 bytes") >= 2 or None, 30, "a second try cut")
        assert set(_stored(data_dir)) == round_samples  # ...not the ones the round sends
        rss = Path(f"/proc/{agent.proc.pid}/status").read_text()
        assert int(next(line.split()[1] for line in rss.splitlines() if line.startswith("VmHWM"))) < 512 * 1024

        hostile.mode = "trickle"
        run_cli("capture", "upload", "--devices", device, *to_hostile)
        assert hostile.trickling.wait(30), "the agent never tried the trickling receiver"
        assert agent.stop(timeout=30) == 0, agent.log()
        assert set(_stored(data_dir)) == round_samples  # every sample kept for a later upload
    finally:
        if agent.proc.poll() is None:
            agent.stop()
        hostile.close()


def test_a_lost_state_json_write_a_bad_field_and_a_symlink_in_the_store(world, tmp_path):
    """The floor is written before state.json: when state.json lost the last save (a kill -9
    between them, a full disk) the retained `start` is applied again at the restart instead of
    being taken for a repeat. A field of the wrong type in state.json is logged and forgotten, the
    agent starts; a symlink in the store is unlinked, never followed out of the data directory."""
    device = "cap-lost"
    agent, info, data_dir = _start(world, device, "--synthetic-load", "10")
    try:
        _capture(world, "start", device, "--policy", "uniform:1")
        _event(world, device, "capture.started")
        assert agent.stop() == 0, agent.log()
        state = data_dir / "capture" / "state.json"
        # state.json as it was before the start was saved, with a record of the wrong type besides.
        state.write_text(json.dumps({"v": 1, "captures": {"old": {"token": 5, "uploading": "yes"}}, "active": None}))
        outside = tmp_path / "outside"
        (outside / "keep").mkdir(parents=True)
        (outside / "keep" / ("0" * 64)).write_bytes(b"not the agent's")
        (data_dir / "capture" / "samples" / "linked").symlink_to(outside / "keep")
        seen = len(_capture_events(world, device))
        agent, info, _ = _start(world, device, "--synthetic-load", "10")
        _event(world, device, "capture.started", after=seen)
        assert _stats(info)["capture"]["active"]
        assert "wrong type" in agent.log()
        assert (outside / "keep" / ("0" * 64)).exists() and not (data_dir / "capture" / "samples" / "linked").exists()
    finally:
        assert agent.stop() == 0, agent.log()


def test_a_model_no_record_can_hold_ends_the_capture_with_why(world):
    """A served model whose tensors no capture record can hold (rank 9: the contract's records hold
    rank 8 at most) fails on every sample: the capture ends (`capture.stopped` naming why), the
    sample counts as dropped (refused), nothing is stored and serving goes on."""
    device = "cap-rank9"
    artifact = make_echo_artifact(world["root"] / "dist" / "rank9", world["build_key"], version="1",
                                  shape=(1, 1, 1, 1, 1, 1, 1, 2, 2))
    data_dir = world["root"] / "agents" / device
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    credentials = world["broker"].add_device(device)
    agent = Agent({"path": artifact, "pub": world["trust"] / "build" / "build.pub"}, credentials, data_dir,
                  "--trust-dir", str(world["trust"]), "--interval", "1", "--backend-path", str(world["backend_dir"]),
                  "--synthetic-load", "20")
    info = agent.ready()
    try:
        _capture(world, "start", device, "--policy", "uniform:1")
        stopped = _event(world, device, "capture.stopped")
        assert stopped["details"]["stop"] == "stopped" and "rank 8" in stopped["details"]["error"]
        _event(world, device, "capture.dropped", reason="refused")
        assert _stored(data_dir) == {}
        _runs(info, _stats(info)["runs"] + 10)
        assert _stats(info)["errors"] == 0 and not _stats(info)["capture"]["active"]
    finally:
        assert agent.stop() == 0, agent.log()
