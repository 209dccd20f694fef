"""torch_brain / temporaldata HDF5 files (what brainsets writes), read directly with h5py.

Every group carries its class in `attrs["object"]`, so the file is parsed without importing
temporaldata (whose versions differ: torch_brain 0.2 bundles its own copy). Mapping:
- `spikes` (IrregularTimeSeries: timestamps, unit_index) + `units` (ArrayDict: id, and
  brain_region/area/location when present) -> spikes and the units table;
- every other Irregular/RegularTimeSeries -> one behaviour per floating-point attribute, named
  `<group>_<attribute>` (e.g. `cursor_vel`); integer attributes are skipped with a note;
- `train_domain`/`valid_domain`/`test_domain` -> the train/valid/test splits, `domain` -> the
  session domain, every other Interval -> an interval set of the same name;
- `session.id`, `subject.id`, `subject.species` and `brainset` -> session metadata.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from .. import intervals as iv
from ..errors import CorpusError, InvalidSession, UnreadableSource
from ..session import SessionData, TimeSeries, interval_array, slugify
from .common import (IngestOptions, as_columns, check_rate, drop_or_refuse_nan, real_array, regular_rate, snake,
                     source_info, unit_ids)

SPLIT_NAMES = {"train_domain": "train", "valid_domain": "valid", "test_domain": "test"}
TIME_KEYS = {"timestamps", "timestamp_indices_1s", "domain"}


def is_temporaldata(f: h5py.File) -> bool:
    return f.attrs.get("object") == "Data"


def _text(v) -> str:
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.ndarray):
        return _text(v.reshape(-1)[0]) if v.size else ""
    return str(v)


def _meta(f: h5py.File, group: str, key: str) -> str | None:
    g = f.get(group)
    if g is None:
        return None
    if key in g.attrs:
        return _text(g.attrs[key])
    if key in g and isinstance(g[key], h5py.Dataset):
        return _text(g[key][()])
    return None


def _dataset(g: h5py.Group, key: str, file: str, s_id: str, field: str) -> np.ndarray:
    """A member dataset's content, or an error naming the field when it is missing or a group."""
    if key not in g:
        raise InvalidSession(f"`{key}` is missing", file=file, session=s_id, field=field)
    if not isinstance(g[key], h5py.Dataset):
        raise InvalidSession(f"`{key}` is a group, not an array", file=file, session=s_id, field=field)
    return g[key][()]


