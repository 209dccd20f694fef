"""Binned-count MATLAB files (scipy.io for v5/v7, h5py for v7.3), recognised by their variables.

Layouts (../shared/data/README.md):
- `stevenson`: `spikes` (units x bins), `time` (bin times), `handVel`/`handPos` (3 x bins; rows that
  are all zero are dropped). Bin width = the median step of `time`.
- `bins_xy`: `spikes` (bins x units), `vel`/`pos` (bins x 2), no time vector: the bin width must be
  given (--bin-width or the metadata file).
- `dad` (Dyer et al. 2017 demo files): `Ytr`/`Yte` counts or rates (bins x units), `Xtr`/`Xte`
  2-D velocity, `Ttr`/`Tte` target ids. Rates are turned back into counts when they are multiples
  of a common quantum (the quantum gives the bin width). Same unit count in Ytr and Yte: one
  session with the source's own train/test parts; different: two sessions (`-tr`, `-te`). Bins
  are laid end to end; runs of equal target id become trials.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from ..errors import CorpusError, InvalidSession, UnknownLayout, UnreadableSource
from ..session import SessionData, SourceInfo, TimeSeries, interval_array, slugify
from .common import IngestOptions, binned_session, check_bin_width, real_array, regular_rate, source_info

LAYOUTS = {
    "stevenson": "spikes (units x bins), time, handVel/handPos",
    "bins_xy": "spikes (bins x units), vel and/or pos (bins x 2)",
    "dad": "Ytr, Xtr (+ Yte, Xte, Ttr, Tte)",
}


def load_mat(path: Path) -> dict[str, np.ndarray]:
    """Top-level numeric variables of a MAT file (v7.3 files are HDF5 and come transposed)."""
    with open(path, "rb") as f:
        head = f.read(128)
    if b"MATLAB 7.3" in head:
        try:
            with h5py.File(path, "r") as h:
                return {k: np.asarray(h[k]).T for k in h.keys() if isinstance(h[k], h5py.Dataset)}
        except (OSError, KeyError) as e:
            raise UnreadableSource(f"unreadable or truncated MAT v7.3 file: {e}", file=path.name) from None
    # deferred: importing scipy only when used keeps start-up light
    import scipy.io

    try:
        d = scipy.io.loadmat(path)
    except Exception as e:  # scipy raises several types for truncated / foreign files
        raise UnreadableSource(f"unreadable or truncated MAT file: {type(e).__name__}: {e}", file=path.name) from None
    return {k: np.asarray(v) for k, v in d.items() if not k.startswith("__")}


def detect_layout(d: dict) -> str | None:
    keys = set(d)
    if {"Ytr", "Xtr"} <= keys:
        return "dad"
    if "spikes" in keys and "time" in keys and keys & {"handVel", "handPos"}:
        return "stevenson"
    if "spikes" in keys and keys & {"vel", "pos"}:
        return "bins_xy"
    return None


def _orient(a: np.ndarray, n_bins: int, name: str, file: str, units_first: bool) -> np.ndarray:
    """Return `a` as (bins, ...) given that one of its axes has n_bins entries."""
    a = np.atleast_2d(real_array(a, file=file, session=None, field=name, allow_bool=True))
    if a.ndim != 2:
        raise InvalidSession(f"expected a 2-D array, got shape {a.shape}", file=file, field=name)
    if a.shape[0] == n_bins and a.shape[1] == n_bins:
        return a.T if units_first else a
    if a.shape[0] == n_bins:
        return a
    if a.shape[1] == n_bins:
        return a.T
    raise InvalidSession(f"shape {a.shape} has no axis of length {n_bins} (the number of bins)",
                         file=file, field=name)


def _counts(y: np.ndarray, file: str, field: str) -> tuple[np.ndarray, float | None]:
    """Integer counts from counts or rates, and the bin width that rates imply (1 / quantum).

    Integer arrays are counts. Floating-point arrays are rates when their values are multiples of
    a common quantum q > 1 spike/s bin (e.g. all multiples of 5 Hz: one spike in a 0.2 s bin);
    float arrays of whole numbers with no common factor are counts.
    """
    y = real_array(y, file=file, session=None, field=field, ndim=(2,), allow_bool=True)
    if not np.isfinite(y).all():
        raise InvalidSession("NaN/inf in spike counts", file=file, field=field)
    if (y < 0).any():
        raise InvalidSession("negative spike counts", file=file, field=field)
    if y.dtype.kind in "iub":
        return y.astype(np.int64), None
    pos = y[y > 0]
    if len(pos) == 0:
        return np.zeros(y.shape, dtype=np.int64), None
    # whole numbers (counts, or rates on a whole quantum); not rates so small that they round to 0
    whole = bool((np.round(pos) >= 1).all()) and np.allclose(y, np.round(y), rtol=0, atol=1e-6)
    q = float(np.gcd.reduce(np.unique(np.round(pos)).astype(np.int64))) if whole else float(pos.min())
    k = y / q
    if not np.allclose(k, np.round(k), rtol=0, atol=1e-6):
        raise InvalidSession("values are neither counts nor rates on a common quantum; cannot recover spike counts",
                             file=file, field=field)
    return np.round(k).astype(np.int64), (1.0 / q if q != 1.0 else None)


def _behaviour(name: str, v: np.ndarray, t: np.ndarray, rate: float | None) -> TimeSeries | None:
    keep = ~np.all(v == 0, axis=0)  # e.g. a third coordinate that is identically zero
    v = v[:, keep]
    if v.shape[1] == 0:
        return None
    cols = [c for c, k in zip("xyz", keep) if k] if len(keep) <= 3 else [f"c{i}" for i in np.flatnonzero(keep)]
    return TimeSeries(t.astype(np.float64), np.ascontiguousarray(v, dtype=np.float64), cols, sampling_rate=rate)


def _trials_from_targets(targets: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Runs of equal target id as [start, end) trials; bounds come from one array of bin edges,
    so consecutive trials touch exactly instead of overlapping by a rounding error."""
    change = np.flatnonzero(np.diff(targets) != 0) + 1
    lo = np.concatenate([[0], change])
    hi = np.concatenate([change, [len(targets)]])
    return interval_array(edges[lo], edges[hi])


