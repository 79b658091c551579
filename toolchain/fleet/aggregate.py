"""The fleet as the monitor shows it: recent windows per device and per model version × target.

The view follows the store (new rows by batch number, so it sees what every monitor sharing the
database stored) and keeps, per device, the windows of its current artifact whose end lies within
``recent_s`` of its newest window (device clock, so a device's clock offset does not matter).
Sums over those windows are kept incrementally, per device and per group (fleet, model, version,
target): latency bucket counts merged in the birth's layout (then p50/p95/p99), runs, errors,
window time (throughput) and output counts (drift against the birth's reference shares).
"""

from __future__ import annotations

import bisect
import json
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import logging
import time

import numpy as np

from edgesmith.runtime import contract
from edgesmith.toolchain.fleet import drift, protocol
from edgesmith.toolchain.fleet.latency import percentiles_us
from edgesmith.toolchain.fleet.protocol import LatencyLayout
from edgesmith.toolchain.fleet.store import BatchResult, Store, deployments, is_silent, now_ms

# A model group is keyed on the manifest digest, never on the names a device claims, so a device
# can only join the group of the artifact whose digest it reports; its labels (model, version,
# target) come from what the store knows of that digest (builds and deployments), else they are
# the claim, shown as unverified.
GroupKey = tuple[str, str]  # fleet, manifest_sha256
WINDOW_COLUMNS = ("batch", "fleet", "device", "artifact_sha256", "window_start_ms", "window_end_ms", "runs", "errors", "latency",
                  "latency_layout", "outputs")
DeviceKey = tuple[str, str]
log = logging.getLogger("edgesmith.fleet.view")
# What the view keeps of one device, whatever it sends: a device picks its own window times and
# interval, so the horizon alone does not bound how many windows it keeps (many windows with one
# end time all lie within it). Past either budget its oldest windows leave the view (still stored).
# A window's counts are kept sparse (only non-zero slots), so what it costs here follows what the
# device sent, never its birth's layout (64 outputs x 4096 classes would be 2 MiB a window).
MAX_VIEW_WINDOWS = 2048
MAX_VIEW_SLOTS = 1 << 21  # non-zero latency and output slots over a device's kept windows (~32 MiB)
MEMBER_RECHECK_S = 2.0  # how often devices outside a deployed manifest's group are checked again


@dataclass(slots=True)
class Window:
    """One telemetry window as the view keeps it: compact, since a big fleet keeps hundreds of
    thousands of them (the latency buckets sparse, the outputs in one array)."""

    end_ms: int
    duration_ms: int
    runs: int
    errors: int
    layout: str | None  # the latency layout (JSON) the buckets are in; None: unknown, not merged
    latency: np.ndarray | None  # the non-empty slots of [buckets..., underflow, overflow]: indices, then counts
    sum_us: float
    max_us: float
    outputs: np.ndarray | None  # the non-zero slots of every monitored output's counts (birth's order): indices, then counts
    outputs_size: int = 0  # slots of all monitored outputs (OutputSpec slices) the indices point into

    @property
    def slots(self) -> int:
        return (len(self.latency) if self.latency is not None else 0) + (
            len(self.outputs) if self.outputs is not None else 0)


@dataclass(frozen=True)
class OutputSpec:
    """Where one monitored output sits in a window's output array, and its reference shares."""

    name: str
    kind: str
    reference: list[float] | None
    start: int
    stop: int


def output_specs(birth: dict[str, Any]) -> list[OutputSpec]:
    specs, start = [], 0
    for o in birth["metrics"]["outputs"]:
        size = o["classes"] if o["kind"] == "classes" else len(o["edges"]) - 1 + 2  # bins, under, over
        specs.append(OutputSpec(o["name"], o["kind"], o.get("reference"), start, start + size))
        start += size
    return specs


