"""The MQTT broker of a fleet: Debian's Mosquitto, configured and run by edgesmith in a directory.

``<dir>/`` holds ``mosquitto.conf`` (generated), ``passwd`` (mosquitto_passwd hashes), ``acl``,
``broker.json`` (host, port, TLS), ``monitor.json`` (the monitor's login), ``central/<name>.json``
(further central logins: monitors with their own client id, ingest workers, one per running
`edgesmith deploy`), ``devices/<id>.json`` (one per device: what `add-device` printed, mode 0600),
``tls/`` (the fleet CA and the broker's certificate, `edgesmith broker certs`), ``data/`` (the
persistence database that keeps queued QoS 1 messages across broker restarts) and ``mosquitto.log``.

Identities (docs/broker-security.md): the broker replaces every client id by the login's username
(`use_username_as_clientid`), so a client can only ever take over its own session; every central
process has its own login; central names start with ``edgesmith-`` and device ids never do. With
mutual TLS the certificate's Common Name is the username (`use_identity_as_username`).

Authorisation: every client logs in; a device (username = its id) may publish only under its own
``edgesmith/v1/<fleet>/<device>/{birth,death,telemetry,event,state}`` and subscribe only to its
own ``desired`` topic; central logins read everything under ``edgesmith/`` and write alerts and
desired states.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from edgesmith.runtime import contract
from edgesmith.toolchain.errors import UserError
from edgesmith.toolchain.fleet import protocol

CENTRAL_PREFIX = "edgesmith-"  # reserved for central logins: a device id never starts with it
MONITOR_USER = "edgesmith-monitor"
DEVICE_KINDS_WRITTEN = tuple(k.value for k in contract.MessageKind)  # birth, death, telemetry, event, state, shadow
# Sized for outages: a device summarising every 10 s queues 8,640 messages a day; a monitor that
# is down for a day must find every device's messages still queued in its persistent session.
MAX_QUEUED_MESSAGES = 1_000_000
# ... but never more than this many bytes per client: a flood of large messages while the monitor
# is away fills its queue (later messages are dropped and show as gaps), not the broker's memory.
MAX_QUEUED_BYTES = 1 << 30
# An MQTT packet larger than this disconnects its sender before the broker buffers it (Mosquitto
# 2.0's max_packet_size, which replaces message_size_limit). It sits above the protocol's own
# MAX_PAYLOAD_BYTES so that the monitor still sees, counts and reports slightly oversized messages.
MAX_PACKET_BYTES = 2 * protocol.MAX_PAYLOAD_BYTES
MAX_INFLIGHT_MESSAGES = 1000
MAX_CONNECTIONS = 19_000  # under the 20,000 open files a process may have here (docs/telemetry.md, "Capacity")
START_TIMEOUT_S = 10.0


class BrokerSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int
    cafile: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    mutual_tls: bool = False  # clients present a certificate; its Common Name is their username
    public_host: str | None = None  # what devices connect to, when not `host` (e.g. host 0.0.0.0)

    @property
    def tls(self) -> bool:
        return self.certfile is not None

    @property
    def device_host(self) -> str:
        """The address written into devices' credentials (and checked against the certificate)."""
        return self.public_host or self.host


@dataclass
class Broker:
    """A broker directory."""

    dir: Path

    @property
    def settings_file(self) -> Path:
        return self.dir / "broker.json"

    @property
    def tls_dir(self) -> Path:
        return self.dir / "tls"

    def settings(self) -> BrokerSettings:
        if not self.settings_file.is_file():
            raise UserError(f"{self.dir} is not an edgesmith broker directory (no broker.json); create it with "
                            f"`edgesmith broker up --dir {self.dir}`")
        return BrokerSettings.model_validate_json(self.settings_file.read_text())

    def login_file(self, name: str) -> Path:
        return self.dir / "monitor.json" if name == MONITOR_USER else self.dir / "central" / f"{name}.json"

    def login(self, name: str = MONITOR_USER) -> dict[str, Any]:
        """A central login's credentials (``username``, ``password``, and with mutual TLS ``certfile``
        and ``keyfile``). Raises OSError or ValueError when it does not exist."""
        return json.loads(self.login_file(name).read_text())

    def monitor_credentials(self) -> dict[str, Any]:
        return self.login(MONITOR_USER)

    def pid(self) -> int | None:
        try:
            pid = int((self.dir / "mosquitto.pid").read_text().strip())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        return pid

    def connection(self) -> dict[str, Any]:
        s = self.settings()
        return {"host": s.host, "port": s.port, "tls": s.tls, "cafile": s.cafile}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def configure_client(client: Any, settings: BrokerSettings, login: dict[str, Any]) -> None:
    """Give a paho client a central login: username and password, and TLS as the broker wants it
    (the fleet CA, and the login's own certificate with mutual TLS)."""
    client.username_pw_set(login["username"], login.get("password"))
    if settings.tls:
        client.tls_set(ca_certs=settings.cafile, certfile=login.get("certfile"), keyfile=login.get("keyfile"))