def _bin_times(t, file: str) -> np.ndarray:
    """A stored vector of bin times: real, finite, non-negative, strictly increasing seconds."""
    t = np.atleast_1d(real_array(t, file=file, session=None, field="time"))
    if t.ndim > 1 and sorted(t.shape)[-2] > 1:
        raise InvalidSession(f"expected a vector of bin times, got shape {t.shape}", file=file, field="time")
    t = t.reshape(-1)
    if len(t) == 0:
        raise InvalidSession("no bins: the time vector is empty", file=file, field="time")
    if not np.isfinite(t).all():
        i = int(np.flatnonzero(~np.isfinite(t))[0])
        raise InvalidSession(f"non-finite bin time at index {i}", file=file, field="time")
    if (t < 0).any():
        i = int(np.flatnonzero(t < 0)[0])
        raise InvalidSession(f"negative bin time {float(t[i])} at index {i}; times must be >= 0 seconds",
                             file=file, field="time")
    if (np.diff(t) <= 0).any():
        i = int(np.flatnonzero(np.diff(t) <= 0)[0])
        raise InvalidSession(f"bin times are not strictly increasing: time[{i}]={float(t[i])} >= "
                             f"time[{i + 1}]={float(t[i + 1])}", file=file, field="time")
    return t


def _width(opts: IngestOptions, stored: float | None, file: str, session: str, what: str) -> float:
    """The bin width: the one given (--bin-width or the metadata file) over the one the file implies."""
    if opts.bin_width_s is not None:
        return check_bin_width(opts.bin_width_s, file=file, session=session,
                               source=" (given by --bin-width or bin_width_s in the metadata file)")
    if stored is None:
        raise InvalidSession(f"the bin width is not stored in this file{what}; pass --bin-width "
                             "(or bin_width_s in the metadata file)", file=file, session=session, field="bin_width")
    return check_bin_width(stored, file=file, session=session, source=" (implied by the file)")


