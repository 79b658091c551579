"""Which artifact ``edgesmith build`` keeps: candidates are backend x precision, timed through the
device runtime where this machine runs them, ranked by one rule (docs/selection.md).

A candidate is one backend the target lists at one precision the target lists (``fp32``, ``bf16``,
``fp16``, ``int8``) and the backend builds. Reduced precisions reach this module only after the
accuracy budget passed them (toolchain/accuracy.py); here they compete on latency like backends do.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal

import numpy as np

from edgesmith.runtime.manifest import AccuracyGate, SelectionCandidate
from edgesmith.toolchain.targets import Target, host_isa, missing_cpu_features

if TYPE_CHECKING:
    from edgesmith.toolchain.build import StagedArtifact

# The order candidates not timed here are tried in: the target lists a reduced precision because its
# hardware runs it fast, so the most reduced one that passed the accuracy budget comes first.
PRECISION_SPEED_ORDER = ("int8", "fp16", "bf16", "fp32")

# A reduced precision costs some accuracy, however small: it wins a timed comparison only when it is
# faster than this margin, beyond the noise of block medians on shared cores (a few percent here).
REDUCED_MARGIN = 0.05

RULE = ("Among the candidates (backend x precision) that passed validation and the accuracy budget, the fastest p50 "
        "measured here through the device runtime (Session, the target's threads, best of blocks) wins, a reduced "
        "precision only when it is more than 5% faster than every fp32 candidate; candidates not "
        "timed here rank by precision (int8, fp16, bf16, then fp32), then in the target's listed backend order, except "
        "that a TVM build ranks after every other backend unless its tuning database records a latency on this target "
        "that beats every other candidate's recorded latency.")


def label(backend: str, precision: str) -> str:
    """How a candidate is named in tables and reasons: the backend, with its precision unless fp32."""
    return backend if precision == "fp32" else f"{backend} {precision}"


# --- timing ------------------------------------------------------------------------------------------

TIMING_BLOCKS = 5  # blocks per candidate (fewer for slow models, see _block_plan)
TIMING_BLOCK_S = 0.2  # a block's target length
TIMING_BUDGET_S = 1.5  # all of one candidate's blocks
TIMING_MAX_RUNS = 200  # runs per block
TIMING_MIN_RUNS = 3
TIMING_WARMUP = 3  # runs before each block, not timed: the engine's threads wake up, caches refill
TIMING_PAUSE_S = 0.05  # between blocks, so the previous engine's spinning worker threads go idle


@dataclass
class Timing:
    p50_us: float
    p95_us: float
    how: str
    seconds: float = 0.0  # wall time spent timing this candidate


def timeable(staged: StagedArtifact) -> bool:
    """The payload ran natively here, in the C++ runtime the device uses: its latency here means something."""
    executed = staged.manifest.validation.executed
    return staged.device_runtime and executed is not None and executed.how == "native"


def _block_plan(seconds_per_run: float) -> tuple[int, int]:
    runs = max(TIMING_MIN_RUNS, min(TIMING_MAX_RUNS, int(TIMING_BLOCK_S / max(seconds_per_run, 1e-9))))
    blocks = max(1, min(TIMING_BLOCKS, int(TIMING_BUDGET_S / (runs * seconds_per_run))))
    return runs, blocks


def time_candidates(staged: list[StagedArtifact], status: Callable[[str], None] = lambda _: None) -> dict[str, Timing]:
    """Median latency of each timeable candidate (keyed by :func:`label`) through the device runtime
    (Session, the target's threads), in blocks: one candidate's whole block, then the next one's,
    never interleaved calls, since an engine's worker threads keep spinning for a while after each
    call and would slow the other engine's. Blocks rotate through the candidates a few times; a
    candidate's figure is its best block's median (and that block's p95): shared cores only ever
    add time."""
    from edgesmith.runtime import Session

    runnable = [s for s in staged if timeable(s)]
    if not runnable:
        return {}
    status(f"{runnable[0].target.name}: timing {', '.join(s.label for s in runnable)} through the device runtime")
    inputs = [np.load(runnable[0].path / p) for p in runnable[0].manifest.golden.samples[0].inputs]
    sessions, plans, best, spent = {}, {}, {}, {}
    for s in runnable:
        t0 = time.perf_counter()
        session = Session(s.path, threads=s.target.threads, trusted_keys=[s.staging_key.public_key])
        for _ in range(TIMING_WARMUP):
            t1 = time.perf_counter()
            session.run(inputs)
        sessions[s.label], plans[s.label] = session, _block_plan(time.perf_counter() - t1)
        spent[s.label] = time.perf_counter() - t0
    rounds = max(blocks for _, blocks in plans.values())
    for k in range(rounds):
        for s in runnable[k % len(runnable):] + runnable[:k % len(runnable)]:
            runs, blocks = plans[s.label]
            if k >= blocks:
                continue
            run = sessions[s.label].run
            t_block = time.perf_counter()
            for _ in range(TIMING_WARMUP):
                run(inputs)
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                run(inputs)
                times.append(time.perf_counter() - t0)
            spent[s.label] += time.perf_counter() - t_block
            median = statistics.median(times)
            if s.label not in best or median < best[s.label][0]:
                best[s.label] = (median, float(np.percentile(times, 95)))
            time.sleep(TIMING_PAUSE_S)
    sessions.clear()
    return {s.label: Timing(p50_us=round(best[s.label][0] * 1e6, 2), p95_us=round(best[s.label][1] * 1e6, 2),
                            how=f"native Session, {s.target.threads} threads, best of {plans[s.label][1]} blocks "
                                f"of {plans[s.label][0]} runs", seconds=spent[s.label])
            for s in runnable}


SERVING_GAP_S = 0.025  # between requests: an agent serving ~40 requests/s (its engine's threads fall idle)
SERVING_RUNS = 24


def serving_latency_us(staged: StagedArtifact, status: Callable[[str], None] = lambda _: None) -> float | None:
    """p50 of single requests ``SERVING_GAP_S`` apart through Session: an engine whose worker threads
    went idle between requests answers several times slower than in a back-to-back block (the
    digits CNN here: ~0.3-0.6 ms against ~0.03 ms), and that is what a device's agent measures, so it
    is the baseline the fleet monitor's latency alert compares a device's latency with."""
    if not timeable(staged):
        return None
    from edgesmith.runtime import Session

    status(f"{staged.manifest.name}: timing sporadic requests through the device runtime")
    session = Session(staged.path, threads=staged.target.threads, trusted_keys=[staged.staging_key.public_key])
    inputs = [np.load(staged.path / p) for p in staged.manifest.golden.samples[0].inputs]
    session.run(inputs)
    times = []
    for _ in range(SERVING_RUNS):
        time.sleep(SERVING_GAP_S)
        t0 = time.perf_counter()
        session.run(inputs)
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1e6, 2)


# --- the rule ----------------------------------------------------------------------------------------

@dataclass
class Candidate:
    """One backend x precision tried for a target: its staged artifact when it passed, its error otherwise."""

    backend: str
    status: Literal["passed", "failed", "skipped"]
    error: str | None = None
    staged: StagedArtifact | None = None
    timing: Timing | None = None
    precision: str = "fp32"
    reason: str | None = None  # set on the candidate select() picks

    @property
    def label(self) -> str:
        return label(self.backend, self.precision)

    @property
    def gate(self) -> AccuracyGate | None:
        return self.staged.manifest.accuracy if self.staged is not None else None

    def record(self) -> SelectionCandidate:
        from edgesmith.toolchain.accuracy import summary

        t, gate = self.timing, self.gate
        return SelectionCandidate(backend=self.backend, precision=self.precision, status=self.status, error=self.error,
                                  latency_us_p50=t.p50_us if t else None, latency_us_p95=t.p95_us if t else None,
                                  timed_how=t.how if t else None, gate=summary(gate) if gate else None)


def recorded_latency_us(staged: StagedArtifact) -> float | None:
    """A latency measured on the target's own device class and recorded in the payload's options:
    today a TVM tuning database's (``options.tuning``, written by toolchain/tune.py). ``measured_on``
    is the target's name when it was measured natively, ``rpc:<key>`` when measured on a device
    through an RPC tracker; the tuning cache is keyed by target, so either is this target's device."""
    tuning = staged.manifest.backend.options.get("tuning")
    if not isinstance(tuning, dict) or not isinstance(tuning.get("workloads_matched"), int) \
            or tuning["workloads_matched"] <= 0:
        return None
    latency, measured_on = tuning.get("latency_us"), tuning.get("measured_on")
    on_this_target = measured_on == staged.target.name or (isinstance(measured_on, str) and measured_on.startswith("rpc:"))
    if isinstance(latency, (int, float)) and not isinstance(latency, bool) and latency > 0 and on_this_target:
        return float(latency)
    return None


def _not_timed_why(target: Target, staged: StagedArtifact) -> str:
    target = staged.target  # the candidate's, with its precision's CPU features
    if target.isa != host_isa():
        return f"{target.name} runs {target.isa} code and this machine is {host_isa()}"
    missing = missing_cpu_features(target) if target.os == "linux" else []
    if missing:
        return f"this machine lacks {', '.join(missing)}"
    if target.os != "linux":
        return f"{target.name} runs {target.os}, not this machine's OS"
    if not staged.device_runtime:
        return f"the C++ runtime does not run {staged.manifest.payload.format} payloads"
    return "its payload did not run natively here"


def _effective_p50(c: Candidate) -> float:
    return c.timing.p50_us * (1 + REDUCED_MARGIN if c.precision != "fp32" else 1)


def _rank_backends(target: Target, passed: list[Candidate]) -> tuple[Candidate, str]:
    """The untimed rule among candidates of one precision: the target's order, TVM last unless its
    tuning database's recorded latency beats every other candidate's."""
    if len(passed) == 1:
        return passed[0], f"{passed[0].label} is the only candidate that passed at its precision"
    recorded = {c.backend: recorded_latency_us(c.staged) for c in passed}
    for c in passed:
        others = [v for b, v in recorded.items() if b != c.backend]
        if c.backend == "tvm" and recorded[c.backend] is not None and all(v is not None for v in others) \
                and recorded[c.backend] < min(others):
            return c, (f"tvm's tuning database records {recorded[c.backend]:.1f} µs on {target.name}, below every other "
                       "candidate's")
    ranked = [c for c in passed if c.backend != "tvm"] + [c for c in passed if c.backend == "tvm"]
    best = ranked[0]
    why = f"{best.label} is the first passing candidate in the target's order ({', '.join(target.backends)})"
    tvm = next((c for c in passed if c.backend == "tvm"), None)
    if tvm is not None and best is not tvm:
        tuned = recorded[tvm.backend] is not None
        why += (", and tvm's recorded tuning latency does not beat every other candidate's" if tuned
                else ", and tvm is untuned here (no tuning database measured on this target), so it ranks last")
    return best, why


def select(target: Target, candidates: list[Candidate]) -> Candidate | None:
    """The chosen candidate, with ``reason`` set, by :data:`RULE`; None when no candidate passed."""
    passed = [c for c in candidates if c.status == "passed"]
    if not passed:
        return None
    timed = sorted((c for c in passed if c.timing), key=_effective_p50)
    untimed = [c for c in passed if not c.timing]
    untimed_note = "; not timed here: " + ", ".join(f"{c.label} ({_not_timed_why(target, c.staged)})" for c in untimed) \
        if untimed else ""
    if timed:
        best = timed[0]
        others = ", ".join(f"{c.label} {c.timing.p50_us:.1f} µs" for c in timed[1:])
        fastest = min(timed, key=lambda c: c.timing.p50_us)
        if not others:
            best.reason = f"{best.label} is the only candidate timed here (p50 {best.timing.p50_us:.1f} µs){untimed_note}"
        elif fastest is not best:
            best.reason = (f"fastest p50 here within the reduced-precision margin: {best.label} {best.timing.p50_us:.1f} µs "
                           f"against {others} ({fastest.label} is faster by less than the {100 * REDUCED_MARGIN:.0f}% a "
                           f"reduced precision must win by){untimed_note}")
        else:
            best.reason = f"fastest p50 here: {best.label} {best.timing.p50_us:.1f} µs against {others}{untimed_note}"
        return best
    if len(passed) == 1:
        only = passed[0]
        only.reason = f"{only.label} is the only candidate that passed; not timed here ({_not_timed_why(target, only.staged)})"
        return only
    precision = min((c.precision for c in passed), key=PRECISION_SPEED_ORDER.index)
    best, why = _rank_backends(target, [c for c in passed if c.precision == precision])
    precisions = sorted({c.precision for c in passed}, key=PRECISION_SPEED_ORDER.index)
    by_precision = (f"{precision} is the most reduced precision that passed ({', '.join(precisions)}); "
                    if len(precisions) > 1 else "")
    best.reason = f"not timed here ({_not_timed_why(target, best.staged)}); {by_precision}{why}"
    return best
