"""``edgesmith capture start|stop|upload``: signed capture states, one per device, published retained
on ``edgesmith/v1/<fleet>/<device>/capture-desired`` (docs/capture.md).

``start`` gives each device a fresh random upload token, and records only its SHA-256 with the
capture's budget in the receiver's store (the grant the receiver checks every upload against).
Versions are the capture states' own counter: above the retained one (only central logins write
that topic). The rollout's FleetWatch finds the broker, logs in and waits for retained messages;
this adds the capture-desired topic to what it follows.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from edgesmith.runtime import contract
from edgesmith.runtime.capture import url_https_or_loopback
from edgesmith.toolchain.capture.store import CaptureStore
from edgesmith.toolchain.deploy import desired
from edgesmith.toolchain.deploy.rollout import PUBLISH_TIMEOUT_S, FleetWatch, fleet_devices
from edgesmith.toolchain.errors import UserError
from edgesmith.toolchain.fleet import protocol
from edgesmith.toolchain.fleet.broker import Broker
from edgesmith.toolchain.signing import SigningKey

DRIFT_ALERT = "drift"
DEFAULT_DRIFT_RATE = 0.2


def parse_policy(text: str) -> dict[str, Any]:
    """``drift[:RATE],low-confidence:T,uniform:R,disagreement`` → contract.CapturePolicy fields."""
    policy: dict[str, Any] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, _, value = part.partition(":")
        try:
            if name == "uniform" and value:
                policy["uniform"] = float(value)
            elif name == "low-confidence" and value:
                policy["low_confidence"] = float(value)
            elif name == "drift":
                policy["drift"] = True
                policy["drift_rate"] = float(value) if value else DEFAULT_DRIFT_RATE
            elif name == "disagreement" and not value:
                policy["disagreement"] = True
            else:
                raise ValueError
        except ValueError:
            raise UserError(f"--policy part {part!r} is not one of: uniform:RATE, low-confidence:THRESHOLD, "
                            "drift[:RATE], disagreement (e.g. drift,low-confidence:0.6,uniform:0.01)") from None
    try:
        contract.CapturePolicy.model_validate(policy)
    except ValueError as e:
        raise UserError(f"--policy {text!r}: {str(e).splitlines()[-1].strip()}; rates and thresholds are between 0 and 1") from None
    if not policy:
        raise UserError("--policy is empty; give e.g. drift,low-confidence:0.6,uniform:0.01")
    return policy


@dataclass
class CaptureWatch(FleetWatch):
    """FleetWatch that also follows the retained capture states (their versions)."""

    capture_versions: dict[str, int] = field(default_factory=dict)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, props: Any) -> None:
        if reason_code.is_failure:
            super()._on_connect(client, userdata, flags, reason_code, props)
            return
        client.subscribe([(f"{protocol.TOPIC_ROOT}/{self.fleet}/+/{contract.CAPTURE_TOPIC}", 1)])

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        parts = protocol.parse_topic(msg.topic)
        if parts is None or not msg.payload or parts[2] != contract.CAPTURE_TOPIC:
            return
        version = desired.version_of(msg.payload)
        if version is not None:
            with self.changed:
                self.capture_versions[parts[1]] = max(version, self.capture_versions.get(parts[1], 0))

    def publish_capture(self, fleet: str, device: str, envelope: bytes) -> None:
        info = self.client.publish(desired.capture_topic(fleet, device), envelope, qos=1, retain=True)
        info.wait_for_publish(PUBLISH_TIMEOUT_S)
        if not info.is_published():
            raise UserError(f"the broker did not acknowledge the capture state for {device} within {PUBLISH_TIMEOUT_S:g} s")


@dataclass
class CaptureCommand:
    fleet: str
    broker_dir: Path
    key: SigningKey
    devices: list[str] | None = None


def drifted_devices(fleet: str, db_url: str | None) -> set[str]:
    """Devices of ``fleet`` with an active drift alert in the monitor's store."""
    from edgesmith.toolchain.fleet.store import Store, default_url

    store = Store.open(db_url or default_url(), create=False)
    return {a["device"] for a in store.alerts(active_only=True) if a["fleet"] == fleet and a["alert"] == DRIFT_ALERT}


