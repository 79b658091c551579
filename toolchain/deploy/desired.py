"""The signed desired state of one device (docs/deployment.md §2).

The envelope carries the desired-state JSON as a string, so what is signed is exactly the bytes
the device parses; the signature covers ``"edgesmith-desired-v1\\n" + signed``, a prefix no
manifest starts with, so a desired-state signature is never a valid manifest signature.

Each desired state carries ``not_after`` (Unix seconds, signed with the rest): a device refuses it
once its clock is more than DESIRED_CLOCK_SKEW_S past that, so a desired state captured today cannot
be replayed to a device that was re-imaged (its replay floor lost) months later.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from typing import Any, Literal

import nacl.exceptions
import nacl.signing

from edgesmith.runtime import contract
from edgesmith.toolchain.deploy.archive import ArchiveInfo
from edgesmith.toolchain.fleet import protocol
from edgesmith.toolchain.signing import SigningKey, key_id

DOMAIN = contract.DESIRED_DOMAIN.encode()
SHADOW_DOMAIN = contract.SHADOW_DOMAIN.encode()  # a shadow state's signature never verifies as a desired state's
CAPTURE_DOMAIN = contract.CAPTURE_DOMAIN.encode()  # nor a capture state's as either
# The fields are the contract's (runtime/contract.py: DesiredEnvelope, DesiredState, DesiredArtifact).
ENVELOPE_FIELDS = tuple(contract.DesiredEnvelope.model_fields)
STATE_FIELDS = tuple(n for n, f in contract.DesiredState.model_fields.items() if f.is_required() or n == "v")
ARTIFACT_FIELDS = tuple(contract.DesiredArtifact.model_fields)
OPTIONAL_STATE_FIELDS = ("not_after",)
Action = Literal["deploy", "rollback"]  # contract.DeployAction
# How long a signed desired state stays valid: long enough for a device that is offline over a
# weekend to still take the retained message, short enough that an old one is not a standing key.
DESIRED_VALIDITY_S = 7 * 24 * 3600
# The clock skew a device allows past not_after (csrc/deploy/desired.h DESIRED_CLOCK_SKEW_S).
DESIRED_CLOCK_SKEW_S = 300


def desired_topic(fleet: str, device: str) -> str:
    return protocol.topic(fleet, device, contract.DESIRED_TOPIC)


def shadow_topic(fleet: str, device: str) -> str:
    return protocol.topic(fleet, device, contract.SHADOW_TOPIC)


def capture_topic(fleet: str, device: str) -> str:
    return protocol.topic(fleet, device, contract.CAPTURE_TOPIC)


def new_capture_id(at_s: float | None = None) -> str:
    """``cap-YYYYMMDD-HHMM-<6 hex>`` (UTC)."""
    stamp = time.strftime("%Y%m%d-%H%M", time.gmtime(at_s if at_s is not None else time.time()))
    return f"cap-{stamp}-{secrets.token_hex(3)}"


def new_shadow_id(at_s: float | None = None) -> str:
    """``sh-YYYYMMDD-HHMM-<6 hex>`` (UTC)."""
    stamp = time.strftime("%Y%m%d-%H%M", time.gmtime(at_s if at_s is not None else time.time()))
    return f"sh-{stamp}-{secrets.token_hex(3)}"


def new_deployment_id(at_s: float | None = None) -> str:
    """``dep-YYYYMMDD-HHMM-<6 hex>`` (UTC)."""
    stamp = time.strftime("%Y%m%d-%H%M", time.gmtime(at_s if at_s is not None else time.time()))
    return f"dep-{stamp}-{secrets.token_hex(3)}"


def artifact_url(base_url: str, sha256: str) -> str:
    return f"{base_url.rstrip('/')}/artifacts/{sha256}.tar"


def desired_state(fleet: str, device: str, version: int, deployment_id: str, action: Action, archive: ArchiveInfo,
                  base_url: str, issued_at_ms: int | None = None, valid_for_s: int = DESIRED_VALIDITY_S) -> dict[str, Any]:
    """The desired state to sign; devices refuse it ``valid_for_s`` after ``issued_at_ms`` (plus skew)."""
    issued = issued_at_ms if issued_at_ms is not None else int(time.time() * 1000)
    return {
        "v": 1, "fleet": fleet, "device": device, "version": int(version), "deployment_id": deployment_id,
        "action": action, "issued_at_ms": issued, "not_after": issued // 1000 + int(valid_for_s),
        "artifact": {"url": artifact_url(base_url, archive.sha256), "sha256": archive.sha256, "size": archive.size,
                     "manifest_sha256": archive.manifest_sha256, "name": archive.name},
    }


def shadow_state(fleet: str, device: str, version: int, shadow_id: str, candidates: list[ArchiveInfo], base_url: str,
                 *, duration_s: int, sample: float, cpu_share: float = 0.5, queue: int = 4,
                 max_bytes: int = 256 << 20, starts_at_ms: int | None = None, issued_at_ms: int | None = None,
                 valid_for_s: int = DESIRED_VALIDITY_S) -> dict[str, Any]:
    """A ``start`` shadow state to sign (contract.ShadowState); no candidates makes it a ``stop``.
    Checked against the contract here, so a bad value is refused before anything is signed."""
    issued = issued_at_ms if issued_at_ms is not None else int(time.time() * 1000)
    state = {
        "v": 1, "kind": "shadow", "fleet": fleet, "device": device, "version": int(version), "shadow_id": shadow_id,
        "action": contract.ShadowAction.START.value if candidates else contract.ShadowAction.STOP.value,
        "issued_at_ms": issued, "not_after": issued // 1000 + int(valid_for_s),
        "starts_at_ms": starts_at_ms if starts_at_ms is not None else issued, "duration_s": int(duration_s),
        "sample": float(sample), "cpu_share": float(cpu_share), "queue": int(queue), "max_bytes": int(max_bytes),
        "candidates": [{"url": artifact_url(base_url, a.sha256), "sha256": a.sha256, "size": a.size,
                        "manifest_sha256": a.manifest_sha256, "name": a.name} for a in candidates],
    }
    contract.ShadowState.model_validate_json(json.dumps(state))
    return state


def capture_state(fleet: str, device: str, version: int, capture_id: str, action: str, *, upload_url: str,
                  upload_token: str | None, policy: dict[str, Any] | None = None, max_samples: int = 500,
                  max_bytes: int = 64 << 20, retention_s: int = 7 * 24 * 3600, issued_at_ms: int | None = None,
                  valid_for_s: int = DESIRED_VALIDITY_S) -> dict[str, Any]:
    """A capture state to sign (contract.CaptureState), checked against the contract here, so a bad
    value is refused before anything is signed."""
    issued = issued_at_ms if issued_at_ms is not None else int(time.time() * 1000)
    state = {
        "v": 1, "kind": "capture", "fleet": fleet, "device": device, "version": int(version), "capture_id": capture_id,
        "action": action, "issued_at_ms": issued, "not_after": issued // 1000 + int(valid_for_s),
        "policy": contract.CapturePolicy.model_validate(policy or {}).model_dump(mode="json"),
        "max_samples": int(max_samples), "max_bytes": int(max_bytes), "retention_s": int(retention_s),
        "upload_url": upload_url.rstrip("/"),
    }
    if upload_token is not None:  # start only: stop and upload use the token the device already has
        state["upload_token"] = upload_token
    contract.CaptureState.model_validate_json(json.dumps(state))
    return state


def sign(state: dict[str, Any], key: SigningKey, domain: bytes = DOMAIN) -> bytes:
    """The envelope's bytes (what is published, retained, on the device's desired topic; a shadow
    state, on its shadow-desired topic, is signed with ``domain=SHADOW_DOMAIN``, a capture state, on
    capture-desired, with ``domain=CAPTURE_DOMAIN``)."""
    signed = json.dumps(state, separators=(",", ":"), sort_keys=True)
    signature = nacl.signing.SigningKey(key.seed).sign(domain + signed.encode()).signature
    return json.dumps({"v": 1, "signed": signed, "key_id": key.key_id, "signature": signature.hex()}).encode()


def verify(envelope: bytes, public_keys: list[bytes]) -> dict[str, Any]:
    """Check an envelope as a device does (§2's field, key and signature rules; not the device's
    own fleet/device/version checks) and return the desired state; ValueError says why not."""
    try:
        outer = json.loads(envelope)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("the envelope is not JSON") from None
    if not isinstance(outer, dict) or any(f not in outer for f in ENVELOPE_FIELDS) or outer["v"] != 1:
        raise ValueError("the envelope lacks a field or is not version 1")
    if not isinstance(outer["signed"], str) or not isinstance(outer["signature"], str) \
            or not re.fullmatch(r"[0-9a-f]{128}", outer["signature"]):
        raise ValueError("the envelope's signed text or signature is malformed")
    keys = {key_id(k): k for k in public_keys}
    if outer["key_id"] not in keys:
        raise ValueError(f"key {outer['key_id']} is not a trusted deploy key")
    try:
        nacl.signing.VerifyKey(keys[outer["key_id"]]).verify(DOMAIN + outer["signed"].encode(),
                                                             bytes.fromhex(outer["signature"]))
    except nacl.exceptions.BadSignatureError:
        raise ValueError("the desired state's signature is not valid") from None
    state = json.loads(outer["signed"])
    if not isinstance(state, dict) or any(f not in state for f in STATE_FIELDS) \
            or not isinstance(state["artifact"], dict) or any(f not in state["artifact"] for f in ARTIFACT_FIELDS):
        raise ValueError("the desired state lacks a field")
    if state["action"] not in tuple(contract.DeployAction):
        raise ValueError(f"unknown action {state['action']!r}")
    not_after = state.get("not_after")
    if not_after is not None and (isinstance(not_after, bool) or not isinstance(not_after, int)
                                  or not 0 < not_after < 2**53):
        raise ValueError("the desired state's not_after is not a positive integer (Unix seconds)")
    try:
        contract.DesiredState.model_validate_json(outer["signed"])
    except ValueError as e:
        raise ValueError(f"the desired state is not in the contract: {str(e).splitlines()[1:3]}") from None
    return state


def version_of(envelope: bytes) -> int | None:
    """The version in a (retained) envelope, unverified: only used to keep versions increasing."""
    try:
        version = json.loads(json.loads(envelope)["signed"])["version"]
    except (ValueError, KeyError, TypeError):
        return None
    ok = isinstance(version, int) and not isinstance(version, bool) and 0 < version <= contract.MAX_SAFE_INT
    return version if ok else None
