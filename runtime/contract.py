"""The device contract, version 1: one pydantic model per message that crosses the device boundary.

Device → central (MQTT, ``edgesmith/v1/<fleet>/<device>/<kind>``; docs/telemetry.md): ``birth``,
``death``, ``telemetry``, ``event``, ``state`` (whose ``details`` are the deploy report,
docs/deployment.md §5) and ``shadow`` (a shadow run's summary per window, docs/shadow.md).
Central → device: the signed ``desired`` state (docs/deployment.md §2), the signed shadow state
on ``shadow-desired`` (docs/shadow.md) and the signed capture state on ``capture-desired``
(docs/capture.md): the same envelope, keys and anti-replay rules, each its own signature domain and
version counter. Device → central over HTTP(S): the capture record (CaptureRecord, docs/capture.md).

This module is the single source of truth for all of them. Generated from it (each with a
freshness test):

- ``docs/telemetry.schema.json`` (device messages), ``docs/desired.schema.json`` (the desired
  state and its envelope) and ``docs/capture.schema.json`` (a capture record's header):
  ``python -m edgesmith.runtime.contract --schema telemetry|desired|capture``;
- ``csrc/common/contract_words.h``, the field names, vocabularies and limits the C++ reader and
  writer use: ``python -m edgesmith.runtime.contract --header``.

``tests/data/contract/`` holds valid and invalid example messages that both pytest
(tests/test_contract.py) and GoogleTest (tests/cpp/test_contract.cc) run.

Every field a device sends is bounded before anything allocates from it: string lengths, integers
below 2**53 (exact in every JSON reader), at most 4096 classes, 1024 histogram edges and 64
monitored outputs. Identifier patterns are matched against the whole string (pydantic's regex
engine anchors ``$`` at the very end: ``"dev\\n"`` is refused). Vocabularies are enums, used by the
central code instead of bare strings. Like the manifest module, this imports pydantic: the
toolchain uses it; the device-side modules of ``edgesmith.runtime`` never import it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from enum import StrEnum
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, JsonValue, TypeAdapter, ValidationError, model_validator

PROTOCOL_VERSION = 1
DESIRED_VERSION = 1
TOPIC_ROOT = "edgesmith/v1"
DESIRED_DOMAIN = "edgesmith-desired-v1\n"  # prefix of what a desired-state signature covers
SHADOW_DOMAIN = "edgesmith-shadow-v1\n"  # prefix of what a shadow-state signature covers (never a desired state's)
CAPTURE_DOMAIN = "edgesmith-capture-v1\n"  # prefix of what a capture-state signature covers (never another's)
CAPTURE_MAGIC = b"edgesmith-capture-record-v1\n"  # the first line of every capture record (docs/capture.md)

# ---- limits ------------------------------------------------------------------------------------
MAX_PAYLOAD_BYTES = 256 * 1024  # the monitor refuses (counts and drops) anything larger
MAX_SAFE_INT = 2**53 - 1  # every integer: exact in any JSON reader, and in a signed 64-bit column
# A telemetry window's counters (runs, errors, each latency bucket, each output count): ~69 billion, far
# beyond any device's window (1M runs/s for 60 s is ~2^26), and low enough that the monitor's sums over
# windows (per device, per model group, the whole fleet) stay within int64 for 2^27 windows, so a
# device reporting the largest counts it may cannot wrap the fleet's histograms or totals.
MAX_WINDOW_COUNT = 2**36
MAX_CLASSES = 4096
MAX_EDGES = 1024
MAX_OUTPUTS = 64
MAX_LATENCY_BUCKETS = 4096
MAX_LABEL = 256  # names, versions, targets
MAX_MESSAGE = 4096  # an event's message
MAX_ERROR = 8192  # a deploy report's error text
MAX_DETAILS = 64  # keys in an event's details
MAX_URL = 2048
MAX_SIGNED = 64 * 1024  # the signed text of a desired state
MAX_MICROS = 1e15  # ~31 years: any latency sum a device can honestly report
MAX_SHADOW_CANDIDATES = 8
MAX_SHADOW_QUEUE = 64  # samples waiting for the shadow worker
MAX_SHADOW_DURATION_S = 30 * 24 * 3600
MAX_CAPTURE_HEADER = 64 * 1024  # a capture record's JSON header, bytes
MAX_CAPTURE_TENSORS = 64  # inputs plus outputs in one capture record
MAX_CAPTURE_RANK = 8
MAX_CAPTURE_RECORD = 64 << 20  # one capture record (one sample), bytes: the receiver's hard cap
MAX_CAPTURE_RETENTION_S = 90 * 24 * 3600

ID_REGEX = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"  # fleet, device and deployment ids: no '/', '+', '#'
EVENT_REGEX = r"[a-z][a-z0-9_.-]{0,63}"
SHA256_REGEX = r"[0-9a-f]{64}"
EPOCH_REGEX = r"[0-9a-f]{16}"
SLOT_REGEX = r"[a-z]{1,8}"
KEY_ID_REGEX = r"[0-9a-f]{16}"
SIGNATURE_REGEX = r"[0-9a-f]{128}"


def is_id(text: object) -> bool:
    """A valid fleet or device id (the whole string; a trailing newline is not allowed)."""
    return isinstance(text, str) and re.fullmatch(ID_REGEX, text) is not None


# ---- vocabularies -------------------------------------------------------------------------------

class MessageKind(StrEnum):
    """What a device publishes; the last topic level."""

    BIRTH = "birth"
    DEATH = "death"
    TELEMETRY = "telemetry"
    EVENT = "event"
    STATE = "state"
    SHADOW = "shadow"


DESIRED_TOPIC = "desired"  # central → device: the signed desired state (retained)
SHADOW_TOPIC = "shadow-desired"  # central → device: the signed shadow state (retained)
CAPTURE_TOPIC = "capture-desired"  # central → device: the signed capture state (retained)


class DeathReason(StrEnum):
    CONNECTION_LOST = "connection-lost"  # the MQTT will, sent by the broker
    SHUTDOWN = "shutdown"  # said by the device


class OutputKind(StrEnum):
    CLASSES = "classes"
    HISTOGRAM = "histogram"


class DeployAction(StrEnum):
    DEPLOY = "deploy"
    ROLLBACK = "rollback"


class DeployResult(StrEnum):
    """A device's result for a deployment (its deploy report)."""

    IN_PROGRESS = "in-progress"
    APPLIED = "applied"
    FAILED = "failed"
    REFUSED = "refused"