def _require_mosquitto() -> tuple[str, str]:
    server = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    passwd = shutil.which("mosquitto_passwd")
    if not server or not passwd:
        raise UserError("Mosquitto is not installed; install it with `apt-get install mosquitto` (or run `make bootstrap`)")
    return server, passwd


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _write_private(path: Path, text: str) -> None:
    """Write a secret file atomically, mode 0600 from the start."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked(broker: Broker) -> Iterator[None]:
    """One writer of the password file, the ACL and the login files at a time (several
    `edgesmith deploy` and monitors may create logins at once)."""
    broker.dir.mkdir(parents=True, exist_ok=True)
    with open(broker.dir / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _check_id(kind: str, value: str) -> None:
    # fullmatch: `$` in re.match also matches before a trailing newline, and "dev\n" would split
    # a line of the password file and the ACL.
    if not isinstance(value, str) or not re.fullmatch(protocol.ID_PATTERN, value):
        raise UserError(f"{kind} id {value!r} is not allowed; use 1-64 letters, digits, '_', '.' or '-', starting "
                        "with a letter or digit (it becomes an MQTT topic level)")


def _check_device_id(value: str) -> None:
    _check_id("device", value)
    if value.lower().startswith(CENTRAL_PREFIX):
        raise UserError(f"device id {value!r} is refused: names starting with '{CENTRAL_PREFIX}' are reserved for the "
                        "fleet's own logins (monitor, deployments); pick another device id")


def _check_central_name(value: str) -> None:
    _check_id("central login", value)
    if not value.startswith(CENTRAL_PREFIX):
        raise UserError(f"central client id {value!r} is not allowed: central logins start with '{CENTRAL_PREFIX}' "
                        f"(device ids never do); use e.g. {CENTRAL_PREFIX}{value}")


def _config(broker: Broker, s: BrokerSettings) -> str:
    lines = [
        "# Generated by `edgesmith broker up`; edits are overwritten.",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {broker.dir / 'passwd'}",
        f"acl_file {broker.dir / 'acl'}",
        f"pid_file {broker.dir / 'mosquitto.pid'}",
        "persistence true",
        f"persistence_location {broker.dir / 'data'}/",
        "autosave_interval 5",
        f"max_packet_size {MAX_PACKET_BYTES}",
        f"max_queued_messages {MAX_QUEUED_MESSAGES}",
        f"max_queued_bytes {MAX_QUEUED_BYTES}",
        f"max_inflight_messages {MAX_INFLIGHT_MESSAGES}",
        "max_keepalive 120",
        "persistent_client_expiration 7d",
        f"log_dest file {broker.dir / 'mosquitto.log'}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "connection_messages true",
        f"listener {s.port} {s.host}",
        "protocol mqtt",
        # A listener setting: the client id is the login, so nobody can take over another login's
        # session (or fire its will).
        "use_username_as_clientid true",
        f"max_connections {MAX_CONNECTIONS}",
    ]
    if os.geteuid() == 0:
        lines.insert(1, "user root")  # else mosquitto drops to user `mosquitto`, who cannot read this directory
    if s.tls:
        lines += [f"certfile {s.certfile}", f"keyfile {s.keyfile}", "tls_version tlsv1.2"]
        if s.cafile:
            lines.append(f"cafile {s.cafile}")
        if s.mutual_tls:
            lines += ["require_certificate true", "use_identity_as_username true"]
    return "\n".join(lines) + "\n"


def _central_names(broker: Broker) -> list[str]:
    names = [MONITOR_USER] if (broker.dir / "monitor.json").is_file() else []
    return names + sorted(p.stem for p in (broker.dir / "central").glob("*.json"))


def _acl(broker: Broker) -> str:
    lines = ["# Generated by edgesmith; one block per user."]
    for name in _central_names(broker):
        lines += [f"user {name}", "topic read edgesmith/#", f"topic write {protocol.TOPIC_ROOT}/+/_monitor/#",
                  f"topic write {protocol.TOPIC_ROOT}/+/+/{contract.DESIRED_TOPIC}",
                  f"topic write {protocol.TOPIC_ROOT}/+/+/{contract.SHADOW_TOPIC}",
                  f"topic write {protocol.TOPIC_ROOT}/+/+/{contract.CAPTURE_TOPIC}", ""]
    for device_file in sorted((broker.dir / "devices").glob("*.json")):
        device = json.loads(device_file.read_text())
        lines.append(f"user {device['username']}")
        for kind in DEVICE_KINDS_WRITTEN:
            lines.append(f"topic write {protocol.topic(device['fleet'], device['device'], kind)}")
        for topic in (contract.DESIRED_TOPIC, contract.SHADOW_TOPIC, contract.CAPTURE_TOPIC):
            lines.append(f"topic read {protocol.topic(device['fleet'], device['device'], topic)}")
        lines.append("")
    return "\n".join(lines)


def _set_password(passwd_tool: str, passwd_file: Path, user: str, password: str) -> None:
    passwd_file.touch(mode=0o600, exist_ok=True)
    result = subprocess.run([passwd_tool, "-b", str(passwd_file), user, password], capture_output=True, text=True)
    if result.returncode != 0:
        raise UserError(f"mosquitto_passwd failed for {user}: {(result.stderr or result.stdout).strip()}")


def _wait_listening(host: str, port: int, timeout: float) -> bool:
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def _reload(broker: Broker) -> None:
    """Make a running broker re-read its password file and ACL."""
    pid = broker.pid()
    if pid is not None:
        os.kill(pid, signal.SIGHUP)


def _client_cert(broker: Broker, settings: BrokerSettings, name: str, out: Path) -> dict[str, str]:
    """With mutual TLS: a client certificate whose Common Name is the login name."""
    if not settings.mutual_tls:
        return {}
    from edgesmith.toolchain.fleet import certs

    issued = certs.issue(broker.tls_dir, name, out)
    return {"certfile": str(issued.cert), "keyfile": str(issued.key)}


def _device_credentials(broker: Broker, settings: BrokerSettings, device: str, fleet: str,
                        password: str) -> dict[str, Any]:
    credentials = {"device": device, "fleet": fleet, "host": settings.device_host, "port": settings.port,
                   "username": device, "password": password, "tls": settings.tls, "cafile": settings.cafile}
    return credentials | _client_cert(broker, settings, device, broker.dir / "devices" / device)


def _refresh_logins(broker: Broker, settings: BrokerSettings) -> None:
    """After the broker's address or TLS changed: every login file says how to connect now, and
    with mutual TLS every login has its certificate."""
    for path in sorted((broker.dir / "devices").glob("*.json")):
        known = json.loads(path.read_text())
        fresh = known | {"host": settings.device_host, "port": settings.port, "tls": settings.tls,
                         "cafile": settings.cafile}
        if settings.mutual_tls and not known.get("certfile"):
            fresh |= _client_cert(broker, settings, known["username"], path.with_suffix(""))
        if fresh != known:
            _write_private(path, json.dumps(fresh, indent=2) + "\n")
    for name in _central_names(broker):
        path = broker.login_file(name)
        known = json.loads(path.read_text())
        if settings.mutual_tls and not known.get("certfile"):
            _write_private(path, json.dumps(known | _client_cert(broker, settings, name, path.with_suffix(""))) + "\n")


def certs(directory: Path, hosts: list[str]) -> dict[str, Any]:
    """Create the fleet CA (first time; kept after) and (re)issue the broker's server certificate
    for ``hosts`` (the names and addresses devices connect to; loopback is always included)."""
    from edgesmith.toolchain.fleet import certs as pki

    broker = Broker(Path(directory).resolve())
    for host in hosts:
        if not host or any(c.isspace() or c in ",/" for c in host) or host in ("0.0.0.0", "::"):
            raise UserError(f"--host {host!r} is not a name or address devices connect to; pass the broker's DNS "
                            "name or IP address (repeat --host for several)")
    with _locked(broker):
        ca = pki.ca_ensure(broker.tls_dir, broker.dir.name)
        server = pki.issue(broker.tls_dir, hosts[0] if hosts else "localhost", broker.tls_dir / "broker",
                           server_hosts=[*hosts, "localhost", "127.0.0.1", "::1"])
    return {"cafile": str(ca.cert), "certfile": str(server.cert), "keyfile": str(server.key),
            "hosts": [*hosts, "localhost", "127.0.0.1", "::1"]}


def up(directory: Path, port: int | None = None, host: str = "127.0.0.1", cafile: str | None = None,
       certfile: str | None = None, keyfile: str | None = None, *, tls: bool = False, mutual_tls: bool = False,
       insecure_plaintext: bool = False, public_host: str | None = None) -> dict[str, Any]:
    """Create (first time) and start the broker; idempotent: a running broker is left running.

    ``tls`` uses the directory's own certificates (`edgesmith broker certs`); ``certfile``/``keyfile``
    (and ``cafile``) name others. A non-loopback address needs TLS or ``insecure_plaintext``."""
    server, passwd_tool = _require_mosquitto()
    broker = Broker(Path(directory).resolve())
    if (certfile is None) != (keyfile is None):
        raise UserError("TLS needs both --certfile and --keyfile")
    if tls or mutual_tls:
        if certfile:
            raise UserError("--tls uses the certificates of `edgesmith broker certs`; leave out --certfile/--keyfile, "
                            "or pass them without --tls")
        own = broker.tls_dir
        if not (own / "broker.crt").is_file():
            raise UserError(f"no broker certificate in {own}; create it first with `edgesmith broker certs --dir "
                            f"{broker.dir} --host <name devices connect to>`")
        cafile, certfile, keyfile = str(own / "ca.crt"), str(own / "broker.crt"), str(own / "broker.key")
    if mutual_tls and not (broker.tls_dir / "ca.key").is_file():
        raise UserError(f"mutual TLS issues each login a certificate from the fleet CA, and {broker.tls_dir} has none; "
                        f"run `edgesmith broker certs --dir {broker.dir}` first")
    broker.dir.mkdir(parents=True, exist_ok=True)
    (broker.dir / "devices").mkdir(exist_ok=True)
    (broker.dir / "central").mkdir(exist_ok=True)
    (broker.dir / "data").mkdir(exist_ok=True)
    with _locked(broker):
        if broker.settings_file.is_file():
            settings = broker.settings()
            if port is not None and port != settings.port:
                raise UserError(f"the broker in {broker.dir} listens on port {settings.port}; stop it and delete "
                                f"{broker.settings_file} to change the port")
            if certfile:
                settings = settings.model_copy(update={"cafile": cafile, "certfile": certfile, "keyfile": keyfile,
                                                       "mutual_tls": mutual_tls})
            if public_host:
                settings = settings.model_copy(update={"public_host": public_host})
        else:
            settings = BrokerSettings(host=host, port=port or _free_port(host), cafile=cafile, certfile=certfile,
                                      keyfile=keyfile, mutual_tls=mutual_tls, public_host=public_host)
        if not is_loopback(settings.host) and not settings.tls and not insecure_plaintext:
            raise UserError(f"the broker would listen on {settings.host} in plaintext, so passwords and desired states "
                            f"would cross the network in clear; create certificates with `edgesmith broker certs --dir "
                            f"{broker.dir} --host <name>` and pass --tls, or say --insecure-plaintext")
        broker.settings_file.write_text(settings.model_dump_json(indent=2) + "\n")
        if not (broker.dir / "monitor.json").is_file():
            password = secrets.token_urlsafe(24)
            _set_password(passwd_tool, broker.dir / "passwd", MONITOR_USER, password)
            _write_private(broker.dir / "monitor.json", json.dumps({"username": MONITOR_USER, "password": password}) + "\n")
        _refresh_logins(broker, settings)
        (broker.dir / "acl").write_text(_acl(broker))
        (broker.dir / "mosquitto.conf").write_text(_config(broker, settings))
    if broker.pid() is None:
        result = subprocess.run([server, "-c", str(broker.dir / "mosquitto.conf"), "-d"], capture_output=True, text=True)
        if result.returncode != 0 or not _wait_listening(settings.host, settings.port, START_TIMEOUT_S):
            log = broker.dir / "mosquitto.log"
            tail = log.read_text().strip().splitlines()[-1:] if log.is_file() else []
            detail = (result.stderr.strip() or (tail[0] if tail else "no message"))
            raise UserError(f"Mosquitto did not start on {settings.host}:{settings.port} ({detail}); see {log}")
    return {"host": settings.host, "port": settings.port, "dir": str(broker.dir), "tls": settings.tls,
            "mutual_tls": settings.mutual_tls, "monitor": broker.monitor_credentials()}


def down(directory: Path, timeout: float = 10.0) -> bool:
    """Stop the broker (it saves its persistence database); False when it was not running."""
    broker = Broker(Path(directory).resolve())
    broker.settings()
    pid = broker.pid()
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except OSError:
            return True
        time.sleep(0.05)
    raise UserError(f"Mosquitto (pid {pid}) did not stop within {timeout:g} s; stop it with `kill {pid}`")


def _await_login(broker: Broker, settings: BrokerSettings, login: dict[str, Any], timeout: float = 10.0) -> None:
    """Wait until a running broker has re-read its password file and ACL and accepts a new login
    (SIGHUP is handled asynchronously; a CONNECT racing it would be refused)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    if broker.pid() is None:
        return
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer: list[bool] = []
        probe = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=login["username"], protocol=mqtt.MQTTv5)
        configure_client(probe, settings, login)
        probe.on_connect = lambda _c, _u, _f, rc, _p: answer.append(not rc.is_failure)
        try:
            probe.connect(host, settings.port, keepalive=10)
            until = time.monotonic() + 2.0
            while not answer and time.monotonic() < until:
                probe.loop(timeout=0.1)
            probe.disconnect()
        except OSError:
            return  # not reachable from here: the client's own retries will tell
        if answer and answer[0]:
            return
        time.sleep(0.05)
    raise UserError(f"the broker in {broker.dir} did not accept the new login {login['username']} within "
                    f"{timeout:g} s; see {broker.dir / 'mosquitto.log'}")


