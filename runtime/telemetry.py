"""Fleet telemetry for Python apps that embed a Session: the same C++ publisher as ``edgesmith-agent``.

    from edgesmith.runtime import Session
    from edgesmith.runtime.telemetry import Publisher

    session = Session("dist/digits-cnn-x86_64-avx2-openvino")
    with Publisher(session, "fleet/broker/devices/cam-01.json", "/var/lib/cam-01") as telemetry:
        ...                                   # session.run(...) as usual
        telemetry.event("recalibrated", "camera recalibrated", {"exposure_ms": 4})

The publisher (``csrc/telemetry/``, protocol in ``docs/telemetry.md``) connects to the broker
named in the credentials file that ``edgesmith broker add-device`` writes, announces the session's
artifact in a *birth*, and every ``interval_s`` publishes the window's summary of the Session's
statistics (runs, errors, latency histogram and percentiles, per-output counts, process RSS and
CPU, temperature). Every message is stored in ``<data_dir>/spool.db`` first and deleted when the
broker acknowledges it, so nothing is lost while the broker is away, or across restarts; the spool
is bounded by ``spool_max_bytes`` (oldest dropped, counted and reported). ``close()`` publishes the
last window and a *death* (reason ``shutdown``); a process that dies without it is reported dead by
the broker (the MQTT will). Work happens on the publisher's own threads, without the GIL.

Errors are :mod:`edgesmith.runtime.errors` classes: ``ValueError`` for bad credentials or
arguments, ``RuntimeError`` when the data directory or spool cannot be used.
"""

from __future__ import annotations

import json
import os
from typing import Any

from edgesmith.runtime.artifact import _core
from edgesmith.runtime.errors import ValueError as EdgesmithValueError

__all__ = ["Publisher"]


class Publisher:
    """Reports ``session`` to the fleet's MQTT broker until :meth:`close` (or the ``with`` block ends).

    ``credentials`` is the JSON file ``edgesmith broker add-device --json`` writes (it names the
    device, fleet, broker and login); ``data_dir`` holds the spool (one publisher per directory);
    ``interval_s`` is the telemetry window; ``spool_max_bytes`` = 0 keeps the default budget (32 MiB).
    """

    def __init__(self, session: Any, credentials: str | os.PathLike[str], data_dir: str | os.PathLike[str],
                 interval_s: float = 10.0, spool_max_bytes: int = 0):
        core_session = getattr(session, "_core", None)
        if core_session is None:
            raise EdgesmithValueError("Publisher takes an edgesmith.runtime.Session")
        if not interval_s > 0:
            raise EdgesmithValueError(f"interval_s must be a positive number of seconds, got {interval_s!r}")
        if spool_max_bytes < 0:
            raise EdgesmithValueError(f"spool_max_bytes must be >= 0, got {spool_max_bytes!r}")
        self._session = session
        self._core = _core().TelemetryPublisher(core_session, os.fspath(credentials), os.fspath(data_dir),
                                                float(interval_s), int(spool_max_bytes))
        self._closed = False

    def event(self, name: str, message: str, details: dict[str, Any] | None = None) -> None:
        """Publish an event: ``name`` like ``run_error`` (lower case, ``^[a-z][a-z0-9_.-]{0,63}$``),
        a one-line ``message`` and JSON-serialisable ``details``."""
        self._core.event(name, message, json.dumps(details or {}))

    def window(self) -> None:
        """Close the current telemetry window now and publish it (the timer starts a new one)."""
        self._core.window()

    def status(self) -> dict[str, Any]:
        """``{device, fleet, connected, bdSeq, seq, connects, acked, in_flight, queued,
        queued_bytes, dropped_total}``."""
        return json.loads(self._core.status())

    def close(self, timeout_s: float = 5.0) -> None:
        """Publish the last window, wait up to ``timeout_s`` for the spool to drain, publish the
        death (reason ``shutdown``) and disconnect. What is still queued stays in the spool for the
        next start. Idempotent."""
        if not self._closed:
            self._closed = True
            self._core.close(timeout_s)

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
