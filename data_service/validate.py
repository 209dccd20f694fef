"""Invariants every stored session satisfies, checked before anything is written.

Each check raises `InvalidSession` naming the field, so the user learns which array of which
session of which file is wrong, and the corpus is never touched by bad data. `verify` runs the
same checks on what is read back from disk.
"""

from __future__ import annotations

import numpy as np

from . import intervals as iv
from .errors import InvalidSession
from .session import SLUG, SPLITS, SessionData

TIME_TOL = 1e-9
# no session lasts 116 days: times beyond this are in the wrong unit (ms, samples) or made by an absurd
# sampling rate, and splitting such a session would try to allocate terabytes
MAX_TIME_S = 1e7


def _fail(s: SessionData, field: str, msg: str) -> None:
    raise InvalidSession(msg, file=s.source.path if s.source else None, session=s.session_id, field=field)


def check_times(s: SessionData, field: str, t: np.ndarray, *, allow_empty: bool = False) -> None:
    """1-D, finite, non-negative, sorted."""
    if t.ndim != 1:
        _fail(s, field, f"expected a 1-D array of times, got shape {t.shape}")
    if len(t) == 0:
        if not allow_empty:
            _fail(s, field, "no samples: the session is empty")
        return
    bad = ~np.isfinite(t)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        _fail(s, field, f"{int(bad.sum())} non-finite times (first at index {i})")
    if t[0] < 0 or (t < 0).any():
        i = int(np.flatnonzero(t < 0)[0])
        _fail(s, field, f"negative time {float(t[i])} at index {i}; times must be >= 0 seconds")
    d = np.diff(t)
    if (d < 0).any():
        i = int(np.flatnonzero(d < 0)[0])
        _fail(s, field, f"times are not sorted: t[{i}]={float(t[i])} > t[{i + 1}]={float(t[i + 1])}")
    if t[-1] > MAX_TIME_S:
        i = int(np.flatnonzero(t > MAX_TIME_S)[0])
        _fail(s, field, f"time {float(t[i]):g} s at index {i} is beyond {MAX_TIME_S:g} s (116 days) from the "
                        "session start: times must be in seconds")


def validate_session(s: SessionData) -> None:
    """Raise InvalidSession on the first broken invariant."""
    if not SLUG.match(s.session_id or ""):
        _fail(s, "session_id", f"session id {s.session_id!r} must match {SLUG.pattern}")
    if not s.subject:
        _fail(s, "subject", "subject is empty")
    n_units = s.n_units
    _check_units(s, n_units)
    t = _check_spikes(s, n_units)
    dom = _check_domain(s, t)
    _check_behaviour(s)
    _check_intervals(s, dom)
    _check_split_overlap(s)


def _check_units(s: SessionData, n_units: int) -> None:
    """The units table: non-empty, one area per unit, unique non-empty ids."""
    if n_units == 0:
        _fail(s, "units/id", "the units table is empty")
    if len(s.unit_areas) != n_units:
        _fail(s, "units/area", f"{len(s.unit_areas)} areas for {n_units} units (mismatched lengths)")
    ids = [str(u) for u in s.unit_ids]
    if any(not u for u in ids):
        _fail(s, "units/id", "empty unit id")
    if len(set(ids)) != n_units:
        seen, dup = set(), None
        for u in ids:
            if u in seen:
                dup = u
                break
            seen.add(u)
        _fail(s, "units/id", f"duplicate unit id {dup!r}")


def _check_spikes(s: SessionData, n_units: int) -> np.ndarray:
    """Spike times and their unit indices; returns the spike times for the domain check."""
    t, u = np.asarray(s.spike_times), np.asarray(s.spike_units)
    if t.dtype != np.float64:
        _fail(s, "spikes/timestamps", f"dtype {t.dtype}, expected float64 seconds")
    check_times(s, "spikes/timestamps", t)
    if u.ndim != 1 or len(u) != len(t):
        _fail(s, "spikes/unit_index", f"{u.size if u.ndim != 1 else len(u)} unit indices for {len(t)} spike times "
                                      "(mismatched lengths)")
    if u.dtype.kind not in "iu":
        _fail(s, "spikes/unit_index", f"dtype {u.dtype}, expected integers")
    if len(u) and (u.min() < 0 or u.max() >= n_units):
        bad = np.flatnonzero((u < 0) | (u >= n_units))
        _fail(s, "spikes/unit_index", f"{len(bad)} unit indices out of range [0, {n_units}) "
                                      f"(first: {int(u[bad[0]])} at spike {int(bad[0])})")
    return t


