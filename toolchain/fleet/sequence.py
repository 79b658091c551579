"""Per-device sequence bookkeeping: which ``seq`` numbers arrived, so duplicates are dropped and gaps counted.

A device's ``seq`` only grows, across sessions and restarts, so the state is small: the lowest and
highest seq seen and the *holes* between them (ranges that never arrived). A seq above the highest
is new (and the numbers it skipped become a hole); one inside a hole is new (a late or replayed
message, the hole shrinks); anything else below the highest is a duplicate. The gap count is the
size of the holes. The state is kept in the store with the device, in the same transaction as the
messages it admitted, so a restarted monitor drops what it already stored.

A device's seq only grows within its spool's *epoch* (a random id the device chooses when it
creates its spool database). A new epoch (a re-image, a recreated spool.db) starts seq over: the
tracker is started over for it, its gap count carried on, and the old epoch is remembered so that
a late message from it is told apart from the new stream (``retired``).

A device that loses many messages one by one could make the hole list grow without bound; past
MAX_HOLES the oldest hole is given up: its size stays in the gap count, and a message from it that
still arrives is taken for a duplicate.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass, field

MAX_HOLES = 1000
MAX_RETIRED = 8  # epochs remembered per device


@dataclass
class SeqTracker:
    lowest: int | None = None
    highest: int | None = None
    holes: list[list[int]] = field(default_factory=list)  # sorted, disjoint [start, end) ranges
    forgotten: int = 0  # size of holes given up on (still counted as gaps)
    epoch: str | None = None  # the device's current spool epoch (None: not known yet)
    retired: list[str] = field(default_factory=list)  # its earlier epochs, newest last

    def restarted(self, epoch: str) -> SeqTracker:
        """The tracker of a new epoch: seqs start over, the gaps so far are kept, the old epoch retired."""
        retired = ([*self.retired, self.epoch] if self.epoch else self.retired)[-MAX_RETIRED:]
        return SeqTracker(forgotten=self.gaps, epoch=epoch, retired=retired)

    @property
    def gaps(self) -> int:
        return self.forgotten + sum(end - start for start, end in self.holes)

    def accept(self, seq: int) -> bool:
        """Record ``seq``; True when it is new, False for a duplicate."""
        if self.highest is None or self.lowest is None:
            self.lowest = self.highest = seq
            return True
        if seq > self.highest:
            if seq > self.highest + 1:
                self._add_hole(self.highest + 1, seq)
            self.highest = seq
            return True
        if seq < self.lowest:
            # An older message than any seen (e.g. a replay that overtook nothing yet): what lies
            # between it and the lowest so far has not arrived either.
            if seq + 1 < self.lowest:
                self.holes.insert(0, [seq + 1, self.lowest])
                self._bound()
            self.lowest = seq
            return True
        i = bisect.bisect_right(self.holes, [seq, float("inf")]) - 1
        if i < 0:
            return False
        start, end = self.holes[i]
        if not start <= seq < end:
            return False
        replacement = [r for r in ([start, seq], [seq + 1, end]) if r[0] < r[1]]
        self.holes[i:i + 1] = replacement
        return True

    def _add_hole(self, start: int, end: int) -> None:
        self.holes.append([start, end])
        self._bound()

    def _bound(self) -> None:
        while len(self.holes) > MAX_HOLES:
            start, end = self.holes.pop(0)
            self.forgotten += end - start

    def copy(self) -> SeqTracker:
        return SeqTracker(self.lowest, self.highest, [hole[:] for hole in self.holes], self.forgotten, self.epoch,
                          self.retired[:])

    def to_json(self) -> str:
        return json.dumps({"lowest": self.lowest, "highest": self.highest, "holes": self.holes,
                           "forgotten": self.forgotten, "epoch": self.epoch, "retired": self.retired},
                          separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | None) -> SeqTracker:
        if not text:
            return cls()
        data = json.loads(text)
        return cls(lowest=data["lowest"], highest=data["highest"], holes=[list(h) for h in data["holes"]],
                   forgotten=data["forgotten"], epoch=data.get("epoch"), retired=list(data.get("retired", [])))
