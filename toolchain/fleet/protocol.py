"""MQTT topics of the device contract, and the contract's models re-exported for the fleet code.

The messages themselves are defined once, in ``edgesmith.runtime.contract`` (docs/telemetry.md).

Design, after Sparkplug B (presence and ordering as protocol) but lossless: a device announces
each MQTT session with a *birth* carrying a session counter ``bdSeq``; its *death* is the MQTT
will registered with the same ``bdSeq`` (a death from an older session never marks a newer one
offline); every message carries a per-device ``seq`` that only grows, across sessions and
restarts, within the device's spool *epoch* (a random id chosen when the spool is created: a
re-image starts a new epoch, and bdSeq and seq start over), so the monitor drops duplicates by
``(device, epoch, seq)`` and counts what never came. Everything is QoS 1 from an on-disk spool
(stored before sending, deleted on PUBACK), in an MQTT v5 persistent session; a message published
in a later session than the one it was made in is flagged ``historical``.
"""

from __future__ import annotations

import re
import sys

from edgesmith.runtime.contract import (ID_REGEX, MAX_PAYLOAD_BYTES, PROTOCOL_VERSION, TOPIC_ROOT,  # noqa: F401
                                        ArtifactRef, Birth, Death, DeployReport, Envelope, Event, LatencyLayout,
                                        LatencyWindow, MessageKind, MetricSchema, OutputLayout, OutputWindow,
                                        ProcessWindow, Runtime, SpoolState, State, Telemetry, is_id, json_schema,
                                        main, parse_message)

ID_PATTERN = f"^{ID_REGEX}$"
DEVICE_KINDS = tuple(k.value for k in MessageKind)


def topic(fleet: str, device: str, kind: str) -> str:
    """``edgesmith/v1/<fleet>/<device>/<kind>``."""
    return f"{TOPIC_ROOT}/{fleet}/{device}/{kind}"


def alert_topic(fleet: str) -> str:
    """Where the monitor publishes alerts for a fleet (``_monitor`` is not a valid device id)."""
    return f"{TOPIC_ROOT}/{fleet}/_monitor/alert"


_TOPIC = re.compile(rf"{re.escape(TOPIC_ROOT)}/([^/]+)/([^/]+)/([^/]+)")


def parse_topic(name: str) -> tuple[str, str, str] | None:
    """``(fleet, device, kind)`` of a device topic, or None for anything else."""
    match = _TOPIC.fullmatch(name)
    if not match or not all(is_id(part) for part in match.groups()[:2]):
        return None
    return match.group(1), match.group(2), match.group(3)


if __name__ == "__main__":
    sys.exit(main(["--schema", "telemetry"]))  # the old command: prints the device messages' schema