FINAL_RESULTS = (DeployResult.APPLIED, DeployResult.FAILED, DeployResult.REFUSED)


class DeployPhase(StrEnum):
    DOWNLOAD = "download"
    VERIFY = "verify"
    SELF_TEST = "self-test"
    SWITCH = "switch"


class EventKind(StrEnum):
    """The events edgesmith itself sends. An event name is open (the runtime's Python API sends any
    name matching EVENT_REGEX); these are the ones with a meaning to the central side."""

    STARTED = "started"
    RUN_ERROR = "run_error"
    SPOOL_DROPPED = "spool_dropped"
    DEPLOY_STARTED = "deploy.started"
    DEPLOY_APPLIED = "deploy.applied"
    DEPLOY_FAILED = "deploy.failed"
    DEPLOY_REFUSED = "deploy.refused"
    DEPLOY_ROLLED_BACK = "deploy.rolled-back"
    REIMAGED = "device.reimaged"  # recorded by the monitor when a device's spool epoch changes
    SHADOW_STARTED = "shadow.started"  # a candidate is verified, self-tested and running beside serving
    SHADOW_REFUSED = "shadow.refused"  # the shadow state or a candidate was refused (details: why)
    SHADOW_FAILED = "shadow.failed"  # a candidate crashed or could not be run; serving is untouched
    SHADOW_ENDED = "shadow.ended"  # the shadow finished: its duration ran out, it was stopped or superseded
    CAPTURE_STARTED = "capture.started"  # a capture state was taken: sampling by its policy is on
    CAPTURE_STOPPED = "capture.stopped"  # capture is off (stopped, superseded, budget used up or expired)
    CAPTURE_UPLOADED = "capture.uploaded"  # an upload round finished (details: samples and bytes acknowledged)
    CAPTURE_DROPPED = "capture.dropped"  # samples were dropped (details: why and how many)


class ShadowAction(StrEnum):
    START = "start"
    STOP = "stop"


class ShadowEnd(StrEnum):
    """Why a shadow (or one candidate's turn) ended, in a ``shadow.ended`` event's details."""

    DURATION = "duration"
    STOPPED = "stopped"
    SUPERSEDED = "superseded"
    SERVING_CHANGED = "serving-changed"  # a deployment switched the serving model


class CaptureAction(StrEnum):
    START = "start"  # sample by the policy into the on-device capture store
    STOP = "stop"  # stop sampling; what is stored stays until uploaded or past retention
    UPLOAD = "upload"  # upload what is stored to upload_url, then keep sampling as before (or not)


class CaptureReason(StrEnum):
    """Why a sample was captured (a capture record's ``reason``; the policy's switches)."""

    UNIFORM = "uniform"  # the uniform rate
    LOW_CONFIDENCE = "low-confidence"  # the top-1 output's max softmax was below the threshold
    DRIFT = "drift"  # the central side flagged the device's inputs as drifted
    DISAGREEMENT = "disagreement"  # a running shadow's top-1 differed from serving's


class CaptureDrop(StrEnum):
    """Why captured samples were dropped, in a ``capture.dropped`` event's details."""

    BUDGET = "budget"  # max_samples or max_bytes reached: new samples are not stored
    DISK_FULL = "disk-full"  # the store's disk filled: the oldest samples went first
    RETENTION = "retention"  # older than retention_s and never uploaded
    REFUSED = "refused"  # the receiver refused them for good (4xx other than 401/403/409)


class CaptureStop(StrEnum):
    """Why capture stopped, in a ``capture.stopped`` event's details."""

    STOPPED = "stopped"
    SUPERSEDED = "superseded"
    BUDGET = "budget"
    EXPIRED = "expired"


# What a deploy event says when its details carry no result.
EVENT_RESULTS = {EventKind.DEPLOY_STARTED: DeployResult.IN_PROGRESS, EventKind.DEPLOY_APPLIED: DeployResult.APPLIED,
                 EventKind.DEPLOY_FAILED: DeployResult.FAILED, EventKind.DEPLOY_REFUSED: DeployResult.REFUSED,
                 EventKind.DEPLOY_ROLLED_BACK: DeployResult.APPLIED}


# ---- field types ---------------------------------------------------------------------------------

Id = Annotated[str, Field(pattern=f"^{ID_REGEX}$")]
Sha256 = Annotated[str, Field(pattern=f"^{SHA256_REGEX}$")]
Epoch = Annotated[str, Field(pattern=f"^{EPOCH_REGEX}$")]
Slot = Annotated[str, Field(pattern=f"^{SLOT_REGEX}$")]
Label = Annotated[str, Field(max_length=MAX_LABEL)]
Name = Annotated[str, Field(min_length=1, max_length=MAX_LABEL)]
Count = Annotated[int, Field(strict=True, ge=0, le=MAX_SAFE_INT)]
WindowCount = Annotated[int, Field(strict=True, ge=0, le=MAX_WINDOW_COUNT)]
Ms = Annotated[int, Field(strict=True, ge=0, le=MAX_SAFE_INT, description="milliseconds since the Unix epoch")]
Finite = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-MAX_MICROS, le=MAX_MICROS)]
Micros = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0, le=MAX_MICROS)]
Share = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0, le=1)]
DetailKey = Annotated[str, Field(min_length=1, max_length=64)]


