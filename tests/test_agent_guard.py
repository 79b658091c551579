"""What the agent trusts and serves (issue 16, items 9 and 10), against real edgesmith-agent
processes: the HTTP API checks a request against the manifest before reading its data, caps the
body, limits concurrent requests and needs a token off loopback; plugins come from built-in
directories and --backend-path only, never from EDGESMITH_BACKEND_PATH or a directory others can
write; trust directories and a project's .edgesmith must be the user's own."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from test_agent import AGENT, Agent, Broker, _npy_concat, _npy_split
from test_session_core import backend_dir  # noqa: F401  (fixture: the testecho plugin)

pytestmark = pytest.mark.integration


@pytest.fixture
def broker(tmp_path):
    from conftest import run_cli

    b = Broker(tmp_path / "broker")
    yield b
    run_cli("broker", "down", "--dir", str(b.dir), check=False)


def _request(port: int, method: str, path: str, body: bytes = b"", headers: dict | None = None,
             send_body: bool = True) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest(method, path)
        for name, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            conn.putheader(name, value)
        conn.endheaders()
        if send_body and body:
            conn.send(body)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def _stats(port: int, headers: dict | None = None) -> dict:
    status, _, body = _request(port, "GET", "/v1/stats", headers=headers)
    assert status == 200, body
    return json.loads(body)


def test_infer_checks_the_manifest_before_the_data_and_caps_the_body(broker, digits_host_openvino, tmp_path):
    agent = Agent(digits_host_openvino, broker.add_device("guard-01"), tmp_path / "data")
    x = np.random.default_rng(3).normal(size=(1, 1, 8, 8)).astype(np.float32)
    try:
        port = agent.ready()["port"]
        status, _, body = _request(port, "POST", "/v1/infer", _npy_concat([x]))
        assert status == 200 and _npy_split(body)[0].shape == (1, 10)

        # A declared length beyond the model's one input plus its header: refused before any byte
        # of the body is sent (the old API accepted up to 256 MiB and waited for it).
        status, _, body = _request(port, "POST", "/v1/infer", b"", {"Content-Length": str(200 << 20)}, send_body=False)
        assert status == 413, body
        assert "at most" in json.loads(body)["error"]

        # Two inputs for a one-input model: refused at the second header, never parsed further.
        status, _, body = _request(port, "POST", "/v1/infer", _npy_concat([x, x]))
        assert status == 400 and "holds more" in json.loads(body)["error"]

        # A header of the wrong shape, no data: the shape is named (the old parser said "truncated").
        header_only = _npy_concat([np.zeros((1, 1, 4, 4), np.float32)])[:128]
        status, _, body = _request(port, "POST", "/v1/infer", header_only)
        assert status == 400
        assert "input 'input' has shape (1, 1, 4, 4), the model takes (1, 1, 8, 8)" in json.loads(body)["error"]

        status, _, body = _request(port, "POST", "/v1/infer", b"not npy")
        assert status == 400
        stats = _stats(port)
        assert stats["http"]["refused"] == {"too_large": 1, "input_mismatch": 2, "malformed": 1}
        assert stats["runs"] == 1 and stats["errors"] == 0  # nothing refused reached the model
    finally:
        assert agent.stop() == 0, agent.log()


def test_concurrent_requests_beyond_the_limit_get_503(broker, digits_host_openvino, tmp_path):
    agent = Agent(digits_host_openvino, broker.add_device("guard-02"), tmp_path / "data", "--http-max-requests", "1")
    body = _npy_concat([np.zeros((1, 1, 8, 8), np.float32)])
    try:
        port = agent.ready()["port"]
        # The first request holds the only slot while its body is still arriving.
        slow = socket.create_connection(("127.0.0.1", port), timeout=30)
        slow.sendall(f"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:100])
        # Until the slow request's handler holds the slot (its connection is handed to a worker
        # thread: not instant on a loaded host), a fast one may still be served; within 3 s (under
        # the body's 5 s read timeout) one must get 503.
        deadline = time.monotonic() + 3
        while True:
            status, headers, reply = _request(port, "POST", "/v1/infer", body)
            if status == 503 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert status == 503, reply
        assert headers["Retry-After"] == "1" and "retry after" in json.loads(reply)["error"]
        slow.sendall(body[100:])
        first = slow.makefile("rb").readline()
        slow.close()
        assert first.startswith(b"HTTP/1.1 200"), first
        status, _, _ = _request(port, "POST", "/v1/infer", body)  # the slot is free again
        assert status == 200
        assert _stats(port)["http"]["refused"]["busy"] >= 1
    finally:
        assert agent.stop() == 0, agent.log()


def _agent_fails(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([str(AGENT), *args], capture_output=True, text=True, timeout=120,
                            env={**os.environ, **(env or {})})
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr
    return result


def test_beyond_loopback_the_api_needs_a_bearer_token(broker, digits_host_openvino, tmp_path):
    credentials = broker.add_device("guard-03")
    base = ["--artifact", str(digits_host_openvino["path"]), "--credentials", str(credentials),
            "--data-dir", str(tmp_path / "d"), "--key", str(digits_host_openvino["pub"])]
    result = _agent_fails(*base, "--http", "0.0.0.0:0")
    assert result.returncode == 2
    assert "needs --http-token-file" in result.stderr.splitlines()[0]

    token = tmp_path / "token"
    token.write_text("s3cret-token-for-the-agent\n")
    token.chmod(0o644)
    result = _agent_fails(*base, "--http", "0.0.0.0:0", "--http-token-file", str(token))
    assert f"chmod 600 {token}" in result.stderr.splitlines()[0]
    token.chmod(0o600)

    agent = Agent(digits_host_openvino, credentials, tmp_path / "data", "--http", "0.0.0.0:0",
                  "--http-token-file", str(token))
    body = _npy_concat([np.zeros((1, 1, 8, 8), np.float32)])
    try:
        port = agent.ready()["port"]
        for headers in ({}, {"Authorization": "Bearer wrong-token-of-same-size"}, {"Authorization": "s3cret-token-for-the-agent"}):
            status, reply_headers, reply = _request(port, "POST", "/v1/infer", body, headers)
            assert status == 401, reply
            assert reply_headers["WWW-Authenticate"] == "Bearer"
        good = {"Authorization": "Bearer s3cret-token-for-the-agent"}
        status, _, reply = _request(port, "POST", "/v1/infer", body, good)
        assert status == 200, reply
        assert _request(port, "GET", "/v1/health")[0] == 401
        assert _stats(port, good)["http"]["refused"]["unauthorized"] == 4
    finally:
        assert agent.stop() == 0, agent.log()


def test_plugins_come_from_built_in_or_flagged_directories_only(broker, digits_host_openvino, tmp_path):
    credentials = broker.add_device("guard-04")
    planted = tmp_path / "planted"
    planted.mkdir()
    # A plugin of the same name that would run as the agent if it were loaded.
    (planted / "libedgesmith_backend_openvino.so").write_bytes(b"\x7fELF not really a plugin")

    agent = Agent(digits_host_openvino, credentials, tmp_path / "data", env={"EDGESMITH_BACKEND_PATH": str(planted)})
    try:
        agent.ready()  # the environment is ignored: the built-in plugin serves
    finally:
        assert agent.stop() == 0, agent.log()

    base = ["--artifact", str(digits_host_openvino["path"]), "--credentials", str(credentials),
            "--data-dir", str(tmp_path / "d2"), "--key", str(digits_host_openvino["pub"])]
    result = _agent_fails(*base, "--backend-path", str(planted))
    assert "backend 'openvino' is not available" in result.stderr  # the flag is honoured
    planted.chmod(0o777)
    result = _agent_fails(*base, "--backend-path", str(planted))
    assert f"the plugin directory '{planted}' can be written by every user" in result.stderr
    assert f"chmod go-w {planted}" in result.stderr
    result = _agent_fails(*base, "--backend-path", "relative/dir")
    assert result.returncode == 2 and "absolute directory" in result.stderr


def test_trust_directories_others_can_write_are_refused(broker, digits_host_openvino, tmp_path):
    credentials = broker.add_device("guard-05")
    trust = tmp_path / "trust"
    (trust / "build").mkdir(parents=True)
    (trust / "deploy").mkdir()
    (trust / "build" / "build.pub").write_text(digits_host_openvino["pub"].read_text())
    (trust / "deploy").chmod(0o775)
    result = _agent_fails("--artifact", str(digits_host_openvino["path"]), "--credentials", str(credentials),
                          "--data-dir", str(tmp_path / "d"), "--trust-dir", str(trust))
    line = result.stderr.splitlines()[0]
    assert f"the trust directory '{trust / 'deploy'}' can be written by its group" in line
    assert f"chmod go-w {trust / 'deploy'}" in line


def test_a_project_home_above_the_working_directory_must_be_the_users_own(tmp_path, monkeypatch):
    from edgesmith.runtime import keys

    project = tmp_path / "project"
    home = project / ".edgesmith"
    (home / "trusted").mkdir(parents=True)
    key = os.urandom(32)
    (home / "trusted" / "signer.pub").write_text(key.hex())
    work = project / "src" / "deep"
    work.mkdir(parents=True)
    monkeypatch.delenv("EDGESMITH_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.chdir(work)
    assert keys.edgesmith_home() == home
    assert keys.trusted_public_keys() == [key]

    for hostile in ("world-writable", "another user's"):
        if hostile == "world-writable":
            home.chmod(0o777)
        else:
            if os.geteuid() != 0:
                continue  # only root can give a directory away
            home.chmod(0o755)
            os.chown(home, 4242, 4242)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert keys.edgesmith_home() == tmp_path / "user" / ".edgesmith"
        assert any(str(home) in str(w.message) and "is ignored" in str(w.message) for w in caught)
        assert keys.trusted_public_keys() == []  # the planted key is not trusted
    os.chown(home, os.geteuid(), os.getegid())

    # Named explicitly, a home others can write still does not supply keys.
    home.chmod(0o755)
    (home / "trusted").chmod(0o777)
    monkeypatch.setenv("EDGESMITH_HOME", str(home))
    from edgesmith.runtime.errors import ValueError as EdgesmithValueError

    with pytest.raises(EdgesmithValueError, match="chmod go-w"):
        keys.trusted_public_keys()


def test_only_infer_takes_a_body(broker, tmp_path, backend_dir):  # noqa: F811
    """A POST (or PUT, DELETE) with a body to any other path was read whole, up to 256 MiB, before
    its 404: a handful at once held gigabytes of an edge device's memory. Now refused at the headers."""
    from deploy_helpers import make_echo_artifact
    from edgesmith.toolchain.signing import generate_key, load_signing_key

    key_path = generate_key("guard", tmp_path / "keys")
    artifact = make_echo_artifact(tmp_path / "echo", load_signing_key(key_path))
    agent = Agent({"path": artifact, "pub": key_path.with_suffix(".pub")}, broker.add_device("guard-05"),
                  tmp_path / "data", "--backend-path", str(backend_dir))
    try:
        port = agent.ready()["port"]
        for method, path in (("POST", "/v1/other"), ("PUT", "/v1/infer"), ("DELETE", "/v1/health")):
            # Declared and never sent: the agent must answer from the headers alone.
            status, _, body = _request(port, method, path, b"", {"Content-Length": str(200 << 20)}, send_body=False)
            assert status == 413, (method, path, body)
            assert "only POST /v1/infer takes a request body" in json.loads(body)["error"]
        status, _, body = _request(port, "POST", "/v1/other", b"", {"Transfer-Encoding": "chunked"}, send_body=False)
        assert status == 413, body
        status, _, body = _request(port, "GET", "/v1/health")
        assert status == 200, body
        x = np.arange(4, dtype=np.float32).reshape(1, 4)
        status, _, body = _request(port, "POST", "/v1/infer", _npy_concat([x]))
        assert status == 200 and np.array_equal(_npy_split(body)[0], 2 * x), body
        assert _stats(port)["http"]["refused"] == {"unexpected_body": 4}
    finally:
        assert agent.stop() == 0, agent.log()


