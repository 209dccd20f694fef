"""The in-memory form of one recording session: what every ingest path produces and the writer stores.

Plain numpy arrays and strings, so a session can be built, validated and compared in tests
without touching disk. Times are seconds (float64) in the source's own clock.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SPLITS = ("train", "valid", "test")


def slugify(text: str) -> str:
    """A session/subject id made safe for paths: letters, digits, '.', '_' and '-'."""
    out = re.sub(r"[^A-Za-z0-9._-]+", "-", text.strip()).strip("-._")
    return out[:128] or "unnamed"


@dataclass
class TimeSeries:
    """One named behaviour: sorted sample times and an (n, d) array of values."""

    timestamps: np.ndarray
    values: np.ndarray
    columns: list[str]
    unit: str = "unknown"
    sampling_rate: float | None = None  # set when the source samples regularly
    description: str = ""


@dataclass
class SourceInfo:
    """Where a session came from; the checksum makes re-ingesting the same file a no-op."""

    path: str
    format: str  # nwb | mat | temporaldata | synthetic
    sha256: str
    size_bytes: int
    layout: str = ""
    n_sessions: int = 1  # sessions made from this file (a re-run skips the file once all are in)


@dataclass
class SessionData:
    """Everything popscale stores about a session.

    `unit_ids` are already corpus-unique (`subject/session/unit`); `spike_units` index into them.
    `intervals` holds named (n, 2) [start, end) sets; `train`/`valid`/`test` are the split domains
    and `domain` the span(s) actually recorded.
    """

    session_id: str
    subject: str
    spike_times: np.ndarray
    spike_units: np.ndarray
    unit_ids: np.ndarray
    unit_areas: np.ndarray
    domain: np.ndarray
    source: SourceInfo
    behaviour: dict[str, TimeSeries] = field(default_factory=dict)
    intervals: dict[str, np.ndarray] = field(default_factory=dict)
    species: str = "unknown"
    task: str = "unknown"
    timing_resolution_s: float | None = None  # bin width when spike times were made from counts
    notes: list[str] = field(default_factory=list)
    split_info: dict = field(default_factory=dict)
    ground_truth: dict[str, np.ndarray] | None = None  # synthetic sessions only
    ground_truth_attrs: dict = field(default_factory=dict)

    @property
    def n_units(self) -> int:
        return int(len(self.unit_ids))

    @property
    def t_start(self) -> float:
        return float(self.domain[0, 0])

    @property
    def t_end(self) -> float:
        return float(self.domain[-1, 1])

    @property
    def duration_s(self) -> float:
        """Recorded time: the summed length of the domain intervals."""
        return float(np.sum(self.domain[:, 1] - self.domain[:, 0]))


def interval_array(start, end) -> np.ndarray:
    """Stack start/end sequences into the (n, 2) float64 form used everywhere."""
    s = np.asarray(start, dtype=np.float64).reshape(-1)
    e = np.asarray(end, dtype=np.float64).reshape(-1)
    return np.stack([s, e], axis=1) if len(s) else np.zeros((0, 2), dtype=np.float64)
