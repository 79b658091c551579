"""The fleet monitor's per-device budget and retention defaults (docs/telemetry.md, "Retention and
budgets"), in a module of their own with no dependency, so `edgesmith fleet --help` and the CLI's
option defaults need no database driver (the `toolchain` extra)."""

from __future__ import annotations

from dataclasses import dataclass

# Defaults of the per-device budget (monitor --device-windows-per-day, --device-mb-per-day). An
# honest device sending a window every second all day stores 86,400 windows, ~80 MB (4 classes) to
# ~360 MB (1,000 classes, SQLite); the defaults leave room for that plus a long outage's spool
# flushed on reconnect, and bound what one device adds to the store a day.
DEFAULT_WINDOWS_PER_DAY = 200_000
DEFAULT_BYTES_PER_DAY = 500_000_000
# Retention (monitor --retention-days): raw windows, events, states, deaths and superseded sessions
# older than this (by the monitor's clock when they arrived) are deleted, PRUNE_ROWS a transaction.
# With the budget, what one device can hold in the store is at most 7 x 500 MB.
DEFAULT_RETENTION_DAYS = 7.0
PRUNE_ROWS = 2000


@dataclass(frozen=True)
class DeviceBudget:
    """What one device may store a day (UTC days, monitor clock): past either bound its further
    windows are refused (``over_budget``, counted against it), until the next day. 0: no bound."""

    windows_per_day: int = DEFAULT_WINDOWS_PER_DAY
    bytes_per_day: int = DEFAULT_BYTES_PER_DAY

    def over(self, windows: int, stored_bytes: int) -> bool:
        return bool((self.windows_per_day and windows > self.windows_per_day)
                    or (self.bytes_per_day and stored_bytes > self.bytes_per_day))
