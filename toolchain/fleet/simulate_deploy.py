"""A simulated device that applies desired states as docs/deployment.md specifies (§2, §4, §5), in
Python: it stands in for the C++ agent (``edgesmith-agent``, csrc/deploy/) in the central side's
tests. It really verifies the envelope against its deploy keys, refuses replays, downloads the
archive with ``Range`` resumes, checks its SHA-256, extracts it under the §1 member rules, verifies
the artifact with the runtime's verifier against its build keys, switches slots with a symlink
flip, and reports ``state``/``event`` messages and a new birth. The one thing it cannot do is run
the model: its golden self-test passes unless the device is told to fail it (``fail_self_test``).
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import tarfile
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from edgesmith.runtime import artifact as runtime_artifact
from edgesmith.runtime.errors import Error as RuntimeErrorBase
from edgesmith.toolchain.deploy import desired
from edgesmith.toolchain.fleet import protocol
from edgesmith.toolchain.fleet.simulate import SimArtifact, SimulatedDevice


class DeployFailure(Exception):
    def __init__(self, phase: str, message: str):
        super().__init__(message)
        self.phase = phase


class DeployingDevice(SimulatedDevice):
    """``start()`` connects (birth, state), subscribes to its desired topic and applies what comes."""

    def __init__(self, credentials: dict[str, Any], data_dir: Path, factory: Path, deploy_keys: list[bytes],
                 build_keys: list[bytes], fail_self_test: bool = False, max_bytes: int = 512 << 20, **kwargs: Any):
        self.factory = Path(factory)
        super().__init__(credentials, SimArtifact.of_manifest((self.factory / "manifest.json").read_bytes()), **kwargs)
        self.root = Path(data_dir) / "deploy"
        (self.root / "slots").mkdir(parents=True, exist_ok=True)
        (self.root / "staging").mkdir(exist_ok=True)
        self.deploy_keys, self.build_keys = deploy_keys, build_keys
        self.fail_self_test = fail_self_test
        self.max_bytes = max_bytes
        self.highest_version = 0
        self.slots: dict[str, dict[str, Any]] = {}  # slot -> {manifest_sha256, name, status}
        self.current: str | None = None  # None: the factory artifact
        self.last: dict[str, Any] = {}
        self.work: queue.Queue[bytes | None] = queue.Queue()
        self.worker = threading.Thread(target=self._work, name=f"deploy-{self.device}", daemon=True)

    # ---- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> DeployingDevice:
        self.connect()
        self.report_state()
        self.worker.start()
        self.subscribe(desired.desired_topic(self.fleet, self.device))
        return self

    def stop(self) -> None:
        self.work.put(None)
        self.worker.join(timeout=30)
        if self.client is not None:
            self.shutdown()

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == desired.desired_topic(self.fleet, self.device):
            self.work.put(bytes(msg.payload))  # applied on the worker: it publishes and waits for PUBACKs
        else:
            super()._on_message(client, userdata, msg)

    def _work(self) -> None:
        while (payload := self.work.get()) is not None:
            if payload:  # an empty retained payload is a cleared topic: ignored
                self.apply(payload)

    # ---- reports (§5) ----------------------------------------------------------------------------------

    def _details(self) -> dict[str, Any]:
        other = "b" if self.current == "a" else "a"
        previous = self.slots.get(other)
        return {"slot": self.current, "artifact": self.artifact.name, "desired_version": self.highest_version,
                "deployment_id": None, "result": None, "phase": None, "error": None,
                "previous_slot": {"slot": other, "artifact_sha256": previous["manifest_sha256"]} if previous else None,
                **self.last}

    def report_state(self) -> None:
        self.send(protocol.State(**self._envelope(False), artifact_sha256=self.artifact.sha256, details=self._details()))

    def _event(self, name: str, message: str) -> None:
        self.send(protocol.Event(**self._envelope(False), event=name, message=message, details=self._details()))

    def _report(self, deployment_id: str | None, result: str, phase: str | None = None, error: str | None = None,
                event: str | None = None) -> None:
        self.last = {"deployment_id": deployment_id, "result": result, "phase": phase, "error": error}
        self.report_state()
        self._event(event or f"deploy.{result}" if result != "in-progress" else "deploy.started",
                    error or f"deployment {deployment_id}: {result}")

    # ---- applying a desired state (§4) -------------------------------------------------------------------

    def apply(self, payload: bytes) -> None:
        try:
            state = desired.verify(payload, self.deploy_keys)
        except ValueError as e:
            self._report(_unverified_id(payload), "refused", error=str(e))
            return
        dep = state["deployment_id"]
        if (state["fleet"], state["device"]) != (self.fleet, self.device):
            self._report(dep, "refused", error="the desired state is for another device")
            return
        if state["version"] <= self.highest_version:
            self._report(dep, "refused", error=f"version {state['version']} is not above {self.highest_version}")
            return
        art = state["artifact"]
        other = "b" if self.current == "a" else "a"
        inactive = self.slots.get(other)
        if state["action"] == "deploy" and inactive and inactive["manifest_sha256"] == art["manifest_sha256"]:
            self._report(dep, "refused", error="that is the previous slot's artifact; going back needs a rollback")
            return
        self.highest_version = state["version"]
        if art["manifest_sha256"] == self.artifact.sha256:  # already serving it: nothing to do (as the C++ agent)
            self._report(dep, "applied")
            return
        self._report(dep, "in-progress", phase="download")
        try:
            if state["action"] == "rollback" and inactive and inactive["status"] == "good" \
                    and inactive["manifest_sha256"] == art["manifest_sha256"]:
                slot_dir = self.root / "slots" / other  # switches without downloading
            else:
                slot_dir = self._install(art, other)
        except DeployFailure as e:
            shutil.rmtree(self.root / "staging", ignore_errors=True)
            (self.root / "staging").mkdir()
            self._report(dep, "failed", phase=e.phase, error=str(e))
            return
        self._switch(other, slot_dir)
        self._report(dep, "applied", event="deploy.rolled-back" if state["action"] == "rollback" else "deploy.applied")

    def _install(self, art: dict[str, Any], slot: str) -> Path:
        part = self.root / "staging" / f"{art['sha256']}.tar.part"
        self._download(art["url"], part)
        digest = hashlib.sha256(part.read_bytes()).hexdigest()
        if digest != art["sha256"]:
            part.unlink()
            raise DeployFailure("verify", f"the archive's SHA-256 is {digest}, not {art['sha256']}")
        staging = self.root / "staging" / "slot"
        shutil.rmtree(staging, ignore_errors=True)
        _extract(part, staging)
        part.unlink()
        try:
            runtime_artifact.verify(staging, self.build_keys)
        except RuntimeErrorBase as e:
            raise DeployFailure("verify", str(e)) from None
        manifest = (staging / "manifest.json").read_bytes()
        if hashlib.sha256(manifest).hexdigest() != art["manifest_sha256"]:
            raise DeployFailure("verify", "the archive's manifest.json is not the desired state's manifest_sha256")
        if self.fail_self_test:
            raise DeployFailure("self-test", "golden self-test failed: output 0 differs from the golden output")
        target = self.root / "slots" / slot
        shutil.rmtree(target, ignore_errors=True)
        os.rename(staging, target)
        self.slots[slot] = {"manifest_sha256": art["manifest_sha256"], "name": art["name"], "status": "good"}
        return target

    def _download(self, url: str, part: Path) -> None:
        have = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                if have and response.status != 206:
                    have = 0  # the server sent it whole
                length = int(response.headers.get("Content-Length", 0))
                if have + length > self.max_bytes:
                    raise DeployFailure("download", f"the archive ({have + length} bytes) exceeds deploy_max_bytes")
                with open(part, "ab" if have else "wb") as out:
                    while chunk := response.read(1 << 16):
                        out.write(chunk)
                        if out.tell() > self.max_bytes:
                            raise DeployFailure("download", "the archive exceeds deploy_max_bytes")
        except (urllib.error.URLError, OSError) as e:
            raise DeployFailure("download", f"downloading {url} failed ({e})") from None

    def _switch(self, slot: str, slot_dir: Path) -> None:
        tmp = self.root / "current.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(Path("slots") / slot)
        os.replace(tmp, self.root / "current")
        self.current = slot
        self.artifact = SimArtifact.of_manifest((slot_dir / "manifest.json").read_bytes())
        self.send(self.birth())  # the same session (bdSeq), naming the artifact that now serves


def _unverified_id(payload: bytes) -> str | None:
    try:
        value = json.loads(json.loads(payload)["signed"]).get("deployment_id")
        return value if isinstance(value, str) else None
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _extract(archive: Path, into: Path) -> None:
    """§1's member rules: regular files and directories only, relative names without '..'."""
    into.mkdir(parents=True)
    seen: set[str] = set()
    with tarfile.open(archive, format=tarfile.USTAR_FORMAT) as tar:
        for member in tar.getmembers():
            name = member.name.rstrip("/")
            if not (member.isfile() or member.isdir()) or name.startswith("/") or ".." in name.split("/") \
                    or name in seen or len(name.encode()) > 255:
                raise DeployFailure("verify", f"archive member {member.name!r} is not allowed")
            seen.add(name)
            path = into / name
            if member.isdir():
                path.mkdir(parents=True, exist_ok=True)
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            assert source is not None
            with open(path, "xb") as out:
                shutil.copyfileobj(source, out)
