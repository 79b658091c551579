"""The monitor's view against one device that sends big-but-valid windows (issue 16 review): what
the view keeps of a device is bounded by what it sent and by a per-device budget, never by the
layout its birth claims or by how many windows it crams into the horizon. A real SQLite store, no
broker: the same ingest path the monitor runs (Store.ingest with the view as listener, refresh)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgesmith.runtime import contract
from edgesmith.toolchain.fleet import aggregate, protocol
from edgesmith.toolchain.fleet.aggregate import FleetView
from edgesmith.toolchain.fleet.simulate import SimArtifact, SimulatedDevice, output_window
from edgesmith.toolchain.fleet.store import Incoming, Store, now_ms

KEY = ("plant-a", "attacker")


def _fleet(tmp_path, outputs: list[protocol.OutputLayout]) -> tuple[Store, FleetView, SimulatedDevice]:
    store = Store.open(f"sqlite:///{tmp_path / 'monitor.db'}")
    view = FleetView(store)
    device = SimulatedDevice({"fleet": KEY[0], "device": KEY[1]}, SimArtifact(outputs=outputs), interval_s=10)
    _ingest(store, view, [device.birth().model_dump_json().encode()])
    return store, view, device


def _ingest(store: Store, view: FleetView, payloads: list[bytes]) -> None:
    items = [Incoming(now_ms(), message=contract.parse_message(p)) for p in payloads]
    store.ingest(items, listener=view)
    view.refresh()


def _same_end(device: SimulatedDevice, n: int, outputs: dict | None) -> list[bytes]:
    """``n`` windows of one device, all ending at the same time (the device picks its own times)."""
    window = json.loads(device.telemetry(runs=1, outputs=outputs).model_dump_json())
    out = []
    for _ in range(n):
        out.append(json.dumps(window).encode())
        window["seq"] = device.seq = device.seq + 1
    return out


def test_a_small_window_costs_little_whatever_the_birth_claims(tmp_path):
    # 64 outputs x 4096 classes: a window with no output counts is ~1 KB on the wire; it must not
    # cost the monitor 2 MiB (a dense array of the birth's layout) for the whole horizon.
    store, view, device = _fleet(tmp_path, [protocol.OutputLayout(name=f"o{i}", kind="classes", classes=4096)
                                            for i in range(contract.MAX_OUTPUTS)])
    _ingest(store, view, _same_end(device, 20, outputs={}))
    kept = view.devices[KEY].windows
    assert len(kept) == 20
    assert max(w.outputs.nbytes for w in kept) < 1024, "a window's outputs cost more than what the device sent"


def test_a_device_cannot_grow_the_view_past_its_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(aggregate, "MAX_VIEW_WINDOWS", 50, raising=False)
    store, view, device = _fleet(tmp_path, [protocol.OutputLayout(name="logits", kind="classes", classes=4,
                                                                  reference=[0.25] * 4)])
    for _ in range(3):
        _ingest(store, view, _same_end(device, 100, outputs={"logits": output_window([1, 2, 3, 4])}))
    assert view.devices[KEY].row["messages"] == 301  # all stored
    dev = view.devices[KEY]
    assert len(dev.windows) == 50
    # The sums are those of the kept windows, for the device and for its model group.
    assert dev.sums.windows == 50 and dev.sums.outputs.tolist() == [50, 100, 150, 200]
    group = view.groups[dev.group]
    assert group.sums.windows == 50 and group.sums.outputs.tolist() == [50, 100, 150, 200]


def test_the_slot_budget_bounds_a_device_of_dense_windows(tmp_path, monkeypatch):
    monkeypatch.setattr(aggregate, "MAX_VIEW_SLOTS", 40_000, raising=False)
    store, view, device = _fleet(tmp_path, [protocol.OutputLayout(name="logits", kind="classes", classes=4096)])
    dense = {"logits": output_window(list(range(1, 4097)))}
    _ingest(store, view, _same_end(device, 30, outputs=dense))
    dev = view.devices[KEY]
    assert sum(w.slots for w in dev.windows) <= 40_000 and 1 <= len(dev.windows) <= 40_000 // 4096 // 2
    assert np.array_equal(dev.sums.outputs, np.arange(1, 4097) * len(dev.windows))


@pytest.mark.parametrize("kind", ["classes", "histogram"])
def test_sparse_sums_match_the_counts(tmp_path, kind):
    layout = (protocol.OutputLayout(name="y", kind="classes", classes=5) if kind == "classes" else
              protocol.OutputLayout(name="y", kind="histogram", edges=[0.0, 1.0, 2.0]))
    store, view, device = _fleet(tmp_path, [layout])
    counts = [0, 3, 0, 7, 1] if kind == "classes" else [3, 0]
    window = output_window(counts, underflow=0 if kind == "classes" else 2, overflow=0 if kind == "classes" else 5)
    _ingest(store, view, [device.telemetry(runs=1, outputs={"y": window}).model_dump_json().encode()
                          for _ in range(2)])
    want = [0, 6, 0, 14, 2] if kind == "classes" else [6, 0, 4, 10]
    assert view.devices[KEY].sums.outputs.tolist() == want


def test_many_distinct_big_births_are_not_kept_by_the_ingest(tmp_path):
    # Each birth of ~150 KB (a reference per class), each followed by a window of its session: what
    # the ingest remembers of old births must not grow with their texts (it once kept 4096 of them).
    import gc
    import tracemalloc

    reference = [1 / 4096] * 4096
    store, view, device = _fleet(tmp_path, [protocol.OutputLayout(name=f"o{i}", kind="classes", classes=4096,
                                                                  reference=reference) for i in range(2)])
    births = 30

    def send(n: int) -> None:
        for _ in range(n):
            device.bd_seq += 1
            device.artifact.build_latency_us = float(device.bd_seq)  # a distinct birth each time
            birth = device.birth().model_dump_json().encode()
            assert len(birth) > 100_000
            store.ingest([Incoming(now_ms(), message=contract.parse_message(birth))])
            store.ingest([Incoming(now_ms(), message=device.telemetry(runs=1, outputs={}))])

    send(2)  # warm up: statement caches and the like
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    send(births)
    gc.collect()
    grown = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(before, "filename"))
    tracemalloc.stop()
    assert grown < births * 100_000 // 4, f"the ingest kept {grown} bytes after {births} births"


def test_the_manifest_answers_kept_are_bounded(tmp_path, monkeypatch):
    # Each birth may claim a new digest; what the view remembers of digests must not grow with them.
    monkeypatch.setattr(aggregate.KnownManifests, "MAX_KNOWN", 100, raising=False)
    monkeypatch.setenv("EDGESMITH_HOME", str(tmp_path / "home"))
    view = FleetView(Store.open(f"sqlite:///{tmp_path / 'monitor.db'}"))
    for i in range(1000):
        assert view.manifests.labels(f"{i:064x}") is None
    assert len(view.manifests._known) <= 100 and len(view.manifests._asked) <= 100
