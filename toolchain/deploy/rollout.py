"""Staged rollout and rollback over the fleet's broker (docs/deployment.md §6).

The rollout learns what devices report by subscribing to the fleet's topics itself (paho, the
monitor's login, a session of its own that the broker keeps across reconnects): retained births
say what each device serves before the deployment (a rollback's target), retained desired states
say the last version published, and ``state``/``event`` messages carrying the deployment id say
how it went. It does not need a monitor running; it records everything in the monitor's store,
which a running monitor also updates from the same messages. It never assumes a desired state took
effect: a device that does not report within the wave's time-out counts as failed.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import ValidationError

from edgesmith.runtime.contract import DESIRED_TOPIC, SHADOW_TOPIC, DeployResult
from edgesmith.runtime.contract import MessageKind as K
from edgesmith.toolchain.deploy import desired
from edgesmith.toolchain.deploy.archive import ArchiveInfo, lookup, monitoring
from edgesmith.toolchain.errors import UserError
from edgesmith.toolchain.fleet import broker as fleet_broker
from edgesmith.toolchain.fleet import protocol
from edgesmith.toolchain.fleet.broker import Broker
from edgesmith.toolchain.fleet.store import Store
from edgesmith.toolchain.fleet.store import deployments as history
from edgesmith.toolchain.fleet.store.deployments import FINAL_RESULTS, TargetResult, deploy_report
from edgesmith.toolchain.signing import SigningKey

CONNECT_TIMEOUT_S = 15.0
RETAINED_SETTLE_S = 1.0  # after SUBACK, for the broker's retained births and desired states to arrive
PUBLISH_TIMEOUT_S = 15.0
SESSION_EXPIRY_S = 3600  # how long the broker keeps a disconnected rollout's session (and queues reports for it)


def parse_share(text: str, what: str) -> float:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*%\s*", text)
    if not match or not 0 <= float(match[1]) <= 100:
        raise UserError(f"{what} {text!r} is not a percentage; write e.g. 20%")
    return float(match[1]) / 100


def parse_waves(text: str) -> list[float]:
    shares = [parse_share(part, "--waves entry") for part in text.split(",")]
    if any(s <= 0 for s in shares) or any(b <= a for a, b in zip(shares, shares[1:])) or shares[-1] != 1.0:
        raise UserError(f"--waves {text!r} must be increasing shares of the fleet above 0% ending at 100%, "
                        "e.g. 10%,50%,100%")
    return shares


def plan_waves(devices: list[str], shares: list[float]) -> list[tuple[float, list[str]]]:
    """Cumulative shares → the devices each wave adds (at least one; waves adding none are dropped)."""
    waves, done = [], 0
    for share in shares:
        upto = max(done + 1, math.ceil(share * len(devices) - 1e-9)) if done < len(devices) else done
        upto = min(upto, len(devices))
        if upto > done:
            waves.append((share, devices[done:upto]))
            done = upto
    return waves


def fleet_devices(broker: Broker, fleet: str, only: list[str] | None) -> list[str]:
    """The fleet's provisioned devices (the broker's logins), or the named subset of them."""
    broker.settings()  # a directory that is no broker's: one sentence saying so
    provisioned = sorted(json.loads(p.read_text())["device"] for p in (broker.dir / "devices").glob("*.json")
                         if json.loads(p.read_text()).get("fleet") == fleet)
    if only:
        unknown = [d for d in only if d not in provisioned]
        if unknown:
            raise UserError(f"device {unknown[0]} is not provisioned in fleet {fleet} on the broker in {broker.dir}; "
                            f"its devices: {', '.join(provisioned) or 'none'}")
        return list(dict.fromkeys(only))
    if not provisioned:
        raise UserError(f"fleet {fleet} has no devices on the broker in {broker.dir}; add them with "
                        f"`edgesmith broker add-device --fleet {fleet}`")
    return provisioned


@dataclass
class Report:
    result: str
    phase: str | None = None
    error: str | None = None
    slot: str | None = None


@dataclass
class FleetWatch:
    """One MQTT client following a fleet's births, desired states and deployment reports."""

    broker: Broker
    fleet: str
    births: dict[str, protocol.ArtifactRef] = field(default_factory=dict)
    birth_messages: dict[str, protocol.Birth] = field(default_factory=dict)  # target and runtime too (shadows)
    retained_versions: dict[str, int] = field(default_factory=dict)
    retained_shadow_versions: dict[str, int] = field(default_factory=dict)  # shadow states' own counter
    reported_versions: dict[str, int] = field(default_factory=dict)
    reports: dict[tuple[str, str], Report] = field(default_factory=dict)  # (deployment id, device)
    shadow_events: dict[tuple[str, str], str] = field(default_factory=dict)  # (shadow id, device): the newest, said

    def __post_init__(self) -> None:
        settings = self.broker.settings()
        if not (self.broker.dir / "monitor.json").is_file():
            raise UserError(f"no monitor login in {self.broker.dir / 'monitor.json'}; run `edgesmith broker up --dir "
                            f"{self.broker.dir}` first")
        # Its own login (= its client id at the broker), removed again by stop(): concurrent
        # deployments and the monitor never take over each other's session.
        self.login_name = f"{fleet_broker.CENTRAL_PREFIX}deploy-{secrets.token_hex(4)}"
        credentials = fleet_broker.central_login(self.broker.dir, self.login_name)
        self.changed = threading.Condition()
        self._subscribed = threading.Event()
        self._refused: str | None = None
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.login_name, protocol=mqtt.MQTTv5)
        fleet_broker.configure_client(self.client, settings, credentials)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_message
        self.settings = settings

    def start(self) -> FleetWatch:
        try:
            # A session the broker keeps while this client is away (reconnects after a network drop or a broker
            # restart; the broker persists it), so device reports sent in the gap are delivered, not lost.
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = SESSION_EXPIRY_S
            self.client.connect(self.settings.host, self.settings.port, keepalive=30, clean_start=False,
                                properties=props)
        except OSError as e:
            fleet_broker.remove_central_login(self.broker.dir, self.login_name)
            raise UserError(f"cannot reach the broker at {self.settings.host}:{self.settings.port} ({e.strerror or e}); "
                            f"start it with `edgesmith broker up --dir {self.broker.dir}`") from None
        self.client.loop_start()
        if not self._subscribed.wait(CONNECT_TIMEOUT_S):
            self.stop()
            raise UserError(self._refused or f"the broker at {self.settings.host}:{self.settings.port} did not accept "
                            "the deployment's subscription in time")
        time.sleep(RETAINED_SETTLE_S)
        return self

    def stop(self) -> None:
        props = Properties(PacketTypes.DISCONNECT)
        props.SessionExpiryInterval = 0  # nobody resumes this client's session: the broker may drop it now
        self.client.disconnect(properties=props)
        self.client.loop_stop()
        fleet_broker.remove_central_login(self.broker.dir, self.login_name)

    def _on_connect(self, client: mqtt.Client, _userdata: Any, _flags: Any, reason_code: Any, _props: Any) -> None:
        if reason_code.is_failure:
            self._refused = (f"the broker refused the monitor login ({reason_code}); check "
                             f"{self.broker.dir / 'monitor.json'} belongs to this broker")
            return
        root = f"{protocol.TOPIC_ROOT}/{self.fleet}/+"
        client.subscribe([(f"{root}/{kind}", 1) for kind in (K.BIRTH, K.STATE, K.EVENT, DESIRED_TOPIC, SHADOW_TOPIC)])

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        parts = protocol.parse_topic(msg.topic)
        if parts is None or not msg.payload:
            return
        _, device, kind = parts
        if kind in (DESIRED_TOPIC, SHADOW_TOPIC):
            version = desired.version_of(msg.payload)
            versions = self.retained_versions if kind == DESIRED_TOPIC else self.retained_shadow_versions
            if version is not None:
                with self.changed:
                    versions[device] = max(version, versions.get(device, 0))
            return
        try:
            message = protocol.parse_message(msg.payload)
        except (ValidationError, ValueError):
            return
        if (message.fleet, message.device, message.kind) != (self.fleet, device, kind):
            return
        with self.changed:
            if kind == K.BIRTH:
                self.births[device] = message.artifact
                self.birth_messages[device] = message
            elif kind == K.EVENT and message.shadow_report() is not None:
                shadow = message.shadow_report()
                self.shadow_events[(shadow.shadow_id, device)] = (
                    f"{message.event}" + (f" (candidate {shadow.candidate})" if shadow.candidate is not None else "")
                    + (f": {shadow.error}" if shadow.error else f": {message.message}" if message.message else ""))
            else:
                said = message.details if kind == K.STATE else message.deploy_report()
                version = said.desired_version if said is not None else None
                if version is not None:  # a claim: clamped to what the store issued when used (version_floor)
                    self.reported_versions[device] = max(version, self.reported_versions.get(device, 0))
                report = deploy_report(message)
                if report is not None:
                    key = (report["deployment_id"], device)
                    known = self.reports.get(key)
                    if known is None or known.result not in FINAL_RESULTS or report["result"] in FINAL_RESULTS:
                        self.reports[key] = Report(report["result"], report["phase"], report["error"], report["slot"])
            self.changed.notify_all()

    def publish_desired(self, fleet: str, device: str, envelope: bytes) -> None:
        self.publish_retained(desired.desired_topic(fleet, device), envelope, f"the desired state for {device}")

    def publish_shadow(self, fleet: str, device: str, envelope: bytes) -> None:
        self.publish_retained(desired.shadow_topic(fleet, device), envelope, f"the shadow state for {device}")

    def publish_retained(self, topic: str, envelope: bytes, what: str) -> None:
        info = self.client.publish(topic, envelope, qos=1, retain=True)
        try:
            info.wait_for_publish(PUBLISH_TIMEOUT_S)
        except (RuntimeError, ValueError) as e:
            raise UserError(f"{what} could not be published ({e}); is the broker up?") from None
        if not info.is_published():
            raise UserError(f"the broker did not acknowledge {what} within {PUBLISH_TIMEOUT_S:g} s")

    def version_floor(self, device: str, issued: int) -> int:
        """What the next version must exceed: the retained desired state's (only central logins
        write it), and the device's reported one clamped to ``issued``, what the store has issued:
        a device claiming 2**63 cannot push versions past what the store can hold."""
        with self.changed:
            return max(self.retained_versions.get(device, 0), min(self.reported_versions.get(device, 0), issued))

    def wait(self, deployment_id: str, devices: list[str], deadline: float,
             on_report: Callable[[str, Report], None]) -> dict[str, Report]:
        """Until every device reported a final result for the deployment, or the deadline; calls
        ``on_report`` for every new report (in-progress ones too). Returns the final ones."""
        seen: dict[str, Report] = {}
        while True:
            with self.changed:
                fresh = [(d, self.reports[(deployment_id, d)]) for d in devices
                         if (deployment_id, d) in self.reports and seen.get(d) != self.reports[(deployment_id, d)]]
                if not fresh:
                    remaining = deadline - time.monotonic()
                    done = all(seen.get(d) is not None and seen[d].result in FINAL_RESULTS for d in devices)
                    if done or remaining <= 0:
                        return {d: r for d, r in seen.items() if r.result in FINAL_RESULTS}
                    self.changed.wait(min(remaining, 1.0))
                    continue
            for device, report in fresh:
                seen[device] = report
                on_report(device, report)