@dataclass
class Sums:
    """Sums over a set of windows; windows are added and removed one at a time."""

    layout: LatencyLayout | None
    layout_json: str | None = None
    outputs: np.ndarray | None = None
    latency: np.ndarray | None = None
    sum_us: float = 0.0
    runs: int = 0
    errors: int = 0
    duration_ms: int = 0
    windows: int = 0

    def __post_init__(self) -> None:
        if self.layout is not None and self.latency is None:
            self.latency = np.zeros(self.layout.count + 2, dtype=np.int64)

    def _add_outputs(self, counts: np.ndarray | None, sign: int) -> None:
        if counts is None:
            return
        if self.outputs is None:
            self.outputs = np.zeros_like(counts)
        if self.outputs.shape == counts.shape:
            self.outputs += sign * counts

    def add(self, w: Window, sign: int = 1) -> None:
        self.runs += sign * w.runs
        self.errors += sign * w.errors
        self.duration_ms += sign * w.duration_ms
        self.windows += sign
        if w.latency is not None and self.latency is not None and w.layout == self.layout_json:
            k = len(w.latency) // 2
            self.latency[w.latency[:k]] += sign * w.latency[k:]
            self.sum_us += sign * w.sum_us
        if w.outputs is not None:
            if self.outputs is None:
                self.outputs = np.zeros(w.outputs_size, dtype=np.int64)
            if len(self.outputs) == w.outputs_size:
                k = len(w.outputs) // 2
                self.outputs[w.outputs[:k]] += sign * w.outputs[k:]

    def merge(self, other: Sums, sign: int = 1) -> None:
        self.runs += sign * other.runs
        self.errors += sign * other.errors
        self.duration_ms += sign * other.duration_ms
        self.windows += sign * other.windows
        if other.latency is not None and self.latency is not None and other.layout_json == self.layout_json:
            self.latency += sign * other.latency
            self.sum_us += sign * other.sum_us
        self._add_outputs(other.outputs, sign)

    def quantiles(self, max_us: float) -> dict[str, float | None]:
        if self.layout is None or self.latency is None:
            return {"p50_us": None, "p95_us": None, "p99_us": None}
        p50, p95, p99 = percentiles_us(self.latency, self.layout, max_us, (0.50, 0.95, 0.99))
        return {"p50_us": p50, "p95_us": p95, "p99_us": p99}

    @property
    def error_rate(self) -> float | None:
        attempts = self.runs + self.errors
        return self.errors / attempts if attempts else None

    @property
    def throughput_rps(self) -> float | None:
        return self.runs / (self.duration_ms / 1000) if self.duration_ms > 0 else None


def _layout_json(birth: dict[str, Any]) -> str:
    """The birth's latency layout as the store writes it with each window (compared, not parsed)."""
    lat = birth["metrics"]["latency"]
    return json.dumps([lat["start_us"], lat["factor"], lat["count"]])


class _Counts(NamedTuple):
    """What a window's output summary contributes (an ``OutputWindow`` read back from the store)."""

    counts: list[int]
    underflow: int
    overflow: int


def _window(row: dict[str, Any], birth: dict[str, Any], layout_json: str, specs: list[OutputSpec],
            msg: protocol.Telemetry | None = None) -> Window:
    """A window in its birth's layout, from a stored row, or (the ingest's own batches) from the
    row and its message, which saves parsing the row's JSON again."""
    if msg is not None:
        lat = msg.latency
        counts, underflow, overflow, sum_us, max_us = lat.counts, lat.underflow, lat.overflow, lat.sum_us, lat.max_us
        window_outputs = msg.outputs
    else:
        lat = json.loads(row["latency"])
        counts, underflow, overflow, sum_us, max_us = (lat["counts"], lat["underflow"], lat["overflow"], lat["sum_us"],
                                                       lat["max_us"])
        window_outputs = {k: _Counts(v["counts"], v.get("underflow", 0), v.get("overflow", 0))
                          for k, v in json.loads(row["outputs"]).items()}
    latency = None
    if row["latency_layout"] == layout_json and len(counts) == birth["metrics"]["latency"]["count"]:
        slots = [*counts, underflow, overflow]
        used = [i for i, c in enumerate(slots) if c]
        latency = np.array(used + [slots[i] for i in used], dtype=np.int64)
    outputs = None
    if specs:
        indices, values = [], []
        for spec in specs:
            got = window_outputs.get(spec.name)
            if got is not None:
                counts = got.counts if spec.kind == "classes" else [*got.counts, got.underflow, got.overflow]
                if len(counts) == spec.stop - spec.start:  # else not in the reference's layout: left out
                    dense = np.asarray(counts, dtype=np.int64)
                    nonzero = np.flatnonzero(dense)
                    indices.append(nonzero + spec.start)
                    values.append(dense[nonzero])
        outputs = np.concatenate([*indices, *values]) if indices else np.zeros(0, dtype=np.int64)
    return Window(end_ms=row["window_end_ms"], duration_ms=max(0, row["window_end_ms"] - row["window_start_ms"]),
                  runs=row["runs"], errors=row["errors"], layout=layout_json if latency is not None else None,
                  latency=latency, sum_us=sum_us, max_us=max_us, outputs=outputs,
                  outputs_size=specs[-1].stop if specs else 0)