def _check_domain(s: SessionData, t: np.ndarray) -> np.ndarray:
    """The session domain, and every spike inside it; returns the domain for the interval checks."""
    dom = iv.as_intervals(s.domain)
    if len(dom) == 0 or not iv.is_normalized(dom):
        _fail(s, "intervals/domain", "domain must be non-empty, sorted, non-overlapping [start, end) intervals")
    if not np.isfinite(dom).all() or dom[-1, 1] > MAX_TIME_S + 1.0:
        _fail(s, "intervals/domain", f"domain {dom[0, 0]}..{dom[-1, 1]} must lie within 0..{MAX_TIME_S:g} s")
    inside = iv.contains(iv.dilate(dom, TIME_TOL), t)
    if not inside.all():
        i = int(np.flatnonzero(~inside)[0])
        _fail(s, "spikes/timestamps",
              f"spike at t={float(t[i])} lies outside the session domain {dom[0, 0]}..{dom[-1, 1]}")
    return dom


def _check_behaviour(s: SessionData) -> None:
    """Every behaviour: a valid name, good timestamps, finite float values with one name per column."""
    for name, ts in s.behaviour.items():
        f = f"behaviour/{name}"
        if not SLUG.match(name):
            _fail(s, f, f"behaviour name {name!r} must match {SLUG.pattern}")
        bt = np.asarray(ts.timestamps)
        check_times(s, f + "/timestamps", bt)
        vals = np.asarray(ts.values)
        if vals.ndim != 2 or vals.shape[0] != len(bt):
            _fail(s, f + "/values", f"values of shape {vals.shape} for {len(bt)} timestamps (mismatched lengths)")
        if vals.dtype.kind != "f":
            _fail(s, f + "/values", f"dtype {vals.dtype}, expected floating point")
        bad = ~np.isfinite(vals)
        if bad.any():
            row = int(np.flatnonzero(bad.any(axis=1))[0])
            _fail(s, f + "/values", f"{int(bad.sum())} NaN/inf values (first at sample {row}, t={float(bt[row])} s)")
        if len(ts.columns) != vals.shape[1]:
            _fail(s, f + "/columns", f"{len(ts.columns)} column names for {vals.shape[1]} columns")


def _check_intervals(s: SessionData, dom: np.ndarray) -> None:
    """Every interval set: a valid name, finite (n, 2) rows that end after they start, inside the domain."""
    lo, hi = dom[0, 0] - TIME_TOL, dom[-1, 1] + TIME_TOL
    for name, a in s.intervals.items():
        f = f"intervals/{name}"
        if not SLUG.match(name):
            _fail(s, f, f"interval set name {name!r} must match {SLUG.pattern}")
        a = np.asarray(a)
        if a.ndim != 2 or a.shape[1] != 2:
            _fail(s, f, f"expected (n, 2) [start, end) rows, got shape {a.shape}")
        if len(a) == 0:
            continue
        if not np.isfinite(a).all():
            _fail(s, f, "non-finite interval bounds")
        if (a[:, 1] < a[:, 0]).any():
            i = int(np.flatnonzero(a[:, 1] < a[:, 0])[0])
            _fail(s, f, f"interval {i} ends before it starts ({a[i, 0]} > {a[i, 1]})")
        if a.min() < lo or a.max() > hi:
            _fail(s, f, f"intervals reach outside the session ({a.min()}..{a.max()} vs {dom[0, 0]}..{dom[-1, 1]})")


def _check_split_overlap(s: SessionData) -> None:
    """The train/valid/test split domains present must not overlap: a model would be tested on its training data."""
    present = [k for k in SPLITS if k in s.intervals]
    for i, a_name in enumerate(present):
        for b_name in present[i + 1:]:
            overlap = iv.total(iv.intersect(s.intervals[a_name], s.intervals[b_name]))
            if overlap > TIME_TOL:
                _fail(s, f"intervals/{a_name}", f"split domains {a_name} and {b_name} overlap by {overlap:.3f} s")