class _Msg(BaseModel):
    # Numbers and booleans are strict (no "1" or true for 1, no "1.5" for 1.5; JSON integers still
    # validate as floats); enum fields take their words.
    model_config = ConfigDict(extra="forbid")


# ---- device → central ------------------------------------------------------------------------------

class Envelope(_Msg):
    """Fields every device message carries."""

    v: Literal[1] = PROTOCOL_VERSION
    fleet: Id
    device: Id
    epoch: Epoch = Field(description="random id of the device's spool, chosen when the spool database is "
                                     "created: a new epoch (a re-image, a recreated spool) restarts bdSeq and seq")
    bdSeq: Count = Field(description="session counter: incremented and stored before each MQTT CONNECT")
    seq: Count = Field(description="per-device message counter; only grows within an epoch, across sessions and "
                                   "restarts (a death repeats its session's birth seq)")
    ts_ms: Ms = Field(description="when the device made the message (ms since the epoch)")
    historical: Annotated[bool, Field(strict=True)] = Field(
        default=False, description="published in a later session than the one it was made in")


class ArtifactRef(_Msg):
    """The installed artifact, as its manifest describes it (a claim: the monitor labels groups from
    what its own store knows about ``manifest_sha256``)."""

    name: Label
    model: Label
    model_version: Label
    target: Label
    backend: Label
    backend_version: Label
    manifest_sha256: Sha256


class LatencyLayout(_Msg):
    start_us: Micros = Field(gt=0)
    factor: Annotated[float, Field(strict=True, allow_inf_nan=False, gt=1, le=16)]
    count: Annotated[int, Field(strict=True, ge=1, le=MAX_LATENCY_BUCKETS)]


class OutputLayout(_Msg):
    """How one output is summarised (the manifest's ``monitoring.outputs`` entry)."""

    model_config = ConfigDict(json_schema_extra={"allOf": [
        {"if": {"properties": {"kind": {"const": "classes"}}, "required": ["kind"]},
         "then": {"required": ["classes"], "properties": {"classes": {"type": "integer"}}}},
        {"if": {"properties": {"kind": {"const": "histogram"}}, "required": ["kind"]},
         "then": {"required": ["edges"], "properties": {"edges": {"type": "array"}}}},
    ]})

    name: Name
    kind: OutputKind
    classes: Annotated[int, Field(strict=True, ge=1, le=MAX_CLASSES)] | None = None
    edges: Annotated[list[Finite], Field(min_length=2, max_length=MAX_EDGES)] | None = None
    reference: Annotated[list[Share], Field(max_length=MAX_CLASSES + 2)] | None = Field(
        default=None, description="the build's share per class / bin (drift is measured against it)")

    @model_validator(mode="after")
    def _kind_fields(self) -> OutputLayout:
        if self.kind == OutputKind.CLASSES and self.classes is None:
            raise ValueError("a 'classes' output needs 'classes'")
        if self.kind == OutputKind.HISTOGRAM:
            if self.edges is None:
                raise ValueError("a 'histogram' output needs 'edges'")
            if any(b <= a for a, b in zip(self.edges, self.edges[1:])):
                raise ValueError("histogram edges must be strictly ascending")
        if self.reference is not None and len(self.reference) != self.bins:
            raise ValueError(f"'reference' holds {len(self.reference)} shares, the output has {self.bins} bins")
        return self

    @property
    def bins(self) -> int:
        """Counts per window: one per class, or one per bin plus underflow and overflow."""
        if self.kind == OutputKind.CLASSES:
            return self.classes or 0
        return len(self.edges or []) - 1 + 2


class MetricSchema(_Msg):
    interval_s: Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0, le=86400)]
    latency: LatencyLayout
    outputs: Annotated[list[OutputLayout], Field(max_length=MAX_OUTPUTS)]
    build_latency_us: Micros | None = Field(default=None, description="p50 measured at build time, if any")

    @model_validator(mode="after")
    def _unique_outputs(self) -> MetricSchema:
        if len({o.name for o in self.outputs}) != len(self.outputs):
            raise ValueError("output names must be unique")
        return self


class Runtime(_Msg):
    version: Label
    isa: Label
    cpu: Label | None = Field(default=None, description="the CPU's model (cpuid's brand string on x86-64, the core "
                              "named from MIDR_EL1 on aarch64), so figures measured on the device name what they ran on")


class Birth(Envelope):
    kind: Literal[MessageKind.BIRTH] = MessageKind.BIRTH
    target: Label
    runtime: Runtime
    artifact: ArtifactRef
    metrics: MetricSchema


class Death(Envelope):
    kind: Literal[MessageKind.DEATH] = MessageKind.DEATH
    reason: DeathReason


class LatencyWindow(_Msg):
    counts: Annotated[list[WindowCount], Field(max_length=MAX_LATENCY_BUCKETS)] = Field(
        description="runs per latency bucket in this window (the birth's layout)")
    underflow: WindowCount
    overflow: WindowCount
    sum_us: Micros
    max_us: Micros
    p50_us: Micros
    p95_us: Micros
    p99_us: Micros