def test_the_header_deadline_ends_with_the_headers(broker, digits_host_openvino, tmp_path):
    """The deadline covers the request line and headers only: a body that pauses past it is still
    read (httplib's per-read timeout bounds it), and a request whose headers stop arriving is cut
    off with 408 at the deadline however slowly its bytes keep coming."""
    agent = Agent(digits_host_openvino, broker.add_device("guard-08"), tmp_path / "data", "--http-header-timeout", "0.5")
    body = _npy_concat([np.zeros((1, 1, 8, 8), np.float32)])
    try:
        port = agent.ready()["port"]
        sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        sock.sendall(f"POST /v1/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {len(body)}\r\n\r\n".encode())
        time.sleep(2)  # four header deadlines: the pause under test, not a wait for an event
        sock.sendall(body)
        reply = _closed_by_peer(sock)
        assert reply.startswith(b"HTTP/1.1 200"), reply[:200]

        sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        reply = _closed_by_peer(sock)
        assert reply.startswith(b"HTTP/1.1 408") and b"within 0.5 s" in reply, reply
        assert _stats(port)["http"]["refused"] == {"header_timeout": 1}
    finally:
        assert agent.stop() == 0, agent.log()


def _connect_from(source: str, port: int) -> socket.socket:
    """A connection to the agent from `source`, another loopback address: the agent counts
    connections per client address."""
    return socket.create_connection(("127.0.0.1", port), timeout=60, source_address=(source, 0))


