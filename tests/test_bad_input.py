"""Every kind of bad input gets an error naming file, session and field, and leaves the corpus as it was."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
from conftest import result_line, run_cli, simple_session

from data_service.errors import CorpusError, DuplicateSession, InvalidSession, UnknownLayout, UnreadableSource
from data_service.ingest import ingest, read_sessions
from data_service.ingest.common import IngestOptions
from data_service.store import CorpusStore


def corpus_state(root: Path) -> dict[str, str]:
    """Every visible file of a corpus and its content hash (staging and the lock excluded)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not rel.startswith((".staging", ".trash", ".lock")):
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    with CorpusStore(root) as st:
        st.add(simple_session("existing"))
    return root


def temporaldata_file(path: Path, *, times=None, units=None, n_units=3, vel=None, behaviour_t=None,
                      session="td-session") -> Path:
    """A temporaldata-layout HDF5 file written with h5py, so broken content can be written too."""
    times = np.array([0.1, 0.2, 0.5, 1.5]) if times is None else np.asarray(times)
    units = np.array([0, 1, 2, 0]) if units is None else np.asarray(units)
    behaviour_t = np.linspace(0, 2, 21) if behaviour_t is None else behaviour_t
    vel = np.zeros((len(behaviour_t), 2)) if vel is None else vel
    with h5py.File(path, "w") as f:
        f.attrs["object"] = "Data"
        f.attrs["absolute_start"] = 0.0
        sp = f.create_group("spikes")
        sp.attrs["object"] = "IrregularTimeSeries"
        sp["timestamps"] = times
        sp["unit_index"] = units
        un = f.create_group("units")
        un.attrs["object"] = "ArrayDict"
        un["id"] = np.array([f"u{i}".encode() for i in range(n_units)])
        cu = f.create_group("cursor")
        cu.attrs["object"] = "IrregularTimeSeries"
        cu["timestamps"] = behaviour_t
        cu["vel"] = vel
        se = f.create_group("session")
        se.attrs["object"] = "Data"
        se.attrs["id"] = session
    return path


