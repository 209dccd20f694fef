"""A batch of windows as a few arrays, read for the whole batch at once.

A training batch is 32 windows from (mostly) 32 sessions. Read and tokenized window by window,
each window costs dozens of numpy calls of 1-3 us on a few hundred numbers: the data service's
cold path was bound by that, not by bytes. Here the per-window work is only what chunked storage
needs (which rows, which chunk); finding the spikes inside the window, shifting times, clipping
intervals are done once over the batch's concatenated arrays. `WindowBatch.of(windows)` gives the
same form from windows read one by one, so the tokenizer packs both the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .reader import SeriesWindow, SessionReader, Window

_NO_ROWS = np.zeros((0, 2))


def segment_sums(flags: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """How many of `flags` are set in each consecutive segment of the given lengths (empty ones too)."""
    return segment_counts(np.flatnonzero(flags), lens)


def segment_counts(positions: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """How many of the sorted `positions` fall in each consecutive segment of the given lengths:
    two binary searches per segment (a cumulative sum over the flags costs ~5 us per 1,000)."""
    ends = np.cumsum(lens)
    return np.searchsorted(positions, ends) - np.searchsorted(positions, ends - lens)


@dataclass
class WindowBatch:
    """Windows of a batch, field by field: spikes concatenated window after window, behaviour per
    window, every interval set's rows concatenated with their count per window."""

    session_ids: list[str]
    t_starts: list[float]  # absolute, as the refs gave them
    t_ends: list[float]
    spike_counts: np.ndarray  # int64 [B]
    spike_times: np.ndarray  # float64, relative to each window's start
    spike_units: np.ndarray  # int64, session-local unit index
    behaviour: list[dict[str, SeriesWindow]]  # per window: behaviour -> samples (relative times)
    # interval set -> (rows [n, 2] clipped to their window, relative; rows per window [B])
    intervals: dict[str, tuple[np.ndarray, np.ndarray]]

    def __len__(self) -> int:
        return len(self.session_ids)

    @classmethod
    def of(cls, windows: Sequence[Window]) -> "WindowBatch":
        """Windows read one by one, in batch form (a set a window lacks has no rows there)."""
        names = list(dict.fromkeys(n for w in windows for n in w.intervals))
        counts = np.fromiter((len(w.spike_times) for w in windows), dtype=np.int64, count=len(windows))
        cat = np.concatenate
        intervals = {}
        for name in names:
            parts = [w.intervals.get(name, _NO_ROWS) for w in windows]
            intervals[name] = (cat(parts), np.fromiter(map(len, parts), dtype=np.int64, count=len(parts)))
        return cls(session_ids=[w.session_id for w in windows], t_starts=[w.t_start for w in windows],
                   t_ends=[w.t_end for w in windows], spike_counts=counts,
                   spike_times=cat([w.spike_times for w in windows]) if windows else np.zeros(0),
                   spike_units=cat([w.spike_units for w in windows]).astype(np.int64, copy=False)
                   if windows else np.zeros(0, np.int64),
                   behaviour=[w.behaviour for w in windows], intervals=intervals)

    def window(self, i: int) -> Window:
        """Window i on its own (the form `SessionReader.read_window` gives)."""
        a = int(self.spike_counts[:i].sum())
        b = a + int(self.spike_counts[i])
        ints = {}
        for name, (rows, n) in self.intervals.items():
            r0 = int(n[:i].sum())
            ints[name] = rows[r0:r0 + int(n[i])]
        return Window(self.session_ids[i], self.t_starts[i], self.t_ends[i], self.spike_times[a:b],
                      self.spike_units[a:b], self.behaviour[i], ints)


def read_batch(readers: Sequence[SessionReader], t_starts: Sequence[float], window_s: float,
               needs: Sequence[tuple[list[str], list[str]]]) -> WindowBatch:
    """Windows [t, t + window_s) of the given sessions with the behaviours and interval sets each
    needs (`needs[i]` = (behaviours, interval sets)): what reading them one by one with
    `SessionReader.read_window` gives, value for value."""
    B = len(readers)
    t_ends = [t + window_s for t in t_starts]  # the same float addition as read_window's caller
    t0, t1 = np.asarray(t_starts, dtype=np.float64), np.asarray(t_ends, dtype=np.float64)
    # spikes: per window its rows (two searches reading only the window's chunks) and their times;
    # then one subtraction and one cast for the batch
    first, parts, n = [], [], []
    for r, a, b in zip(readers, t_starts, t_ends):
        lo, hi = r.spike_rows(a, b)
        first.append(lo)
        parts.append(r.spike_times(lo, hi))
        n.append(hi - lo)
    counts = np.asarray(n, dtype=np.int64)
    times = (np.concatenate(parts) if B else np.zeros(0)) - np.repeat(t0, counts)
    units = [r.spike_units(a, a + k) for r, a, k in zip(readers, first, n)]
    units_a = np.concatenate(units).astype(np.int64) if B else np.zeros(0, np.int64)
    behaviour = [r.window_behaviour(a, b, beh) for r, a, b, (beh, _) in zip(readers, t_starts, t_ends, needs)]
    names = list(dict.fromkeys(n for _, sets in needs for n in sets))
    return WindowBatch(session_ids=[r.session_id for r in readers], t_starts=list(t_starts), t_ends=t_ends,
                       spike_counts=counts, spike_times=times, spike_units=units_a, behaviour=behaviour,
                       intervals={name: _clipped(readers, t_starts, t_ends, t0, t1, name,
                                                 [name in sets for _, sets in needs]) for name in names})


def _clipped(readers: Sequence[SessionReader], t_starts: Sequence[float], t_ends: Sequence[float],
             t0: np.ndarray, t1: np.ndarray, name: str, wanted: list[bool]) -> tuple[np.ndarray, np.ndarray]:
    """Set `name`'s rows overlapping each window, clipped to it and relative to its start
    (`SessionReader.window_intervals`, with the shifting and clipping done once for the batch)."""
    parts = [(r.interval_rows(name, a, b) if want else None) for r, a, b, want in zip(readers, t_starts, t_ends, wanted)]
    parts = [_NO_ROWS if p is None else p for p in parts]
    m = np.fromiter(map(len, parts), dtype=np.int64, count=len(parts))
    if not m.any():
        return _NO_ROWS, m
    rows = np.concatenate(parts) - np.repeat(t0, m)[:, None]
    keep = rows[:, 1] > 0  # rows of overlapping sets that end before the window (none in a disjoint set)
    if not keep.all():
        rows, m = rows[keep], segment_sums(keep, m)
    np.maximum(rows, 0.0, out=rows)
    np.minimum(rows, np.repeat(t1 - t0, m)[:, None], out=rows)
    return rows, m