def _checked_birth(birth_json: str | None) -> dict[str, Any] | None:
    """A stored birth, its artifact and metric schema checked against the contract's bounds again
    (a store written by an older monitor may hold births that the contract now refuses)."""
    if not birth_json:
        return None
    birth = json.loads(birth_json)
    contract.ArtifactRef.model_validate_json(json.dumps(birth["artifact"]))
    contract.MetricSchema.model_validate_json(json.dumps(birth["metrics"]))
    return birth


# A manifest digest -> the artifact store's archive of it (with .model, .model_version, .target,
# .name), or None: toolchain/deploy/archive.lookup, passed in by whoever starts the monitor (the
# fleet package does not import the deploy package).
ArtifactIndex = Callable[[str], Any]


class KnownManifests:
    """What the store knows about manifest digests: from the artifact store's index (builds packaged
    for deployment), when given one, and from deployments (their rows name the model and version).
    Cached; an unknown digest is asked about again at most every RECHECK_S."""

    RECHECK_S = 30.0
    # A device names whatever digest it likes in each birth: the answers kept are bounded (the
    # oldest asked is forgotten first, and asked again if it comes back).
    MAX_KNOWN = 10_000

    def __init__(self, store: Store, index: ArtifactIndex | None = None):
        self.store = store
        self.index = index
        self._known: dict[str, dict[str, Any] | None] = {}
        self._asked: dict[str, float] = {}
        self._monitoring: dict[str, dict[str, Any] | None] = {}
        self._monitoring_asked: dict[str, float] = {}

    def monitoring(self, sha: str) -> dict[str, Any] | None:
        """The ``monitoring`` section of the manifest a deployment sent under this digest
        (deployments.record_manifest), or None; cached like labels()."""
        at = time.monotonic()
        if sha in self._monitoring and (self._monitoring[sha] is not None
                                        or at - self._monitoring_asked[sha] < self.RECHECK_S):
            return self._monitoring[sha]
        self._monitoring_asked[sha] = at
        found = None
        try:
            found = deployments.manifest_monitoring(self.store, sha)
            if found is not None:
                contract.LatencyLayout.model_validate(found["latency"])
                for o in found["outputs"]:
                    contract.OutputLayout.model_validate(o)
        except Exception:  # noqa: BLE001 (unreadable: the group is formed as for an unknown digest)
            log.exception("cannot read the deployed manifest %s", sha[:12])
            found = None
        self._monitoring.pop(sha, None)
        self._monitoring[sha] = found
        while len(self._monitoring) > self.MAX_KNOWN:
            oldest = next(iter(self._monitoring))
            del self._monitoring[oldest]
            self._monitoring_asked.pop(oldest, None)
        return found

    def labels(self, sha: str) -> dict[str, Any] | None:
        at = time.monotonic()
        if sha in self._known and (self._known[sha] is not None or at - self._asked[sha] < self.RECHECK_S):
            return self._known[sha]
        self._asked[sha] = at
        found = None
        try:
            info = self.index(sha) if self.index is not None else None
            if info is not None:
                found = {"model": info.model, "version": info.model_version, "target": info.target,
                         "artifact": info.name}
            else:
                found = deployments.deployed_manifest(self.store, sha)
        except Exception:  # noqa: BLE001 (an unreadable index or store: the digest stays unverified)
            log.exception("cannot look up manifest %s", sha[:12])
        self._known.pop(sha, None)  # re-inserted: the newest asked
        self._known[sha] = found
        while len(self._known) > self.MAX_KNOWN:
            oldest = next(iter(self._known))
            del self._known[oldest]
            self._asked.pop(oldest, None)
        return found


