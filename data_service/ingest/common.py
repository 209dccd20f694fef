"""What every source format shares: options, metadata overrides, checksums, binned counts -> spikes."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import yaml

from ..errors import CorpusError, InvalidSession
from ..session import SessionData, SourceInfo, interval_array, slugify
from ..splits import SplitConfig, session_seed


@dataclass
class IngestOptions:
    """Facts a source file may not carry; each overrides what the file says."""

    subject: str | None = None
    session_id: str | None = None
    species: str | None = None
    task: str | None = None
    area: str | None = None  # brain area for every unit whose area the file does not give
    bin_width_s: float | None = None  # for binned counts whose bin width is not stored
    seed: int = 0  # spike placement within bins and split draws
    drop_nan_behaviour: bool = False  # drop NaN/inf behaviour samples instead of refusing the file
    splits: SplitConfig = field(default_factory=SplitConfig)

    def merged(self, overrides: dict) -> "IngestOptions":
        """These options with `overrides` (metadata-file keys or flags); `eval_intervals` (the
        interval set scoring and held-out data are confined to) goes into the split config."""
        known = ({f.name for f in fields(self)} - {"splits"}) | {"eval_intervals"}
        unknown = set(overrides) - known
        if unknown:
            raise CorpusError(f"unknown metadata keys {sorted(unknown)}; known: {sorted(known)}")
        out = replace(self, **{k: v for k, v in overrides.items() if v is not None and k != "eval_intervals"})
        if overrides.get("eval_intervals") is not None:
            if not isinstance(overrides["eval_intervals"], str):
                raise CorpusError(f"eval_intervals: expected the name of an interval set, got {overrides['eval_intervals']!r}")
            out = replace(out, splits=replace(out.splits, eval_intervals=overrides["eval_intervals"]))
        return out


def load_metadata_file(path: str | Path) -> dict[str, dict]:
    """A YAML mapping of source file names (or glob-free basenames) to IngestOptions overrides."""
    try:
        doc = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise CorpusError(f"cannot read metadata file: {e.strerror or e}", file=str(path)) from None
    except UnicodeDecodeError as e:
        raise CorpusError(f"metadata file is not a text file (byte {e.start} is not UTF-8)", file=str(path)) from None
    except (yaml.YAMLError, ValueError) as e:  # (PyYAML's int() raises ValueError on huge integers)
        raise CorpusError(f"metadata file is not valid YAML: {' '.join(str(e).split())}", file=str(path)) from None
    if not isinstance(doc, dict) or not all(isinstance(v, dict) for v in doc.values()):
        raise CorpusError("metadata file must map file names to mappings of options", file=str(path))
    return doc


def options_for(path: Path, base: IngestOptions, meta: dict[str, dict], cli: dict) -> IngestOptions:
    """Source defaults < metadata-file entry for this file < explicit command-line flags."""
    opts = base.merged(meta.get(path.name, {}))
    return opts.merged(cli)


# plausible sampling: a behaviour sampled, or spikes binned, between once per 1000 s and a million
# times a second; anything outside is a unit mistake (ms for s, a period for a rate) or a corrupt file
MIN_RATE_HZ = 1e-3
MAX_RATE_HZ = 1e6


def _dtype_name(dt: np.dtype) -> str:
    kinds = {"U": "strings", "S": "byte strings", "O": "objects (e.g. a cell array or strings)",
             "c": "complex numbers", "b": "booleans", "V": "records (a compound or struct)", "M": "dates",
             "m": "time deltas"}
    return f"{kinds.get(dt.kind, 'values')} ({dt})"


def real_array(a, *, file: str, session: str | None, field: str, ndim: tuple[int, ...] | None = None,
               allow_bool: bool = False, integers: bool = False) -> np.ndarray:
    """`a` as a float64 (or, with `integers`, int64) array, refused with an error naming the field
    when it holds anything but real numbers (strings, complex numbers, objects, booleans unless
    `allow_bool`) or has the wrong number of axes: nothing is ever cast silently."""
    try:
        arr = np.asarray(a)
    except Exception as e:  # ragged or otherwise unconvertible content
        raise InvalidSession(f"not an array of numbers ({type(e).__name__}: {e})", file=file, session=session,
                             field=field) from None
    ok = "iuf" + ("b" if allow_bool else "")
    if arr.dtype.kind not in ok:
        raise InvalidSession(f"{_dtype_name(arr.dtype)} where {'integers' if integers else 'real numbers'} "
                             "belong", file=file, session=session, field=field)
    if ndim is not None and arr.ndim not in ndim:
        want = " or ".join(f"{n}-D" for n in ndim)
        raise InvalidSession(f"expected a {want} array, got shape {arr.shape}", file=file, session=session,
                             field=field)
    if integers:
        if arr.dtype.kind == "f":
            raise InvalidSession(f"{arr.dtype} where integers belong", file=file, session=session, field=field)
        return arr.astype(np.int64)
    return arr.astype(np.float64)


def check_rate(rate, *, file: str, session: str | None, field: str) -> float:
    """A sampling rate in Hz, refused (naming the field) unless finite and plausible."""
    try:
        r = np.asarray(rate)
        r = float(r.reshape(-1)[0]) if r.size == 1 and r.dtype.kind in "iuf" else None
    except (TypeError, ValueError):
        r = None
    if r is None:
        raise InvalidSession(f"sampling rate {rate!r} is not a number", file=file, session=session, field=field)
    if not (np.isfinite(r) and MIN_RATE_HZ <= r <= MAX_RATE_HZ):
        raise InvalidSession(f"sampling rate {r:g} Hz is not plausible: expected {MIN_RATE_HZ:g} to "
                             f"{MAX_RATE_HZ:g} Hz", file=file, session=session, field=field)
    return r


def check_bin_width(width, *, file: str, session: str | None, field: str = "bin_width", source: str = "") -> float:
    """A bin width in seconds, refused (naming the field and where it came from) unless finite and
    plausible (1 us to 1000 s, the reciprocal of the sampling-rate bounds)."""
    try:
        w = float(width)
    except (TypeError, ValueError):
        raise InvalidSession(f"bin width {width!r}{source} is not a number", file=file, session=session,
                             field=field) from None
    lo, hi = 1.0 / MAX_RATE_HZ, 1.0 / MIN_RATE_HZ
    if not (np.isfinite(w) and lo <= w <= hi):
        raise InvalidSession(f"bin width {w:g} s{source} is not plausible: expected {lo:g} to {hi:g} s",
                             file=file, session=session, field=field)
    return w


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def source_info(path: Path, fmt: str, layout: str = "", sha256: str | None = None) -> SourceInfo:
    return SourceInfo(path=path.name, format=fmt, sha256=sha256 or file_sha256(path),
                      size_bytes=os.path.getsize(path), layout=layout)


def snake(name: str) -> str:
    """CamelCase or odd names -> a behaviour/interval name (lower snake case)."""
    s = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", str(name))
    return slugify(s).lower().replace("-", "_").replace(".", "_") or "unnamed"


def unit_ids(subject: str, session_id: str, names) -> np.ndarray:
    """Corpus-unique unit ids: subject/session/unit."""
    return np.asarray([f"{subject}/{session_id}/{n}" for n in names], dtype=np.str_)


def counts_to_spikes(counts: np.ndarray, bin_starts: np.ndarray, bin_width: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Binned counts (T bins x U units) -> sorted spike times placed uniformly at random (seeded)
    within each bin, and their unit indices. The session then has bin-width timing resolution."""
    c = np.asarray(counts)
    if c.ndim != 2:
        raise ValueError(f"counts must be 2-D (bins x units), got {c.shape}")
    if (c < 0).any():
        raise ValueError("negative spike counts")
    c = c.astype(np.int64)
    t_idx, u_idx = np.nonzero(c)
    reps = c[t_idx, u_idx]
    bins = np.repeat(t_idx, reps)
    units = np.repeat(u_idx, reps)
    rng = np.random.default_rng(seed)
    times = np.asarray(bin_starts, dtype=np.float64)[bins] + rng.random(len(bins)) * bin_width
    order = np.argsort(times, kind="stable")
    return times[order], units[order].astype(np.int64)


