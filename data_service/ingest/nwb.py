"""NWB files with spike-sorted units (pynwb).

- Units: the `units` table's spike times (ragged), one unit per row; brain area from the units'
  `location` column, else their electrodes' or electrode group's location, else --area.
- Behaviour: SpatialSeries and TimeSeries inside behaviour containers (Position, CompassDirection,
  BehavioralTimeSeries, PupilTracking, EyeTracking) in acquisition or a `behavior` processing
  module, and plain TimeSeries directly in that module (the Neural Latents Benchmark's layout),
  each named by its own name, with its NWB `unit`. A container's 1-D series that share timestamps are stacked into one behaviour named
  after the container (columns = series names); anything else is one behaviour per series.
- Intervals: `trials`, `epochs` (plus one set per epoch tag, `epoch_<tag>`) and every other
  TimeIntervals table, under its own name.
- Domain: the epochs when present, widened to cover every spike and sample.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from ..errors import CorpusError, InvalidSession, UnreadableSource
from ..session import SessionData, TimeSeries, interval_array, slugify
from .common import (IngestOptions, as_columns, check_rate, drop_or_refuse_nan, real_array, regular_rate, snake,
                     source_info, unit_ids)

BEHAVIOUR_CONTAINERS = {"Position", "CompassDirection", "BehavioralTimeSeries", "PupilTracking", "EyeTracking"}
DOMAIN_PAD_S = 1e-3  # half-open domain: the last spike must lie strictly inside


def _where(ts, fallback: str) -> str:
    """Where a series lives in the file (e.g. acquisition/Position/xy), for error messages."""
    name = getattr(getattr(ts, "data", None), "name", None)  # an h5py dataset knows its path
    if isinstance(name, str) and name.strip("/").count("/"):
        return name.strip("/").rsplit("/", 1)[0]
    return fallback


def _series_times(ts, n: int, file: str, s_id: str, where: str) -> np.ndarray:
    if ts.timestamps is not None:
        return real_array(ts.timestamps[:], file=file, session=s_id, field=f"{where}/timestamps", ndim=(1,))
    rate = check_rate(ts.rate, file=file, session=s_id, field=f"{where}/rate")
    start = real_array(ts.starting_time or 0.0, file=file, session=s_id, field=f"{where}/starting_time", ndim=(0,))
    if not np.isfinite(start):
        raise InvalidSession(f"starting time {float(start)}", file=file, session=s_id, field=f"{where}/starting_time")
    return float(start) + np.arange(n, dtype=np.float64) / rate


def _series(ts, file: str, s_id: str, where: str) -> tuple[np.ndarray, np.ndarray, str]:
    v = real_array(ts.data[:], file=file, session=s_id, field=f"{where}/data", ndim=(1, 2, 3, 4))
    return _series_times(ts, len(v), file, s_id, where), v, getattr(ts, "unit", "unknown")


def _behaviour_series(nwb):
    """(container name, {series name: series}) for every behaviour container in the file, and for
    every plain TimeSeries placed directly in the `behavior` module (how the Neural Latents
    Benchmark's files keep hand_vel, hand_pos, cursor_pos, eye_pos), named by itself."""
    sources = [(obj, False) for obj in nwb.acquisition.values()]
    for name, mod in nwb.processing.items():
        if name.lower() in ("behavior", "behaviour"):
            sources += [(obj, True) for obj in mod.data_interfaces.values()]
    for obj, in_behaviour_module in sources:
        kind = type(obj).__name__
        if kind in BEHAVIOUR_CONTAINERS:
            series = getattr(obj, "spatial_series", None) or getattr(obj, "time_series", None) or {}
            yield obj.name, dict(series)
        elif kind == "SpatialSeries" or (kind == "TimeSeries" and in_behaviour_module):
            yield obj.name, {obj.name: obj}


def _behaviours(nwb, s_id: str, file: str, opts: IngestOptions, notes: list[str]) -> dict[str, TimeSeries]:
    out: dict[str, TimeSeries] = {}
    for container, series in _behaviour_series(nwb):
        if not series:
            continue
        loaded = {k: _series(v, file, s_id, _where(v, f"{container}/{k}")) for k, v in series.items()}
        first_t = next(iter(loaded.values()))[0]
        stackable = len(loaded) > 1 and all(
            v[1].ndim == 1 and len(v[0]) == len(first_t) and np.array_equal(v[0], first_t) for v in loaded.values())
        if stackable:
            groups = {snake(container): (first_t, np.stack([v[1] for v in loaded.values()], axis=1),
                                         list(loaded), next(iter(loaded.values()))[2])}
        else:
            groups = {}
            for k, (t, v, unit) in loaded.items():
                name = snake(container) if len(loaded) == 1 else f"{snake(container)}_{snake(k)}"
                v2 = as_columns(v)
                cols = list("xyz"[: v2.shape[1]]) if v2.shape[1] <= 3 else [f"c{i}" for i in range(v2.shape[1])]
                groups[name] = (t, v2, cols, unit)
        for name, (t, v, cols, unit) in groups.items():
            if len(t) != len(v):
                raise InvalidSession(f"{len(t)} timestamps for {len(v)} samples (mismatched lengths)",
                                     file=file, session=s_id, field=f"behaviour/{name}")
            t, v = drop_or_refuse_nan(s_id, file, name, t, v, opts.drop_nan_behaviour, notes)
            out[name] = TimeSeries(t, np.ascontiguousarray(v), cols, unit=str(unit or "unknown"),
                                   sampling_rate=regular_rate(t), description=f"NWB {container}")
    return out


def _unit_areas(units, n: int, opts: IngestOptions) -> list[str]:
    """The units' `location`, else their first electrode's, else their electrode group's."""
    cols = set(units.colnames)
    if "location" in cols:
        return [str(x) for x in units["location"][:]]
    try:
        if "electrodes" in cols:
            return [str(units["electrodes"][i]["location"].iloc[0]) for i in range(n)]
        if "electrode_group" in cols:
            return [str(g.location) for g in units["electrode_group"][:]]
    except (KeyError, AttributeError, IndexError):  # optional metadata, absent in this file
        pass
    return [opts.area or "unknown"] * n


def _intervals(nwb, file: str, s_id: str) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    tables = dict(nwb.intervals or {})
    if nwb.trials is not None:
        tables["trials"] = nwb.trials
    for name, table in tables.items():
        start, stop = (real_array(table[c][:], file=file, session=s_id, field=f"intervals/{name}/{c}", ndim=(1,))
                       for c in ("start_time", "stop_time"))
        for c, a in (("start_time", start), ("stop_time", stop)):
            if not np.isfinite(a).all():
                i = int(np.flatnonzero(~np.isfinite(a))[0])
                raise InvalidSession(f"non-finite {c} in row {i}", file=file, session=s_id,
                                     field=f"intervals/{name}/{c}")
        key = "trials" if name == "trials" else snake(name)
        out[key] = interval_array(start, stop)
        if name == "epochs" and "tags" in table.colnames:
            tags = table["tags"][:]
            by_tag: dict[str, list[int]] = {}
            for i, tag_list in enumerate(tags):
                for tag in (tag_list if isinstance(tag_list, (list, tuple, np.ndarray)) else [tag_list]):
                    by_tag.setdefault(snake(str(tag)), []).append(i)
            for tag, rows in by_tag.items():
                out[f"epoch_{tag}"] = interval_array(start[rows], stop[rows])
    return out


def read_nwb(path: Path, opts: IngestOptions, sha256: str | None = None) -> list[SessionData]:
    # deferred: importing pynwb only when used keeps start-up light
    import pynwb

    file = path.name
    io = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            io = pynwb.NWBHDF5IO(str(path), "r", load_namespaces=True)
            nwb = io.read()
    except Exception as e:  # h5py/hdmf raise many types for truncated or foreign files
        if io is not None:  # else the file stays open (and locked) for the life of the process
            try:
                io.close()
            except Exception:  # noqa: BLE001 - already failing; the read error is the one to report
                pass
        msg, where = _explain(e)
        raise UnreadableSource(f"unreadable or truncated NWB file: {type(e).__name__}: {msg}", file=file,
                               field=where) from None
    s_id = None
    try:
        s_id = opts.session_id or slugify(str(nwb.session_id or nwb.identifier or path.stem))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return [_session(nwb, path, opts, sha256, s_id)]
    except CorpusError:
        raise
    except Exception as e:  # a structurally broken file that only fails once read in depth
        raise UnreadableSource(f"NWB file could not be read in full: {type(e).__name__}: {_short(e)}", file=file,
                               session=s_id) from None
    finally:
        io.close()


def _short(e, limit: int = 300) -> str:
    """An exception's message on one line, cut short (hdmf's can quote whole builders)."""
    msg = " ".join(str(e).split())
    return msg if len(msg) <= limit else msg[:limit] + " ..."


def _explain(e: Exception) -> tuple[str, str | None]:
    """(message, where in the file) of a read error: hdmf's ConstructError carries the builder of
    the object it could not build (its path is the field) and the reason, not the builder's dump."""
    args = getattr(e, "args", ())
    if len(args) == 2 and isinstance(args[1], str) and hasattr(args[0], "path"):
        where = str(args[0].path)
        where = where[len("root/"):] if where.startswith("root/") else where
        return _short(args[1]), None if where in ("", "root") else where
    return _short(e), None


def _spike_index(units, n: int, file: str, s_id: str) -> None:
    """The ragged spike-times column must index its data exactly: non-decreasing offsets, one per
    unit, the last at the end of the data (else units would silently lose or share spikes)."""
    if "spike_times" not in units.colnames:
        raise InvalidSession("the units table has no spike_times column", file=file, session=s_id,
                             field="units/spike_times")
    col = units["spike_times"]
    target = getattr(col, "target", None)
    if target is None:  # not ragged: one spike per unit (hdmf would not write this, but it is readable)
        return
    field = "units/spike_times_index"
    idx = real_array(col.data[:], file=file, session=s_id, field=field, ndim=(1,), integers=True)
    total = len(target.data)
    if len(idx) != n:
        raise InvalidSession(f"{len(idx)} index entries for {n} units (mismatched lengths)", file=file,
                             session=s_id, field=field)
    if len(idx) and ((np.diff(idx) < 0).any() or idx[0] < 0 or idx[-1] != total):
        raise InvalidSession(f"the index of the ragged spike times is inconsistent with its {total} values "
                             f"(offsets must rise from 0 to {total}; got {idx[:5].tolist()}"
                             f"{' ...' if len(idx) > 5 else ''} ending at {int(idx[-1])})", file=file,
                             session=s_id, field=field)


def _session(nwb, path: Path, opts: IngestOptions, sha256: str | None, s_id: str) -> SessionData:
    file = path.name
    raw_subject = getattr(nwb.subject, "subject_id", None) or ""
    subject = opts.subject or (slugify(raw_subject) if raw_subject else "unknown")
    species = opts.species or getattr(nwb.subject, "species", None) or "unknown"
    units = nwb.units
    if units is None or len(units) == 0:
        raise InvalidSession("the file has no units table: popscale needs spike-sorted units", file=file,
                             session=s_id, field="units")
    n = len(units)
    _spike_index(units, n, file, s_id)
    times, idx = [], []
    for i in range(n):
        t = real_array(units["spike_times"][i], file=file, session=s_id, field=f"units/spike_times[{i}]", ndim=(1,))
        if len(t) and (not np.isfinite(t).all() or (t < 0).any() or (np.diff(t) < 0).any()):
            what = "non-finite" if not np.isfinite(t).all() else "negative" if (t < 0).any() else "unsorted"
            raise InvalidSession(f"unit {units.id[i]} has {what} spike times", file=file, session=s_id,
                                 field=f"units/spike_times[{i}]")
        times.append(t)
        idx.append(np.full(len(t), i, dtype=np.int64))
    t = np.concatenate(times) if times else np.zeros(0)
    u = np.concatenate(idx) if idx else np.zeros(0, dtype=np.int64)
    order = np.argsort(t, kind="stable")
    t, u = t[order], u[order]
    notes: list[str] = []
    behaviour = _behaviours(nwb, s_id, file, opts, notes)
    intervals = _intervals(nwb, file, s_id)

    data_t = [t[[0, -1]]] if len(t) else []
    data_t += [b.timestamps[[0, -1]] for b in behaviour.values() if len(b.timestamps)]
    data_t += [a.reshape(-1) for a in intervals.values() if len(a)]
    if not data_t:
        raise InvalidSession("no spikes, behaviour or intervals: the session is empty", file=file, session=s_id,
                             field="spikes/timestamps")
    allt = np.concatenate(data_t)
    lo, hi = float(allt.min()), float(allt.max()) + DOMAIN_PAD_S
    epochs = intervals.get("epochs")
    if epochs is not None and len(epochs):  # the recording spans its epochs, and at least its data
        lo, hi = min(lo, float(epochs[:, 0].min())), max(hi, float(epochs[:, 1].max()))
    domain = interval_array([lo], [hi])
    if nwb.session_description:
        notes.append(f"NWB session description: {nwb.session_description[:200]}")
    return SessionData(
        session_id=s_id, subject=subject, spike_times=t, spike_units=u,
        unit_ids=unit_ids(subject, s_id, [str(x) for x in units.id[:]]),
        unit_areas=np.asarray(_unit_areas(units, n, opts), dtype=np.str_),
        domain=domain, source=source_info(path, "nwb", "nwb-units", sha256), behaviour=behaviour,
        intervals=intervals, species=species, task=opts.task or "unknown",
        notes=notes,
    )