class DeviceView:
    """One device: its store row, current birth, and the recent windows of its current artifact."""

    def __init__(self, row: dict[str, Any]):
        self.row = row
        self.birth: dict[str, Any] | None = _checked_birth(row["birth"])
        self.layout = LatencyLayout(**self.birth["metrics"]["latency"]) if self.birth else None
        self.layout_json = _layout_json(self.birth) if self.birth else None
        self.specs = output_specs(self.birth) if self.birth else []
        self.windows: deque[Window] = deque()
        self.slots = 0  # Window.slots over self.windows (MAX_VIEW_SLOTS)
        self.over_budget = 0  # windows that left the view early, to keep it within its budget
        self.sums = Sums(self.layout, self.layout_json)
        # Summaries are rebuilt only when what they come from changed: the windows (sums_dirty)
        # or the store row (row_dirty); presence depends on the time and is added per snapshot.
        self.recent: dict[str, Any] = {}
        self.static: dict[str, Any] = {}
        self.sums_dirty = True
        self.row_dirty = True
        self.was_silent = False


    @property
    def sha(self) -> str | None:
        return self.birth["artifact"]["manifest_sha256"] if self.birth else None

    @property
    def group(self) -> GroupKey | None:
        if not self.birth:
            return None
        return (self.row["fleet"], self.birth["artifact"]["manifest_sha256"])

    def add(self, w: Window, horizon_ms: int) -> tuple[list[Window], bool]:
        """Insert a window; returns the windows that fell out of the horizon and whether it was kept."""
        newest = self.windows[-1].end_ms if self.windows else w.end_ms
        if w.end_ms < max(newest, w.end_ms) - horizon_ms:
            return [], False
        ends = [x.end_ms for x in self.windows]
        self.windows.insert(bisect.bisect_right(ends, w.end_ms), w)
        self.sums.add(w)
        self.slots += w.slots
        expired = []
        cutoff = self.windows[-1].end_ms - horizon_ms
        while self.windows and (self.windows[0].end_ms < cutoff or len(self.windows) > MAX_VIEW_WINDOWS
                                or self.slots > MAX_VIEW_SLOTS):
            old = self.windows.popleft()
            if old.end_ms >= cutoff:
                self.over_budget += 1
            self.sums.add(old, -1)
            self.slots -= old.slots
            expired.append(old)
        self.sums_dirty = True
        return expired, True

    def max_us(self) -> float:
        return max((w.max_us for w in self.windows if w.latency is not None), default=0.0)


@dataclass
class GroupView:
    key: GroupKey
    sums: Sums
    specs: list[OutputSpec]
    labels: dict[str, Any] = field(default_factory=dict)  # model, version, target; verified or claimed
    members: set[DeviceKey] = field(default_factory=set)
    history: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=360))
    summary: dict[str, Any] = field(default_factory=dict)
    dirty: bool = True
    # A deployed manifest's group: layout and references from the stored manifest, and members only
    # devices a deployment of it was applied to whose births report that layout (``shape``); other
    # devices naming the digest wait ``outside`` (checked again, see FleetView._recheck_groups).
    strict: bool = False
    shape: tuple | None = None
    outside: set[DeviceKey] = field(default_factory=set)


def _shape(metrics: dict[str, Any]) -> tuple:
    """What must agree for a device's windows to add up with a group's: the latency layout and each
    monitored output's name, kind and bins (not the reference, which is the group's own)."""
    lat = metrics["latency"]
    return ((float(lat["start_us"]), float(lat["factor"]), int(lat["count"])),
            tuple((o["name"], o["kind"], o.get("classes"), tuple(o.get("edges") or ())) for o in metrics["outputs"]))


def _drift(sums: Sums, specs: list[OutputSpec], min_samples: int) -> dict[str, Any]:
    out = {}
    for spec in specs:
        counts = sums.outputs[spec.start:spec.stop] if sums.outputs is not None else None
        measured = drift.measure(counts, spec.reference, min_samples) if counts is not None else None
        out[spec.name] = measured.as_dict() if measured else None
    return out


def _worst(drifts: dict[str, Any], measure: str) -> float | None:
    values = [d[measure] for d in drifts.values() if d]
    return max(values) if values else None