class OutputWindow(_Msg):
    counts: Annotated[list[WindowCount], Field(max_length=MAX_CLASSES)] = Field(
        description="per class / bin, in this window")
    underflow: WindowCount
    overflow: WindowCount
    nan: WindowCount
    seen: WindowCount = Field(description="values (histogram) or rows (classes) the window's runs produced")
    binned: WindowCount = Field(description="how many of them were counted (large outputs are sampled)")


class ProcessWindow(_Msg):
    rss_bytes: Count
    cpu_seconds: Micros = Field(description="CPU time the process used in this window")
    cpu_percent: Micros


class SpoolState(_Msg):
    queued: Count = Field(description="messages waiting for a PUBACK")
    dropped_total: Count = Field(description="messages dropped because the spool's disk budget was exhausted")


class Telemetry(Envelope):
    kind: Literal[MessageKind.TELEMETRY] = MessageKind.TELEMETRY
    artifact_sha256: Sha256
    window_start_ms: Ms
    window_end_ms: Ms
    runs: WindowCount
    errors: WindowCount
    nan_input_runs: WindowCount
    nan_input_values: WindowCount
    latency: LatencyWindow
    outputs: Annotated[dict[Name, OutputWindow], Field(max_length=MAX_OUTPUTS)]
    process: ProcessWindow
    temperature_c: Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-273.15, le=1000)] | None = None
    spool: SpoolState


class PreviousSlot(_Msg):
    slot: Slot | None = None
    artifact_sha256: Sha256


class DeployReport(_Msg):
    """A device's report of its deployment state: a ``state`` message's and a ``deploy.*`` event's
    ``details`` (docs/deployment.md §5). Unknown fields are ignored (not stored), so a newer agent's
    additions never cost its report."""

    model_config = ConfigDict(extra="ignore")

    slot: Slot | None = None
    artifact: Label | None = None
    desired_version: Count | None = None
    deployment_id: Id | None = None
    result: DeployResult | None = None
    phase: DeployPhase | None = None
    error: Annotated[str, Field(max_length=MAX_ERROR)] | None = None
    previous_slot: PreviousSlot | None = None


class Event(Envelope):
    kind: Literal[MessageKind.EVENT] = MessageKind.EVENT
    event: Annotated[str, Field(pattern=f"^{EVENT_REGEX}$")] = Field(
        description="the event's name; edgesmith's own are listed in EventKind, an application may send others")
    message: Annotated[str, Field(max_length=MAX_MESSAGE)]
    details: Annotated[dict[DetailKey, JsonValue], Field(max_length=MAX_DETAILS)] = {}

    @model_validator(mode="after")
    def _deploy_details(self) -> Event:
        self.deploy_report()  # a deploy event's details are a deploy report
        self.shadow_report()  # and a shadow event's a shadow report
        self.capture_report()  # and a capture event's a capture report
        return self

    def deploy_report(self) -> DeployReport | None:
        if not self.event.startswith("deploy."):
            return None
        return DeployReport.model_validate_json(json.dumps(self.details))

    def shadow_report(self) -> ShadowReport | None:
        if not self.event.startswith("shadow."):
            return None
        return ShadowReport.model_validate_json(json.dumps(self.details))

    def capture_report(self) -> CaptureReport | None:
        if not self.event.startswith("capture."):
            return None
        return CaptureReport.model_validate_json(json.dumps(self.details))


class State(Envelope):
    """What the device reports it is running and its deployment state."""

    kind: Literal[MessageKind.STATE] = MessageKind.STATE
    artifact_sha256: Sha256 | None
    details: DeployReport = DeployReport()


class ShadowReport(_Msg):
    """A ``shadow.*`` event's ``details``. Unknown fields are ignored, as in DeployReport."""

    model_config = ConfigDict(extra="ignore")

    shadow_id: Id
    shadow_version: Count | None = None
    candidate: Annotated[int, Field(strict=True, ge=0, lt=MAX_SHADOW_CANDIDATES)] | None = None
    candidate_sha256: Sha256 | None = Field(default=None, description="the candidate's manifest")
    reason: ShadowEnd | None = None
    error: Annotated[str, Field(max_length=MAX_ERROR)] | None = None
    rss_increase_bytes: Count | None = None


class CaptureReport(_Msg):
    """A ``capture.*`` event's ``details`` (docs/capture.md). Unknown fields are ignored, as in ShadowReport."""

    model_config = ConfigDict(extra="ignore")

    capture_id: Id
    capture_version: Count | None = None
    samples: Count | None = Field(default=None, description="samples concerned (stored, uploaded or dropped)")
    bytes: Count | None = Field(default=None, description="their record bytes")
    stored_samples: Count | None = Field(default=None, description="samples in the device's capture store after this")
    stored_bytes: Count | None = None
    reason: CaptureDrop | None = Field(default=None, description="capture.dropped: why")
    stop: CaptureStop | None = Field(default=None, description="capture.stopped: why")
    error: Annotated[str, Field(max_length=MAX_ERROR)] | None = None


class ShadowOutput(_Msg):
    """One output of a shadow window: the candidate's output against the serving model's on the
    same inputs."""

    compared: Count = Field(description="values compared (every element of the output, per sample)")
    rows: Count = Field(description="samples (classes outputs: rows) compared")
    agree: Count | None = Field(default=None, description="classes outputs: rows whose top-1 class matched serving's")
    max_abs_err: Micros = Field(description="max |candidate - serving| over the window's finite values")
    max_rel_err: Micros = Field(description="max_abs_err / max |serving| over the same values (0 when serving is all 0)")
    nan: Count = Field(description="values not finite in the candidate's output where serving's were finite")
    histogram: OutputWindow | None = Field(
        default=None, description="the candidate's own output summary, in its manifest's monitoring layout")


