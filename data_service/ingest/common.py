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
        known = {f.name for f in fields(self)} - {"splits"}
        unknown = set(overrides) - known
        if unknown:
            raise CorpusError(f"unknown metadata keys {sorted(unknown)}; known: {sorted(known)}")
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


def load_metadata_file(path: str | Path) -> dict[str, dict]:
    """A YAML mapping of source file names (or glob-free basenames) to IngestOptions overrides."""
    try:
        doc = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise CorpusError(f"cannot read metadata file: {e.strerror or e}", file=str(path)) from None
    except yaml.YAMLError as e:
        raise CorpusError(f"metadata file is not valid YAML: {' '.join(str(e).split())}", file=str(path)) from None
    if not isinstance(doc, dict) or not all(isinstance(v, dict) for v in doc.values()):
        raise CorpusError("metadata file must map file names to mappings of options", file=str(path))
    return doc


def options_for(path: Path, base: IngestOptions, meta: dict[str, dict], cli: dict) -> IngestOptions:
    """Source defaults < metadata-file entry for this file < explicit command-line flags."""
    opts = base.merged(meta.get(path.name, {}))
    return opts.merged(cli)


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
        raise InvalidSession(
            f"{int(bad.sum())} samples with NaN/inf values (first at sample {row}, t={float(t[row])} s); "
            "pass --drop-nan-behaviour to drop them", file=file, session=s_id, field=f"behaviour/{name}/values")
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