@dataclass
class RolloutConfig:
    fleet: str
    broker_dir: Path
    shares: list[float]
    abort_on_failure: float
    wave_timeout_s: float
    key: SigningKey
    base_url: str
    store_dir: Path
    devices: list[str] | None = None


@dataclass
class RolloutResult:
    deployment_id: str
    status: str  # completed | rolled-back | aborted
    targeted: int = 0
    applied: int = 0
    failed: int = 0
    skipped: int = 0
    rollback_id: str | None = None
    rollback_failed: int = 0


Say = Callable[[str], None]
APPLIED = DeployResult.APPLIED


def _previous_of(watch: FleetWatch, served: dict[str, dict[str, Any]], device: str) -> tuple[str | None, str | None]:
    birth = watch.births.get(device)
    if birth is not None:
        return birth.manifest_sha256, birth.name
    row = served.get(device)
    return (row["manifest_sha256"], row["artifact"]) if row and row["manifest_sha256"] else (None, None)


def deploy(archive: ArchiveInfo, config: RolloutConfig, store: Store, say: Say) -> RolloutResult:
    """Publish the artifact's desired state wave by wave; abort and roll back past the threshold."""
    broker = Broker(Path(config.broker_dir).resolve())
    names = fleet_devices(broker, config.fleet, config.devices)
    history.ensure_tables(store)
    watch = FleetWatch(broker, config.fleet).start()
    try:
        served = history.served_artifacts(store, config.fleet)
        previous = {d: _previous_of(watch, served, d) for d in names}
        skipped = [d for d in names if previous[d][0] == archive.manifest_sha256]
        targets = [d for d in names if d not in skipped]
        # An abort must be able to put every device back: their current artifacts must be servable. A
        # device whose birth names an artifact the store does not hold (unknown, or a false claim) is
        # skipped with a warning; it never blocks the rollout to the others.
        unknown = [d for d in targets if previous[d][0] is not None and lookup(previous[d][0], config.store_dir) is None]
        targets = [d for d in targets if d not in unknown]
        deployment_id = desired.new_deployment_id()
        result = RolloutResult(deployment_id, "completed", skipped=len(skipped) + len(unknown))
        for device in skipped:
            say(f"  {device}: already serves {archive.name}; left alone")
        for device in unknown:
            sha, name = previous[device]
            say(f"  warning: {device} says it serves {name} (manifest {sha[:12]}…), whose archive the artifact store "
                f"{config.store_dir} does not hold, so an abort could not roll it back: skipped; pass that artifact's "
                "directory with --previous DIR to include it")
        if not targets:
            say(f"every device already serves {archive.name}; nothing to deploy" if not unknown else
                f"no device can be deployed to ({len(unknown)} skipped as serving unknown artifacts); nothing to deploy")
            return result
        waves = plan_waves(targets, config.shares)
        history.record_manifest(store, archive.manifest_sha256, monitoring(archive))  # the model group's layout
        history.create_deployment(store, {
            "id": deployment_id, "fleet": config.fleet, "action": "deploy", "rolls_back": None,
            "artifact": archive.name, "archive_sha256": archive.sha256, "manifest_sha256": archive.manifest_sha256,
            "model": archive.model, "model_version": archive.model_version, "model_uri": archive.model_uri,
            "url": desired.artifact_url(config.base_url, archive.sha256), "key_id": config.key.key_id,
            "waves": json.dumps([round(s, 4) for s, _ in waves]), "abort_on_failure": config.abort_on_failure},
            waves)
        say(f"deployment {deployment_id}: {archive.name} to {len(targets)} device(s) of {config.fleet} in "
            f"{len(waves)} wave(s), abort above {config.abort_on_failure:.0%} failed")
        say(f"  archive {desired.artifact_url(config.base_url, archive.sha256)} ({archive.size} bytes), "
            f"deploy key {config.key.key_id}")
        outcome: dict[str, Report] = {}
        targeted: list[str] = []
        try:
            _run_waves(watch, store, config, archive, deployment_id, waves, previous, outcome, targeted, result, say)
            _conclude(watch, store, config, deployment_id, previous, outcome, targeted, result, say)
        except KeyboardInterrupt:
            history.finish(store, deployment_id, "interrupted", f"stopped by the user after {len(targeted)} of "
                           f"{len(targets)} devices were sent it; their desired states stay published "
                           f"(`edgesmith rollback --fleet {config.fleet}` undoes them)")
            raise
        except Exception as e:  # a lost broker, a store error, …: the deployment must not stay `running`
            error = str(e) if isinstance(e, UserError) else f"deployment {deployment_id} stopped: {e}"
            history.finish(store, deployment_id, "failed", f"{error} (after {len(targeted)} of {len(targets)} devices "
                           f"were sent it; `edgesmith rollback --fleet {config.fleet}` undoes them)")
            raise UserError(error) from None
        return result
    finally:
        watch.stop()