def read_mat(path: Path, opts: IngestOptions, sha256: str | None = None) -> list[SessionData]:
    d = load_mat(path)
    layout = detect_layout(d)
    if layout is None:
        raise UnknownLayout(
            f"MAT variables {sorted(d)} match no known layout; expected one of: "
            + "; ".join(f"{k}: {v}" for k, v in LAYOUTS.items()), file=path.name)
    base_id = opts.session_id or slugify(path.stem)
    try:
        return _read_layout(path, d, layout, opts, sha256, base_id)
    except CorpusError as e:  # the arrays are checked before the session exists: it is this file's
        raise e.located(file=path.name, session=base_id)


def _read_layout(path: Path, d: dict, layout: str, opts: IngestOptions, sha256: str | None,
                 base_id: str) -> list[SessionData]:
    """The sessions of a MAT file of a known layout; the caller locates any error at this file."""
    src = source_info(path, "mat", layout, sha256)
    subject = opts.subject or base_id
    if layout in ("stevenson", "bins_xy"):
        return [_read_binned(d, layout, opts, src, subject, base_id, path.name)]
    return _read_dad(d, opts, src, subject, base_id, path.name)


def _binned_arrays(d: dict, layout: str, opts: IngestOptions, f: str,
                   base_id: str) -> tuple[int, np.ndarray, float, np.ndarray, dict]:
    """Bin count, counts, bin width, bin starts and raw behaviour of a `stevenson` or `bins_xy` file."""
    if layout == "stevenson":
        t = _bin_times(d["time"], f)
        n = len(t)
        counts, implied = _counts(_orient(d["spikes"], n, "spikes", f, units_first=True), f, "spikes")
        step = float(np.median(np.diff(t))) if n > 1 else None
        if step is not None and opts.bin_width_s is None:
            check_bin_width(step, file=f, session=base_id, source=" (the median step of `time`)")
            step = float(np.round(step, 9))  # 0.05 s, not 0.049999999999999996 s
        width = _width(opts, step, f, base_id, " (a single bin)")
        beh_src = {"hand_vel": d.get("handVel"), "hand_pos": d.get("handPos")}
        starts = t
    else:
        vel = d["vel" if "vel" in d else "pos"]
        n = max(np.shape(np.atleast_2d(vel)))  # (bins x 2) or (2 x bins)
        counts, implied = _counts(_orient(d["spikes"], n, "spikes", f, units_first=False), f, "spikes")
        width = _width(opts, implied, f, base_id, "")
        starts = np.arange(n, dtype=np.float64) * width
        beh_src = {"hand_vel": d.get("vel"), "hand_pos": d.get("pos")}
    return n, counts, width, starts, beh_src


def _read_binned(d: dict, layout: str, opts: IngestOptions, src: SourceInfo, subject: str, base_id: str,
                 f: str) -> SessionData:
    """The one session of a `stevenson` or `bins_xy` file, with its hand velocity/position."""
    n, counts, width, starts, beh_src = _binned_arrays(d, layout, opts, f, base_id)
    if n == 0:
        raise InvalidSession("no bins: the spike counts are empty", file=f, session=base_id, field="spikes")
    s = binned_session(session_id=base_id, subject=subject, counts=counts, bin_starts=starts,
                       bin_width=width, source=src, opts=opts)
    for name, v in beh_src.items():
        if v is None:
            continue
        ts = _behaviour(name, _orient(real_array(v, file=f, session=base_id, field=name), n, name, f,
                                      units_first=True), starts, regular_rate(starts))
        if ts is not None:
            s.behaviour[name] = ts
    return s