def central_login(directory: Path, name: str) -> dict[str, Any]:
    """The login of one central process (a monitor with its own client id, an ingest worker, one
    `edgesmith deploy`), created the first time: with `use_username_as_clientid` the login name is
    the client id, so two processes sharing a login would take over each other's session."""
    _check_central_name(name)
    broker = Broker(Path(directory).resolve())
    settings = broker.settings()
    path = broker.login_file(name)
    if path.is_file():  # the common case needs no Mosquitto tools here
        return broker.login(name)
    _, passwd_tool = _require_mosquitto()
    with _locked(broker):
        if path.is_file():
            return broker.login(name)
        path.parent.mkdir(exist_ok=True)
        password = secrets.token_urlsafe(24)
        _set_password(passwd_tool, broker.dir / "passwd", name, password)
        login = {"username": name, "password": password} | _client_cert(broker, settings, name, path.with_suffix(""))
        _write_private(path, json.dumps(login) + "\n")
        (broker.dir / "acl").write_text(_acl(broker))
        _reload(broker)
        _await_login(broker, settings, login)
    return login


def remove_central_login(directory: Path, name: str) -> None:
    """Delete a central login (a finished `edgesmith deploy`'s); the monitor's own is kept."""
    _check_central_name(name)
    if name == MONITOR_USER:
        return
    _, passwd_tool = _require_mosquitto()
    broker = Broker(Path(directory).resolve())
    path = broker.login_file(name)
    with _locked(broker):
        if not path.is_file():
            return
        subprocess.run([passwd_tool, "-D", str(broker.dir / "passwd"), name], capture_output=True, text=True)
        for stale in (path, path.with_suffix(".crt"), path.with_suffix(".key")):
            stale.unlink(missing_ok=True)
        (broker.dir / "acl").write_text(_acl(broker))
        _reload(broker)


