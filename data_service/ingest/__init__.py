"""`popscale ingest`: source files in, sessions out; the format is detected from the file's bytes.

Files are ingested one after another into one locked corpus. A bad file is reported (file,
session, field) and skipped; the rest go in; the command exits non-zero if any file failed.
Re-ingesting a file whose checksum is already in the corpus is a no-op, so re-running an
interrupted ingest finishes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import h5py

from ..errors import CorpusError, InvalidSession, UnknownLayout, UnreadableSource
from ..session import SessionData
from ..splits import make_splits
from ..store import CorpusStore
from ..validate import validate_session
from .common import IngestOptions, file_sha256
from .matlab import read_mat
from .nwb import read_nwb
from .temporaldata_h5 import is_temporaldata, read_temporaldata

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
SUFFIXES = {".nwb", ".mat", ".h5", ".hdf5"}


def detect_format(path: Path) -> str:
    """'nwb', 'mat' or 'temporaldata', from the file's content (not its name)."""
    try:
        with open(path, "rb") as f:
            head = f.read(1024)
    except OSError as e:
        raise UnreadableSource(f"cannot open: {e.strerror}", file=str(path)) from None
    if not head:
        raise UnreadableSource("the file is empty", file=path.name)
    if head.startswith(b"MATLAB"):
        return "mat"
    if head.startswith(HDF5_MAGIC) or HDF5_MAGIC in head[:1024]:
        try:
            with h5py.File(path, "r") as f:
                if "nwb_version" in f.attrs or ("general" in f and "acquisition" in f):
                    return "nwb"
                if is_temporaldata(f):
                    return "temporaldata"
                keys = sorted(f.keys())[:12]
        except OSError as e:
            raise UnreadableSource(f"unreadable or truncated HDF5 file: {e}", file=path.name) from None
        raise UnknownLayout(f"an HDF5 file that is neither NWB nor temporaldata (top-level keys {keys})",
                            file=path.name)
    raise UnknownLayout("not an NWB, MAT or HDF5 file (unrecognised header bytes)", file=path.name)


READERS: dict[str, Callable[[Path, IngestOptions, str | None], list[SessionData]]] = {
    "nwb": read_nwb, "mat": read_mat, "temporaldata": read_temporaldata,
}


def read_sessions(path: Path, opts: IngestOptions, sha256: str | None = None) -> list[SessionData]:
    """Parse and validate one source file into sessions with splits filled in (nothing is written).

    Whatever a file holds, the outcome is sessions or a CorpusError naming the file: a reader that
    trips over content nobody anticipated reports it as unreadable instead of crashing the ingest."""
    fmt, session = "source", None
    try:
        fmt = detect_format(path)
        sessions = READERS[fmt](path, opts, sha256)
        ids = [s.session_id for s in sessions]
        dup = next((i for i in ids if ids.count(i) > 1), None)
        if dup is not None:
            raise InvalidSession(f"the file yields {ids.count(dup)} sessions with the same id", file=path.name,
                                 session=dup, field="session_id")
        for s in sessions:
            session = s.session_id
            s.source.n_sessions = len(sessions)
            validate_session(s)  # before splits are drawn from it; the writer validates again
            make_splits(s, opts.splits)
    except CorpusError as e:
        raise e.located(file=path.name, session=session)
    except Exception as e:  # noqa: BLE001 - content no check foresaw: still one located error, never a crash
        msg = " ".join(str(e).split())
        raise UnreadableSource(f"the {fmt} file could not be read: {type(e).__name__}: "
                               f"{msg[:300] + ' ...' if len(msg) > 300 else msg}", file=path.name,
                               session=session) from e
    return sessions


def expand_sources(paths: list[str | Path]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(q for q in p.iterdir() if q.suffix.lower() in SUFFIXES and q.is_file())
        else:
            out.append(p)
    return out


@dataclass
class IngestReport:
    results: list[tuple[str, str, str]] = field(default_factory=list)  # (file, session, status)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (file, error)
    recovered: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def ingest(paths: list[str | Path], corpus: str | Path, opts_for: Callable[[Path], IngestOptions], *,
           replace: bool = False, on_file: Callable[[Path, str], None] | None = None) -> IngestReport:
    """Ingest every source file into `corpus`; bad files are reported, not fatal."""
    report = IngestReport()
    with CorpusStore(corpus) as store:
        report.recovered = store.recovered
        for path in expand_sources(paths):
            try:
                if not path.is_file():
                    raise UnreadableSource("no such file", file=str(path))
                sha = file_sha256(path)
                done = [sid for sid, row in store.rows.items() if row["source_sha256"] == sha]
                expected = max((store.rows[sid]["source_n_sessions"] for sid in done), default=0)
                if done and len(done) >= expected and not replace:
                    report.results += [(path.name, sid, "unchanged") for sid in done]
                else:
                    sessions = read_sessions(path, opts_for(path), sha)
                    for s in sessions:  # every session id is cleared before any is written: never half a file
                        store.check_new(s.session_id, s.source.sha256, replace, file=path.name)
                    for s in sessions:
                        r = store.add(s, replace=replace)
                        report.results.append((path.name, s.session_id, r.status))
            except CorpusError as e:
                e.located(file=path.name)
                report.failures.append((path.name, str(e)))
            if on_file:
                on_file(path, "failed" if report.failures and report.failures[-1][0] == path.name else "ok")
    return report
