"""The monitor's store against one device filling it (issue 16): a per-device daily budget past
which that device's windows are refused (counted against it, never against another device), and
retention that deletes old raw rows in short transactions while what the views and alerts need
(device totals, presence, the current session) stays. Real SQLite and PostgreSQL, no broker: the
ingest path the monitor runs (Store.ingest, Store.prune)."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select, text

from conftest import BOTH_STORES
from edgesmith.toolchain.errors import UserError
from edgesmith.toolchain.fleet import protocol
from edgesmith.toolchain.fleet.simulate import SimArtifact, SimulatedDevice, output_window
from edgesmith.toolchain.fleet.store import DeviceBudget, Incoming, Store, fleet_status
from edgesmith.toolchain.fleet.store.ingest import DAY_MS, messages, sessions, window_bytes, windows
from test_fleet_monitor import broker_dir, classes  # noqa: F401

FLEET = "plant-a"
ART = SimArtifact(outputs=[classes([0.4, 0.3, 0.2, 0.1])])
DAY = 20_000 * DAY_MS  # a UTC midnight


def _device(name: str) -> SimulatedDevice:
    return SimulatedDevice({"fleet": FLEET, "device": name}, ART, interval_s=10)


def _send(store: Store, at_ms: int, *msgs) -> None:
    store.ingest([Incoming(at_ms, message=m) for m in msgs])


def _event(d: SimulatedDevice, message: str) -> protocol.Event:
    return protocol.Event(**d._envelope(False), event="started", message=message)


def _windows(d: SimulatedDevice, n: int) -> list:
    return [d.telemetry(runs=10, outputs={"logits": output_window([4, 3, 2, 1])}) for _ in range(n)]


def _count(store: Store, table, *where) -> int:
    with store.engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(table).where(*where)))


def _status(store: Store, at_ms: int) -> dict[str, dict]:
    return {r["device"]: r for r in fleet_status(store, 10.0, at_ms=at_ms)}


@BOTH_STORES
def test_a_device_past_its_budget_is_refused_alone(store_url):
    store = Store.open(store_url)
    store.budget = DeviceBudget(windows_per_day=5, bytes_per_day=0)
    hog, honest = _device("hog"), _device("honest")
    _send(store, DAY + 1000, hog.birth(), honest.birth())
    # Interleaved in the same batches: the hog's refusals never touch the honest device's windows.
    for _ in range(4):
        _send(store, DAY + 2000, *_windows(hog, 2), *_windows(honest, 1))
    status = _status(store, DAY + 3000)
    assert status["hog"]["runs"] == 50 and status["hog"]["refused"]["by_reason"] == {"over_budget": 3}
    assert "over its budget of 5 windows" in status["hog"]["refused"]["last_detail"]
    assert status["honest"]["runs"] == 40 and status["honest"]["refused"] is None
    assert store.counters()["dropped.over_budget"] == 3
    assert _count(store, windows, windows.c.device == "hog") == 5
    # Births, deaths and events are not windows: still stored past the budget.
    _send(store, DAY + 4000, _event(hog, "still speaking"))
    assert _count(store, messages, messages.c.device == "hog") == 1
    # A new UTC day: the hog's windows are stored again.
    _send(store, DAY + DAY_MS + 1, *_windows(hog, 2))
    assert _count(store, windows, windows.c.device == "hog") == 7
    assert _status(store, DAY + DAY_MS + 2)["hog"]["refused"]["by_reason"] == {"over_budget": 3}


@BOTH_STORES
def test_the_byte_budget_counts_what_windows_cost_in_the_store(store_url):
    store = Store.open(store_url)
    d = _device("cam-01")
    _send(store, DAY, d.birth())
    _send(store, DAY + 1, *_windows(d, 1))
    with store.engine.connect() as conn:
        one = window_bytes(dict(conn.execute(select(windows)).mappings().one()))
    assert one > 300  # the row's fixed cost plus its JSON
    store.budget = DeviceBudget(windows_per_day=0, bytes_per_day=3 * one + one // 2)  # room for 3 windows today
    _send(store, DAY + 2, *_windows(d, 5))
    assert _count(store, windows) == 3
    assert _status(store, DAY + 3)["cam-01"]["refused"]["by_reason"] == {"over_budget": 3}


@BOTH_STORES
def test_retention_prunes_old_rows_in_short_transactions(store_url):
    store = Store.open(store_url)
    old, new = DAY, DAY + 30 * DAY_MS
    d, gone = _device("cam-01"), _device("cam-02")
    _send(store, old, d.birth(), gone.birth())
    _send(store, old + 1, *_windows(d, 7), _event(d, "old"))
    d.bd_seq += 1  # a new session: the old one is superseded, its row may go
    _send(store, new, d.birth(), *_windows(d, 3), _event(d, "new"))
    before = _status(store, new + 1)
    calls = []
    deleted = store.prune(new - DAY_MS, rows=2, between=lambda: calls.append(1) and False)
    assert deleted == {"windows": 7, "messages": 1, "sessions": 1}
    assert len(calls) >= 3  # 7 windows, 2 a transaction: several short transactions, not one long one
    assert _count(store, windows) == 3 and _count(store, messages) == 1
    # What the views and alerts read stays: totals, presence and each device's current session
    # (cam-02's old birth is its current one, however old).
    after = _status(store, new + 1)
    assert after == before and after["cam-01"]["runs"] == 100
    with store.engine.connect() as conn:
        kept = sorted(conn.execute(select(sessions.c.device, sessions.c.bd_seq)).all())
    assert kept == [("cam-01", d.bd_seq), ("cam-02", gone.bd_seq)]
    assert store.counters()["pruned"] == 9
    assert store.prune(new - DAY_MS) == {"windows": 0, "messages": 0, "sessions": 0}
    # A prune asked to stop between transactions stops.
    _send(store, new + 2, *_windows(d, 5))
    assert store.prune(new + 3, rows=2, between=lambda: True)["windows"] == 2


@BOTH_STORES
def test_a_store_from_before_budgets_gains_their_columns(store_url):
    store = Store.open(store_url)
    with store.engine.begin() as conn:
        for column in ("budget_day", "budget_windows", "budget_bytes"):
            conn.execute(text(f"ALTER TABLE devices DROP COLUMN {column}"))
        conn.execute(text("DELETE FROM counters WHERE name IN ('pruned', 'dropped.over_budget')"))
    store.engine.dispose()
    store = Store.open(store_url)
    store.budget = DeviceBudget(windows_per_day=1)
    d = _device("cam-01")
    _send(store, DAY, d.birth(), *_windows(d, 2))
    assert _status(store, DAY + 1)["cam-01"]["refused"]["by_reason"] == {"over_budget": 1}


def test_retention_shorter_than_the_view_is_refused(tmp_path):
    from edgesmith.toolchain.fleet.monitor import MonitorConfig

    with pytest.raises(UserError, match="keeps less than twice --recent-s"):
        MonitorConfig(tmp_path, "sqlite:///x.db", recent_s=3600, retention_s=3600)
    assert MonitorConfig(tmp_path, "sqlite:///x.db", retention_s=0).retention_s == 0


def test_the_monitor_prunes_with_its_retention_and_applies_its_budget(broker_dir, tmp_path):  # noqa: F811
    """The monitor's options reach the store: its budget is the one ingest applies, and its prune
    deletes what is older than its retention (between transactions it checks for a stop)."""
    from edgesmith.toolchain.fleet import monitor as monitor_mod
    from edgesmith.toolchain.fleet.store import now_ms

    config = monitor_mod.MonitorConfig(broker_dir, f"sqlite:///{tmp_path / 'm.db'}", recent_s=60, retention_s=3600,
                                       budget=DeviceBudget(windows_per_day=2, bytes_per_day=0))
    m = monitor_mod.Monitor(config)
    try:
        d = _device("cam-01")
        at = now_ms()
        _send(m.store, at - 7200_000, d.birth(), *_windows(d, 2))  # two hours old
        _send(m.store, at, *_windows(d, 2))  # today's budget is 2 (unless the two-hour-old ones were yesterday)
        today = 2 if (at - 7200_000) // DAY_MS == at // DAY_MS else 0
        assert m.store.counters()["dropped.over_budget"] == today
        assert m.prune() == {"windows": 2, "messages": 0, "sessions": 0}
        assert _count(m.store, windows) == 2 - today
    finally:
        m.close()