def add_devices(directory: Path, devices: list[str], fleet: str) -> list[dict[str, Any]]:
    """Provision many new devices at once (load tests, fleet imports): one password-file rewrite
    (``mosquitto_passwd -U`` hashes a plain-text file in place), one ACL write, one reload.
    Devices that exist already in this fleet keep their credentials; one in another fleet refuses
    the whole call, before anything is written (as add_device does)."""
    for device in devices:
        _check_device_id(device)
    _check_id("fleet", fleet)
    _, passwd_tool = _require_mosquitto()
    broker = Broker(Path(directory).resolve())
    settings = broker.settings()
    results, fresh = [], {}
    with _locked(broker):
        elsewhere = []
        for device in devices:
            path = broker.dir / "devices" / f"{device}.json"
            if path.is_file() and json.loads(path.read_text())["fleet"] != fleet:
                elsewhere.append(f"{device} ({json.loads(path.read_text())['fleet']})")
        if elsewhere:  # checked before anything is written: all of them or none
            raise UserError(f"device{'s' if len(elsewhere) > 1 else ''} {', '.join(elsewhere[:5])}"
                            f"{' and more' if len(elsewhere) > 5 else ''} already in another fleet; device ids are "
                            f"unique per broker: choose other ids for fleet {fleet}")
        for device in devices:
            path = broker.dir / "devices" / f"{device}.json"
            if path.is_file():
                results.append({**json.loads(path.read_text()), "credentials": str(path)})
                continue
            password = secrets.token_urlsafe(24)
            fresh[device] = password
            credentials = _device_credentials(broker, settings, device, fleet, password)
            _write_private(path, json.dumps(credentials, indent=2) + "\n")
            results.append({**credentials, "credentials": str(path)})
        if fresh:
            plain = broker.dir / f".passwd.{secrets.token_hex(4)}.tmp"
            _write_private(plain, "".join(f"{user}:{password}\n" for user, password in fresh.items()))
            result = subprocess.run([passwd_tool, "-U", str(plain)], capture_output=True, text=True)
            if result.returncode != 0:
                plain.unlink(missing_ok=True)
                raise UserError(f"mosquitto_passwd -U failed: {(result.stderr or result.stdout).strip()}")
            with open(broker.dir / "passwd", "a") as out:
                out.write(plain.read_text())
            plain.unlink()
            (broker.dir / "acl").write_text(_acl(broker))
            _reload(broker)
    return results


def add_device(directory: Path, device: str, fleet: str, rotate: bool = False) -> dict[str, Any]:
    """Create a device's login and ACL; write and return its credentials (what the agent reads)."""
    _check_device_id(device)
    _check_id("fleet", fleet)
    _, passwd_tool = _require_mosquitto()
    broker = Broker(Path(directory).resolve())
    settings = broker.settings()
    path = broker.dir / "devices" / f"{device}.json"
    with _locked(broker):
        if path.is_file():
            existing = json.loads(path.read_text())
            if existing["fleet"] != fleet:
                raise UserError(f"device {device} is already in fleet {existing['fleet']}; device ids are unique per "
                                "broker")
            if not rotate:
                return {**existing, "credentials": str(path)}
        password = secrets.token_urlsafe(24)
        _set_password(passwd_tool, broker.dir / "passwd", device, password)
        credentials = _device_credentials(broker, settings, device, fleet, password)
        _write_private(path, json.dumps(credentials, indent=2) + "\n")
        (broker.dir / "acl").write_text(_acl(broker))
        _reload(broker)
    return {**credentials, "credentials": str(path)}