def _run_waves(watch: FleetWatch, store: Store, config: RolloutConfig, archive: ArchiveInfo, deployment_id: str,
               waves: list[tuple[float, list[str]]], previous: dict[str, tuple[str | None, str | None]],
               outcome: dict[str, Report], targeted: list[str], result: RolloutResult, say: Say) -> None:
    for number, (share, wave_devices) in enumerate(waves, 1):
        history.update_wave(store, deployment_id, number, status="running", started_ms=_ms())
        say(f"wave {number}/{len(waves)} ({share:.0%}): {', '.join(wave_devices)}")
        for device in wave_devices:
            version = history.reserve_version(
                store, config.fleet, device,
                watch.version_floor(device, history.issued_version(store, config.fleet, device)))
            state = desired.desired_state(config.fleet, device, version, deployment_id, "deploy", archive,
                                          config.base_url)
            history.add_target(store, deployment_id, config.fleet, device, number, version, previous[device])
            watch.publish_desired(config.fleet, device, desired.sign(state, config.key))
        targeted += wave_devices
        final = _wait_and_record(watch, store, deployment_id, wave_devices, config.wave_timeout_s, say)
        outcome.update(final)
        applied = sum(1 for d in wave_devices if final[d].result == APPLIED)
        history.update_wave(store, deployment_id, number, status="done", finished_ms=_ms(), applied=applied,
                            failed=len(wave_devices) - applied)
        failed_so_far = sum(1 for d in targeted if outcome[d].result != APPLIED)
        share_failed = failed_so_far / len(targeted)
        say(f"wave {number}: {applied} applied, {len(wave_devices) - applied} failed; "
            f"{failed_so_far} of {len(targeted)} targeted failed ({share_failed:.0%})")
        if share_failed > config.abort_on_failure:
            history.update_wave(store, deployment_id, number, status="aborted")
            for later in range(number + 1, len(waves) + 1):
                history.update_wave(store, deployment_id, later, status="skipped")
            say(f"ABORT: {share_failed:.0%} failed > {config.abort_on_failure:.0%}; rolling back")
            result.status = "aborted"
            return