def _series(g: h5py.Group, name: str, file: str, s_id: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    kind = _text(g.attrs["object"])
    keys = [k for k in g.keys() if k not in TIME_KEYS and isinstance(g[k], h5py.Dataset)]
    cols = {k: np.asarray(g[k][()]) for k in keys}
    if kind == "RegularTimeSeries":
        rate = check_rate(g.attrs.get("sampling_rate"), file=file, session=s_id, field=f"{name}/sampling_rate")
        n = len(next(iter(cols.values()))) if cols and next(iter(cols.values())).ndim else 0
        start = 0.0
        if "domain" in g:
            d0 = real_array(_dataset(g, "domain/start", file, s_id, f"{name}/domain/start"), file=file,
                            session=s_id, field=f"{name}/domain/start").reshape(-1)
            start = float(d0[0]) if len(d0) else 0.0
        t = start + np.arange(n, dtype=np.float64) / rate
    else:
        t = real_array(_dataset(g, "timestamps", file, s_id, f"{name}/timestamps"), file=file, session=s_id,
                       field=f"{name}/timestamps", ndim=(1,))
    return t, cols


def read_temporaldata(path: Path, opts: IngestOptions, sha256: str | None = None) -> list[SessionData]:
    file = path.name
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise UnreadableSource(f"unreadable or truncated HDF5 file: {e}", file=file) from None
    s_id = None
    try:
        s_id = opts.session_id or slugify(_meta(f, "session", "id") or path.stem)
        return [_session(f, path, opts, sha256, s_id)]
    except CorpusError:
        raise
    except Exception as e:  # a structurally broken file that only fails once read in depth
        raise UnreadableSource(f"temporaldata file could not be read in full: {type(e).__name__}: {e}",
                               file=file, session=s_id) from None
    finally:
        f.close()


def _session(f: h5py.File, path: Path, opts: IngestOptions, sha256: str | None, s_id: str) -> SessionData:
    """The session of an open temporaldata file; the caller turns deep structural breakage into UnreadableSource."""
    file = path.name
    subject = opts.subject or slugify(_meta(f, "subject", "id") or "unknown")
    species = opts.species or _meta(f, "subject", "species") or "unknown"
    t, u, ug = _spike_arrays(f, file, s_id)
    names, areas = _unit_table(ug, file, s_id, opts)
    notes: list[str] = []
    behaviour, intervals, domain = _other_groups(f, file, s_id, opts, notes)
    if domain is None:
        domain = _implied_domain(t, behaviour, file, s_id)
    brainset = _text(f.attrs["brainset"]) if "brainset" in f.attrs else _meta(f, "brainset", "id")
    if brainset:
        notes.append(f"brainset: {brainset}")
    return SessionData(
        session_id=s_id, subject=subject, spike_times=t, spike_units=u.astype(np.int64) if u.dtype.kind in "iu" else u,
        unit_ids=unit_ids(subject, s_id, names), unit_areas=np.asarray(areas, dtype=np.str_), domain=domain,
        source=source_info(path, "temporaldata", "temporaldata-h5", sha256), behaviour=behaviour,
        intervals=intervals, species=species, task=opts.task or "unknown", notes=notes,
    )


def _spike_arrays(f: h5py.File, file: str, s_id: str) -> tuple[np.ndarray, np.ndarray, h5py.Group]:
    """Spike times and unit indices, checked to be there and to match; also the units group, checked to be a group."""
    if "spikes" not in f or "units" not in f:
        raise InvalidSession("a temporaldata file needs `spikes` and `units` to be ingested", file=file,
                             session=s_id, field="spikes" if "spikes" not in f else "units")
    sp, ug = f["spikes"], f["units"]
    for name, g in (("spikes", sp), ("units", ug)):
        if not isinstance(g, h5py.Group):
            raise InvalidSession(f"`{name}` is an array, not a group", file=file, session=s_id, field=name)
    for k in ("timestamps", "unit_index"):
        if k not in sp:
            raise InvalidSession(f"spikes has no `{k}`", file=file, session=s_id, field=f"spikes/{k}")
    t = real_array(_dataset(sp, "timestamps", file, s_id, "spikes/timestamps"), file=file, session=s_id,
                   field="spikes/timestamps", ndim=(1,))
    u = np.asarray(_dataset(sp, "unit_index", file, s_id, "spikes/unit_index"))
    if u.ndim != 1 or len(t) != len(u):
        raise InvalidSession(f"unit indices of shape {u.shape} for {len(t)} spike times (mismatched lengths)",
                             file=file, session=s_id, field="spikes/unit_index")
    return t, u, ug


def _unit_table(ug: h5py.Group, file: str, s_id: str, opts: IngestOptions) -> tuple[list[str], list[str]]:
    """Unit names and areas (from brain_region/area/location, else the --area option, else `unknown`)."""
    if "id" not in ug:
        raise InvalidSession("units has no `id`", file=file, session=s_id, field="units/id")
    ids = np.asarray(_dataset(ug, "id", file, s_id, "units/id"))
    if ids.ndim != 1:
        raise InvalidSession(f"expected a 1-D array of unit ids, got shape {ids.shape}", file=file, session=s_id,
                             field="units/id")
    names = [_text(x) for x in ids]
    area_key = next((k for k in ("brain_region", "area", "location") if k in ug), None)
    areas = ([_text(x) for x in np.atleast_1d(_dataset(ug, area_key, file, s_id, f"units/{area_key}"))]
             if area_key else [opts.area or "unknown"] * len(names))
    return names, areas


def _other_groups(f: h5py.File, file: str, s_id: str, opts: IngestOptions,
                  notes: list[str]) -> tuple[dict[str, TimeSeries], dict[str, np.ndarray], np.ndarray | None]:
    """Behaviour, interval sets and the domain from every typed group but spikes and units, in file order."""
    behaviour: dict[str, TimeSeries] = {}
    intervals: dict[str, np.ndarray] = {}
    domain = None
    for name, g in f.items():
        if not isinstance(g, h5py.Group) or "object" not in g.attrs or name in ("spikes", "units"):
            continue
        kind = _text(g.attrs["object"])
        if kind in ("IrregularTimeSeries", "RegularTimeSeries"):
            _add_behaviour(g, name, file, s_id, opts, notes, behaviour)
        elif kind == "Interval":
            a = _interval(g, name, file, s_id)
            if name == "domain":
                domain = iv.normalize(a)
            else:
                intervals[SPLIT_NAMES.get(name, snake(name))] = a
    return behaviour, intervals, domain


def _add_behaviour(g: h5py.Group, name: str, file: str, s_id: str, opts: IngestOptions, notes: list[str],
                   behaviour: dict[str, TimeSeries]) -> None:
    """One behaviour per floating-point attribute of a time series group; other attributes are noted and skipped."""
    bt, cols = _series(g, name, file, s_id)
    for key, v in cols.items():
        if v.dtype.kind != "f":
            notes.append(f"skipped non-float attribute {name}.{key}")
            continue
        bname = snake(f"{name}_{key}")
        v = as_columns(v).astype(np.float64 if v.dtype == np.float64 else np.float32)
        if len(v) != len(bt):
            raise InvalidSession(f"{len(v)} samples for {len(bt)} timestamps (mismatched lengths)",
                                 file=file, session=s_id, field=f"behaviour/{bname}")
        bt2, v2 = drop_or_refuse_nan(s_id, file, bname, bt, v, opts.drop_nan_behaviour, notes)
        cols_ = list("xyz"[: v2.shape[1]]) if v2.shape[1] <= 3 else [f"c{i}" for i in range(v2.shape[1])]
        behaviour[bname] = TimeSeries(bt2, np.ascontiguousarray(v2), cols_, sampling_rate=regular_rate(bt2),
                                      description=f"temporaldata {name}.{key}")


def _interval(g: h5py.Group, name: str, file: str, s_id: str) -> np.ndarray:
    """An Interval group's [start, end) rows, checked for matching lengths and finite bounds."""
    start, end = (real_array(_dataset(g, k, file, s_id, f"{name}/{k}"), file=file, session=s_id,
                             field=f"{name}/{k}", ndim=(0, 1)).reshape(-1) for k in ("start", "end"))
    if len(start) != len(end):
        raise InvalidSession(f"{len(start)} starts for {len(end)} ends (mismatched lengths)", file=file,
                             session=s_id, field=f"{name}/end")
    if not (np.isfinite(start).all() and np.isfinite(end).all()):
        raise InvalidSession("non-finite interval bounds", file=file, session=s_id, field=f"{name}/start")
    return interval_array(start, end)


def _implied_domain(t: np.ndarray, behaviour: dict[str, TimeSeries], file: str, s_id: str) -> np.ndarray:
    """A file without a `domain` group: the span of its spikes and behaviour (1 ms past the last sample)."""
    spans = [t[[0, -1]]] if len(t) else []
    spans += [b.timestamps[[0, -1]] for b in behaviour.values() if len(b.timestamps)]
    if not spans:
        raise InvalidSession("no spikes or behaviour: the session is empty", file=file, session=s_id,
                             field="spikes/timestamps")
    allt = np.concatenate(spans)
    return interval_array([allt.min()], [allt.max() + 1e-3])
