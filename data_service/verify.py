"""`popscale verify`: re-read everything and say exactly what, if anything, is wrong.

Each session is rebuilt from disk with zarr-python (independently of the fast reader), its
arrays' sha256 checked against the ones recorded at write time, and the same invariants the
writer enforced (validate.py) re-run, plus the per-second index and the manifest row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import zarr

from . import intervals as iv
from .errors import CorpusError
from .format import (
    FORMAT_NAME, FORMAT_VERSION, GROUND_TRUTH, INTERVALS, INDEX_STEP_S, MANIFEST, SESSIONS, SPIKE_INDEX,
    SPIKE_TIMES, SPIKE_UNITS, STAGING, UNIT_AREAS, UNIT_IDS, behaviour_path, check_corpus_root, checksum, time_index,
)
from .manifest import read_manifest, row_from_attrs, session_attrs
from .session import SessionData, SourceInfo, TimeSeries
from .validate import validate_session


@dataclass
class Problem:
    session: str | None
    field: str | None
    message: str

    def __str__(self) -> str:
        where = ", ".join(x for x in (f"session {self.session}" if self.session else None,
                                      f"field {self.field}" if self.field else None) if x)
        return f"[{where}] {self.message}" if where else self.message


@dataclass
class VerifyReport:
    sessions_checked: int = 0
    arrays_checked: int = 0
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def read_arrays(session_dir: Path, names) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Each named array via zarr-python; failures (crc32c mismatch, truncated shard) by name."""
    g = zarr.open_group(str(session_dir), mode="r")
    arrays: dict[str, np.ndarray] = {}
    errors: dict[str, str] = {}
    for name in names:
        try:
            arrays[name] = np.asarray(g[name][...])
        except Exception as e:  # noqa: BLE001 - whatever zarr raises for damaged data is the finding
            errors[name] = f"{type(e).__name__}: {e}"
    return arrays, errors


def load_session(session_dir: Path, arrays: dict[str, np.ndarray] | None = None) -> tuple[SessionData, dict[str, np.ndarray]]:
    """A stored session back in memory (via zarr-python), and every array by its path."""
    a = session_attrs(session_dir)
    if arrays is None:
        arrays, errors = read_arrays(session_dir, a["checksums"])
        if errors:
            name, msg = next(iter(errors.items()))
            raise CorpusError(f"unreadable array: {msg}", file=str(session_dir), session=a["session_id"], field=name)
    table = arrays.get(INTERVALS, np.zeros((0, 2)))
    intervals = {k: table[lo:hi].reshape(-1, 2) for k, (lo, hi) in a["interval_sets"].items()}
    behaviour = {
        name: TimeSeries(arrays[behaviour_path(name, "timestamps")], arrays[behaviour_path(name, "values")],
                         b["columns"], b.get("unit", "unknown"), b.get("sampling_rate"))
        for name, b in a["behaviour"].items()
    }
    src = a["source"]
    s = SessionData(
        session_id=a["session_id"], subject=a["subject"], spike_times=arrays[SPIKE_TIMES],
        spike_units=arrays[SPIKE_UNITS], unit_ids=arrays[UNIT_IDS], unit_areas=arrays[UNIT_AREAS],
        domain=np.asarray(a["domain"], dtype=np.float64).reshape(-1, 2),
        source=SourceInfo(src["path"], src["format"], src["sha256"], src.get("size_bytes", 0), src.get("layout", "")),
        behaviour=behaviour, intervals=intervals, species=a.get("species", "unknown"), task=a.get("task", "unknown"),
        timing_resolution_s=a.get("timing_resolution_s"), notes=a.get("notes", []), split_info=a.get("split", {}),
        ground_truth={k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(GROUND_TRUTH + "/")} or None,
    )
    return s, arrays