def publish(command: CaptureCommand, action: contract.CaptureAction, store: CaptureStore, *, receiver: str,
            capture_id: str | None = None, policy: dict[str, Any] | None = None, drifted: set[str] | None = None,
            max_samples: int = 500, max_bytes: int = 64 << 20, retention_s: int = 7 * 24 * 3600,
            valid_for_s: int = desired.DESIRED_VALIDITY_S) -> tuple[str, dict[str, int]]:
    """Sign and publish one capture state per device; returns (capture id, {device: version}).

    ``start`` issues new tokens and grants; ``stop`` and ``upload`` name an existing capture (the
    newest one of each device when ``capture_id`` is None), repeat its policy and budget, and carry
    no token: the device keeps the one ``start`` gave it, so it can still upload after a stop."""
    if not receiver.startswith(("http://", "https://")):
        raise UserError(f"--receiver {receiver} is not an http:// or https:// URL; devices upload only over those")
    if not url_https_or_loopback(receiver):  # the device's own rule (csrc/common/url.h)
        raise UserError(f"--receiver {receiver} is plain http:// to a host other than the loopback, so the devices' upload "
                        "tokens would travel in clear and devices refuse it; serve the receiver over https:// "
                        "(`edgesmith capture serve --tls-cert`)")
    broker = Broker(Path(command.broker_dir).resolve())
    names = fleet_devices(broker, command.fleet, command.devices)
    capture_id = capture_id or (desired.new_capture_id() if action == contract.CaptureAction.START else None)
    grants = {}
    for device in names:
        if action == contract.CaptureAction.START:
            continue
        grant = store.latest_grant(command.fleet, device) if capture_id is None else \
            store.find_grant(command.fleet, device, capture_id)
        if grant is None:
            raise UserError(f"device {device} has no capture {capture_id or ''} to {action.value}".replace("  ", " ")
                            + f"; start one with `edgesmith capture start --fleet {command.fleet} --devices {device}`")
        grants[device] = grant
    watch = CaptureWatch(broker, command.fleet).start()
    versions: dict[str, int] = {}
    try:
        issued = int(time.time() * 1000)
        for device in names:
            device_policy = dict(policy or {})
            if device_policy.get("drift") and drifted is not None and device not in drifted:
                device_policy["drift"], device_policy["drift_rate"] = False, 0.0  # only flagged devices
            if action == contract.CaptureAction.START:
                token: str | None = secrets.token_hex(32)  # the device gets it; the store keeps its SHA-256
                store.grant(command.fleet, device, capture_id, token, max_samples, max_bytes,
                            issued // 1000 + valid_for_s + retention_s, json.dumps(device_policy), retention_s)
                cid, samples, size, keep = capture_id, max_samples, max_bytes, retention_s
            else:  # a whole capture state again (the retained one replaces start's): the same policy and budget
                token, grant = None, grants[device]
                cid, samples, size, keep = grant.capture_id, grant.max_samples, grant.max_bytes, grant.retention_s
                device_policy = json.loads(grant.policy)
            with watch.changed:
                retained = watch.capture_versions.get(device, 0)
            version = store.reserve_version(command.fleet, device, retained)
            state = desired.capture_state(command.fleet, device, version, cid, action.value, upload_url=receiver,
                                          upload_token=token, policy=device_policy, max_samples=samples,
                                          max_bytes=size, retention_s=keep, issued_at_ms=issued, valid_for_s=valid_for_s)
            watch.publish_capture(command.fleet, device, desired.sign(state, command.key, domain=desired.CAPTURE_DOMAIN))
            versions[device] = version
    finally:
        watch.stop()
    return capture_id or next(iter(grants.values())).capture_id, versions
