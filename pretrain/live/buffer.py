"""The last window of spikes, as they arrive from a rig: out of order within a tolerance, late or
unknown ones counted and dropped, never a spike after the tick a window is cut at.

Why its own module: the rules here decide what a live prediction may see, and the tests hold the
server to them (tests/test_live.py). Times are LSL seconds (the rig's clock after time correction).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Counts:
    received: int = 0
    late: int = 0  # older than (newest seen - tolerance) on arrival: not used
    unknown: int = 0  # a unit index outside the session's units: not used
    restarts: int = 0  # the stream's clock jumped back by more than the tolerance: buffer emptied


@dataclass
class SpikeRing:
    """Spikes (time, unit index) with time >= newest - keep_s; appended in arrival order, kept sorted."""

    n_units: int
    keep_s: float  # the window plus the tolerance: what a window cut at the newest tick can need
    tolerance_s: float = 0.005  # how far out of order a spike may arrive and still be used
    restart_s: float = 1.0  # a spike this far before the newest is a restarted stream, not a late one
    counts: Counts = field(default_factory=Counts)

    def __post_init__(self) -> None:
        self.times = np.zeros(0, np.float64)
        self.units = np.zeros(0, np.int64)
        self.newest = -np.inf

    def add(self, times: np.ndarray, units: np.ndarray) -> None:
        """Takes a chunk as it came off the stream (any order)."""
        times = np.asarray(times, np.float64).ravel()
        units = np.asarray(units, np.int64).ravel()
        self.counts.received += len(times)
        if not len(times):
            return
        if times.max() < self.newest - self.restart_s:  # the source restarted its clock: start over
            self.counts.restarts += 1
            self.times, self.units, self.newest = self.times[:0], self.units[:0], -np.inf
        known = (units >= 0) & (units < self.n_units)
        self.counts.unknown += int((~known).sum())
        times, units = times[known], units[known]
        # late: judged against the newest before this chunk and within it, in arrival order
        running = np.maximum.accumulate(np.concatenate([[self.newest], times]))[:-1]
        ok = times >= running - self.tolerance_s
        self.counts.late += int((~ok).sum())
        times, units = times[ok], units[ok]
        if not len(times):
            return
        self.newest = max(self.newest, float(times.max()))
        t = np.concatenate([self.times, times])
        u = np.concatenate([self.units, units])
        order = np.argsort(t, kind="stable")
        keep = t[order] >= self.newest - self.keep_s
        self.times, self.units = t[order][keep], u[order][keep]

    def window(self, tick: float, window_s: float) -> tuple[np.ndarray, np.ndarray]:
        """The spikes with tick - window_s <= t < tick: never one stamped at or after the tick."""
        lo, hi = np.searchsorted(self.times, (tick - window_s, tick), side="left")
        return self.times[lo:hi], self.units[lo:hi]
