"""Writing sessions into a corpus so that nothing half-written is ever visible.

A session is written in full to `.staging/<id>.<random>/`, checksummed and fsynced, then moved
into `sessions/<id>` with one rename, and only then listed in the manifest. A writer killed at
any point leaves either the old corpus or the new one; the next writer (`CorpusStore.open`)
clears staging, puts back a session caught mid-replace and re-registers sessions the manifest
missed, so re-running the same command finishes the job. One writer at a time (an flock).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import zarr

from . import faults
from .errors import CorpusError, DuplicateSession
from .format import (
    DEFAULT_CHUNKING, FORMAT_NAME, FORMAT_VERSION, GROUND_TRUTH, INDEX_STEP_S, INTERVALS, LOCK, SESSIONS,
    SPIKE_INDEX, SPIKE_TIMES, SPIKE_UNITS, STAGING, TRASH, UNIT_AREAS, UNIT_IDS, Chunking, behaviour_path,
    check_corpus_root, checksum, exact_grid, sharded_codec, time_index, unit_index_dtype,
)
from . import intervals as iv
from .manifest import reconcile, row_from_attrs, write_manifest
from .session import SPLITS, SessionData
from .shards import DENSE_ATTR
from .validate import validate_session
from .version import __version__ as VERSION  # the software version, stamped into every session written


def _write_sharded(g: zarr.Group, name: str, data: np.ndarray, chunking: Chunking) -> None:
    data = np.ascontiguousarray(data)
    row_shape = tuple(data.shape[1:])
    n = data.shape[0]
    shard = min(chunking.shard, max(chunking.chunk, -(-n // chunking.chunk) * chunking.chunk))
    arr = g.create_array(
        name, shape=data.shape, dtype=data.dtype, chunks=(shard, *row_shape),
        serializer=sharded_codec(data.dtype, chunking, row_shape), compressors=None, filters=None,
        chunk_key_encoding={"name": "v2", "separator": "."}, fill_value=0,
        # every chunk is written, even all-zero ones, so a reader can tell a lost shard from zeros
        config={"write_empty_chunks": True}, attributes={DENSE_ATTR: True},
    )
    if n:
        arr[...] = data


def _write_small(g: zarr.Group, name: str, data: np.ndarray) -> None:
    """Small or string arrays: one plain chunk (zarr's default codecs)."""
    arr = g.create_array(name, shape=data.shape, dtype=data.dtype if data.dtype.kind != "U" else str,
                         chunks=data.shape if data.size else None,
                         chunk_key_encoding={"name": "v2", "separator": "."})
    if data.size:
        arr[...] = data


def _write_json_atomic(path: Path, doc: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_tree(path: Path) -> None:
    for dirpath, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_session_group(path: Path, s: SessionData, chunking: Chunking = DEFAULT_CHUNKING) -> dict:
    """Write one validated session as a standalone Zarr v3 group at `path`; return its attributes."""
    g = zarr.open_group(str(path), mode="w-", zarr_format=3)
    sums: dict[str, str] = {}

    def put(name: str, data: np.ndarray, sharded: bool = True) -> None:
        (_write_sharded(g, name, data, chunking) if sharded else _write_small(g, name, data))
        sums[name] = checksum(data)
        faults.point("array-written")

    origin = float(np.floor(s.t_start))
    n_steps = int(np.ceil((s.t_end - origin) / INDEX_STEP_S)) + 1
    t = np.asarray(s.spike_times, dtype="<f8")
    put(SPIKE_TIMES, t)
    put(SPIKE_UNITS, np.asarray(s.spike_units).astype(unit_index_dtype(s.n_units)))
    put(SPIKE_INDEX, time_index(t, origin, n_steps))
    put(UNIT_IDS, np.asarray([str(u) for u in s.unit_ids], dtype=np.str_), sharded=False)
    put(UNIT_AREAS, np.asarray([str(a) for a in s.unit_areas], dtype=np.str_), sharded=False)
    behaviour = _write_behaviour(put, sums, s, origin, n_steps)
    sets = _write_intervals(put, s)
    if s.ground_truth:
        for name, arr in sorted(s.ground_truth.items()):
            put(f"{GROUND_TRUTH}/{name}", np.asarray(arr), sharded=False)
    attrs = _session_attrs(s, sums, origin, int(len(t)), behaviour, sets)
    g.attrs.put({"popscale": attrs})
    return attrs


def _write_behaviour(put: Callable[..., None], sums: dict[str, str], s: SessionData, origin: float,
                     n_steps: int) -> dict:
    """Write each behaviour's arrays (in name order) and return their attributes, which cite the timestamps' checksum."""
    behaviour = {}
    for name, ts in sorted(s.behaviour.items()):
        bt = np.asarray(ts.timestamps, dtype="<f8")
        put(behaviour_path(name, "timestamps"), bt)
        put(behaviour_path(name, "values"), np.asarray(ts.values))
        put(behaviour_path(name, "index"), time_index(bt, origin, n_steps))
        grid = exact_grid(bt, ts.sampling_rate)
        behaviour[name] = {
            "columns": list(ts.columns), "unit": ts.unit, "sampling_rate": ts.sampling_rate,
            "grid": {"t0": grid[0], "step": grid[1]} if grid else None,
            "timestamps_checksum": sums[behaviour_path(name, "timestamps")],
            "n_samples": int(len(bt)), "dtype": np.asarray(ts.values).dtype.str, "description": ts.description,
        }
    return behaviour


def _write_intervals(put: Callable[..., None], s: SessionData) -> dict[str, list[int]]:
    """Write all interval sets as one sorted array and return each set's [first, last) row range in it."""
    sets, rows, lo = {}, [], 0
    for name in sorted(s.intervals):
        a = iv.as_intervals(s.intervals[name])
        a = a[np.argsort(a[:, 0], kind="stable")]
        sets[name] = [lo, lo + len(a)]
        rows.append(a)
        lo += len(a)
    put(INTERVALS, np.concatenate(rows) if rows else iv.EMPTY, sharded=False)
    return sets


def _session_attrs(s: SessionData, sums: dict[str, str], origin: float, n_spikes: int, behaviour: dict,
                   sets: dict[str, list[int]]) -> dict:
    """The group's `popscale` attributes, built once every array is written so the checksums are complete."""
    split_seconds = {k: iv.total(s.intervals.get(k, iv.EMPTY)) for k in SPLITS}
    content_hash = hashlib.sha256(json.dumps(sums, sort_keys=True).encode()).hexdigest()[:16]
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "session_id": s.session_id,
        "subject": s.subject,
        "species": s.species,
        "task": s.task,
        "brain_areas": sorted({str(a) for a in s.unit_areas}),
        "source": {"path": s.source.path, "format": s.source.format, "sha256": s.source.sha256,
                   "size_bytes": s.source.size_bytes, "layout": s.source.layout,
                   "n_sessions": s.source.n_sessions},
        "domain": iv.as_intervals(s.domain).tolist(),
        "t_start": s.t_start,
        "t_end": s.t_end,
        "duration_s": s.duration_s,
        "n_spikes": n_spikes,
        "n_units": s.n_units,
        "timing_resolution_s": s.timing_resolution_s,
        "index_origin": origin,
        "index_step_s": INDEX_STEP_S,
        "behaviour": behaviour,
        "interval_sets": sets,
        "split": s.split_info,
        "split_seconds": split_seconds,
        "ground_truth": s.ground_truth_attrs if s.ground_truth else None,
        "notes": list(s.notes),
        "checksums": sums,
        "content_hash": content_hash,
        "written_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "popscale_version": VERSION,
    }


@dataclass
class Staged:
    session_id: str
    path: Path
    attrs: dict


@dataclass
class AddResult:
    session_id: str
    status: str  # added | replaced | unchanged


def stage_session(root: Path, s: SessionData, chunking: Chunking = DEFAULT_CHUNKING, durable: bool = True) -> Staged:
    """Validate and write a session into the corpus's staging area (no lock needed)."""
    validate_session(s)
    path = Path(root) / STAGING / f"{s.session_id}.{uuid.uuid4().hex[:8]}"
    try:
        attrs = write_session_group(path, s, chunking)
        if durable:
            _fsync_tree(path)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    faults.point("staged")
    return Staged(s.session_id, path, attrs)


class CorpusStore:
    """Write access to a corpus directory. Use as a context manager: it holds the writer lock."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self._lock_fd: int | None = None
        self.rows: dict[str, dict] = {}
        self.recovered: list[str] = []

    # ---- opening -------------------------------------------------------------------------
    def __enter__(self) -> "CorpusStore":
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise CorpusError("another popscale process is writing to this corpus", file=str(self.root)) from None
        try:
            self._init_layout()
            self.recovered = self._recover()
        except BaseException:
            self.__exit__()  # release the lock: __exit__ is not called when __enter__ raises
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def _init_layout(self) -> None:
        """Check an existing corpus, or create one; the root zarr.json is written last, atomically,
        so a corpus is either not there at all or complete."""
        meta = self.root / "zarr.json"
        if meta.exists():
            check_corpus_root(self.root)
        else:
            sessions = self.root / SESSIONS
            foreign = [p.name for p in self.root.iterdir() if p.name not in (LOCK, SESSIONS, STAGING, TRASH)]
            if foreign or (sessions.exists() and any(p.is_dir() for p in sessions.iterdir())):
                raise CorpusError("directory exists, is not empty and is not a popscale corpus", file=str(self.root))
            sessions.mkdir(exist_ok=True)
            _write_json_atomic(sessions / "zarr.json", {"zarr_format": 3, "node_type": "group", "attributes": {}})
            _write_json_atomic(meta, {"zarr_format": 3, "node_type": "group", "attributes": {"popscale": {
                "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "created_by": f"popscale {VERSION}"}}})
        for d in (STAGING, TRASH):
            (self.root / d).mkdir(exist_ok=True)

    def _recover(self) -> list[str]:
        notes = []
        for p in (self.root / STAGING).iterdir():
            shutil.rmtree(p, ignore_errors=True)
            notes.append(f"removed unfinished session write {p.name}")
        for p in (self.root / TRASH).iterdir():
            sid = p.name.rsplit(".", 1)[0]
            final = self.root / SESSIONS / sid
            if final.exists():
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.rename(p, final)
                notes.append(f"restored session {sid} from an interrupted replace")
        self.rows, changes = reconcile(self.root)
        return notes + changes

    # ---- writing ---------------------------------------------------------------------------
    def existing(self, session_id: str) -> dict | None:
        return self.rows.get(session_id)

    def check_new(self, session_id: str, source_sha256: str, replace: bool, file: str | None = None) -> str | None:
        """'unchanged' if this exact source is already in, None if the session may be written;
        raises DuplicateSession for the same id from a different source without replace."""
        row = self.rows.get(session_id)
        if row is None:
            return None
        if row["source_sha256"] == source_sha256 and not replace:
            return "unchanged"
        if not replace:
            raise DuplicateSession(
                f"session id already in the corpus (from {row['source_file']}, sha256 {row['source_sha256'][:12]}); "
                "pass --replace to overwrite it or choose another session id", file=file, session=session_id,
                field="session_id")
        return None

    def commit(self, staged: Staged) -> AddResult:
        """Move a staged session into place (replacing any old one) and list it in the manifest."""
        assert self._lock_fd is not None, "commit needs the writer lock (use `with CorpusStore(...)`)"
        final = self.root / SESSIONS / staged.session_id
        status = "added"
        trash = None
        if final.exists():
            trash = self.root / TRASH / f"{staged.session_id}.{uuid.uuid4().hex[:8]}"
            os.rename(final, trash)
            status = "replaced"
            faults.point("trashed")
        os.rename(staged.path, final)
        faults.point("committed")
        self.rows[staged.session_id] = row_from_attrs(staged.attrs)
        write_manifest(self.root, self.rows)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        return AddResult(staged.session_id, status)

    def add(self, s: SessionData, *, replace: bool = False, durable: bool = True) -> AddResult:
        """Validate, stage and commit one session."""
        if self.check_new(s.session_id, s.source.sha256, replace, file=s.source.path) == "unchanged":
            return AddResult(s.session_id, "unchanged")
        return self.commit(stage_session(self.root, s, durable=durable))
