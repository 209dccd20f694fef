"""Reading windows out of a corpus: the API the data service and the benchmarks use.

    corpus = open_corpus("runs/demo/corpus")
    w = corpus.read_window("A2929-200711", 700.0, 701.0)
    w.spike_times, w.spike_units, w.behaviour["position"].values, w.intervals["train"]

A window's spike range comes from the per-second index (arithmetic, then a search inside at
most two seconds of spikes), and only the chunks holding it are read and decoded; decoded
chunks, session handles and corpora are cached per process, so the Nth window of a session
costs a few array slices. Times in a window are relative to its start.
"""

from __future__ import annotations

from collections.abc import Collection

import math
from bisect import bisect_left, bisect_right
import os
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import zarr

from . import intervals as iv
from .errors import CorpusError
from .format import (
    GROUND_TRUTH, INTERVALS, MANIFEST, SESSIONS, SPIKE_INDEX, SPIKE_TIMES,
    SPIKE_UNITS, UNIT_AREAS, UNIT_IDS, behaviour_path, check_corpus_root,
)
from .manifest import fingerprint, read_manifest, session_attrs
from .remote import as_path, filesystem, is_url, join
from .shards import open_sharded


class _ZarrRows:
    """Fallback for arrays the fast path does not handle: the same read(start, stop) via zarr."""

    def __init__(self, path: Path) -> None:
        self._a = zarr.open_array(str(path), mode="r")
        self.shape = self._a.shape

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self._a[max(0, start):max(0, stop)])

    def read_all(self) -> np.ndarray:
        return np.asarray(self._a[...])

    def search(self, t: float, a: int, b: int, guess: int) -> int:
        """ShardedArray.search's contract, by reading all of [a, b)."""
        return a + int(np.searchsorted(self.read(a, b), t, side="left"))


_NO_ROWS = np.zeros((0, 2))
_NO_ROWS.flags.writeable = False  # shared by every window without rows of a set


def _strings(a) -> np.ndarray:
    """zarr returns numpy's variable-width StringDType; callers get a plain fixed-width str array."""
    return np.asarray([str(x) for x in np.asarray(a).tolist()], dtype=np.str_)


def _rows(path: Path):
    return open_sharded(path) or _ZarrRows(path)


@dataclass
class SeriesWindow:
    """The samples of one behaviour inside a window (times relative to the window start)."""

    timestamps: np.ndarray
    values: np.ndarray


@dataclass
class Window:
    session_id: str
    t_start: float
    t_end: float
    spike_times: np.ndarray  # float64 seconds relative to t_start, sorted
    spike_units: np.ndarray  # int64 session-local unit index (into SessionReader.unit_ids)
    behaviour: dict[str, SeriesWindow]
    intervals: dict[str, np.ndarray] = field(default_factory=dict)  # clipped to the window, relative

    def mask(self, interval_set: str, times: np.ndarray) -> np.ndarray:
        """Which of `times` (relative) fall inside the named interval set."""
        return iv.contains(iv.normalize(self.intervals[interval_set]), times)

    def interval_masks(self, behaviour: str) -> dict[str, np.ndarray]:
        """For every interval set, which samples of `behaviour` it covers."""
        t = self.behaviour[behaviour].timestamps
        return {name: self.mask(name, t) for name in self.intervals}