def _conclude(watch: FleetWatch, store: Store, config: RolloutConfig, deployment_id: str,
              previous: dict[str, tuple[str | None, str | None]], outcome: dict[str, Report], targeted: list[str],
              result: RolloutResult, say: Say) -> None:
    """Count the results; after an abort, roll back. Records the deployment's final status."""
    result.targeted = len(targeted)
    result.applied = sum(1 for d in targeted if outcome[d].result == APPLIED)
    result.failed = len(targeted) - result.applied
    if result.status != "aborted":
        history.finish(store, deployment_id, "completed", f"{result.applied} of {result.targeted} devices applied it")
        return
    # Devices that applied it go back; so do silent ones, which may still apply it late (a newer
    # desired state supersedes the deployment's).
    back = [d for d in targeted if outcome[d].result in (APPLIED, TargetResult.TIMEOUT)]
    rollback = _roll_back(watch, store, config, deployment_id, {d: previous[d] for d in back}, say)
    if rollback is not None:
        result.rollback_id, result.rollback_failed = rollback
    result.status = "rolled-back" if rollback is not None and rollback[1] == 0 else "aborted"
    history.finish(store, deployment_id, result.status, f"{result.failed} of {result.targeted} targeted devices "
                   f"failed; rolled back by {result.rollback_id or 'nothing'}")


