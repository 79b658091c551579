"""Alert rules and where alerts go (log, the fleet's MQTT alert topic, an optional webhook).

Each rule is evaluated per device on the monitor's view of its recent windows and says *firing*,
*clear*, or nothing (not enough data to say, or in between). An alert fires once when its
condition starts and resolves once when it clears; the state lives in the store's ``alerts``
table, so a restarted monitor, or a second one on the same database, does not fire it again.
A value must fall below ``CLEAR_RATIO`` x its threshold to clear, so a value hovering at the
threshold does not flap.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the CLI reads the default thresholds from here without loading SQLAlchemy
    from edgesmith.toolchain.fleet.store import AlertKey, Store

log = logging.getLogger("edgesmith.fleet.monitor")

CLEAR_RATIO = 0.8
WEBHOOK_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Thresholds:
    drift_psi: float = 0.2  # PSI above 0.2 is the usual "significant shift"
    drift_js: float = 0.1  # Jensen–Shannon divergence in bits, 0..1
    error_rate: float = 0.05
    latency_ratio: float = 1.5  # recent p50 over the build's p50
    min_runs: int = 20  # error rate and latency need this many runs (+ errors) in the recent windows



@dataclass(frozen=True)
class Condition:
    state: str  # "firing" or "clear"
    info: dict[str, Any]


def _labels(d: dict[str, Any]) -> dict[str, Any]:
    return {"device": d["device"], "model": d["model"], "model_version": d["version"], "target": d["target"]}


def _judge(value: float, threshold: float) -> str | None:
    if value > threshold:
        return "firing"
    if value < CLEAR_RATIO * threshold:
        return "clear"
    return None


def conditions(devices: Iterable[dict[str, Any]], t: Thresholds) -> dict[AlertKey, Condition]:
    """What every rule says about these devices (their summaries in the monitor's view) now."""
    out: dict[AlertKey, Condition] = {}

    def put(d: dict[str, Any], alert: str, subject: str, state: str | None, value: float | None, threshold: float,
            message: str, **extra: Any) -> None:
        if state is not None:
            out[(d["fleet"], alert, subject)] = Condition(state, {**_labels(d), "value": value, "threshold": threshold,
                                                                 "message": message, **extra})

    for d in devices:
        dev, recent = d["device"], d["recent"]
        silent_state = "firing" if d["session_open"] and d["silent"] else ("clear" if not d["silent"] else None)
        interval = d["interval_s"]
        put(d, "silent", dev, silent_state, None, interval, f"device {dev} has sent nothing for 3 intervals "
            f"({3 * interval:g} s)" if interval else f"device {dev} has gone silent")

        attempts = recent["runs"] + recent["errors"]
        if attempts >= t.min_runs and recent["error_rate"] is not None:
            rate = recent["error_rate"]
            put(d, "error_rate", dev, _judge(rate, t.error_rate), rate, t.error_rate,
                f"device {dev}: {rate:.1%} of {attempts} recent runs failed (threshold {t.error_rate:.1%})")

        build, p50 = d["build_latency_us"], recent["p50_us"]
        if build and p50 is not None and recent["runs"] >= t.min_runs:
            ratio = p50 / build
            put(d, "latency", dev, _judge(ratio, t.latency_ratio), ratio, t.latency_ratio,
                f"device {dev}: recent p50 {p50 / 1000:.3g} ms is {ratio:.2f}x the build's {build / 1000:.3g} ms "
                f"(threshold {t.latency_ratio:g}x)")

        for output, measured in (d["drift"] or {}).items():
            if not measured:
                continue
            psi, js = measured["psi"], measured["js"]
            if psi > t.drift_psi or js > t.drift_js:
                state = "firing"
            elif psi < CLEAR_RATIO * t.drift_psi and js < CLEAR_RATIO * t.drift_js:
                state = "clear"
            else:
                state = None
            put(d, "drift", f"{dev}/{output}", state, psi, t.drift_psi,
                f"device {dev}, output {output}: PSI {psi:.3f} (threshold {t.drift_psi:g}), Jensen-Shannon {js:.3f} "
                f"(threshold {t.drift_js:g}) over {measured['samples']} recent values",
                manifest_sha256=d.get("manifest_sha256"))  # the serving model a retrain request names
    return out


class Notifier:
    """Sends alert events to the log, an MQTT publish function and, if given, a webhook (in the
    background, so a slow webhook never holds up ingest)."""

    def __init__(self, publish: Callable[[str, dict[str, Any]], None] | None = None, webhook: str | None = None):
        self.publish = publish
        self.webhook = webhook
        self._posts: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        if webhook:
            self._thread = threading.Thread(target=self._post_loop, name="webhook", daemon=True)
            self._thread.start()

    def send(self, event: dict[str, Any]) -> None:
        level = logging.WARNING if event["state"] == "firing" else logging.INFO
        log.log(level, "alert %s: %s (%s)", event["state"], event["message"], event["alert"])
        if self.publish is not None:
            self.publish(event["fleet"], event)
        if self.webhook:
            self._posts.put(event)

    def close(self) -> None:
        if self._thread is not None:
            self._posts.put(None)
            self._thread.join(timeout=WEBHOOK_TIMEOUT_S + 1)

    def _post_loop(self) -> None:
        while (event := self._posts.get()) is not None:
            request = urllib.request.Request(self.webhook, data=json.dumps(event).encode(), method="POST",
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=WEBHOOK_TIMEOUT_S) as response:
                    response.read()
            except (urllib.error.URLError, OSError, ValueError) as e:
                log.warning("webhook %s refused alert %s/%s: %s", self.webhook, event["alert"], event["subject"], e)


class AlertManager:
    def __init__(self, store: Store, thresholds: Thresholds, notifier: Notifier):
        self.store = store
        self.thresholds = thresholds
        self.notifier = notifier

    def evaluate(self, devices: Iterable[dict[str, Any]], at_ms: int) -> list[dict[str, Any]]:
        """Judge these devices (those whose data or silence changed): fire what started, resolve
        what cleared; returns the events sent."""
        found = conditions(devices, self.thresholds)
        if not found:
            return []
        active = self.store.active_alerts()
        firing = {k: c.info for k, c in found.items() if c.state == "firing" and k not in active}
        clearing = [k for k, c in found.items() if c.state == "clear" and k in active]
        if not firing and not clearing:
            return []
        retrain_ids: dict[AlertKey, str] = {}
        fired, cleared = self.store.alert_transitions(firing, clearing, at_ms, retrain_ids)
        events = []
        for keys, state in ((fired, "firing"), (cleared, "resolved")):
            for key in keys:
                fleet, alert, subject = key
                event = {"v": 1, "kind": "alert", "alert": alert, "state": state, "fleet": fleet, "subject": subject,
                         **found[key].info, "ts_ms": at_ms}
                if state == "firing" and key in retrain_ids:
                    event["retrain_request"] = retrain_ids[key]
                self.notifier.send(event)
                events.append(event)
        return events
