"""The capture receiver: ``PUT /v1/captures/<fleet>/<device>/<capture_id>/<sha256>`` (docs/capture.md).

Every request is hostile until proven otherwise, and checked in the order that costs the least:
the path's ids, the bearer token against the SHA-256 kept for exactly that device and capture
(constant-time), the grant's expiry, the declared length against the hard cap and the budget left,
then the body, read with a running cap (a lying Content-Length gains nothing), its SHA-256 against
the URL's, the record against the contract and against the inputs of the model it names (the
artifact store's manifest, when the store holds it). Only then is it stored, once: an upload of a
record already stored answers 200 without storing it again. Every refusal is counted per device
and reason (``CaptureStore.refusals``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import tarfile
import time
from enum import StrEnum
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from edgesmith.runtime import contract
from edgesmith.runtime.manifest import Manifest
from edgesmith.toolchain.capture import record
from edgesmith.toolchain.capture.store import CaptureStore
from edgesmith.toolchain.deploy import archive
from edgesmith.toolchain.deploy.server import AppServer

_ID = re.compile(f"^{contract.ID_REGEX}$")
_SHA = re.compile(f"^{contract.SHA256_REGEX}$")
_BEARER = re.compile(f"^Bearer ({contract.SHA256_REGEX})$")
MAX_MANIFEST_BYTES = 4 << 20
READ_TIMEOUT_S = 30.0  # an upload whose body stalls this long is ended (408): it no longer holds its budget
UNKNOWN = "-"  # the refusal counters' fleet and device for requests naming a device no capture was granted to


class Refusal(StrEnum):
    """Why an upload was refused (the per-device counters' reasons) and its HTTP status."""

    TOKEN = "token"  # 403: no grant for this device and capture, or another token
    EXPIRED = "expired"  # 410: the grant's not_after has passed
    LENGTH = "length"  # 411: no Content-Length
    TOO_LARGE = "too-large"  # 413: over the hard cap (contract.MAX_CAPTURE_RECORD) or the capture's max_bytes
    BUDGET = "budget"  # 409: the capture's max_samples or max_bytes is used up
    DIGEST = "digest"  # 400: the body's SHA-256 is not the URL's
    INVALID = "invalid"  # 400: not a capture record, or its fleet/device/capture_id are not the URL's
    MODEL = "model"  # 422: its inputs are not those of the model it names
    STALLED = "stalled"  # 408: the body stopped arriving for READ_TIMEOUT_S (keep it, retry later)


STATUS = {Refusal.TOKEN: 403, Refusal.EXPIRED: 410, Refusal.LENGTH: 411, Refusal.TOO_LARGE: 413, Refusal.BUDGET: 409,
          Refusal.DIGEST: 400, Refusal.INVALID: 400, Refusal.MODEL: 422, Refusal.STALLED: 408}


_INPUTS: dict[tuple[str, str], list[tuple[str, str, list[int]]]] = {}  # known manifests only


def _manifest_inputs(manifest_sha256: str, artifacts: Path | None) -> list[tuple[str, str, list[int]]] | None:
    """The (name, dtype, shape) of the model's inputs, from the artifact store's archive of that
    manifest; None when the store does not hold it (asked again next time: it may be archived later)."""
    store = Path(artifacts) if artifacts else archive.default_store_dir()
    key = (str(store), manifest_sha256)
    if key not in _INPUTS:
        info = archive.lookup(manifest_sha256, store)
        if info is None:
            return None
        with tarfile.open(store / f"{info.sha256}.tar") as tar:
            member = tar.getmember("manifest.json")
            if not member.isfile() or member.size > MAX_MANIFEST_BYTES:
                return None
            manifest = Manifest.model_validate_json(tar.extractfile(member).read())
        _INPUTS[key] = [(t.name, t.dtype, list(t.shape)) for t in manifest.inputs]
    return _INPUTS[key]


def _store(store: CaptureStore, grant, body: bytes, row: dict) -> str:
    temp = store.new_temp()
    try:
        with open(temp, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        return store.commit(grant, temp, row)
    finally:
        temp.unlink(missing_ok=True)  # stored (renamed away), a duplicate or refused: never left behind


def make_app(store: CaptureStore, artifacts: Path | None = None, read_timeout_s: float = READ_TIMEOUT_S) -> Starlette:
    log = logging.getLogger("edgesmith.capture")
    # Per grant: the samples being received (by digest) and the lengths their uploads declared. The
    # budget check counts them, so concurrent uploads of one capture hold at most its budget in memory,
    # not one hard cap each; uploads of one digest at once (a retry racing the first try) count once.
    # Checked and reserved with no await in between: the event loop makes that one step.
    inflight: dict[tuple[str, str, str], dict[str, list[int]]] = {}

    def refuse(fleet: str, device: str, why: Refusal, detail: str) -> Response:
        # Counted under the device only when the store granted it a capture: ids anyone can put in a
        # URL must not grow the table (they share one bucket).
        if not store.known(fleet, device):
            fleet, device = UNKNOWN, UNKNOWN
        store.refuse(fleet, device, why.value)
        log.info("refused an upload of %s/%s: %s (%s)", fleet, device, why.value, detail)
        return JSONResponse({"refused": why.value, "detail": detail}, status_code=STATUS[why])

    async def upload(request: Request) -> Response:
        p = request.path_params
        fleet, device, capture_id, sha = p["fleet"], p["device"], p["capture_id"], p["sha256"]
        if not (_ID.match(fleet) and _ID.match(device) and _ID.match(capture_id) and _SHA.match(sha)):
            return PlainTextResponse("not a capture upload path\n", status_code=404)
        grant = store.find_grant(fleet, device, capture_id)
        bearer = _BEARER.match(request.headers.get("authorization", ""))
        if not store.authorised(grant, bearer.group(1) if bearer else None):
            return refuse(fleet, device, Refusal.TOKEN, "no capture of this device takes this token")
        if time.time() > grant.not_after:
            return refuse(fleet, device, Refusal.EXPIRED, "the capture's upload grant has expired")
        stored = store.has(sha)
        if stored is not None and (stored["fleet"], stored["device"], stored["capture_id"]) == (fleet, device, capture_id):
            return JSONResponse({"sha256": sha, "stored": False}, status_code=200)  # idempotent: already here
        declared = request.headers.get("content-length", "")
        if not declared.isdigit():
            return refuse(fleet, device, Refusal.LENGTH, "an upload declares its Content-Length")
        samples, used = store.used(grant)
        if samples >= grant.max_samples or used >= grant.max_bytes:
            return refuse(fleet, device, Refusal.BUDGET, f"the capture's budget is used up ({samples} samples, {used} bytes)")
        cap = min(contract.MAX_CAPTURE_RECORD + contract.MAX_CAPTURE_HEADER + record.PREFIX, grant.max_bytes - used)
        if int(declared) > cap:
            return refuse(fleet, device, Refusal.TOO_LARGE, f"{declared} bytes is over the {cap} this upload may take")
        key = (fleet, device, capture_id)
        pending = inflight.get(key, {})
        others = {digest: max(lengths) for digest, lengths in pending.items() if digest != sha}
        reserved = sum(others.values()) + max([*pending.get(sha, []), int(declared)])
        if (sha not in pending and samples + len(others) >= grant.max_samples) or used + reserved > grant.max_bytes:
            return refuse(fleet, device, Refusal.BUDGET,
                          f"the capture's budget is taken ({samples} samples, {used} bytes stored, {len(others)} uploads "
                          f"of {sum(others.values())} bytes in progress)")
        inflight.setdefault(key, pending).setdefault(sha, []).append(int(declared))
        try:
            return await _receive(request, grant, fleet, device, capture_id, sha, cap)
        finally:
            lengths = pending[sha]
            lengths.remove(int(declared))
            if not lengths:
                del pending[sha]
            if not pending and inflight.get(key) is pending:
                del inflight[key]

    async def _receive(request: Request, grant, fleet: str, device: str, capture_id: str, sha: str,
                       cap: int) -> Response:
        body = bytearray()
        chunks = request.stream().__aiter__()
        while True:
            try:
                chunk = await asyncio.wait_for(chunks.__anext__(), read_timeout_s)
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                return refuse(fleet, device, Refusal.STALLED, f"the body stopped arriving for {read_timeout_s:g} s "
                                                              f"after {len(body)} bytes")
            body += chunk
            if len(body) > cap:
                return refuse(fleet, device, Refusal.TOO_LARGE, f"the body exceeds the {cap} bytes this upload may take")
        body = bytes(body)
        if record.sha256(body) != sha:
            return refuse(fleet, device, Refusal.DIGEST, "the body's SHA-256 is not the one in the URL")
        try:
            header = record.parse(body)
        except record.RecordError as e:
            return refuse(fleet, device, Refusal.INVALID, str(e))
        if (header.fleet, header.device, header.capture_id) != (fleet, device, capture_id):
            return refuse(fleet, device, Refusal.INVALID, "the record's fleet, device or capture_id is not the URL's")
        expected = _manifest_inputs(header.manifest_sha256, artifacts)
        got = [(t.name, t.dtype, t.shape) for t in header.inputs]
        if expected is not None and got != expected:
            return refuse(fleet, device, Refusal.MODEL, f"its inputs {got} are not the model's {expected}")
        row = {"sha256": sha, "fleet": fleet, "device": device, "capture_id": capture_id,
               "manifest_sha256": header.manifest_sha256, "model": header.model, "model_version": header.model_version,
               "ts_ms": header.ts_ms, "reason": header.reason.value, "top1": header.top1,
               "confidence": header.confidence, "bytes": len(body)}
        outcome = await run_in_threadpool(_store, store, grant, body, row)  # fsyncs: off the event loop
        if outcome == "budget":
            return refuse(fleet, device, Refusal.BUDGET, "the capture's budget is used up")
        return JSONResponse({"sha256": sha, "stored": outcome == "stored"}, status_code=201 if outcome == "stored" else 200)

    async def health(_request: Request) -> Response:
        return PlainTextResponse("ok\n")

    return Starlette(routes=[Route("/v1/captures/{fleet}/{device}/{capture_id}/{sha256}", upload, methods=["PUT"]),
                             Route("/healthz", health, methods=["GET"])])


class CaptureReceiver(AppServer):
    """The receiver in a background thread (tests, `edgesmith loop`) or the foreground (``run``)."""

    def __init__(self, store: CaptureStore, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 certfile: str | None = None, keyfile: str | None = None, artifacts: Path | None = None,
                 read_timeout_s: float = READ_TIMEOUT_S):
        self.store = store
        super().__init__(make_app(store, artifacts, read_timeout_s), host, port, log_level, certfile, keyfile,
                         what="captures", option="--listen")


def serve_forever(directory: Path, host: str, port: int, certfile: str | None = None, keyfile: str | None = None,
                  artifacts: Path | None = None) -> None:
    """`edgesmith capture serve`: run in the foreground until interrupted."""
    logging.basicConfig(level=logging.INFO)
    receiver = CaptureReceiver(CaptureStore(directory), host, port, "info", certfile, keyfile, artifacts)
    print(json.dumps({"receiver": receiver.url, "dir": str(Path(directory).resolve())}), flush=True)
    receiver.run()