class ShadowWindow(Envelope):
    """A shadow run's summary for one window (docs/shadow.md). The inputs never leave the device."""

    kind: Literal[MessageKind.SHADOW] = MessageKind.SHADOW
    shadow_id: Id
    shadow_version: Count
    candidate: Annotated[int, Field(strict=True, ge=0, lt=MAX_SHADOW_CANDIDATES)] = Field(
        description="the candidate's index in the shadow state")
    candidate_sha256: Sha256 = Field(description="the candidate's manifest")
    serving_sha256: Sha256 = Field(description="the serving model's manifest")
    window_start_ms: Ms
    window_end_ms: Ms
    offered: Count = Field(description="serving runs sampled for the shadow in this window")
    samples: Count = Field(description="of them, run by the candidate")
    dropped: Count = Field(description="of them, dropped: the shadow queue was full or the CPU share was used up")
    errors: Count = Field(description="candidate runs that failed")
    latency: LatencyWindow = Field(description="the candidate's run time (the birth's latency layout)")
    serving_latency: LatencyWindow = Field(
        description="the serving model's run time on the same samples, as the agent served them (what users see)")
    paired_samples: Count | None = Field(
        default=None, description="of samples, those the serving model also ran in the shadow child (paired timing)")
    paired_serving_latency: LatencyWindow | None = Field(
        default=None, description="the serving model's run time in the shadow child on the paired samples, back to "
        "back with the candidate under the same scheduling: the latency ratio's baseline (absent: the agent has "
        "no paired timing)")
    outputs: Annotated[dict[Name, ShadowOutput], Field(max_length=MAX_OUTPUTS)]
    rss_increase_bytes: Count = Field(description="resident memory the shadow child adds on this device: the "
                                      "candidate and, with paired timing, the child's own serving Session")
    cpu_seconds: Micros = Field(description="CPU time the shadow used in this window")


DeviceMessage = Annotated[Union[Birth, Death, Telemetry, Event, State, ShadowWindow], Field(discriminator="kind")]
AnyDeviceMessage = Birth | Death | Telemetry | Event | State | ShadowWindow
_DEVICE_ADAPTER: TypeAdapter[Any] = TypeAdapter(DeviceMessage)
MESSAGE_MODELS: dict[MessageKind, type[Envelope]] = {MessageKind.BIRTH: Birth, MessageKind.DEATH: Death,
                                                     MessageKind.TELEMETRY: Telemetry, MessageKind.EVENT: Event,
                                                     MessageKind.STATE: State, MessageKind.SHADOW: ShadowWindow}


class PayloadTooLarge(ValueError):
    pass


def parse_message(payload: bytes) -> AnyDeviceMessage:
    """Validate one device message; raises PayloadTooLarge, or pydantic.ValidationError when it is not one."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise PayloadTooLarge(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    return _DEVICE_ADAPTER.validate_json(payload)


def refusal_reason(error: ValidationError) -> str:
    """``malformed`` (not JSON) or ``invalid`` (JSON, but not a message of the contract)."""
    return "malformed" if any(err["type"] == "json_invalid" for err in error.errors()) else "invalid"


# ---- central → device: the desired state ---------------------------------------------------------------

class DesiredArtifact(_Msg):
    url: Annotated[str, Field(min_length=1, max_length=MAX_URL)]
    sha256: Sha256 = Field(description="of the archive")
    size: Count = Field(description="of the archive, bytes")
    manifest_sha256: Sha256
    name: Name


class SignedState(_Msg):
    """What every signed central → device state carries (DesiredState, ShadowState, CaptureState):
    whom it is for, its version, when it was issued and until when a device takes it. Each kind is
    signed over its own domain, published on its own topic and counts its own versions."""

    v: Literal[1] = DESIRED_VERSION
    fleet: Id
    device: Id
    version: Annotated[int, Field(strict=True, ge=1, le=MAX_SAFE_INT)] = Field(
        description="strictly increasing per device and kind: a device refuses anything not above what it took")
    issued_at_ms: Ms
    not_after: Annotated[int, Field(strict=True, ge=1, le=MAX_SAFE_INT)] | None = Field(
        default=None, description="seconds since the epoch after which the device refuses it (absent: no expiry)")


class DesiredState(SignedState):
    """What one device should run; signed, inside a DesiredEnvelope."""

    deployment_id: Id
    action: DeployAction
    artifact: DesiredArtifact


class DesiredEnvelope(_Msg):
    """What is published (retained) on ``edgesmith/v1/<fleet>/<device>/desired``: the desired state's
    JSON as a string, so what is signed is exactly the bytes the device parses."""

    v: Literal[1] = DESIRED_VERSION
    signed: Annotated[str, Field(min_length=2, max_length=MAX_SIGNED)]
    key_id: Annotated[str, Field(pattern=f"^{KEY_ID_REGEX}$")]
    signature: Annotated[str, Field(pattern=f"^{SIGNATURE_REGEX}$")] = Field(
        description=f"ed25519 over {DESIRED_DOMAIN!r} + signed, hex")


class ShadowState(SignedState):
    """What one device should shadow; signed (over SHADOW_DOMAIN + the text) inside a DesiredEnvelope
    published, retained, on ``edgesmith/v1/<fleet>/<device>/shadow-desired`` (docs/shadow.md).

    ``start`` names the candidates, run one after another beside the serving model, each for an equal
    share of ``duration_s`` from ``starts_at_ms``; ``stop`` (no candidates) ends any shadow. Versions
    are their own counter, strictly increasing per device, as desired states' are."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"allOf": [
        {"if": {"properties": {"action": {"const": "start"}}, "required": ["action"]},
         "then": {"properties": {"candidates": {"minItems": 1}}}},
        {"if": {"properties": {"action": {"const": "stop"}}, "required": ["action"]},
         "then": {"properties": {"candidates": {"maxItems": 0}}}},
    ]})

    kind: Literal["shadow"] = "shadow"
    shadow_id: Id
    action: ShadowAction
    starts_at_ms: Ms = Field(default=0, description="when the first candidate's turn starts (its schedule's origin)")
    duration_s: Annotated[int, Field(strict=True, ge=1, le=MAX_SHADOW_DURATION_S)] = Field(
        default=3600, description="the whole shadow; each candidate runs for duration_s / len(candidates)")
    sample: Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0, le=1)] = Field(
        default=0.1, description="fraction of served requests also run by the candidate")
    cpu_share: Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0, le=1)] = Field(
        default=0.5, description="at most this fraction of one core's time goes to the candidate")
    queue: Annotated[int, Field(strict=True, ge=1, le=MAX_SHADOW_QUEUE)] = Field(
        default=4, description="samples waiting for the shadow worker; more are dropped and counted")
    max_bytes: Annotated[int, Field(strict=True, ge=1, le=MAX_SAFE_INT)] = Field(
        default=256 << 20, description="the shadow slot's byte budget (archive and extracted artifact)")
    candidates: Annotated[list[DesiredArtifact], Field(max_length=MAX_SHADOW_CANDIDATES)] = []

    @model_validator(mode="after")
    def _candidates(self) -> ShadowState:
        if self.action == ShadowAction.START and not self.candidates:
            raise ValueError("a 'start' shadow state needs at least one candidate")
        if self.action == ShadowAction.STOP and self.candidates:
            raise ValueError("a 'stop' shadow state names no candidates")
        return self


