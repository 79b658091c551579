"""``edgesmith shadow start|stop``: signed shadow states, one per device, published retained on
``edgesmith/v1/<fleet>/<device>/shadow-desired`` (docs/shadow.md).

Everything a device would refuse is refused here first, one sentence each: a candidate whose
inputs/outputs differ from what a device serves (the rule is the device's own, bound from C++:
``shadow_signature_problem``), a candidate built for another target or ISA, an unknown device or
fleet, values out of the contract's range, a device already in a running shadow. The broker, the
deploy key, the artifact store and server, and the device selection are the rollout's
(toolchain/deploy/rollout.py); shadow-state versions are their own per-device counter, above both
what the store issued and what the broker retains.
"""

from __future__ import annotations

import json
import re
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from edgesmith.runtime import contract
from edgesmith.runtime.manifest import Manifest
from edgesmith.toolchain.deploy import archive as archive_mod
from edgesmith.toolchain.deploy import desired
from edgesmith.toolchain.deploy.archive import ArchiveInfo
from edgesmith.toolchain.deploy.rollout import FleetWatch, Say, fleet_devices, parse_share, plan_waves
from edgesmith.toolchain.errors import UserError
from edgesmith.toolchain.fleet.broker import Broker
from edgesmith.toolchain.fleet.store import Store, now_ms
from edgesmith.toolchain.fleet.store import deployments as history
from edgesmith.toolchain.fleet.store.ingest import devices as device_rows
from edgesmith.toolchain.fleet.store.shadows import ensure_tables, shadow_versions, shadows
from edgesmith.toolchain.signing import SigningKey

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """``90s``, ``30m``, ``2h``, ``1d`` (or plain seconds) → seconds, within the contract's range."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    seconds = round(float(match[1]) * _UNITS[match[2] or "s"]) if match else 0
    if not 1 <= seconds <= contract.MAX_SHADOW_DURATION_S:
        raise UserError(f"--duration {text!r} is not a duration from 1s to {contract.MAX_SHADOW_DURATION_S // 86400}d; "
                        "write e.g. 30m or 2h")
    return seconds


def check_share(value: float, option: str) -> float:
    if not 0 < value <= 1:
        raise UserError(f"{option} {value:g} is out of range; give a fraction above 0 and at most 1, e.g. 0.2")
    return value


def candidate_dirs(path: Path) -> list[Path]:
    """An artifact directory, or a directory of them (a `--backend all` build's output), sorted."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        return [path]
    found = sorted(p for p in path.iterdir() if (p / "manifest.json").is_file()) if path.is_dir() else []
    if not found:
        raise UserError(f"{path} is neither an artifact directory nor a directory of them; pass what `edgesmith build` "
                        "wrote (one artifact, or the folder of a `--backend all` build)")
    if len(found) > contract.MAX_SHADOW_CANDIDATES:
        raise UserError(f"{path} holds {len(found)} artifacts and a shadow runs at most "
                        f"{contract.MAX_SHADOW_CANDIDATES}; start several shadows, or pass fewer")
    return found


def signature_problem(serving_manifest_json: str, candidate_manifest_json: str) -> str:
    """The device's own rule (C++, csrc/telemetry/shadow_window.h, through edgesmith.runtime.shadow):
    "" when the candidate takes the serving model's inputs and gives its outputs, else why not."""
    from edgesmith.runtime.shadow import shadow_signature_problem

    return shadow_signature_problem(serving_manifest_json, candidate_manifest_json)


def manifest_in_store(manifest_sha256: str, store_dir: Path) -> tuple[ArchiveInfo, str] | None:
    """The stored archive of a manifest digest, and that manifest's text (read from the archive)."""
    info = archive_mod.lookup(manifest_sha256, store_dir)
    if info is None:
        return None
    with tarfile.open(info.path) as tar:
        member = tar.extractfile("manifest.json")
        text = member.read().decode() if member is not None else ""
    return info, text


@dataclass
class Candidate:
    index: int
    archive: ArchiveInfo
    manifest: Manifest
    manifest_json: str

    def row(self) -> dict[str, Any]:
        m = self.manifest
        return {"index": self.index, "name": m.name, "manifest_sha256": self.archive.manifest_sha256,
                "archive_sha256": self.archive.sha256, "size": self.archive.size, "model": m.model.name,
                "model_version": m.model.version, "target": m.target.name, "isa": m.target.isa,
                "backend": m.backend.name, "precision": m.backend.precision,
                "build_latency_us": m.build.latency_us,
                "model_uri": self.archive.model_uri}


def prepare_candidates(paths: list[Path], store_dir: Path, trusted: list[bytes] | None) -> list[Candidate]:
    """Verify each artifact as devices will, and archive it into the store (content-addressed)."""
    from edgesmith.runtime import artifact as runtime_artifact

    out = []
    for index, path in enumerate(paths):
        manifest, _ = archive_mod.read_manifest(path)
        runtime_artifact.verify(path, trusted)
        out.append(Candidate(index, archive_mod.archive(path, store_dir), manifest,
                             (path / "manifest.json").read_text()))
    if len({c.archive.manifest_sha256 for c in out}) != len(out):
        raise UserError("the same artifact is named twice among the candidates; pass each once")
    return out


@dataclass
class ShadowConfig:
    fleet: str
    broker_dir: Path
    key: SigningKey
    base_url: str
    store_dir: Path
    duration_s: int
    sample: float
    cpu_share: float = 0.5
    queue: int = 4
    devices: list[str] | None = None
    canary: float | None = None
    wait_s: float = 0.0  # for each device's first shadow.started / refused / failed event


def _serving_of(watch: FleetWatch, store: Store, fleet: str, device: str) -> dict[str, Any] | None:
    """What the device's newest birth says it serves (the broker's retained one, else the store's)."""
    birth = watch.birth_messages.get(device)
    if birth is None:
        with store.engine.connect() as conn:
            text = conn.scalar(select(device_rows.c.birth).where(device_rows.c.fleet == fleet,
                                                                 device_rows.c.device == device))
        if not text:
            return None
        birth = contract.Birth.model_validate_json(text)
    return {"serving_sha256": birth.artifact.manifest_sha256, "serving": birth.artifact.name,
            "target": birth.target, "isa": birth.runtime.isa, "runtime": birth.runtime.version, "cpu": birth.runtime.cpu}


def running_shadows(store: Store, fleet: str, at_ms: int | None = None) -> list[dict[str, Any]]:
    at = at_ms if at_ms is not None else now_ms()
    with store.engine.connect() as conn:
        rows = conn.execute(select(shadows).where(shadows.c.fleet == fleet, shadows.c.status == "running",
                                                  shadows.c.ends_ms > at).order_by(shadows.c.created_ms)).mappings()
        return [dict(r) for r in rows]


def _check_devices(store: Store, watch: FleetWatch, config: ShadowConfig, names: list[str],
                   candidates: list[Candidate]) -> dict[str, dict[str, Any]]:
    busy = {d: r["id"] for r in running_shadows(store, config.fleet) for d in json.loads(r["devices"])}
    plan: dict[str, dict[str, Any]] = {}
    for device in names:
        if device in busy:
            raise UserError(f"device {device} is already in shadow {busy[device]}, which is running; stop it first "
                            "with "
                            f"`edgesmith shadow stop {busy[device]} --fleet {config.fleet}`")
        serving = _serving_of(watch, store, config.fleet, device)
        if serving is None:
            raise UserError(f"device {device} of fleet {config.fleet} has not announced what it serves (no birth "
                            "seen), so a candidate cannot be checked against it; start its agent, or leave it out of "
                            "--devices")
        found = manifest_in_store(serving["serving_sha256"], config.store_dir)
        if found is None:
            raise UserError(f"device {device} serves {serving['serving']} "
                            f"(manifest {serving['serving_sha256'][:12]}…), "
                            f"whose archive the artifact store {config.store_dir} does not hold, so its inputs and "
                            "outputs are unknown; pass that artifact's directory with --serving DIR")
        for c in candidates:
            if (c.manifest.target.name, c.manifest.target.isa) != (serving["target"], serving["isa"]):
                raise UserError(f"candidate {c.manifest.name} is built for target {c.manifest.target.name} "
                                f"({c.manifest.target.isa}), but device {device} is {serving['target']} "
                                f"({serving['isa']}); build it for {serving['target']}, or leave {device} out")
            problem = signature_problem(found[1], c.manifest_json)
            if problem:
                raise UserError(f"candidate {c.manifest.name} cannot shadow {serving['serving']} on {device}: "
                                f"{problem}; "
                                f"pick candidates built from the serving model's signature, or leave {device} out")
        plan[device] = serving
    return plan


def _select_devices(broker: Broker, config: ShadowConfig) -> list[str]:
    names = fleet_devices(broker, config.fleet, config.devices)
    if config.canary is not None:
        if config.canary <= 0:
            raise UserError("--canary must be above 0%, e.g. 5%")
        names = plan_waves(names, [config.canary])[0][1]
    return names


def start(paths: list[Path], config: ShadowConfig, store: Store, say: Say, trusted: list[bytes] | None = None,
          serving_dirs: list[Path] | None = None) -> str:
    """Check, sign and publish a ``start`` shadow state to every chosen device; returns the shadow id."""
    check_share(config.sample, "--sample")
    check_share(config.cpu_share, "--cpu-share")
    if not 1 <= config.queue <= contract.MAX_SHADOW_QUEUE:
        raise UserError(f"--queue {config.queue} is out of range; give 1 to {contract.MAX_SHADOW_QUEUE}")
    candidates = prepare_candidates(paths, config.store_dir, trusted)
    if config.duration_s < len(candidates):
        raise UserError(f"--duration {config.duration_s}s is shorter than one second per candidate "
                        f"({len(candidates)}); give a longer one")
    for directory in serving_dirs or []:
        archive_mod.archive(directory, config.store_dir)
    ensure_tables(store)
    broker = Broker(Path(config.broker_dir).resolve())
    names = _select_devices(broker, config)
    watch = FleetWatch(broker, config.fleet).start()
    try:
        plan = _check_devices(store, watch, config, names, candidates)
        shadow_id = desired.new_shadow_id()
        issued = now_ms()
        for device in names:  # each stored before use: a crash after publishing never reuses one
            plan[device]["version"] = history.reserve_version(
                store, config.fleet, device, _floor(watch, device), table=shadow_versions)
        archives = [c.archive for c in candidates]
        states = {d: desired.shadow_state(config.fleet, d, plan[d]["version"], shadow_id, archives, config.base_url,
                                          duration_s=config.duration_s, sample=config.sample,
                                          cpu_share=config.cpu_share, queue=config.queue, starts_at_ms=issued,
                                          issued_at_ms=issued) for d in names}
        with store.engine.begin() as conn:
            conn.execute(shadows.insert().values(
                id=shadow_id, fleet=config.fleet, devices=json.dumps(plan, sort_keys=True),
                candidates=json.dumps([c.row() for c in candidates]), sample=config.sample,
                duration_s=config.duration_s, cpu_share=config.cpu_share, queue=config.queue, url=config.base_url,
                key_id=config.key.key_id, status="running", created_ms=issued, starts_ms=issued,
                ends_ms=issued + config.duration_s * 1000))
        say(f"shadow {shadow_id}: {len(candidates)} candidate(s) beside the serving model on {len(names)} device(s) of "
            f"{config.fleet}, sample {config.sample:g}, cpu share {config.cpu_share:g}, {config.duration_s} s")
        for c in candidates:
            say(f"  candidate {c.index}: {c.manifest.name} ({c.archive.size} bytes, "
                f"{desired.artifact_url(config.base_url, c.archive.sha256)})")
        published: list[str] = []
        try:
            for device in names:
                watch.publish_shadow(config.fleet, device, desired.sign(states[device], config.key,
                                                                         domain=desired.SHADOW_DOMAIN))
                published.append(device)
                say(f"  {device}: shadow state version {plan[device]['version']} published "
                    f"(serving {plan[device]['serving']})")
        except UserError as e:
            _finish(store, shadow_id, "stopped")
            raise UserError(f"{e} (after {len(published)} of {len(names)} devices were sent it; `edgesmith shadow stop "
                            f"{shadow_id} --fleet {config.fleet}` withdraws it)") from None
        if config.wait_s > 0:
            _wait_started(watch, shadow_id, names, config.wait_s, say)
        return shadow_id
    finally:
        watch.stop()


def _floor(watch: FleetWatch, device: str) -> int:
    """What the next shadow-state version must exceed: the broker's retained one (only central
    logins write it) and whatever the store issued (reserve_version adds that itself)."""
    with watch.changed:
        return watch.retained_shadow_versions.get(device, 0)


def _wait_started(watch: FleetWatch, shadow_id: str, names: list[str], wait_s: float, say: Say) -> None:
    deadline = time.monotonic() + wait_s
    told: set[str] = set()
    with watch.changed:
        while len(told) < len(names):
            for device in names:
                event = watch.shadow_events.get((shadow_id, device))
                if device not in told and event is not None:
                    told.add(device)
                    say(f"  {device}: {event}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            watch.changed.wait(min(remaining, 1.0))
    for device in names:
        if device not in told:
            say(f"  {device}: no shadow event within {wait_s:g} s (it may still be downloading; see "
                f"`edgesmith shadow report {shadow_id}`)")


def _finish(store: Store, shadow_id: str, status: str) -> None:
    with store.engine.begin() as conn:
        conn.execute(update(shadows).where(shadows.c.id == shadow_id).values(status=status, stopped_ms=now_ms()))


def get(store: Store, shadow_id: str | None, fleet: str | None = None) -> dict[str, Any]:
    """A shadow's row (devices and candidates decoded); default the newest (of the fleet, if given)."""
    ensure_tables(store)
    query = select(shadows)
    if shadow_id:
        query = query.where(shadows.c.id == shadow_id)
    if fleet:
        query = query.where(shadows.c.fleet == fleet)
    with store.engine.connect() as conn:
        row = conn.execute(query.order_by(shadows.c.created_ms.desc()).limit(1)).mappings().first()
    if row is None:
        where = f" of fleet {fleet}" if fleet else ""
        raise UserError(f"no shadow {shadow_id or ''}{where} in the store".replace("  ", " ")
                        + "; start one with `edgesmith shadow start`, or pass the --db the shadow was started with")
    out = dict(row)
    out["devices"], out["candidates"] = json.loads(row["devices"]), json.loads(row["candidates"])
    return out


def stop(shadow_id: str | None, fleet: str, broker_dir: Path, key: SigningKey, store: Store, say: Say) -> str:
    """Publish a ``stop`` shadow state to each of the shadow's devices (default: the fleet's newest running one)."""
    if shadow_id is None:
        running = running_shadows(store, fleet) if store else []
        if not running:
            raise UserError(f"no shadow of fleet {fleet} is running; `edgesmith shadow report --fleet {fleet}` lists "
                            "the last one")
        shadow_id = running[-1]["id"]
    shadow = get(store, shadow_id, fleet)
    if shadow["status"] != "running" or shadow["ends_ms"] <= now_ms():
        # A device's stop ends whatever shadow it runs now, whichever id the stop names: stopping a
        # shadow that is over would end a newer one on the same devices.
        status = "finished" if shadow["status"] == "running" else shadow["status"]
        running = [r["id"] for r in running_shadows(store, fleet)]
        raise UserError(f"shadow {shadow['id']} is not running (it is {status}); nothing was published"
                        + (f"; the fleet's running shadow is {', '.join(running)}: `edgesmith shadow stop "
                           f"{running[-1]} --fleet {fleet}` stops it" if running else ""))
    watch = FleetWatch(Broker(Path(broker_dir).resolve()), fleet).start()
    try:
        for device in sorted(shadow["devices"]):
            version = history.reserve_version(store, fleet, device, _floor(watch, device),
                                              table=shadow_versions)
            state = desired.shadow_state(fleet, device, version, shadow["id"], [], shadow["url"],
                                         duration_s=int(shadow["duration_s"]), sample=float(shadow["sample"]),
                                         cpu_share=float(shadow["cpu_share"]), queue=int(shadow["queue"]))
            watch.publish_shadow(fleet, device, desired.sign(state, key, domain=desired.SHADOW_DOMAIN))
            say(f"  {device}: stop published (shadow state version {version})")
    finally:
        watch.stop()
    _finish(store, shadow["id"], "stopped")
    say(f"shadow {shadow['id']} stopped on {len(shadow['devices'])} device(s); its figures stay: "
        f"`edgesmith shadow report {shadow['id']}`")
    return shadow["id"]