CASES = {
    "unsorted spike times": (dict(times=[0.5, 0.2, 0.6, 1.0]), InvalidSession, "spikes/timestamps", "not sorted"),
    "negative spike times": (dict(times=[-0.5, 0.2, 0.6, 1.0]), InvalidSession, "spikes/timestamps", "negative"),
    "NaN in behaviour": (dict(vel=np.where(np.arange(42).reshape(21, 2) == 7, np.nan, 0.0)), InvalidSession,
                         "behaviour/cursor_vel/values", "NaN"),
    "inf in behaviour": (dict(vel=np.where(np.arange(42).reshape(21, 2) == 9, np.inf, 0.0)), InvalidSession,
                         "behaviour/cursor_vel/values", "NaN/inf"),
    "unit index out of range": (dict(units=[0, 1, 5, 0]), InvalidSession, "spikes/unit_index", "out of range"),
    "empty session": (dict(times=np.zeros(0), units=np.zeros(0, dtype=int), behaviour_t=np.zeros(0),
                           vel=np.zeros((0, 2))), InvalidSession, "spikes/timestamps", "empty"),
    "mismatched spike lengths": (dict(units=[0, 1, 2]), InvalidSession, "spikes/unit_index", "mismatched lengths"),
    "mismatched behaviour lengths": (dict(vel=np.zeros((20, 2))), InvalidSession, "behaviour/cursor_vel",
                                     "mismatched lengths"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_content_is_refused_with_location_and_corpus_unchanged(case, corpus, tmp_path):
    kwargs, exc, field, words = CASES[case]
    src = temporaldata_file(tmp_path / "bad.h5", **kwargs)
    before = corpus_state(corpus)
    report = ingest([src], corpus, lambda p: IngestOptions())
    assert not report.ok and len(report.failures) == 1
    with pytest.raises(exc) as e:
        read_sessions(src, IngestOptions())
    assert e.value.file == "bad.h5"
    assert e.value.session == "td-session"
    assert e.value.field == field
    assert words in e.value.message
    msg = report.failures[0][1]
    assert "bad.h5" in msg and "td-session" in msg and field in msg
    assert corpus_state(corpus) == before


def test_nan_behaviour_can_be_dropped_on_request(tmp_path):
    vel = np.zeros((21, 2))
    vel[3, 1] = np.nan
    src = temporaldata_file(tmp_path / "nan.h5", vel=vel)
    (s,) = read_sessions(src, IngestOptions(drop_nan_behaviour=True))
    assert len(s.behaviour["cursor_vel"].timestamps) == 20
    assert any("dropped 1 NaN/inf samples" in n for n in s.notes)


def test_unreadable_truncated_and_unknown_files(corpus, tmp_path, real_dir):
    before = corpus_state(corpus)
    junk = tmp_path / "junk.mat"
    junk.write_bytes(b"\x00\x01not a recording" * 10)
    empty = tmp_path / "empty.nwb"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.nwb"
    truncated.write_bytes((real_dir / "mouse_A2929-200711.nwb").read_bytes()[:3_000_000])
    trunc_mat = tmp_path / "truncated.mat"
    trunc_mat.write_bytes((real_dir / "chewie_demo.mat").read_bytes()[:20_000])
    other_h5 = tmp_path / "other.h5"
    with h5py.File(other_h5, "w") as f:
        f["x"] = np.arange(3)
    unknown_mat = tmp_path / "unknown.mat"
    scipy.io.savemat(unknown_mat, {"foo": np.arange(5), "bar": np.ones((3, 3))})
    expectations = {
        junk: (UnknownLayout, "unrecognised header"),
        empty: (UnreadableSource, "empty"),
        truncated: (UnreadableSource, "truncated"),
        trunc_mat: (UnreadableSource, "truncated"),
        other_h5: (UnknownLayout, "neither NWB nor temporaldata"),
        unknown_mat: (UnknownLayout, "match no known layout"),
        tmp_path / "missing.nwb": (UnreadableSource, "cannot open"),
    }
    for path, (exc, words) in expectations.items():
        with pytest.raises(exc, match=words) as e:
            read_sessions(path, IngestOptions())
        assert path.name in str(e.value)
    report = ingest(list(expectations), corpus, lambda p: IngestOptions())
    assert len(report.failures) == len(expectations)
    assert corpus_state(corpus) == before


def test_bad_matlab_content(tmp_path):
    neg = tmp_path / "neg.mat"
    scipy.io.savemat(neg, {"spikes": -np.ones((4, 30)), "time": np.arange(30) * 0.05, "handVel": np.ones((2, 30))})
    with pytest.raises(InvalidSession, match="negative spike counts") as e:
        read_sessions(neg, IngestOptions())
    assert e.value.field == "spikes" and e.value.file == "neg.mat"
    short = tmp_path / "short.mat"
    scipy.io.savemat(short, {"spikes": np.ones((4, 30)), "time": np.arange(30) * 0.05, "handVel": np.ones((2, 29))})
    with pytest.raises(InvalidSession, match="no axis of length 30") as e:
        read_sessions(short, IngestOptions())
    assert e.value.field == "hand_vel"
    nobin = tmp_path / "nobin.mat"
    scipy.io.savemat(nobin, {"spikes": np.ones((30, 4), dtype=np.uint8), "vel": np.ones((30, 2))})
    with pytest.raises(InvalidSession, match="bin width is not stored") as e:
        read_sessions(nobin, IngestOptions())
    assert e.value.field == "bin_width"
    (s,) = read_sessions(nobin, IngestOptions(bin_width_s=0.05))
    assert s.timing_resolution_s == 0.05 and len(s.spike_times) == 120


def test_duplicate_session_id_refused_unless_replace(corpus, tmp_path):
    other = simple_session("existing", seed=7, sha="another-source")
    before = corpus_state(corpus)
    with CorpusStore(corpus) as st:
        with pytest.raises(DuplicateSession, match="--replace") as e:
            st.add(other)
        assert e.value.session == "existing" and e.value.field == "session_id"
        assert corpus_state(corpus) == before
        # the very same source again is not a conflict: nothing to do
        assert st.add(simple_session("existing")).status == "unchanged"
        assert corpus_state(corpus) == before
        assert st.add(other, replace=True).status == "replaced"
        assert st.rows["existing"]["source_sha256"] == "another-source"


def test_cli_continues_past_a_bad_file_and_exits_nonzero(tmp_path, real_dir):
    bad = temporaldata_file(tmp_path / "bad.h5", times=[0.5, 0.2, 0.6, 1.0])
    good = tmp_path / "chewie_demo.mat"
    shutil.copy(real_dir / "chewie_demo.mat", good)
    p = run_cli("ingest", str(bad), str(good), "--corpus", str(tmp_path / "c"), "--bin-width", "0.2")
    assert p.returncode == 1
    r = result_line(p.stdout)
    assert r["failed"] == "1" and r["added"] == "1"
    assert "bad.h5" in p.stderr and "td-session" in p.stderr and "spikes/timestamps" in p.stderr


def test_store_rejects_a_foreign_directory(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "precious.txt").write_text("keep me")
    with pytest.raises(CorpusError, match="not a popscale corpus"):
        with CorpusStore(tmp_path / "d"):
            pass
    assert (tmp_path / "d" / "precious.txt").read_text() == "keep me"