def _closed_by_peer(sock: socket.socket) -> bytes:
    """Everything the agent sent before closing `sock`; fails when it is still open after the
    socket's timeout."""
    received = b""
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"the agent kept the connection open; it sent {received[:200]!r}") from None
    finally:
        sock.close()
    return received


def _drip(sockets: list[socket.socket], stop: threading.Event) -> None:
    """The slowloris: one more header line on each connection every half second, never the end."""
    line = 0
    while not stop.wait(0.5):
        line += 1
        for sock in sockets:
            try:
                sock.send(f"X-Drip-{line}: {'a' * 20}\r\n".encode())
            except OSError:
                pass  # closed by the agent: what the test waits for


def _endless(sock: socket.socket, chunk: bytes, limit: int = 64 << 20) -> int:
    """Send `chunk` until the agent stops reading (or `limit` bytes); returns the bytes sent."""
    sent = 0
    try:
        while sent < limit:
            sock.sendall(chunk)
            sent += len(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass
    return sent


def test_slow_idle_and_endless_clients_cannot_starve_the_api(broker, digits_host_openvino, tmp_path):
    """Slowloris (issue 16): 16 connections dripping header lines, plus idle keep-alive connections,
    used to hold every thread of httplib's pool, and /v1/health timed out even with the token. Now
    connections are capped per client address, headers must be complete within a deadline, and idle
    keep-alive connections are closed: a well-behaved client is served all along (default limits)."""
    token = tmp_path / "token"
    token.write_text("s3cret-token-for-the-agent\n")
    token.chmod(0o600)
    good = {"Authorization": "Bearer s3cret-token-for-the-agent"}
    agent = Agent(digits_host_openvino, broker.add_device("guard-06"), tmp_path / "data", "--http-token-file", str(token))
    body = _npy_concat([np.zeros((1, 1, 8, 8), np.float32)])
    stop = threading.Event()
    try:
        port = agent.ready()["port"]
        # Idle keep-alive clients: one request each, then nothing.
        idle = [_connect_from("127.0.0.3", port) for _ in range(4)]
        for sock in idle:
            sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nAuthorization: " + good["Authorization"].encode() + b"\r\n\r\n")
        for sock in idle:
            assert sock.recv(4096).startswith(b"HTTP/1.1 200"), "an idle client's first request failed"
        # The slowloris, from another address: twice the per-address limit.
        slow = [_connect_from("127.0.0.2", port) for _ in range(16)]
        for sock in slow:
            sock.send(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")
        dripper = threading.Thread(target=_drip, args=(slow, stop), daemon=True)
        dripper.start()

        # The well-behaved client is served while all of them are held.
        stats = _stats(port, good)
        assert stats["http"]["connections"] >= 1 + 4 + 8, stats["http"]  # the slow and idle ones still open
        status, _, reply = _request(port, "GET", "/v1/health", headers=good)
        assert status == 200 and json.loads(reply)["device"] == "guard-06", reply
        status, _, reply = _request(port, "POST", "/v1/infer", body, good)
        assert status == 200 and _npy_split(reply)[0].shape == (1, 10), reply

        # Every slow connection ends: refused at accept beyond 8 from its address (503), or cut off
        # when its headers were not complete after 5 s (408). The idle ones are closed after 5 s.
        endings = [_closed_by_peer(sock) for sock in slow]
        stop.set()
        for sock in idle:
            _closed_by_peer(sock)
        assert all(e == b"" or e.startswith((b"HTTP/1.1 503", b"HTTP/1.1 408")) for e in endings), endings
        refused = _stats(port, good)["http"]["refused"]
        assert refused["too_many_connections"] >= 1 and refused["header_timeout"] >= 1, refused
        assert refused["too_many_connections"] + refused["header_timeout"] == len(slow), refused

        # An endless header line, and endless header lines sent fast: cut off at 32 KiB.
        for chunk in (b"a" * 4096, b"X-Endless: " + b"a" * 50 + b"\r\n"):
            sock = _connect_from("127.0.0.4", port)
            sock.sendall(b"GET /v1/health HTTP/1.1\r\nX-Start: " if chunk[0:1] == b"a" else b"GET /v1/health HTTP/1.1\r\n")
            sent = _endless(sock, chunk)
            reply = _closed_by_peer(sock)
            assert sent < 64 << 20 and (reply == b"" or reply.startswith(b"HTTP/1.1 431")), (sent, reply[:200])
        assert _stats(port, good)["http"]["refused"]["header_too_large"] == 2
        status, _, _ = _request(port, "GET", "/v1/health", headers=good)
        assert status == 200
    finally:
        stop.set()
        assert agent.stop() == 0, agent.log()


def test_connection_limits_are_options_with_bounds(tmp_path):
    base = ["--artifact", str(tmp_path / "a"), "--credentials", str(tmp_path / "c.json"), "--data-dir", str(tmp_path / "d")]
    for args, sentence in (
        (["--http-max-connections", "0"], "--http-max-connections takes a number from 1 to 1024, got '0'"),
        (["--http-max-connections-per-peer", "2000"], "--http-max-connections-per-peer takes a number from 1 to 1024"),
        (["--http-max-connections", "4", "--http-max-connections-per-peer", "5"],
         "--http-max-connections-per-peer (5) cannot exceed --http-max-connections (4)"),
        (["--http-header-timeout", "0.01"], "--http-header-timeout must be from 0.1 to 600 seconds"),
        (["--http-idle-timeout", "forever"], "--http-idle-timeout takes a positive number, got 'forever'"),
    ):
        result = _agent_fails(*base, *args)
        assert result.returncode == 2 and sentence in result.stderr.splitlines()[0], result.stderr
    config = tmp_path / "device.toml"
    config.write_text("http_idle_timeout_s = 1000\n")
    result = _agent_fails("--config", str(config), *base)
    assert "'http_idle_timeout_s' must be from 0.1 to 600 seconds" in result.stderr.splitlines()[0], result.stderr
    config.write_text("http_max_connections = 2\nhttp_max_connections_per_peer = 2\nhttp_header_timeout_s = 0\n")
    result = _agent_fails("--config", str(config), *base)
    assert "'http_header_timeout_s' must be from 0.1 to 600 seconds" in result.stderr.splitlines()[0], result.stderr


def test_the_load_copy_lives_under_the_data_dir_and_is_cleaned_safely(broker, digits_host_openvino, tmp_path):
    """The private load copy (issue 16): under <data-dir>/load by default (a disk; $TMPDIR is often
    RAM), with copies left by dead processes removed by their free lock, never by a PID check that
    is wrong across PID namespaces sharing the directory; a disk too small is refused in one sentence
    naming the directory, the bytes needed and --load-dir."""
    import fcntl

    credentials = broker.add_device("guard-07")
    data = tmp_path / "data"
    load = data / "load"
    load.mkdir(parents=True)
    old = os.stat(load).st_mtime - 3600
    stale = load / "edgesmith-load-4242-abcdef"  # its owner died: nobody holds its lock
    held = load / "edgesmith-load-1-ghijkl"  # pid 1 of another namespace, alive: it holds its lock
    for copy in (stale, held):
        copy.mkdir(mode=0o700)
        (copy / "model.xml").write_bytes(b"x")
        os.utime(copy, (old, old))
    holder = os.open(held, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    agent = Agent(digits_host_openvino, credentials, data)
    try:
        agent.ready()
        mine = [p for p in load.iterdir() if p.name.startswith(f"edgesmith-load-{agent.proc.pid}-")]
        assert len(mine) == 1 and (mine[0] / "manifest.json").is_file(), sorted(load.iterdir())
        assert not stale.exists() and (held / "model.xml").is_file()
    finally:
        assert agent.stop() == 0, agent.log()
        os.close(holder)
    assert not mine[0].exists()

    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k,mode=0700", "tmpfs", str(small)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"a tmpfs cannot be mounted here (needs root): {mounted.stderr.strip()}")
    try:
        result = _agent_fails("--artifact", str(digits_host_openvino["path"]), "--credentials", str(credentials),
                              "--data-dir", str(tmp_path / "data2"), "--key", str(digits_host_openvino["pub"]),
                              "--load-dir", str(small))
        first = result.stderr.splitlines()[0]
        assert "its private copy needs " in first and f"and {small} (TMPDIR) has " in first, first
        assert "--load-dir" in first, first
        assert list(small.iterdir()) == []  # nothing half-copied left behind
    finally:
        subprocess.run(["umount", str(small)], check=True)