def _ms() -> int:
    return int(time.time() * 1000)


def _wait_and_record(watch: FleetWatch, store: Store, deployment_id: str, devices: list[str], timeout_s: float,
                     say: Say) -> dict[str, Report]:
    def on_report(device: str, report: Report) -> None:
        history.set_result(store, deployment_id, device, report.result, report.error, report.phase, report.slot)
        detail = f" (slot {report.slot})" if report.result == APPLIED and report.slot else \
            f": {report.error}" if report.error else f" ({report.phase})" if report.phase else ""
        say(f"  {device}: {report.result}{detail}")

    final = watch.wait(deployment_id, devices, time.monotonic() + timeout_s, on_report)
    for device in devices:
        if device not in final:
            error = f"no result reported within {timeout_s:g} s"
            history.set_result(store, deployment_id, device, TargetResult.TIMEOUT.value, error)
            say(f"  {device}: timeout ({error})")
            final[device] = Report(TargetResult.TIMEOUT.value, error=error)
    return final


def _roll_back(watch: FleetWatch, store: Store, config: RolloutConfig, of: str,
               previous: dict[str, tuple[str | None, str | None]], say: Say) -> tuple[str, int] | None:
    """Signed ``rollback`` desired states putting each device back on its previous artifact;
    returns the rollback's deployment id and how many devices are not confirmed back (failed,
    silent, or with no known previous artifact); None when no device can be rolled back."""
    plan: dict[str, ArchiveInfo] = {}
    for device, (sha, name) in previous.items():
        info = lookup(sha, config.store_dir) if sha else None
        if info is None:
            say(f"  {device}: cannot be rolled back: what it served before is unknown"
                if not sha else f"  {device}: cannot be rolled back: no archive of {name} in the store")
            continue
        plan[device] = info
    if not plan:
        return None
    rollback_id = desired.new_deployment_id()
    for info in {i.manifest_sha256: i for i in plan.values()}.values():
        history.record_manifest(store, info.manifest_sha256, monitoring(info))
    names = sorted({i.name for i in plan.values()})
    first = next(iter(plan.values()))
    history.create_deployment(store, {
        "id": rollback_id, "fleet": config.fleet, "action": "rollback", "rolls_back": of,
        "artifact": ", ".join(names), "archive_sha256": first.sha256, "manifest_sha256": first.manifest_sha256,
        "model": first.model, "model_version": first.model_version, "model_uri": first.model_uri,
        "url": desired.artifact_url(config.base_url, first.sha256), "key_id": config.key.key_id,
        "waves": json.dumps([1.0]), "abort_on_failure": None}, [(1.0, sorted(plan))])
    say(f"rollback {rollback_id} of {of}: {len(plan)} device(s) back to {', '.join(names)}")
    history.update_wave(store, rollback_id, 1, status="running", started_ms=_ms())
    try:
        for device, info in sorted(plan.items()):
            version = history.reserve_version(
                store, config.fleet, device,
                watch.version_floor(device, history.issued_version(store, config.fleet, device)))
            state = desired.desired_state(config.fleet, device, version, rollback_id, "rollback", info,
                                          config.base_url)
            history.add_target(store, rollback_id, config.fleet, device, 1, version, (None, None))
            watch.publish_desired(config.fleet, device, desired.sign(state, config.key))
        final = _wait_and_record(watch, store, rollback_id, sorted(plan), config.wave_timeout_s, say)
    except BaseException as e:  # the rollback must not stay `running` either
        history.finish(store, rollback_id, "interrupted" if isinstance(e, KeyboardInterrupt) else "failed",
                       str(e) if isinstance(e, UserError) else f"rollback {rollback_id} stopped: {e!r}")
        if isinstance(e, Exception) and not isinstance(e, UserError):
            raise UserError(f"rollback {rollback_id} stopped: {e}") from None
        raise
    applied = sum(1 for r in final.values() if r.result == APPLIED)
    failed = len(plan) - applied
    history.update_wave(store, rollback_id, 1, status="done", finished_ms=_ms(), applied=applied, failed=failed)
    history.finish(store, rollback_id, "completed" if failed == 0 else "failed",
                   f"{applied} of {len(plan)} devices rolled back")
    unplanned = len(previous) - len(plan)
    history.set_status(store, of, "rolled-back" if failed + unplanned == 0 else "aborted")
    say(f"rollback {rollback_id}: {applied} of {len(plan)} device(s) back" + (f", {failed} failed" if failed else "")
        + (f"; {unplanned} could not be rolled back" if unplanned else ""))
    return rollback_id, failed + unplanned