class FleetView:
    def __init__(self, store: Store, recent_s: float = 300.0, default_interval_s: float = 10.0,
                 min_drift_samples: int = drift.MIN_SAMPLES, artifact_index: ArtifactIndex | None = None):
        self.store = store
        self.horizon_ms = int(recent_s * 1000)
        self.default_interval_s = default_interval_s
        self.min_drift_samples = min_drift_samples
        self.devices: dict[DeviceKey, DeviceView] = {}
        self.groups: dict[GroupKey, GroupView] = {}
        self.manifests = KnownManifests(store, artifact_index)
        # Stored rows the view could not take in (skipped, logged once per device, and counted):
        # one device's bad data never stops the view or another device's alerts.
        self.bad_rows = 0
        self.bad_devices: dict[DeviceKey, str] = {}
        self.cursor = 0
        # Silence is judged only from this time on: the monitor sets it when it starts, while it is
        # disconnected, and while it works through a backlog (a device is not silent just because
        # its queued messages have not been read yet).
        self.listening_since_ms = now_ms()
        # This process's own ingest batches, handed over as committed (BatchListener), so only what
        # other monitors sharing the store wrote is read back from it.
        self._lock = threading.Lock()
        self._pending: set[int] = set()
        self._inbox: dict[int, BatchResult] = {}
        self._changed: set[DeviceKey] = set()
        self._rechecked = 0.0

    # ---- following the store -------------------------------------------------------------------------

    def batch_started(self, batch: int) -> None:
        with self._lock:
            self._pending.add(batch)

    def batch_committed(self, result: BatchResult) -> None:
        with self._lock:
            self._pending.discard(result.batch)
            self._inbox[result.batch] = result

    def batch_abandoned(self, batch: int) -> None:
        with self._lock:
            self._pending.discard(batch)

    def load(self) -> None:
        """Start from the store: every device, and windows received recently enough to matter."""
        upto = self.store.batch()
        for row in self.store.devices():
            self._take(self._device_row, row)
        since = now_ms() - 2 * self.horizon_ms
        for row in self.store.windows(received_after_ms=since, up_to_batch=upto, columns=WINDOW_COLUMNS):
            self._take(self._window_row, row)
        self.cursor = upto
        if self.bad_rows:
            log.warning("skipped %d stored row(s) the view could not use, of %d device(s): %s", self.bad_rows,
                        len(self.bad_devices), ", ".join(f"{f}/{d}" for f, d in sorted(self.bad_devices)[:10]))

    def _take(self, handler: Any, row: dict[str, Any], msg: protocol.Telemetry | None = None) -> None:
        """Take one stored row in; a row that fails is skipped and counted against its device."""
        try:
            handler(row, msg) if msg is not None else handler(row)
        except Exception as e:  # noqa: BLE001 (isolated per row: whatever a device stored, the view goes on)
            self.bad_rows += 1
            key = (row.get("fleet"), row.get("device"))
            if key not in self.bad_devices:
                log.warning("skipping a stored row of %s/%s the view cannot use (%s: %s)", key[0], key[1],
                            type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
            self.bad_devices[key] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            if handler == self._device_row and key[0] is not None:  # shown, with no artifact
                old = self.devices.get(key)
                if old is not None:
                    self._leave_group(key, old)
                try:
                    self.devices[key] = DeviceView({**row, "birth": None})
                except Exception:  # noqa: BLE001
                    self.devices.pop(key, None)

    def refresh(self) -> int:
        """Take in what was stored since the last call, in batch order; returns how many windows came."""
        self._recheck_groups()
        upto = self.store.batch()
        with self._lock:
            if self._pending:  # our own batch being committed: wait for it rather than read around it
                upto = min(upto, min(self._pending) - 1)
            own = {b: self._inbox.pop(b) for b in sorted(self._inbox) if b <= upto}
        if upto <= self.cursor:
            return 0
        # Other monitors' batches (none when this one is alone on the store), then everything in order.
        foreign_devices = self.store.devices(since_batch=self.cursor, exclude_batches=list(own))
        foreign_windows = self.store.windows(since_batch=self.cursor, up_to_batch=upto, columns=WINDOW_COLUMNS,
                                             exclude_batches=list(own))
        # Device rows first (in batch order, so each device ends with its newest row), then the
        # windows in batch order. A device row carries the number of the last batch that touched
        # it, not of its birth's: a device whose birth another monitor stored is only known from
        # that row, and its windows from earlier batches must not arrive before it.
        device_rows = sorted([*foreign_devices, *(row for result in own.values() for row in result.devices)],
                             key=lambda row: row["batch"])
        windows: list[tuple[int, dict[str, Any], protocol.Telemetry | None]] = [
            (row["batch"], row, None) for row in foreign_windows]
        for batch, result in own.items():
            windows.extend((batch, row, msg) for row, msg in result.windows)
        windows.sort(key=lambda w: w[0])
        for row in device_rows:
            self._take(self._device_row, row)
        for _, row, msg in windows:
            self._take(self._window_row, row, msg)
        self.cursor = upto
        return len(windows)

    def _device_row(self, row: dict[str, Any]) -> None:
        key = (row["fleet"], row["device"])
        view = self.devices.get(key)
        self._changed.add(key)
        if view is not None and view.row["birth"] == row["birth"]:
            view.row = row
            view.row_dirty = True
            return
        birth = json.loads(row["birth"]) if row["birth"] else None
        if view is not None and (view.birth is None) == (birth is None) and (
                birth is None or (birth["artifact"] == view.birth["artifact"] and birth["metrics"] == view.birth["metrics"])):
            view.row, view.birth = row, birth  # same artifact (e.g. a reconnect): recent windows stay
            view.row_dirty = True
            return
        # New device, or a new artifact: its recent windows start over (a new artifact is measured
        # against its own reference and layout).
        if view is not None:
            self._leave_group(key, view)
        view = self.devices[key] = DeviceView(row)
        self._join_group(key, view)

    def _new_group(self, group: GroupKey, view: DeviceView) -> GroupView:
        """A group's layout and references: the deployed manifest's when a deployment sent that
        digest (a device's birth only claims it), else its first member's, shown as unverified
        unless the artifact store or a deployment knows the digest."""
        known = self.manifests.labels(group[1])
        stored = self.manifests.monitoring(group[1])
        if stored is not None:
            metrics = {"latency": stored["latency"], "outputs": stored["outputs"]}
            labels = {**(known or {}), "verified": True}
            return GroupView(group, Sums(LatencyLayout(**metrics["latency"]), _layout_json({"metrics": metrics})),
                             output_specs({"metrics": metrics}), labels, strict=True, shape=_shape(metrics))
        a = view.birth["artifact"]  # type: ignore[index]
        labels = ({**known, "verified": True} if known else
                  {"model": a["model"], "version": a["model_version"],
                   "target": a["target"], "artifact": a["name"], "verified": False})
        return GroupView(group, Sums(view.layout, view.layout_json), view.specs, labels)

    def _join_group(self, key: DeviceKey, view: DeviceView) -> None:
        group = view.group
        if group is None:
            return
        g = self.groups.get(group)
        if g is None:
            g = self.groups[group] = self._new_group(group, view)
        if g.strict and not (_shape(view.birth["metrics"]) == g.shape  # type: ignore[index]
                             and key[1] in deployments.applied_devices(self.store, key[0], group[1], [key[1]])):
            g.outside.add(key)  # kept per device; joins if a deployment of the digest is applied to it
            return
        self._add_member(g, key, view)

    @staticmethod
    def _add_member(g: GroupView, key: DeviceKey, view: DeviceView) -> None:
        g.outside.discard(key)
        g.members.add(key)
        g.sums.merge(view.sums)
        g.dirty = True

    def _leave_group(self, key: DeviceKey, view: DeviceView) -> None:
        group = view.group
        g = self.groups.get(group) if group else None
        if g is not None:
            g.outside.discard(key)
            if key in g.members:
                g.sums.merge(view.sums, -1)
                g.members.discard(key)
                g.dirty = True

    def _recheck_groups(self) -> None:
        """Devices outside a deployed manifest's group join once a deployment of it is applied to
        them (its report may come after their birth); a group formed from a first member's birth
        is formed again from the manifest once a deployment of its digest is recorded."""
        at = time.monotonic()
        if at - self._rechecked < MEMBER_RECHECK_S:
            return
        self._rechecked = at
        for gkey, g in list(self.groups.items()):
            if not g.strict:
                if self.manifests.monitoring(gkey[1]) is not None:
                    del self.groups[gkey]
                    for k in sorted(g.members | g.outside):
                        view = self.devices.get(k)
                        if view is not None and view.group == gkey:
                            self._join_group(k, view)
                continue
            candidates = [k for k in g.outside if k in self.devices and self.devices[k].group == gkey
                          and _shape(self.devices[k].birth["metrics"]) == g.shape]  # type: ignore[index]
            if not candidates:
                continue
            applied = deployments.applied_devices(self.store, gkey[0], gkey[1], sorted(d for _, d in candidates))
            for k in candidates:
                if k[1] in applied:
                    self._add_member(g, k, self.devices[k])

    def _window_row(self, row: dict[str, Any], msg: protocol.Telemetry | None = None) -> None:
        view = self.devices.get((row["fleet"], row["device"]))
        if view is None or view.birth is None or row["artifact_sha256"] != view.sha:
            return  # not the device's current artifact: stored, but not part of its recent view
        w = _window(row, view.birth, view.layout_json, view.specs, msg)
        early = view.over_budget
        expired, kept = view.add(w, self.horizon_ms)
        if view.over_budget and not early:
            log.warning("device %s/%s sends more windows than the view keeps of one device (%d windows, %d "
                        "non-zero slots); its oldest leave its recent summary early (all are stored)", row["fleet"],
                        row["device"], MAX_VIEW_WINDOWS, MAX_VIEW_SLOTS)
        self._changed.add((row["fleet"], row["device"]))
        g = self.groups.get(view.group)
        if g is not None and (row["fleet"], row["device"]) in g.members:
            if kept:
                g.sums.add(w)
            for old in expired:
                g.sums.add(old, -1)
            g.dirty = True

    # ---- what is shown -------------------------------------------------------------------------------

    def device_summary(self, view: DeviceView, at_ms: int) -> dict[str, Any]:
        r = view.row
        if view.sums_dirty or not view.recent:
            drifts = _drift(view.sums, view.specs, self.min_drift_samples)
            view.recent = {
                "recent": {"windows": view.sums.windows, "runs": view.sums.runs, "errors": view.sums.errors,
                           "error_rate": view.sums.error_rate, "throughput_rps": view.sums.throughput_rps,
                           **view.sums.quantiles(view.max_us())},
                "drift": drifts, "psi": _worst(drifts, "psi"), "js": _worst(drifts, "js"),
            }
            view.sums_dirty = False
        if view.row_dirty or not view.static:
            view.static = {
                "device": r["device"], "fleet": r["fleet"], "session_open": bool(r["session_open"]),
                "death_reason": r["death_reason"], "bd_seq": r["bd_seq"], "artifact": r["artifact"], "model": r["model"],
                "version": r["model_version"], "target": r["target"], "backend": r["backend"],
                "manifest_sha256": r["manifest_sha256"], "interval_s": r["interval_s"],
                "build_latency_us": r["build_latency_us"], "last_seen_ms": r["last_seen_ms"],
                "first_seen_ms": r["first_seen_ms"],
                "last_window": {"end_ms": r["last_window_end_ms"], "p50_us": r["p50_us"], "p95_us": r["p95_us"],
                                "p99_us": r["p99_us"]},
                "runs_total": r["runs"], "errors_total": r["errors"], "messages": r["messages"],
                "duplicates": r["duplicates"], "gaps": r["gaps"],
            }
            view.row_dirty = False
        silent = is_silent(max(r["last_seen_ms"], self.listening_since_ms), r["interval_s"], at_ms, self.default_interval_s)
        return {**view.static, "online": bool(r["session_open"]) and not silent, "silent": silent, **view.recent}

    def group_summary(self, g: GroupView, online: int) -> dict[str, Any]:
        if g.dirty or not g.summary:
            max_us = max((self.devices[k].max_us() for k in g.members if k in self.devices), default=0.0)
            drifts = _drift(g.sums, g.specs, self.min_drift_samples)
            rates = [r for r in (self.devices[k].sums.throughput_rps for k in g.members if k in self.devices)
                     if r is not None]
            g.summary = {
                "recent": {"windows": g.sums.windows, "runs": g.sums.runs, "errors": g.sums.errors,
                           "error_rate": g.sums.error_rate,
                           "throughput_rps": sum(rates) if rates else None,
                           **g.sums.quantiles(max_us)},
                "drift": drifts, "psi": _worst(drifts, "psi"), "js": _worst(drifts, "js"),
            }
            g.dirty = False
        fleet, sha = g.key
        return {"fleet": fleet, "manifest_sha256": sha, "model": g.labels.get("model"),
                "version": g.labels.get("version"), "target": g.labels.get("target"),
                "verified": g.labels.get("verified", False), "devices": len(g.members),
                "online": online, **g.summary, "history": list(g.history)}

    def snapshot(self, at_ms: int | None = None) -> dict[str, Any]:
        at_ms = at_ms if at_ms is not None else now_ms()
        devices = [d for d in (self._summary(k, at_ms) for k in sorted(self.devices)) if d is not None]
        online: dict[GroupKey, int] = {}
        for d in devices:
            key = (d["fleet"], d["manifest_sha256"])
            if d["online"] and key in self.groups and (d["fleet"], d["device"]) in self.groups[key].members:
                online[key] = online.get(key, 0) + 1
        for key in [k for k, g in self.groups.items() if not g.members and not g.outside]:
            del self.groups[key]
        groups = []
        for k in sorted(k for k, g in self.groups.items() if g.members):
            try:
                groups.append(self.group_summary(self.groups[k], online.get(k, 0)))
            except Exception:  # noqa: BLE001 (one group's data never hides the others)
                log.exception("cannot summarise the group of manifest %s; left out of the view", k[1][:12])
        mix: dict[str, dict[str, dict[str, int]]] = {}
        for d in devices:
            if d["model"] is not None:
                versions = mix.setdefault(d["fleet"], {}).setdefault(f"{d['model']} × {d['target']}", {})
                versions[d["version"]] = versions.get(d["version"], 0) + 1
        for d in devices:
            d["view_error"] = self.bad_devices.get((d["fleet"], d["device"]))
        return {"generated_ms": at_ms, "devices": devices, "groups": groups, "version_mix": mix,
                "bad_rows": self.bad_rows,
                "bad_devices": [{"fleet": f, "device": d, "error": e} for (f, d), e in sorted(self.bad_devices.items(), key=str)]}

    def record_history(self, at_ms: int) -> None:
        """One chart point per group."""
        for key in [k for k, g in self.groups.items() if not g.members and not g.outside]:
            del self.groups[key]
        for g in self.groups.values():
            if not g.members:
                continue
            try:
                summary = self.group_summary(g, 0)
            except Exception:  # noqa: BLE001 (logged by snapshot(); the other groups' charts go on)
                continue
            recent = summary["recent"]
            g.history.append({"t_ms": at_ms, "p50_us": recent["p50_us"], "p95_us": recent["p95_us"],
                              "p99_us": recent["p99_us"], "psi": summary["psi"], "js": summary["js"],
                              "throughput_rps": recent["throughput_rps"], "error_rate": recent["error_rate"]})

    def take_changed(self, at_ms: int) -> list[dict[str, Any]]:
        """Summaries of the devices whose windows or row changed since the last call, or whose
        silence began or ended: all that alert rules need to look at again."""
        keys, self._changed = self._changed, set()
        listening = self.listening_since_ms
        for key, view in self.devices.items():
            r = view.row
            silent = is_silent(max(r["last_seen_ms"], listening), r["interval_s"], at_ms, self.default_interval_s)
            if silent != view.was_silent:
                view.was_silent = silent
                keys.add(key)
        return [d for d in (self._summary(k, at_ms) for k in sorted(keys) if k in self.devices) if d is not None]

    def _summary(self, key: DeviceKey, at_ms: int) -> dict[str, Any] | None:
        """A device's summary; a device whose data breaks it is left out and marked, never the others."""
        try:
            return self.device_summary(self.devices[key], at_ms)
        except Exception as e:  # noqa: BLE001
            if key not in self.bad_devices:
                log.exception("cannot summarise device %s/%s; left out of the view", *key)
            self.bad_devices[key] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            return None
