"""A shadow's figures per device x candidate, the measured selection, and the deploy gate.

Figures come only from the ``shadow_windows`` the monitor stored (contract-checked windows of a
device that was in the shadow, for one of its candidates): each device's are aggregated from its
own windows, never mixed with another's, and a candidate passes only when it passes on every
device of the shadow, so one device lying about itself cannot carry a candidate. Latency
histograms merge by adding counts in the device's birth layout; p50/p95 come from the C++ rule
the monitor uses for telemetry (toolchain/fleet/latency.py).

The latency ratio is paired (docs/shadow.md, "Paired timing"): the candidate's p50 over the p50 of
the serving model run in the same shadow child, back to back with the candidate on the same
samples, so both were timed under the same scheduling. The serving path's own latency (what the
device's users see) is reported beside it, never divided by. A device whose windows carry no
paired figures (an agent without paired timing) has no ratio: a loaded device would bias it.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import func, select

from edgesmith.runtime import contract
from edgesmith.toolchain.errors import UserError
from edgesmith.toolchain.fleet.latency import LatencyHistogram
from edgesmith.toolchain.fleet.store import Store, now_ms
from edgesmith.toolchain.fleet.store.shadows import shadow_events, shadow_ignored, shadow_selections, shadow_windows
from edgesmith.toolchain.shadow import central

DEFAULT_MIN_AGREEMENT = 0.99
DEFAULT_MIN_SAMPLES = 100


@dataclass
class Figures:
    """One device x candidate."""

    device: str
    candidate: int
    name: str
    windows: int = 0
    offered: int = 0
    samples: int = 0
    dropped: int = 0
    errors: int = 0
    rows: int = 0
    agree: int = 0
    agreement: float | None = None
    max_abs_err: float | None = None
    max_rel_err: float | None = None
    nan: int = 0
    p50_us: float | None = None
    p95_us: float | None = None
    serving_p50_us: float | None = None  # the serving path's own latency on the sampled requests
    serving_p95_us: float | None = None
    paired_samples: int = 0  # samples the serving model also ran in the shadow child
    paired_serving_p50_us: float | None = None  # the serving model in the child, beside the candidate
    paired_serving_p95_us: float | None = None
    latency_ratio: float | None = None  # candidate p50 / paired serving p50 (same samples, same scheduling)
    p95_ratio: float | None = None
    rss_increase_bytes: int | None = None
    refused: int = 0
    failed: int = 0
    last_error: str | None = None
    events: list[str] = field(default_factory=list)

    def misses(self, min_agreement: float, max_latency_ratio: float | None, min_samples: int) -> str | None:
        """Why this device x candidate does not pass the bounds (None: it passes)."""
        if self.samples < min_samples:
            return f"{self.samples} samples < {min_samples}"
        if self.agreement is None:
            return "no top-1 agreement reported (no classes output compared)"
        if self.agreement < min_agreement:
            return f"agreement {self.agreement:.4f} < {min_agreement:g}"
        if max_latency_ratio is not None and (self.latency_ratio is None or self.latency_ratio > max_latency_ratio):
            ratio = "unknown" if self.latency_ratio is None else f"{self.latency_ratio:.3f}"
            return f"latency ratio {ratio} > {max_latency_ratio:g}"
        return None

    def said(self) -> str:
        agreement = "n/a" if self.agreement is None else f"{self.agreement:.4f}"
        ratio = "n/a" if self.latency_ratio is None else f"{self.latency_ratio:.3f}"
        return f"{self.samples} samples, agreement {agreement}, latency ratio {ratio}"


def _latency(rows: list[dict[str, Any]], column: str) -> tuple[float | None, float | None]:
    """p50/p95 of the windows' merged histograms (the layout most of them share)."""
    layouts = Counter(r["latency_layout"] for r in rows if r["latency_layout"])
    if not layouts:
        return None, None
    start_us, factor, count = json.loads(layouts.most_common(1)[0][0])
    hist = LatencyHistogram(contract.LatencyLayout(start_us=start_us, factor=factor, count=count))
    for r in rows:
        if r["latency_layout"] != layouts.most_common(1)[0][0]:
            continue
        w = json.loads(r[column])
        hist.add(w["counts"], w["underflow"], w["overflow"], w["sum_us"], w["max_us"])
    # Each count is bounded by the contract, but not their sum over up to MAX_LATENCY_BUCKETS buckets and
    # many windows; the C++ rule totals them in 64 bits. Scaled down to a total it can hold, the
    # histogram keeps its shape (and so its quantiles), whatever a device claims.
    if hist.total > contract.MAX_SAFE_INT:
        div = -(-hist.total // contract.MAX_SAFE_INT)
        hist.counts = [c // div for c in hist.counts]
        hist.underflow //= div
        hist.overflow //= div
    if hist.total == 0:
        return None, None
    p50, p95 = hist.percentiles_us((0.50, 0.95))
    return p50, p95


def figures(store: Store, shadow: dict[str, Any]) -> list[Figures]:
    """Per device x candidate of the shadow, sorted (devices without windows show zero samples)."""
    with store.engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(select(shadow_windows).where(
            shadow_windows.c.shadow_id == shadow["id"])).mappings()]
        events = [dict(r) for r in conn.execute(select(shadow_events).where(
            shadow_events.c.shadow_id == shadow["id"]).order_by(shadow_events.c.id)).mappings()]
    out = []
    for device in sorted(shadow["devices"]):
        for cand in shadow["candidates"]:
            mine = [r for r in rows if r["device"] == device and r["candidate"] == cand["index"]]
            f = Figures(device, cand["index"], cand["name"], windows=len(mine))
            for r in mine:
                f.offered += r["offered"]
                f.samples += r["samples"]
                f.dropped += r["dropped"]
                f.errors += r["errors"]
                f.rows += r["rows"]
                f.agree += r["agree"]
                f.nan += r["nan"]
            if mine:
                f.max_abs_err = max(r["max_abs_err"] for r in mine)
                f.max_rel_err = max(r["max_rel_err"] for r in mine)
                f.rss_increase_bytes = max(r["rss_increase_bytes"] for r in mine)
            f.agreement = f.agree / f.rows if f.rows else None
            f.p50_us, f.p95_us = _latency(mine, "latency")
            f.serving_p50_us, f.serving_p95_us = _latency(mine, "serving_latency")
            # The ratio only from windows that carry both sides of the pairs (all of a device's,
            # unless its agent lacks paired timing or could not open the serving model).
            paired = [r for r in mine if r["paired_serving_latency"] is not None]
            f.paired_samples = sum(r["paired_samples"] or 0 for r in paired)
            if paired:
                f.paired_serving_p50_us, f.paired_serving_p95_us = _latency(paired, "paired_serving_latency")
                p50, p95 = _latency(paired, "latency")
                if p50 is not None and f.paired_serving_p50_us:
                    f.latency_ratio = p50 / f.paired_serving_p50_us
                if p95 is not None and f.paired_serving_p95_us:
                    f.p95_ratio = p95 / f.paired_serving_p95_us
            for e in events:
                if e["device"] != device or e["candidate"] not in (None, cand["index"]):
                    continue
                f.refused += e["event"] == contract.EventKind.SHADOW_REFUSED
                f.failed += e["event"] == contract.EventKind.SHADOW_FAILED
                f.last_error = e["error"] or f.last_error
                if e["rss_increase_bytes"] is not None:
                    f.rss_increase_bytes = max(f.rss_increase_bytes or 0, e["rss_increase_bytes"])
                f.events.append(e["event"] + (f" ({e['reason']})" if e["reason"] else ""))
            out.append(f)
    return out


def ignored(store: Store, shadow_id: str) -> dict[str, dict[str, int]]:
    """Reports naming this shadow that counted for nothing: per device, per reason."""
    with store.engine.connect() as conn:
        rows = conn.execute(select(shadow_ignored.c.device, shadow_ignored.c.reason, func.count())
                            .where(shadow_ignored.c.shadow_id == shadow_id)
                            .group_by(shadow_ignored.c.device, shadow_ignored.c.reason)).all()
    out: dict[str, dict[str, int]] = {}
    for device, reason, count in rows:
        out.setdefault(device, {})[reason] = int(count)
    return out


def report(store: Store, shadow_id: str | None, fleet: str | None = None) -> dict[str, Any]:
    """`edgesmith shadow report`: the shadow and its figures (JSON-ready)."""
    shadow = central.get(store, shadow_id, fleet)
    status = shadow["status"]
    if status == "running" and shadow["ends_ms"] <= now_ms():
        status = "finished"
    return {"id": shadow["id"], "fleet": shadow["fleet"], "status": status, "sample": shadow["sample"],
            "duration_s": shadow["duration_s"], "cpu_share": shadow["cpu_share"], "created_ms": shadow["created_ms"],
            "ends_ms": shadow["ends_ms"], "devices": shadow["devices"], "candidates": shadow["candidates"],
            "figures": [asdict(f) for f in figures(store, shadow)], "ignored": ignored(store, shadow["id"])}


@dataclass
class Verdict:
    candidate: dict[str, Any]
    passed: bool
    worst_ratio: float | None
    misses: dict[str, str]  # device: why not
    figures: list[Figures]


def judge(store: Store, shadow: dict[str, Any], min_agreement: float, max_latency_ratio: float | None,
          min_samples: int) -> list[Verdict]:
    """Each candidate against the bounds on every device of the shadow."""
    if not 0 <= min_agreement <= 1:
        raise UserError(f"--min-agreement {min_agreement:g} is not a share; give e.g. 0.99")
    if max_latency_ratio is not None and max_latency_ratio <= 0:
        raise UserError(f"--max-latency-ratio {max_latency_ratio:g} must be above 0, e.g. 1.05")
    if min_samples < 1:
        raise UserError(f"--min-samples {min_samples} must be at least 1")
    all_figures = figures(store, shadow)
    verdicts = []
    for cand in shadow["candidates"]:
        mine = [f for f in all_figures if f.candidate == cand["index"]]
        misses = {f.device: why for f in mine if (why := f.misses(min_agreement, max_latency_ratio, min_samples))}
        ratios = [f.latency_ratio for f in mine]
        worst = None if any(r is None for r in ratios) or not ratios else max(ratios)
        verdicts.append(Verdict(cand, not misses, worst, misses, mine))
    return verdicts


def _said(v: Verdict) -> str:
    return f"{v.candidate['name']}: " + "; ".join(
        f"{f.device} {f.said()}" + (f" ({v.misses[f.device]})" if f.device in v.misses else "") for f in v.figures)


def select_candidate(store: Store, shadow_id: str, min_agreement: float = DEFAULT_MIN_AGREEMENT,
                     max_latency_ratio: float | None = None,
                     min_samples: int = DEFAULT_MIN_SAMPLES) -> tuple[Verdict, list[Verdict], dict[str, Any]]:
    """The fastest candidate (lowest worst-device latency ratio against serving) that passed on
    every device; UserError with every candidate's figures when none did."""
    shadow = central.get(store, shadow_id)
    verdicts = judge(store, shadow, min_agreement, max_latency_ratio, min_samples)
    passing = [v for v in verdicts if v.passed and v.worst_ratio is not None]
    if not passing:
        bound = f", latency ratio <= {max_latency_ratio:g}" if max_latency_ratio else ""
        raise UserError(f"no candidate of shadow {shadow['id']} passed on every device (agreement >= "
                        f"{min_agreement:g}, >= {min_samples} samples{bound}): "
                        + " | ".join(_said(v) for v in verdicts) + "; let the shadow run longer, or lower the bounds")
    chosen = min(passing, key=lambda v: (v.worst_ratio, v.candidate["index"]))
    return chosen, verdicts, shadow


def record_selection(store: Store, shadow: dict[str, Any], chosen: Verdict, verdicts: list[Verdict],
                     min_agreement: float, max_latency_ratio: float | None, min_samples: int) -> dict[str, Any]:
    """The measured choice in the store (``shadow_selections``); returns the row."""
    measured_on = {d: {"target": info.get("target"), "isa": info.get("isa"), "cpu": info.get("cpu"),
                       "runtime": info.get("runtime")} for d, info in sorted(shadow["devices"].items())}
    row = {"shadow_id": shadow["id"], "fleet": shadow["fleet"], "candidate": chosen.candidate["index"],
           "name": chosen.candidate["name"], "manifest_sha256": chosen.candidate["manifest_sha256"],
           "archive_sha256": chosen.candidate["archive_sha256"], "min_agreement": min_agreement,
           "max_latency_ratio": max_latency_ratio, "min_samples": min_samples,
           "measured_on": json.dumps(measured_on),
           "figures": json.dumps([asdict(f) for v in verdicts for f in v.figures]), "created_ms": now_ms()}
    with store.engine.begin() as conn:
        row["id"] = conn.execute(shadow_selections.insert().values(**row)).inserted_primary_key[0]
    return row


def set_selection_run(store: Store, selection_id: int, run_id: str) -> None:
    with store.engine.begin() as conn:
        conn.execute(shadow_selections.update().where(shadow_selections.c.id == selection_id)
                     .values(mlflow_run_id=run_id))


def require(store: Store, shadow_id: str, manifest_sha256: str, name: str, min_agreement: float,
            max_latency_ratio: float | None, min_samples: int, fleet: str | None = None) -> Verdict:
    """`deploy --require-shadow`: the artifact must be a candidate of the shadow (of ``fleet``, the
    deployment's: another fleet's devices measured nothing about this one) and pass on every shadowed
    device; UserError with the figures otherwise."""
    shadow = central.get(store, shadow_id, fleet)
    verdicts = judge(store, shadow, min_agreement, max_latency_ratio, min_samples)
    verdict = next((v for v in verdicts if v.candidate["manifest_sha256"] == manifest_sha256), None)
    if verdict is None:
        names = ", ".join(c["name"] for c in shadow["candidates"])
        raise UserError(f"{name} was not a candidate of shadow {shadow['id']} (its candidates: {names}); shadow it "
                        f"first with `edgesmith shadow start <artifact> --fleet {shadow['fleet']}`")
    if not verdict.passed:
        raise UserError(f"refused: {name} missed the bounds of shadow {shadow['id']} on "
                        f"{len(verdict.misses)} of {len(verdict.figures)} device(s): "
                        + "; ".join(f"{d}: {why} ({next(f.said() for f in verdict.figures if f.device == d)})"
                                    for d, why in sorted(verdict.misses.items()))
                        + "; deploy a candidate that passed (`edgesmith select --from-shadow "
                        f"{shadow['id']}`), or let the shadow run longer")
    return verdict