def rollback(config: RolloutConfig, store: Store, say: Say, deployment_id: str | None = None) -> tuple[str, int]:
    """`edgesmith rollback`: undo a deployment (default: the fleet's latest) on every device that
    applied it or may still apply it; explicit and signed like any desired state."""
    history.ensure_tables(store)
    dep = history.deployment(store, deployment_id) if deployment_id else \
        history.latest_deployment(store, config.fleet)
    if dep is None or dep["fleet"] != config.fleet or dep["action"] != "deploy":
        raise UserError(f"no deployment {deployment_id or ''} of fleet {config.fleet} in the store".replace("  ", " ")
                        + "; list them with `edgesmith fleet status`")
    rows = [t for t in history.targets(store, dep["id"])
            if t["result"] in (APPLIED, TargetResult.TIMEOUT, TargetResult.PUBLISHED, TargetResult.IN_PROGRESS)
            and (not config.devices or t["device"] in config.devices)]
    if not rows:
        raise UserError(f"no device of deployment {dep['id']} applied it (or may still); nothing to roll back")
    broker = Broker(Path(config.broker_dir).resolve())
    watch = FleetWatch(broker, config.fleet).start()
    try:
        outcome = _roll_back(watch, store, config, dep["id"],
                             {t["device"]: (t["previous_manifest_sha256"], t["previous_artifact"]) for t in rows}, say)
    finally:
        watch.stop()
    if outcome is None:
        raise UserError(f"none of deployment {dep['id']}'s devices can be rolled back: the artifacts they served "
                        "before are not in the artifact store")
    return outcome