def _dad_parts(d: dict, f: str, base_id: str) -> list[tuple]:
    """The `tr` (and `te`) parts of a `dad` file as (tag, counts, velocity, target ids or None, implied width)."""
    parts = [("tr", "Ytr", "Xtr", "Ttr")] + ([("te", "Yte", "Xte", "Tte")] if "Yte" in d else [])
    loaded = []
    for tag, yk, xk, tk in parts:
        if xk not in d:
            raise InvalidSession(f"{yk} without {xk} (the behaviour of its bins)", file=f, field=xk)
        y = np.atleast_2d(real_array(d[yk], file=f, session=base_id, field=yk, allow_bool=True))
        counts, implied = _counts(y, f, yk)
        if counts.shape[0] == 0:
            raise InvalidSession("no bins: the spike counts are empty", file=f, field=yk)
        x = _orient(real_array(d[xk], file=f, session=base_id, field=xk), counts.shape[0], xk, f, units_first=False)
        targets = None
        if tk in d:
            targets = real_array(d[tk], file=f, session=base_id, field=tk).reshape(-1)
            if len(targets) != counts.shape[0]:
                raise InvalidSession(f"{len(targets)} target ids for {counts.shape[0]} bins (mismatched lengths)",
                                     file=f, field=tk)
            if not np.isfinite(targets).all():
                raise InvalidSession("NaN/inf target ids", file=f, field=tk)
        loaded.append((tag, counts, x, targets, implied))
    return loaded


def _read_dad(d: dict, opts: IngestOptions, src: SourceInfo, subject: str, base_id: str,
              f: str) -> list[SessionData]:
    """A `dad` file: one session when its parts share units, else one session per part (`-tr`, `-te`)."""
    loaded = _dad_parts(d, f, base_id)
    width = _width(opts, next((p[4] for p in loaded if p[4]), None), f, base_id, " (counts, not rates)")
    same_units = len({p[1].shape[1] for p in loaded}) == 1
    groups = [loaded] if same_units else [[p] for p in loaded]
    implied = loaded[-1][4]  # the last part's implied width decides the rate note, for every session
    sessions = []
    for group in groups:
        sid = base_id if same_units else f"{base_id}-{group[0][0]}"
        sessions.append(_dad_session(group, sid, subject, width, same_units, implied, src, opts))
    return sessions


def _dad_session(group: list[tuple], sid: str, subject: str, width: float, same_units: bool, implied: float | None,
                 src: SourceInfo, opts: IngestOptions) -> SessionData:
    """One session from `dad` parts laid end to end: velocity, trials from target ids, train/test from the parts."""
    counts = np.concatenate([p[1] for p in group])
    x = np.concatenate([p[2] for p in group])
    edges = np.arange(len(counts) + 1, dtype=np.float64) * width
    starts = edges[:-1]
    s = binned_session(session_id=sid, subject=subject, counts=counts, bin_starts=starts,
                       bin_width=width, source=src, opts=opts)
    s.behaviour["hand_vel"] = TimeSeries(starts.copy(), x, ["x", "y"], sampling_rate=1.0 / width)
    if all(p[3] is not None for p in group):
        targets = np.concatenate([p[3] for p in group])
        s.intervals["trials"] = _trials_from_targets(targets, edges)
        s.behaviour["target_id"] = TimeSeries(starts.copy(), targets.astype(np.float64)[:, None], ["id"],
                                              sampling_rate=1.0 / width, description="reach target id per bin")
    if same_units and len(group) == 2:  # the file's own parts become the train and test domains
        cut = edges[group[0][1].shape[0]]
        s.intervals["train"] = interval_array([0.0], [cut])
        s.intervals["test"] = interval_array([cut], [edges[-1]])
        s.notes.append(f"train/test domains are the file's {group[0][0]}/{group[1][0]} parts")
    s.notes.append("bins of the file's parts laid end to end in time; runs of equal target id are trials")
    if implied:
        s.notes.append(f"rates converted back to counts; bin width {width:g} s implied by the rate quantum")
    return s