class CapturePolicy(_Msg):
    """Which served requests a device captures; a sample is taken when any switch says so (its
    record's ``reason`` names the first that did, in this field order)."""

    uniform: Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0, le=1)] = Field(
        default=0.0, description="fraction of served requests captured at random")
    low_confidence: Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0, le=1)] | None = Field(
        default=None, description="capture when the classes output's max softmax is below this (absent: off)")
    drift: bool = Field(default=False, description="the central side flagged this device's inputs as drifted")
    drift_rate: Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0, le=1)] = Field(
        default=0.0, description="with drift: fraction of served requests captured")
    disagreement: bool = Field(default=False, description="capture when a running shadow's top-1 differs from serving's")


class CaptureState(SignedState):
    """What one device should capture; signed (over CAPTURE_DOMAIN + the text) inside a
    DesiredEnvelope published, retained, on ``edgesmith/v1/<fleet>/<device>/capture-desired``
    (docs/capture.md). Versions are their own counter, strictly increasing per device."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"allOf": [
        {"if": {"properties": {"action": {"const": "start"}}, "required": ["action"]},
         "then": {"required": ["upload_token"], "properties": {"upload_token": {"type": "string"}}},
         "else": {"properties": {"upload_token": {"type": "null"}}}},
    ]})

    kind: Literal["capture"] = "capture"
    capture_id: Id
    action: CaptureAction
    policy: CapturePolicy = CapturePolicy()
    max_samples: Annotated[int, Field(strict=True, ge=1, le=1_000_000)] = Field(
        default=500, description="samples the device stores for this capture at most (and the receiver accepts)")
    max_bytes: Annotated[int, Field(strict=True, ge=1, le=MAX_SAFE_INT)] = Field(
        default=64 << 20, description="record bytes the device stores for this capture at most (and the receiver accepts)")
    retention_s: Annotated[int, Field(strict=True, ge=1, le=MAX_CAPTURE_RETENTION_S)] = Field(
        default=7 * 24 * 3600, description="a stored sample not uploaded within this is deleted (capture.dropped)")
    upload_url: Annotated[str, Field(min_length=1, max_length=MAX_URL, pattern=r"^https?://")] = Field(
        description="the central receiver's base URL; records go to PUT <upload_url>/v1/captures/<fleet>/<device>/<capture_id>/<sha256>")
    upload_token: Annotated[str, Field(pattern=f"^{SHA256_REGEX}$")] | None = Field(
        default=None, description="start only: 64 hex digits, random per device and capture, sent as 'Authorization: "
                                  "Bearer <token>' with every upload of this capture (the receiver keeps only its "
                                  "SHA-256, so stop and upload carry none: the device keeps the one start gave it)")

    @model_validator(mode="after")
    def _token(self) -> CaptureState:
        if (self.action == CaptureAction.START) != (self.upload_token is not None):
            raise ValueError("a 'start' capture state carries an upload_token; 'stop' and 'upload' carry none")
        return self


class CaptureTensor(_Msg):
    """One tensor in a capture record: ``nbytes`` raw little-endian bytes at ``offset`` of the data
    section (after the header), C order."""

    name: Name
    dtype: Annotated[str, Field(pattern=r"^(float32|float16|int8|uint8|int32|int64|bool)$")]
    shape: Annotated[list[Annotated[int, Field(strict=True, ge=0, le=MAX_CAPTURE_RECORD)]],
                     Field(max_length=MAX_CAPTURE_RANK)]
    offset: Annotated[int, Field(strict=True, ge=0, le=MAX_CAPTURE_RECORD)]
    nbytes: Annotated[int, Field(strict=True, ge=0, le=MAX_CAPTURE_RECORD)]


DTYPE_BYTES = {"float32": 4, "float16": 2, "int8": 1, "uint8": 1, "int32": 4, "int64": 8, "bool": 1}


class CaptureRecord(_Msg):
    """The JSON header of one uploaded capture record (one sample). The record is CAPTURE_MAGIC,
    then the header's length as 8 lower-case hex digits and a newline, then the header (this
    model, UTF-8 JSON), then the data section: the tensors' bytes, back to back in header order,
    nothing after them. The upload URL carries the SHA-256 of the whole record (docs/capture.md)."""

    v: Literal[1] = PROTOCOL_VERSION
    fleet: Id
    device: Id
    capture_id: Id
    manifest_sha256: Sha256 = Field(description="the serving model's manifest")
    model: Label = Field(description="the serving model's name")
    model_version: Label = Field(default="", description="its registry version, when the manifest names one")
    ts_ms: Ms = Field(description="when the sample was served")
    reason: CaptureReason
    top1: Annotated[int, Field(strict=True, ge=0, lt=MAX_CLASSES)] | None = Field(
        default=None, description="the serving model's top-1 class (classes outputs)")
    confidence: Share | None = Field(default=None, description="its max softmax")
    inputs: Annotated[list[CaptureTensor], Field(min_length=1, max_length=MAX_CAPTURE_TENSORS)]
    outputs: Annotated[list[CaptureTensor], Field(max_length=MAX_CAPTURE_TENSORS)] = []

    @model_validator(mode="after")
    def _layout(self) -> CaptureRecord:
        tensors = self.inputs + self.outputs
        names = [t.name for t in self.inputs], [t.name for t in self.outputs]
        if len(set(names[0])) != len(names[0]) or len(set(names[1])) != len(names[1]):
            raise ValueError("a tensor name appears twice among the inputs or the outputs")
        at = 0
        for t in tensors:
            count = 1
            for d in t.shape:
                count *= d
                if count > MAX_CAPTURE_RECORD:
                    raise ValueError(f"tensor {t.name!r} has more than {MAX_CAPTURE_RECORD} elements")
            if count * DTYPE_BYTES[t.dtype] != t.nbytes:
                raise ValueError(f"tensor {t.name!r}: nbytes {t.nbytes} is not its shape times its dtype's size")
            if t.offset != at:
                raise ValueError(f"tensor {t.name!r} starts at {t.offset}, not right after the previous one ({at})")
            at += t.nbytes
        if at > MAX_CAPTURE_RECORD:
            raise ValueError(f"the tensors hold {at} bytes, over {MAX_CAPTURE_RECORD}")
        return self

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.inputs + self.outputs)


# ---- JSON Schemas, the C++ header --------------------------------------------------------------------

SCHEMAS = {"telemetry": "docs/telemetry.schema.json", "desired": "docs/desired.schema.json",
           "capture": "docs/capture.schema.json"}
HEADER = "csrc/common/contract_words.h"


def json_schema(which: str) -> dict[str, Any]:
    """The JSON Schema of device messages (``telemetry``) or of the desired state and its envelope (``desired``)."""
    if which == "telemetry":
        schema = _DEVICE_ADAPTER.json_schema()
        schema["title"] = (f"edgesmith device message (birth, death, telemetry, event, state), "
                           f"protocol version {PROTOCOL_VERSION}")
    elif which == "desired":
        schema = DesiredEnvelope.model_json_schema()
        schema.setdefault("$defs", {}).update(DesiredState.model_json_schema(ref_template="#/$defs/{model}")
                                              .pop("$defs", {}))
        schema["$defs"]["DesiredState"] = {k: v for k, v in DesiredState.model_json_schema(
            ref_template="#/$defs/{model}").items() if k != "$defs"}
        shadow = ShadowState.model_json_schema(ref_template="#/$defs/{model}")
        schema["$defs"].update(shadow.pop("$defs", {}))
        schema["$defs"]["ShadowState"] = shadow
        capture = CaptureState.model_json_schema(ref_template="#/$defs/{model}")
        schema["$defs"].update(capture.pop("$defs", {}))
        schema["$defs"]["CaptureState"] = capture
        schema["title"] = (f"edgesmith signed desired state, version {DESIRED_VERSION}: the envelope; 'signed' holds "
                           "a DesiredState (on 'desired'), a ShadowState (on 'shadow-desired') or a CaptureState "
                           "(on 'capture-desired'), see $defs, as JSON text")
    elif which == "capture":
        schema = CaptureRecord.model_json_schema()
        schema["title"] = (f"edgesmith capture record header, version {PROTOCOL_VERSION} (after the magic line "
                           f"{CAPTURE_MAGIC.decode()!r} and the header's length as 8 hex digits and a newline)")
    else:
        raise ValueError(f"no schema {which!r}; choose one of {', '.join(SCHEMAS)}")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


def _fields(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _cpp_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", text).upper()


def header() -> str:
    """``csrc/common/contract_words.h``: what the C++ reader and writer spell."""
    out = ["// Generated by `python -m edgesmith.runtime.contract --header` from runtime/contract.py; do not edit.",
           "// The device contract's field names, vocabularies and limits (tests/test_contract.py checks it is fresh).",
           "#pragma once", "", "#include <cstdint>", "", "namespace edgesmith::contract {", "",
           f"constexpr int PROTOCOL_VERSION = {PROTOCOL_VERSION};",
           f"constexpr const char* TOPIC_ROOT = \"{TOPIC_ROOT}\";",
           f"constexpr uint64_t MAX_PAYLOAD_BYTES = {MAX_PAYLOAD_BYTES};",
           f"constexpr uint64_t MAX_SAFE_INT = {MAX_SAFE_INT}ull;",
           f"constexpr uint64_t MAX_WINDOW_COUNT = {MAX_WINDOW_COUNT}ull;",
           f"constexpr uint64_t MAX_CLASSES = {MAX_CLASSES};",
           f"constexpr uint64_t MAX_EDGES = {MAX_EDGES};",
           f"constexpr uint64_t MAX_OUTPUTS = {MAX_OUTPUTS};",
           f"constexpr uint64_t MAX_LATENCY_BUCKETS = {MAX_LATENCY_BUCKETS};",
           f"constexpr uint64_t MAX_DETAILS = {MAX_DETAILS};",
           f"constexpr double MAX_MICROS = {MAX_MICROS!r};",
           f"constexpr uint64_t MAX_SHADOW_CANDIDATES = {MAX_SHADOW_CANDIDATES};",
           f"constexpr uint64_t MAX_SHADOW_QUEUE = {MAX_SHADOW_QUEUE};",
           f"constexpr uint64_t MAX_SHADOW_DURATION_S = {MAX_SHADOW_DURATION_S};",
           f"constexpr const char* SHADOW_DOMAIN = \"{SHADOW_DOMAIN.strip()}\\n\";",
           f"constexpr const char* CAPTURE_DOMAIN = \"{CAPTURE_DOMAIN.strip()}\\n\";",
           f"constexpr const char* CAPTURE_MAGIC = \"{CAPTURE_MAGIC.decode().strip()}\\n\";",
           f"constexpr uint64_t MAX_CAPTURE_HEADER = {MAX_CAPTURE_HEADER};",
           f"constexpr uint64_t MAX_CAPTURE_TENSORS = {MAX_CAPTURE_TENSORS};",
           f"constexpr uint64_t MAX_CAPTURE_RANK = {MAX_CAPTURE_RANK};",
           f"constexpr uint64_t MAX_CAPTURE_RECORD = {MAX_CAPTURE_RECORD};",
           f"constexpr uint64_t MAX_CAPTURE_RETENTION_S = {MAX_CAPTURE_RETENTION_S};",
           f"constexpr uint64_t MAX_LABEL = {MAX_LABEL};",
           f"constexpr uint64_t MAX_MESSAGE = {MAX_MESSAGE};",
           f"constexpr uint64_t MAX_ERROR = {MAX_ERROR};",
           f"constexpr uint64_t EPOCH_HEX_DIGITS = 16;",
           f"constexpr const char* ID_REGEX = \"{ID_REGEX}\";",
           f"constexpr const char* EVENT_REGEX = \"{EVENT_REGEX}\";",
           f"constexpr const char* SHA256_REGEX = \"{SHA256_REGEX}\";",
           f"constexpr const char* EPOCH_REGEX = \"{EPOCH_REGEX}\";",
           f"constexpr const char* SLOT_REGEX = \"{SLOT_REGEX}\";", ""]
    for enum in (MessageKind, DeathReason, OutputKind, DeployAction, DeployResult, DeployPhase, EventKind,
                 ShadowAction, ShadowEnd, CaptureAction, CaptureReason, CaptureDrop, CaptureStop):
        prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", enum.__name__).upper()
        out.append(f"// {enum.__name__}")
        out += [f"constexpr const char* {prefix}_{m.name} = \"{m.value}\";" for m in enum]
        out.append("")
    out.append(f"constexpr const char* DESIRED_TOPIC = \"{DESIRED_TOPIC}\";")
    out.append(f"constexpr const char* SHADOW_TOPIC = \"{SHADOW_TOPIC}\";")
    out.append(f"constexpr const char* CAPTURE_TOPIC = \"{CAPTURE_TOPIC}\";")
    out.append("")
    models: list[tuple[str, type[BaseModel]]] = [
        ("ENVELOPE", Envelope), ("BIRTH", Birth), ("DEATH", Death), ("TELEMETRY", Telemetry), ("EVENT", Event),
        ("STATE", State), ("ARTIFACT_REF", ArtifactRef), ("LATENCY_LAYOUT", LatencyLayout),
        ("OUTPUT_LAYOUT", OutputLayout), ("METRIC_SCHEMA", MetricSchema), ("RUNTIME", Runtime),
        ("LATENCY_WINDOW", LatencyWindow), ("OUTPUT_WINDOW", OutputWindow), ("PROCESS_WINDOW", ProcessWindow),
        ("SPOOL_STATE", SpoolState), ("DEPLOY_REPORT", DeployReport), ("PREVIOUS_SLOT", PreviousSlot),
        ("DESIRED_ENVELOPE", DesiredEnvelope), ("DESIRED_STATE", DesiredState), ("DESIRED_ARTIFACT", DesiredArtifact),
        ("SHADOW_STATE", ShadowState), ("SHADOW_REPORT", ShadowReport), ("SHADOW_OUTPUT", ShadowOutput),
        ("SHADOW_WINDOW", ShadowWindow), ("CAPTURE_STATE", CaptureState), ("CAPTURE_POLICY", CapturePolicy),
        ("CAPTURE_REPORT", CaptureReport), ("CAPTURE_RECORD", CaptureRecord), ("CAPTURE_TENSOR", CaptureTensor)]
    out.append("// Field names, as F_<MODEL>_<FIELD>; F_KIND is every device message's kind.")
    out.append('constexpr const char* F_KIND = "kind";')
    for prefix, model in models:
        names = _fields(model) if prefix in ("ENVELOPE",) or not issubclass(model, Envelope) else \
            [n for n in _fields(model) if n not in Envelope.model_fields]
        out += [f"constexpr const char* F_{prefix}_{_cpp_name(n)} = \"{n}\";" for n in names]
    out += ["", "}  // namespace edgesmith::contract", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schema", choices=sorted(SCHEMAS), help="print a JSON Schema")
    parser.add_argument("--header", action="store_true", help=f"print the C++ header ({HEADER})")
    args = parser.parse_args(argv)
    if args.schema:
        sys.stdout.write(json.dumps(json_schema(args.schema), indent=2, sort_keys=True) + "\n")
        return 0
    if args.header:
        sys.stdout.write(header())
        return 0
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
