"""The telemetry protocol, version 1 (docs/telemetry.md): topics and one pydantic model per message.

This module is the source of truth: ``docs/telemetry.schema.json`` is generated from it
(``python -m edgesmith.toolchain.fleet.protocol --schema``) and the C++ publisher
(``csrc/telemetry/``) is tested to produce messages that validate against it.

Design, after Sparkplug B (presence and ordering as protocol) but lossless: a device announces
each MQTT session with a *birth* carrying a session counter ``bdSeq``; its *death* is the MQTT
will registered with the same ``bdSeq`` (a death from an older session never marks a newer one
offline); every message carries a per-device 64-bit ``seq`` that only grows, across sessions and
restarts, so the monitor drops duplicates by ``(device, bdSeq, seq)`` and counts what never came.
Everything is QoS 1 from an on-disk spool (stored before sending, deleted on PUBACK), in an MQTT v5
persistent session; a message published in a later session than the one it was made in is
flagged ``historical``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

PROTOCOL_VERSION = 1
TOPIC_ROOT = "edgesmith/v1"
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # fleet and device ids: no '/', '+', '#'
DEVICE_KINDS = ("birth", "death", "telemetry", "event", "state")
MAX_PAYLOAD_BYTES = 256 * 1024  # the monitor refuses (counts and drops) anything larger

Id = Annotated[str, Field(pattern=ID_PATTERN)]
U64 = Annotated[int, Field(ge=0, le=2**64 - 1)]
Count = Annotated[int, Field(ge=0)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


def topic(fleet: str, device: str, kind: str) -> str:
    """``edgesmith/v1/<fleet>/<device>/<kind>``."""
    return f"{TOPIC_ROOT}/{fleet}/{device}/{kind}"


def alert_topic(fleet: str) -> str:
    """Where the monitor publishes alerts for a fleet (``_monitor`` is not a valid device id)."""
    return f"{TOPIC_ROOT}/{fleet}/_monitor/alert"


_TOPIC = re.compile(rf"^{re.escape(TOPIC_ROOT)}/([^/]+)/([^/]+)/([^/]+)$")


def parse_topic(name: str) -> tuple[str, str, str] | None:
    """``(fleet, device, kind)`` of a device topic, or None for anything else."""
    match = _TOPIC.match(name)
    if not match or not all(re.match(ID_PATTERN, part) for part in match.groups()[:2]):
        return None
    return match.group(1), match.group(2), match.group(3)


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Envelope(_Msg):
    """Fields every device message carries."""

    v: Literal[1] = PROTOCOL_VERSION
    fleet: Id
    device: Id
    bdSeq: U64 = Field(description="session counter: incremented and stored before each MQTT CONNECT")
    seq: U64 = Field(description="per-device message counter; only grows, across sessions and restarts "
                                 "(a death repeats its session's birth seq)")
    ts_ms: Annotated[int, Field(ge=0)] = Field(description="when the device made the message (ms since the epoch)")
    historical: bool = Field(default=False, description="published in a later session than the one it was made in")


class ArtifactRef(_Msg):
    """The installed artifact, as its manifest describes it."""

    name: str
    model: str
    model_version: str
    target: str
    backend: str
    backend_version: str
    manifest_sha256: Sha256


class LatencyLayout(_Msg):
    start_us: Finite = Field(gt=0)
    factor: Finite = Field(gt=1)
    count: Annotated[int, Field(ge=1, le=4096)]


class OutputLayout(_Msg):
    """How one output is summarised (the manifest's ``monitoring.outputs`` entry)."""

    name: str
    kind: Literal["classes", "histogram"]
    classes: Annotated[int, Field(ge=1)] | None = None
    edges: list[Finite] | None = None
    reference: list[Finite] | None = Field(default=None, description="the build's share per class / bin "
                                                                      "(drift is measured against it)")


class MetricSchema(_Msg):
    interval_s: Finite = Field(gt=0)
    latency: LatencyLayout
    outputs: list[OutputLayout]
    build_latency_us: Finite | None = Field(default=None, description="p50 measured at build time, if any")


class Runtime(_Msg):
    version: str
    isa: str


class Birth(Envelope):
    kind: Literal["birth"] = "birth"
    target: str
    runtime: Runtime
    artifact: ArtifactRef
    metrics: MetricSchema


class Death(Envelope):
    kind: Literal["death"] = "death"
    reason: Literal["connection-lost", "shutdown"] = Field(
        description="connection-lost: the MQTT will, sent by the broker; shutdown: said by the device")


class LatencyWindow(_Msg):
    counts: list[Count] = Field(description="runs per latency bucket in this window (the birth's layout)")
    underflow: Count
    overflow: Count
    sum_us: Finite = Field(ge=0)
    max_us: Finite = Field(ge=0)
    p50_us: Finite = Field(ge=0)
    p95_us: Finite = Field(ge=0)
    p99_us: Finite = Field(ge=0)


class OutputWindow(_Msg):
    counts: list[Count] = Field(description="per class / bin, in this window")
    underflow: Count
    overflow: Count
    nan: Count
    seen: Count = Field(description="values (histogram) or rows (classes) the window's runs produced")
    binned: Count = Field(description="how many of them were counted (large outputs are sampled)")


class ProcessWindow(_Msg):
    rss_bytes: Count
    cpu_seconds: Finite = Field(ge=0, description="CPU time the process used in this window")
    cpu_percent: Finite = Field(ge=0)


class SpoolState(_Msg):
    queued: Count = Field(description="messages waiting for a PUBACK")
    dropped_total: Count = Field(description="messages dropped because the spool's disk budget was exhausted")


class Telemetry(Envelope):
    kind: Literal["telemetry"] = "telemetry"
    artifact_sha256: Sha256
    window_start_ms: Annotated[int, Field(ge=0)]
    window_end_ms: Annotated[int, Field(ge=0)]
    runs: Count
    errors: Count
    nan_input_runs: Count
    nan_input_values: Count
    latency: LatencyWindow
    outputs: dict[str, OutputWindow]
    process: ProcessWindow
    temperature_c: Finite | None = None
    spool: SpoolState


class Event(Envelope):
    kind: Literal["event"] = "event"
    event: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_.-]{0,63}$")]
    message: str
    details: dict[str, Any] = {}


class State(Envelope):
    """What the device reports it is running (deployment state; see the deployment work)."""

    kind: Literal["state"] = "state"
    artifact_sha256: Sha256 | None
    details: dict[str, Any] = {}


DeviceMessage = Annotated[Union[Birth, Death, Telemetry, Event, State], Field(discriminator="kind")]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(DeviceMessage)


def parse_message(payload: bytes) -> Birth | Death | Telemetry | Event | State:
    """Validate one device message; raises pydantic.ValidationError (or ValueError) when it is not one."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    return _ADAPTER.validate_json(payload)


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a device message (one of the kinds, by ``kind``)."""
    schema = _ADAPTER.json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = f"edgesmith telemetry message, protocol version {PROTOCOL_VERSION}"
    return schema


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schema", action="store_true", help="print the JSON Schema of device messages")
    args = parser.parse_args(argv)
    if args.schema:
        sys.stdout.write(json.dumps(json_schema(), indent=2, sort_keys=True) + "\n")
        return 0
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