class _TimeSeriesRows:
    """Timestamps + per-second index of a sorted series; finds a window's row range."""

    def __init__(self, times, index: np.ndarray, origin: float, step: float) -> None:
        self.times = times
        self.index = index
        self._offsets = index.tolist()  # a list: indexing one is ~10x cheaper than a numpy scalar
        self.origin = origin
        self.step = step
        self.last = len(index) - 1

    def span(self, t0: float, t1: float) -> tuple[int, int]:
        """Rows [a, b) of the index's seconds covering [t0, t1): a superset of the window's rows."""
        k0 = int((t0 - self.origin) // self.step)
        k1 = int(math.ceil((t1 - self.origin) / self.step))
        k0 = min(max(k0, 0), self.last)
        k1 = min(max(k1, 0), self.last)
        a, b = self._offsets[k0], self._offsets[k1] if k1 < self.last else len(self.times)
        return (0 if t0 < self.origin else a), b

    def rows(self, t0: float, t1: float) -> tuple[int, int]:
        """(lo, hi): the rows with t0 <= t < t1 (np.searchsorted over `span`'s rows). Each end is
        searched from the row the index interpolates for it within its second, so only the chunks
        holding the window's rows are read, not those of the whole seconds around it (0.19 chunk
        reads a window fewer at 200 sessions: bench/RESULTS.md, issue 28)."""
        a, b = self.span(t0, t1)
        lo = self.times.search(t0, a, b, self._guess(t0))
        return lo, self.times.search(t1, lo, b, self._guess(t1))

    def _guess(self, t: float) -> int:
        """The row at time t if the spikes of its second were evenly spread."""
        k = (t - self.origin) / self.step
        i = int(k // 1)
        if i < 0:
            return 0
        if i >= self.last:
            return len(self.times)
        off = self._offsets
        return off[i] + int((k - i) * (off[i + 1] - off[i]))

    def window(self, t0: float, t1: float) -> tuple[int, int, np.ndarray]:
        """(lo, hi, times[lo:hi]) for t0 <= t < t1."""
        lo, hi = self.rows(t0, t1)
        return lo, hi, self.times.read(lo, hi)


class _GridRows:
    """Timestamps known to be exactly t0 + i * step: a window's rows and times by arithmetic."""

    def __init__(self, times, t0: float, step: float) -> None:
        self.times = times  # the stored array, for whole-series reads
        self.t0, self.step, self.n = t0, step, len(times)

    def _first_at_or_after(self, t: float) -> int:
        i = min(max(int(math.ceil((t - self.t0) / self.step)), 0), self.n)
        while i > 0 and self.t0 + (i - 1) * self.step >= t:  # settle float rounding either way
            i -= 1
        while i < self.n and self.t0 + i * self.step < t:
            i += 1
        return i

    def window(self, t0: float, t1: float) -> tuple[int, int, np.ndarray]:
        lo, hi = self._first_at_or_after(t0), self._first_at_or_after(t1)
        return lo, hi, self.t0 + np.arange(lo, hi) * self.step


class SessionReader:
    """One session of a corpus, opened lazily; safe to share within a process."""

    def __init__(self, root: Path, session_id: str) -> None:
        self.root = root
        self.session_id = session_id
        self.path = root / SESSIONS / session_id
        if not (self.path / "zarr.json").exists():
            raise CorpusError("no such session in the corpus", file=str(root), session=session_id)
        self.attrs = session_attrs(self.path)
        self.origin = float(self.attrs["index_origin"])
        self.step = float(self.attrs["index_step_s"])
        self._spikes = _TimeSeriesRows(_rows(self.path / SPIKE_TIMES), _rows(self.path / SPIKE_INDEX).read_all(),
                                       self.origin, self.step)
        self._units = _rows(self.path / SPIKE_UNITS)
        self._behaviour = {}
        shared: dict[str, _TimeSeriesRows | _GridRows] = {}  # behaviours with identical timestamps
        for name, meta in self.attrs["behaviour"].items():
            key = meta.get("timestamps_checksum") or name
            rows = shared.get(key)
            if rows is None:
                t = _rows(self.path / behaviour_path(name, "timestamps"))
                grid = meta.get("grid")
                if grid:
                    rows = _GridRows(t, grid["t0"], grid["step"])
                else:
                    idx = _rows(self.path / behaviour_path(name, "index")).read_all()
                    rows = _TimeSeriesRows(t, idx, self.origin, self.step)
                shared[key] = rows
            self._behaviour[name] = (rows, _rows(self.path / behaviour_path(name, "values")))

    # ---- whole-session metadata ------------------------------------------------------------
    @property
    def behaviour_names(self) -> list[str]:
        return list(self._behaviour)

    @property
    def domain(self) -> np.ndarray:
        return np.asarray(self.attrs["domain"], dtype=np.float64).reshape(-1, 2)

    @cached_property
    def unit_ids(self) -> np.ndarray:
        return _strings(zarr.open_array(str(self.path / UNIT_IDS), mode="r")[...])

    @cached_property
    def unit_areas(self) -> np.ndarray:
        return _strings(zarr.open_array(str(self.path / UNIT_AREAS), mode="r")[...])

    @cached_property
    def intervals(self) -> dict[str, np.ndarray]:
        sets = self.attrs["interval_sets"]
        table = np.asarray(zarr.open_array(str(self.path / INTERVALS), mode="r")[...]) if sets else None
        return {name: table[lo:hi].reshape(-1, 2) for name, (lo, hi) in sets.items()}

    @cached_property
    def _interval_lookup(self) -> dict[str, tuple[np.ndarray, list[float], list[float], bool]]:
        """Per set: rows sorted by start, their starts and the running max of their ends (as lists:
        `bisect` on a list is ~10x cheaper than numpy's searchsorted for one value), and whether
        the rows are disjoint, so a window's rows are found with two binary searches."""
        out = {}
        for name, rows in self.intervals.items():
            rows = rows[np.argsort(rows[:, 0], kind="stable")]
            max_end = np.maximum.accumulate(rows[:, 1]) if len(rows) else rows[:, 1]
            disjoint = bool(np.all(rows[1:, 0] >= rows[:-1, 1])) if len(rows) else True
            out[name] = (rows, rows[:, 0].tolist(), max_end.tolist(), disjoint)
        return out

    @cached_property
    def ground_truth(self) -> dict[str, np.ndarray]:
        p = self.path / GROUND_TRUTH
        if not p.exists():
            return {}
        g = zarr.open_group(str(p), mode="r")
        return {name: np.asarray(a[...]) for name, a in g.arrays()}

    # ---- windows -----------------------------------------------------------------------------
    def interval_rows(self, name: str, t0: float, t1: float) -> np.ndarray | None:
        """The rows of interval set `name` that may overlap [t0, t1), as stored (absolute, not
        clipped; a set whose rows overlap one another may hold some ending before t0); None if the
        session has no such set."""
        found = self._interval_lookup.get(name)
        if found is None:
            return None
        rows, starts, max_end, _ = found
        hi = bisect_left(starts, t1)
        return rows[bisect_right(max_end, t0, 0, hi):hi]

    def window_intervals(self, t0: float, t1: float, names: Collection[str] | None = None) -> dict[str, np.ndarray]:
        """Every interval set's (or those named) rows overlapping [t0, t1), clipped to it, relative to t0."""
        out = {}
        width = t1 - t0
        lookup = self._interval_lookup
        for name in lookup if names is None else [n for n in names if n in lookup]:
            sel = self.interval_rows(name, t0, t1)
            if not len(sel):
                out[name] = _NO_ROWS
                continue
            sel = sel - t0
            if not lookup[name][3]:  # rows that overlap one another: some may end before t0
                sel = sel[sel[:, 1] > 0]
            np.maximum(sel, 0.0, out=sel)
            np.minimum(sel, width, out=sel)
            out[name] = sel
        return out

    def read_window(self, t0: float, t1: float, *, behaviours: Collection[str] | None = None,
                    intervals: bool | Collection[str] = True) -> Window:
        """Spikes, behaviour samples and intervals with t0 <= t < t1, times relative to t0.
        `behaviours` / `intervals` (names) restrict what is read: a training window needs few."""
        lo, hi, times = self._spikes.window(t0, t1)
        units = self._units.read(lo, hi).astype(np.int64)
        return Window(self.session_id, t0, t1, times - t0, units, self.window_behaviour(t0, t1, behaviours),
                      {} if intervals is False else self.window_intervals(t0, t1, None if intervals is True else intervals))

    def window_behaviour(self, t0: float, t1: float, names: Collection[str] | None = None) -> dict[str, SeriesWindow]:
        """Every behaviour's (or those named) samples with t0 <= t < t1, times relative to t0."""
        beh = {}
        ranges: dict[int, tuple[int, int, np.ndarray]] = {}
        for name in (self._behaviour if names is None else [b for b in names if b in self._behaviour]):
            rows, values = self._behaviour[name]
            r = ranges.get(id(rows))
            if r is None:
                r = ranges[id(rows)] = rows.window(t0, t1)
            beh[name] = SeriesWindow(r[2] - t0, values.read(r[0], r[1]))  # own array per behaviour
        return beh

    # ---- rows for a batch of windows (batch.py) -----------------------------------------------------
    def spike_rows(self, t0: float, t1: float) -> tuple[int, int]:
        """(lo, hi): the spikes with t0 <= t < t1."""
        return self._spikes.rows(t0, t1)

    def spike_times(self, lo: int, hi: int) -> np.ndarray:
        """The absolute times of spikes [lo, hi)."""
        return self._spikes.times.read(lo, hi)

    def spike_units(self, lo: int, hi: int) -> np.ndarray:
        """The session-local unit of spikes [lo, hi), as stored (uint16 or wider)."""
        return self._units.read(lo, hi)

    # ---- whole arrays (verify, round-trip tests, export) -----------------------------------------
    def spikes(self) -> tuple[np.ndarray, np.ndarray]:
        return self._spikes.times.read_all(), self._units.read_all()

    def behaviour(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        rows, values = self._behaviour[name]
        return rows.times.read_all(), values.read_all()


class Corpus:
    """A corpus opened for reading: the manifest plus lazily opened sessions. `root` is a local
    path or a URL on shared storage (remote.py)."""

    def __init__(self, root: Path | str) -> None:
        self.root = as_path(str(root)) if isinstance(root, str) else root
        check_corpus_root(self.root)
        self.rows = read_manifest(self.root)
        self._sessions: dict[str, SessionReader] = {}

    @property
    def session_ids(self) -> list[str]:
        return sorted(self.rows)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.rows)

    def session(self, session_id: str) -> SessionReader:
        r = self._sessions.get(session_id)
        if r is None:
            if session_id not in self.rows:
                raise CorpusError("no such session in the corpus manifest", file=str(self.root), session=session_id)
            r = self._sessions[session_id] = SessionReader(self.root, session_id)
        return r

    def read_window(self, session_id: str, t0: float, t1: float, **kw) -> Window:
        return self.session(session_id).read_window(t0, t1, **kw)


_open: dict[tuple[str, int], Corpus] = {}
REMOTE_RECHECK_S = 30.0  # how often a URL corpus's manifest is checked for changes (one HEAD request)
_remote_checked: dict[str, tuple[float, object]] = {}


def _remote_stamp(url: str):
    now = time.monotonic()
    seen = _remote_checked.get(url)
    if seen is not None and now - seen[0] < REMOTE_RECHECK_S:
        return seen[1]
    try:
        info = filesystem(url).info(join(url, MANIFEST))
        stamp = info.get("ETag") or info.get("LastModified") or info.get("mtime") or info.get("size")
    except FileNotFoundError:
        stamp = 0
    _remote_checked[url] = (now, stamp)
    return stamp


def open_corpus(root: Path | str) -> Corpus:
    """The process's Corpus for `root`, re-read when the manifest changes (checked on every call for a
    local corpus, every REMOTE_RECHECK_S for one on shared storage)."""
    if is_url(root):
        real = str(root).rstrip("/")
        stamp = _remote_stamp(real)
    else:
        real = os.path.realpath(root)
        try:
            stamp = os.stat(os.path.join(real, MANIFEST)).st_mtime_ns
        except FileNotFoundError:
            stamp = 0
    key = (real, stamp)
    c = _open.get(key)
    if c is None:
        for k in [k for k in _open if k[0] == real]:
            del _open[k]
        c = _open[key] = Corpus(real)
    return c