def binned_session(*, session_id: str, subject: str, counts: np.ndarray, bin_starts: np.ndarray,
                   bin_width: float, source: SourceInfo, opts: IngestOptions, unit_names=None,
                   areas=None) -> SessionData:
    """The SessionData of a binned-count recording, with spike times placed within bins."""
    n_units = counts.shape[1]
    times, units = counts_to_spikes(counts, bin_starts, bin_width, session_seed(opts.seed, session_id))
    names = unit_names if unit_names is not None else [f"u{j:03d}" for j in range(n_units)]
    area = opts.area or "unknown"
    t0 = float(bin_starts[0])
    t1 = float(bin_starts[-1] + bin_width)
    return SessionData(
        session_id=session_id, subject=subject, spike_times=times, spike_units=units,
        unit_ids=unit_ids(subject, session_id, names),
        unit_areas=np.asarray(areas if areas is not None else [area] * n_units, dtype=np.str_),
        domain=interval_array([t0], [t1]), source=source,
        species=opts.species or "unknown", task=opts.task or "unknown", timing_resolution_s=float(bin_width),
        notes=[f"spike times placed uniformly at random within {bin_width * 1e3:g} ms bins "
               f"(seed {opts.seed}); timing resolution is the bin width"],
    )


def drop_or_refuse_nan(s_id: str, file: str, name: str, t: np.ndarray, v: np.ndarray, drop: bool,
                       notes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """NaN/inf behaviour samples: refused with a clear error, or dropped (with a note) on request."""
    bad = ~np.isfinite(v).all(axis=1) | ~np.isfinite(t)
    if not bad.any():
        return t, v
    if not drop:
        row = int(np.flatnonzero(bad)[0])
        part = "values" if np.isfinite(t[row]) else "timestamps"  # say which array holds the first bad sample
        raise InvalidSession(
            f"{int(bad.sum())} samples with NaN/inf {part} (first at sample {row}, t={float(t[row])} s); "
            "pass --drop-nan-behaviour to drop them", file=file, session=s_id, field=f"behaviour/{name}/{part}")
    notes.append(f"dropped {int(bad.sum())} NaN/inf samples of behaviour {name}")
    return t[~bad], v[~bad]


def as_columns(v: np.ndarray) -> np.ndarray:
    """Samples as an (n, d) array: 1-D becomes one column, trailing axes are flattened."""
    v = np.asarray(v)
    return v.reshape(v.shape[0], int(np.prod(v.shape[1:], dtype=np.int64)) if v.ndim > 1 else 1)


def regular_rate(t: np.ndarray) -> float | None:
    """The sampling rate if timestamps are evenly spaced (to 0.1 % of a step), else None."""
    if len(t) < 3:
        return None
    d = np.diff(t)
    step = float(np.median(d))
    if step <= 0 or np.abs(d - step).max() > 1e-3 * step:
        return None
    return 1.0 / step