def verify_session(root: Path, sid: str, row: dict | None, report: VerifyReport) -> None:
    d = root / SESSIONS / sid
    try:
        a = session_attrs(d)
    except (OSError, ValueError, KeyError) as e:
        report.problems.append(Problem(sid, "zarr.json", f"session metadata unreadable: {e}"))
        return
    if a.get("format") != FORMAT_NAME or a.get("format_version", 0) > FORMAT_VERSION:
        report.problems.append(Problem(sid, "zarr.json", f"unknown session format {a.get('format')} v{a.get('format_version')}"))
        return
    if a.get("session_id") != sid:
        report.problems.append(Problem(sid, "session_id", f"directory holds session {a.get('session_id')!r}"))
    arrays, errors = read_arrays(d, a["checksums"])
    for name, msg in errors.items():
        report.problems.append(Problem(sid, name, f"array unreadable (corrupt or truncated): {msg}"))
    if errors:
        return
    s, _ = load_session(d, arrays)
    for name, want in a["checksums"].items():
        report.arrays_checked += 1
        got = checksum(arrays[name])
        if got != want:
            report.problems.append(Problem(sid, name, f"checksum mismatch (stored {want[:19]}, content {got[:19]})"))
    try:
        validate_session(s)
    except CorpusError as e:
        report.problems.append(Problem(sid, e.field, e.message))
    origin = float(a["index_origin"])
    n_steps = len(arrays[SPIKE_INDEX]) - 1
    if not np.array_equal(arrays[SPIKE_INDEX], time_index(arrays[SPIKE_TIMES], origin, n_steps, INDEX_STEP_S)):
        report.problems.append(Problem(sid, SPIKE_INDEX, "per-second index does not match the spike times"))
    for name, meta in a["behaviour"].items():
        bt = arrays[behaviour_path(name, "timestamps")]
        idx = arrays[behaviour_path(name, "index")]
        if not np.array_equal(idx, time_index(bt, origin, len(idx) - 1)):
            report.problems.append(Problem(sid, behaviour_path(name, "index"), "index does not match the timestamps"))
        grid = meta.get("grid")
        if grid and not np.array_equal(bt, grid["t0"] + np.arange(len(bt)) * grid["step"]):
            report.problems.append(Problem(sid, behaviour_path(name, "timestamps"),
                                           "timestamps are not the exact grid the metadata claims"))
    for k, rows in s.intervals.items():
        if len(rows) and (rows[:, 0] > rows[:, 1]).any():
            report.problems.append(Problem(sid, f"intervals/{k}", "an interval ends before it starts"))
    if len(arrays[SPIKE_TIMES]) != a["n_spikes"] or len(arrays[UNIT_IDS]) != a["n_units"]:
        report.problems.append(Problem(sid, "zarr.json", "n_spikes/n_units disagree with the arrays"))
    if abs(iv.total(s.domain) - a["duration_s"]) > 1e-6:
        report.problems.append(Problem(sid, "zarr.json", "duration disagrees with the domain"))
    if row is None:
        report.problems.append(Problem(sid, MANIFEST, "session on disk but not in the manifest (a writer was interrupted; "
                                                      "any `popscale ingest` or `synth` on this corpus repairs it)"))
    elif row != row_from_attrs(a):
        report.problems.append(Problem(sid, MANIFEST, "manifest row differs from the session's metadata"))
    report.sessions_checked += 1


def verify(root: Path | str, *, sessions: list[str] | None = None,
           on_session: Callable[[str], None] | None = None) -> VerifyReport:
    root = Path(root)
    report = VerifyReport()
    try:
        check_corpus_root(root)
    except CorpusError as e:
        report.problems.append(Problem(None, "zarr.json", f"{root}: {e.message}"))
        return report
    try:
        rows = read_manifest(root)
    except (OSError, ValueError, KeyError) as e:
        report.problems.append(Problem(None, MANIFEST, f"manifest unreadable: {e}"))
        rows = {}
    sdir = root / SESSIONS
    on_disk = sorted(p.name for p in sdir.iterdir() if p.is_dir()) if sdir.exists() else []
    for sid in sorted(set(rows) - set(on_disk)):
        report.problems.append(Problem(sid, MANIFEST, "listed in the manifest but missing on disk"))
    staging = root / STAGING
    if staging.exists() and any(staging.iterdir()):
        report.notes.append("unfinished writes in .staging (invisible to readers; the next writer removes them)")
    for sid in (sessions or on_disk):
        if sid not in on_disk:
            report.problems.append(Problem(sid, None, "no such session"))
            continue
        verify_session(root, sid, rows.get(sid), report)
        if on_session:
            on_session(sid)
    return report
