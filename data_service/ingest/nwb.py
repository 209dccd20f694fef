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
from .common import IngestOptions, as_columns, drop_or_refuse_nan, regular_rate, snake, source_info, unit_ids

BEHAVIOUR_CONTAINERS = {"Position", "CompassDirection", "BehavioralTimeSeries", "PupilTracking", "EyeTracking"}
DOMAIN_PAD_S = 1e-3  # half-open domain: the last spike must lie strictly inside


def _series_times(ts) -> np.ndarray:
    if ts.timestamps is not None:
        return np.asarray(ts.timestamps[:], dtype=np.float64)
    n = len(ts.data)
    return float(ts.starting_time or 0.0) + np.arange(n, dtype=np.float64) / float(ts.rate)


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
        loaded = {k: (_series_times(v), np.asarray(v.data[:], dtype=np.float64), getattr(v, "unit", "unknown"))
                  for k, v in series.items()}
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


def _intervals(nwb) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    tables = dict(nwb.intervals or {})
    if nwb.trials is not None:
        tables["trials"] = nwb.trials
    for name, table in tables.items():
        start = np.asarray(table["start_time"][:], dtype=np.float64)
        stop = np.asarray(table["stop_time"][:], dtype=np.float64)
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
    import pynwb

    file = path.name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            io = pynwb.NWBHDF5IO(str(path), "r", load_namespaces=True)
            nwb = io.read()
    except Exception as e:  # h5py/hdmf raise many types for truncated or foreign files
        raise UnreadableSource(f"unreadable or truncated NWB file: {type(e).__name__}: {e}", file=file) from None
    try:
        return [_session(nwb, path, opts, sha256)]
    except CorpusError:
        raise
    except Exception as e:  # a structurally broken file that only fails once read in depth
        raise UnreadableSource(f"NWB file could not be read in full: {type(e).__name__}: {e}", file=file) from None
    finally:
        io.close()


def _session(nwb, path: Path, opts: IngestOptions, sha256: str | None) -> SessionData:
    file = path.name
    s_id = opts.session_id or slugify(nwb.session_id or nwb.identifier or path.stem)
    raw_subject = getattr(nwb.subject, "subject_id", None) or ""
    subject = opts.subject or (slugify(raw_subject) if raw_subject else "unknown")
    species = opts.species or getattr(nwb.subject, "species", None) or "unknown"
    units = nwb.units
    if units is None or len(units) == 0:
        raise InvalidSession("the file has no units table: popscale needs spike-sorted units", file=file,
                             session=s_id, field="units")
    n = len(units)
    times, idx = [], []
    for i in range(n):
        t = np.asarray(units["spike_times"][i], dtype=np.float64)
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
    intervals = _intervals(nwb)

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
