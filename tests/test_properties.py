"""Property-based bad input (issue 12): hypothesis writes broken recordings in every format ingest
reads (NWB, binned MATLAB .mat, temporaldata HDF5) and broken configs, sweep files and command
lines, and each must be refused with one located error:

- a recording: a `CorpusError` naming the file and, where the file can be read that far, the
  session and the field; the corpus it was ingested into is byte-for-byte what it was;
- a config, sweep file or command line: one `error: ...` line and a `RESULT error=...` line, no
  traceback, before Ray or training starts (a guard makes starting either fail the test).

The strategies generate the damage (where the NaN sits, how many units, which index is out of
range, how long a truncated file still is); the valid files they start from are checked to ingest.
"""

from __future__ import annotations

import math
import warnings
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
import yaml
from conftest import REPO, simple_session
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_bad_input import corpus_state, temporaldata_file

from data_service.errors import CorpusError, InvalidSession, UnknownLayout, UnreadableSource
from data_service.ingest import ingest, read_sessions
from data_service.ingest.common import IngestOptions
from data_service.ingest.matlab import detect_layout
from data_service.store import CorpusStore

# small example counts: every example writes a file and ingests it; database=None keeps
# hypothesis from writing .hypothesis/ into the checkout
PROPS = settings(deadline=None, max_examples=15, database=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture])
FEW = settings(PROPS, max_examples=8)

TAKEN = ("existing", "taken", "pair-te")  # session ids already in the corpus, from other sources
NWB_SESSION, TD_SESSION = "nwb-session", "td-session"
NAN_LIKE = [math.nan, math.inf, -math.inf]
DEMO = str(REPO / "configs" / "demo.yaml")
TINY_SWEEP = str(REPO / "configs" / "sweeps" / "tiny.yaml")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small corpus every bad file is thrown at, and the hash of each of its files."""
    root = tmp_path_factory.mktemp("properties") / "corpus"
    with CorpusStore(root) as store:
        for sid in TAKEN:
            store.add(simple_session(sid, duration=30.0, n_units=4, sha=f"other-source-{sid}"), durable=False)
    return root, corpus_state(root)


def refused(src: Path, corpus, *, field=None, session=None, exc=CorpusError, words: str | None = None,
            opts: IngestOptions | None = None) -> CorpusError:
    """`src` is refused by read_sessions and by ingest with one CorpusError that names the file (and
    `session`, and `field`: one name or a tuple of acceptable ones), and the corpus is unchanged."""
    opts = opts or IngestOptions()
    root, before = corpus
    with pytest.raises(CorpusError) as info:
        read_sessions(src, opts)
    e = info.value
    assert isinstance(e, exc), f"{type(e).__name__}: {e}"
    assert e.file == src.name, str(e)
    if session is not None:
        assert e.session == session, str(e)
    if field is not None:
        assert e.field in ((field,) if isinstance(field, str) else field), str(e)
    if words is not None:
        assert words in e.message, str(e)
    report = ingest([src], root, lambda _p: opts)
    assert report.results == [] and len(report.failures) == 1, report
    name, msg = report.failures[0]
    assert name == src.name and src.name in msg and "\n" not in msg
    for part in (e.session, e.field):
        assert part is None or part in msg, msg
    assert corpus_state(root) == before
    return e


# ---- writers: a valid recording in each format, with any part of it replaced -----------------------------
def nwb_file(path: Path, *, spikes=None, ids=None, bt=None, pos=None, session: str = NWB_SESSION) -> Path:
    """A small valid NWB (pynwb): units, a Position SpatialSeries with timestamps, a TimeSeries at a
    fixed rate in the behavior module, one trial. Content pynwb refuses to write is patched in with h5py."""
    from pynwb import NWBHDF5IO, NWBFile, TimeSeries
    from pynwb.behavior import Position, SpatialSeries

    nwb = NWBFile(session_description="property test", identifier="prop", session_id=session,
                  session_start_time=datetime(2020, 1, 1, tzinfo=timezone.utc))
    spikes = [np.array([0.1, 0.5, 1.0, 1.5]) + 0.01 * k for k in range(3)] if spikes is None else spikes
    for k, t in enumerate(spikes):
        nwb.add_unit(spike_times=np.asarray(t, dtype=np.float64), **({"id": int(ids[k])} if ids is not None else {}))
    bt = np.arange(0, 2, 0.1) if bt is None else np.asarray(bt, dtype=np.float64)
    pos = np.zeros((len(bt), 2)) if pos is None else pos
    p = Position(name="Position")
    p.add_spatial_series(SpatialSeries(name="xy", data=pos, timestamps=bt, reference_frame="arena", unit="cm"))
    nwb.add_acquisition(p)
    mod = nwb.create_processing_module("behavior", "behaviour")
    mod.add(TimeSeries(name="speed", data=np.zeros(20), starting_time=0.0, rate=10.0, unit="cm/s"))
    nwb.add_trial(start_time=0.0, stop_time=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with NWBHDF5IO(str(path), "w") as io:
            io.write(nwb)
    return path


def h5_replace(path: Path, name: str, data) -> None:
    """Replace one dataset of an HDF5 file (keeping its attributes, and the ragged index's link to
    its data when that is what is replaced)."""
    with h5py.File(path, "a") as f:
        attrs = dict(f[name].attrs)
        del f[name]
        f[name] = data
        for k, v in attrs.items():
            f[name].attrs[k] = v
        if name == "units/spike_times":
            f["units/spike_times_index"].attrs["target"] = f[name].ref


def mat_file(path: Path, layout: str = "stevenson", *, n_bins: int = 30, n_units: int = 4, **over) -> Path:
    """A valid binned MAT v5 file of one layout, with any variable replaced (None: left out)."""
    counts = (np.arange(n_bins * n_units).reshape(n_bins, n_units) % 3).astype(np.float64)  # bins x units
    counts[0, :] = 1  # every unit spikes
    if layout == "stevenson":
        d = {"spikes": counts.T, "time": np.arange(n_bins) * 0.05, "handVel": np.ones((2, n_bins))}
    elif layout == "bins_xy":
        d = {"spikes": counts.astype(np.uint8), "vel": np.ones((n_bins, 2))}
    else:  # dad: rates on a 5 Hz quantum (0.2 s bins)
        d = {"Ytr": counts * 5.0, "Xtr": np.ones((n_bins, 2)), "Ttr": np.repeat(np.arange(3), -(-n_bins // 3))[:n_bins]}
    d.update(over)
    scipy.io.savemat(path, {k: v for k, v in d.items() if v is not None})
    return path


def mat73_file(path: Path, n_bins: int = 30) -> Path:
    """A MAT v7.3 file (HDF5 behind a 512-byte MATLAB header; arrays stored transposed)."""
    with h5py.File(path, "w", userblock_size=512) as f:
        f["spikes"] = np.ones((n_bins, 4))  # MATLAB (units x bins)
        f["time"] = (np.arange(n_bins) * 0.05)[:, None]
        f["handVel"] = np.ones((n_bins, 2))
    with open(path, "r+b") as f:
        f.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 .")
    return path


def td_file(path: Path, *, patch=None, **kw) -> Path:
    """temporaldata_file (test_bad_input) plus an h5py patch applied to the open file."""
    temporaldata_file(path, **kw)
    if patch is not None:
        with h5py.File(path, "a") as f:
            patch(f)
    return path


def _replace(f: h5py.File, name: str, data) -> None:
    del f[name]
    f[name] = data


def test_the_writers_make_valid_recordings(tmp_path):
    """Every refusal below is the injected damage's: the undamaged files ingest."""
    files = [(nwb_file(tmp_path / "ok.nwb"), IngestOptions()), (td_file(tmp_path / "ok.h5"), IngestOptions()),
             (mat73_file(tmp_path / "ok73.mat"), IngestOptions())]
    files += [(mat_file(tmp_path / f"ok_{lay}.mat", lay), IngestOptions(bin_width_s=0.05 if lay == "bins_xy" else None))
              for lay in ("stevenson", "bins_xy", "dad")]
    for path, opts in files:
        sessions = read_sessions(path, opts)
        assert sessions and all(len(s.spike_times) for s in sessions), path.name
    report = ingest([p for p, _ in files[:2]], tmp_path / "c", lambda _p: IngestOptions())
    assert report.ok, report.failures


# ---- strategies --------------------------------------------------------------------------------------------
def sorted_times(min_size: int = 2, max_size: int = 10):
    """Distinct, sorted, non-negative spike times within a 50 s recording."""
    return st.lists(st.floats(0.0, 50.0, allow_nan=False, allow_subnormal=False), min_size=min_size,
                    max_size=max_size, unique=True).map(sorted).map(np.array)


def unit_spikes(min_units: int = 1, max_units: int = 4):
    return st.lists(sorted_times(), min_size=min_units, max_size=max_units)


def absurd_rates():
    """Sampling rates (Hz) no recording has: zero, negative, non-finite, under 1 mHz, over 1 MHz."""
    return st.one_of(st.sampled_from([0.0, -1.0, 1e-12, 1e9, *NAN_LIKE]), st.floats(max_value=0.0, allow_nan=False),
                     st.floats(1e-300, 9.9e-4), st.floats(1.01e6, 1e300))


def absurd_bin_widths():
    """Bin widths (s) no binned recording has: zero, negative, non-finite, under 1 us, over 1000 s."""
    return st.one_of(st.sampled_from([0.0, -0.05, 1e-12, 1e9, *NAN_LIKE]), st.floats(max_value=0.0, allow_nan=False),
                     st.floats(1e-300, 9.9e-7), st.floats(1000.5, 1e300))


def junk_h5(n: int, kind: str) -> np.ndarray:
    """n values of a type that has no place where numbers belong, as HDF5 can store them."""
    return {"strings": lambda: np.array([f"x{i}".encode() for i in range(n)]),
            "complex": lambda: np.arange(n) * 0.1 + 1j,
            "booleans": lambda: np.ones(n, dtype=bool),
            "objects": lambda: np.array([f"s{i}" for i in range(n)], dtype=h5py.string_dtype())}[kind]()


def junk_mat(shape: tuple[int, ...], kind: str):
    """A MAT variable of a type that has no place where numbers belong (MATLAB's logicals load as
    uint8, so booleans are not junk here)."""
    n = int(np.prod(shape))
    return {"strings": lambda: np.array(["abc"] * shape[-1]),
            "complex": lambda: np.ones(shape) + 1j,
            "cell": lambda: np.array([np.ones(2), "x"], dtype=object),
            "struct": lambda: {"a": np.ones(n)}}[kind]()


H5_JUNK = st.sampled_from(["strings", "complex", "booleans", "objects"])
MAT_JUNK = st.sampled_from(["strings", "complex", "cell", "struct"])


# ---- 1. unsorted spike times -------------------------------------------------------------------------------
@PROPS
@given(data=st.data())
def test_unsorted_times(tmp_path, corpus, data):
    fmt = data.draw(st.sampled_from(["nwb", "temporaldata", "mat"]), label="format")
    if fmt == "nwb":
        spikes = data.draw(unit_spikes(), label="spikes")
        u = data.draw(st.integers(0, len(spikes) - 1), label="unit")
        i = data.draw(st.integers(0, len(spikes[u]) - 2), label="swapped at")
        spikes[u][[i, i + 1]] = spikes[u][[i + 1, i]]
        refused(nwb_file(tmp_path / "bad.nwb", spikes=spikes), corpus, session=NWB_SESSION,
                field=f"units/spike_times[{u}]", words="unsorted")
    elif fmt == "temporaldata":
        t = data.draw(sorted_times(3, 20), label="times")
        i = data.draw(st.integers(0, len(t) - 2), label="swapped at")
        t[[i, i + 1]] = t[[i + 1, i]]
        refused(td_file(tmp_path / "bad.h5", times=t, units=np.arange(len(t)) % 3), corpus, session=TD_SESSION,
                field="spikes/timestamps", words="not sorted")
    else:
        n = data.draw(st.integers(5, 40), label="bins")
        t = np.arange(n) * 0.05
        i = data.draw(st.integers(0, n - 2), label="swapped at")
        t[[i, i + 1]] = t[[i + 1, i]]
        refused(mat_file(tmp_path / "bad.mat", n_bins=n, time=t), corpus, session="bad", field="time",
                words="not strictly increasing")


# ---- 2. negative times -------------------------------------------------------------------------------------
@PROPS
@given(data=st.data())
def test_negative_times(tmp_path, corpus, data):
    fmt = data.draw(st.sampled_from(["nwb", "nwb-behaviour", "temporaldata", "mat"]), label="format")
    neg = data.draw(st.floats(-1e6, -1e-6), label="negative time")
    if fmt == "nwb":
        spikes = data.draw(unit_spikes(), label="spikes")
        u = data.draw(st.integers(0, len(spikes) - 1), label="unit")
        spikes[u][data.draw(st.integers(0, len(spikes[u]) - 1), label="at")] = neg
        refused(nwb_file(tmp_path / "bad.nwb", spikes=spikes), corpus, session=NWB_SESSION,
                field=f"units/spike_times[{u}]", words="negative")
    elif fmt == "nwb-behaviour":
        bt = np.arange(20) * 0.1
        bt[data.draw(st.integers(0, 19), label="at")] = neg
        refused(nwb_file(tmp_path / "bad.nwb", bt=np.sort(bt)), corpus, session=NWB_SESSION,
                field="behaviour/position/timestamps", words="negative")
    elif fmt == "temporaldata":
        t = data.draw(sorted_times(3, 20), label="times")
        t[data.draw(st.integers(0, len(t) - 1), label="at")] = neg
        refused(td_file(tmp_path / "bad.h5", times=t, units=np.arange(len(t)) % 3), corpus, session=TD_SESSION,
                field="spikes/timestamps", words="negative")
    else:
        t = np.arange(30) * 0.05
        t[data.draw(st.integers(0, 29), label="at")] = neg
        refused(mat_file(tmp_path / "bad.mat", time=t), corpus, session="bad", field="time", words="negative")


# ---- 3. NaN / inf times and values -------------------------------------------------------------------------
@PROPS
@given(data=st.data())
def test_nan_and_inf(tmp_path, corpus, data):
    bad = data.draw(st.sampled_from(NAN_LIKE), label="value")
    where = data.draw(st.sampled_from(["nwb spikes", "nwb behaviour values", "nwb behaviour timestamps",
                                       "td spikes", "td behaviour values", "td behaviour timestamps",
                                       "mat time", "mat counts", "mat behaviour"]), label="where")
    row = data.draw(st.integers(0, 19), label="sample")
    col = data.draw(st.integers(0, 1), label="column")
    if where == "nwb spikes":
        spikes = data.draw(unit_spikes(), label="spikes")
        u = data.draw(st.integers(0, len(spikes) - 1), label="unit")
        spikes[u][data.draw(st.integers(0, len(spikes[u]) - 1), label="at")] = bad
        refused(nwb_file(tmp_path / "bad.nwb", spikes=spikes), corpus, session=NWB_SESSION,
                field=f"units/spike_times[{u}]", words="non-finite")
    elif where.startswith("nwb behaviour"):
        pos, bt = np.zeros((20, 2)), np.arange(20) * 0.1
        part = where.split()[-1]
        if part == "values":
            pos[row, col] = bad
        else:
            bt[row] = bad
        refused(nwb_file(tmp_path / "bad.nwb", bt=bt, pos=pos), corpus, session=NWB_SESSION,
                field=f"behaviour/position/{part}", words="NaN/inf")
    elif where == "td spikes":
        t = data.draw(sorted_times(3, 20), label="times")
        t[data.draw(st.integers(0, len(t) - 1), label="at")] = bad
        refused(td_file(tmp_path / "bad.h5", times=t, units=np.arange(len(t)) % 3), corpus, session=TD_SESSION,
                field="spikes/timestamps", words="non-finite")
    elif where.startswith("td behaviour"):
        vel, bt = np.zeros((21, 2)), np.linspace(0, 2, 21)
        part = where.split()[-1]
        if part == "values":
            vel[row, col] = bad
        else:
            bt[row] = bad
        refused(td_file(tmp_path / "bad.h5", vel=vel, behaviour_t=bt), corpus, session=TD_SESSION,
                field=f"behaviour/cursor_vel/{part}", words="NaN/inf")
    elif where == "mat time":
        t = np.arange(30) * 0.05
        t[row] = bad
        refused(mat_file(tmp_path / "bad.mat", time=t), corpus, session="bad", field="time", words="non-finite")
    elif where == "mat counts":
        counts = np.ones((4, 30))
        counts[col, row] = bad
        refused(mat_file(tmp_path / "bad.mat", spikes=counts), corpus, session="bad", field="spikes", words="NaN/inf")
    else:
        vel = np.ones((2, 30))
        vel[col, row] = bad
        refused(mat_file(tmp_path / "bad.mat", handVel=vel), corpus, session="bad",
                field="behaviour/hand_vel/values", words="NaN/inf")


# ---- 4. out-of-range unit indices ----------------------------------------------------------------------------
@PROPS
@given(data=st.data())
def test_out_of_range_unit_indices(tmp_path, corpus, data):
    fmt = data.draw(st.sampled_from(["temporaldata", "nwb"]), label="format")
    if fmt == "temporaldata":
        n_units = data.draw(st.integers(1, 5), label="units")
        t = data.draw(sorted_times(2, 20), label="times")
        u = data.draw(st.lists(st.integers(0, n_units - 1), min_size=len(t), max_size=len(t)), label="indices")
        u[data.draw(st.integers(0, len(t) - 1), label="at")] = data.draw(
            st.one_of(st.integers(n_units, n_units + 10_000), st.integers(-10_000, -1)), label="bad index")
        refused(td_file(tmp_path / "bad.h5", times=t, units=np.array(u), n_units=n_units), corpus,
                session=TD_SESSION, field="spikes/unit_index", words="out of range")
    else:  # the ragged index of the units table points past (or back within) its spike times
        spikes = data.draw(unit_spikes(2, 4), label="spikes")
        total = sum(len(s) for s in spikes)
        idx = np.cumsum([len(s) for s in spikes])
        k = data.draw(st.integers(0, len(idx) - 1), label="entry")
        idx[k] = data.draw(st.integers(0, 3 * total), label="offset")
        assume((np.diff(idx) < 0).any() or idx[-1] != total)
        path = nwb_file(tmp_path / "bad.nwb", spikes=spikes)
        with h5py.File(path, "a") as f:
            f["units/spike_times_index"][k] = idx[k]
        refused(path, corpus, session=NWB_SESSION, field="units/spike_times_index", words="inconsistent")


# ---- 5. empty units ----------------------------------------------------------------------------------------
@PROPS
@given(fmt=st.sampled_from(["nwb", "temporaldata", "mat", "mat-dad"]), n_units=st.integers(0, 5))
def test_empty_units(tmp_path, corpus, fmt, n_units):
    """No units at all, or units without a single spike."""
    if n_units == 0:
        fields = {"nwb": "units", "temporaldata": "units/id", "mat": "units/id", "mat-dad": "units/id"}
        words = {"nwb": "no units table"}.get(fmt, "units table is empty")
    else:
        fields, words = dict.fromkeys(["nwb", "temporaldata", "mat", "mat-dad"], "spikes/timestamps"), "empty"
    if fmt == "nwb":
        src, session = nwb_file(tmp_path / "bad.nwb", spikes=[np.zeros(0)] * n_units), NWB_SESSION
    elif fmt == "temporaldata":
        src, session = td_file(tmp_path / "bad.h5", times=np.zeros(0), units=np.zeros(0, dtype=int),
                               n_units=n_units), TD_SESSION
    elif fmt == "mat":
        src, session = mat_file(tmp_path / "bad.mat", spikes=np.zeros((n_units, 30))), "bad"
    else:
        src, session = mat_file(tmp_path / "bad.mat", "dad", Ytr=np.zeros((30, n_units))), "bad"
    refused(src, corpus, session=session, field=fields[fmt], words=words,
            opts=IngestOptions(bin_width_s=0.2 if fmt == "mat-dad" else None))


# ---- 6. mismatched lengths ---------------------------------------------------------------------------------
@PROPS
@given(data=st.data())
def test_mismatched_lengths(tmp_path, corpus, data):
    what = data.draw(st.sampled_from(["td unit_index", "td behaviour", "nwb behaviour", "nwb unit ids",
                                      "mat time", "mat behaviour", "mat targets", "mat dad behaviour"]), label="what")
    d = data.draw(st.integers(1, 5), label="by") * data.draw(st.sampled_from([-1, 1]), label="sign")
    n = data.draw(st.integers(12, 40), label="length")
    if what == "td unit_index":
        t = np.sort(np.random.default_rng(n).uniform(0, 2, n))
        refused(td_file(tmp_path / "bad.h5", times=t, units=np.zeros(n + d, dtype=int)), corpus, session=TD_SESSION,
                field="spikes/unit_index", words="mismatched lengths")
    elif what == "td behaviour":
        refused(td_file(tmp_path / "bad.h5", behaviour_t=np.linspace(0, 2, n), vel=np.zeros((n + d, 2))), corpus,
                session=TD_SESSION, field="behaviour/cursor_vel", words="mismatched lengths")
    elif what == "nwb behaviour":
        path = nwb_file(tmp_path / "bad.nwb", bt=np.arange(n) * 0.1)
        h5_replace(path, "acquisition/Position/xy/timestamps", np.arange(n + d) * 0.1)
        refused(path, corpus, session=NWB_SESSION, field="behaviour/position", words="mismatched lengths")
    elif what == "nwb unit ids":  # hdmf itself refuses the table: the file is named, and the table
        path = nwb_file(tmp_path / "bad.nwb")
        h5_replace(path, "units/id", np.arange(max(3 + d, 0)))
        refused(path, corpus, exc=UnreadableSource, field="units")
    elif what == "mat time":  # bins = len(time): the counts have no axis that long
        refused(mat_file(tmp_path / "bad.mat", n_bins=n, time=np.arange(n + d) * 0.05), corpus, session="bad",
                field="spikes", words="no axis of length")
    elif what == "mat behaviour":
        refused(mat_file(tmp_path / "bad.mat", n_bins=n, handVel=np.ones((2, n + d))), corpus, session="bad",
                field="hand_vel", words="no axis of length")
    elif what == "mat targets":
        refused(mat_file(tmp_path / "bad.mat", "dad", n_bins=n, Ttr=np.arange(n + d) % 3), corpus, session="bad",
                field="Ttr", words="mismatched lengths")
    else:
        refused(mat_file(tmp_path / "bad.mat", "dad", n_bins=n, Xtr=np.ones((n + d, 2))), corpus, session="bad",
                field="Xtr", words="no axis of length")


# ---- 7. wrong dtypes ---------------------------------------------------------------------------------------
@PROPS
@given(data=st.data())
def test_wrong_dtypes(tmp_path, corpus, data):
    fmt = data.draw(st.sampled_from(["nwb", "temporaldata", "mat"]), label="format")
    if fmt == "nwb":
        kind = data.draw(H5_JUNK, label="kind")
        target = data.draw(st.sampled_from(["units/spike_times", "acquisition/Position/xy/data",
                                            "acquisition/Position/xy/timestamps"]), label="array")
        path = nwb_file(tmp_path / "bad.nwb")
        shape = {"units/spike_times": 12, "acquisition/Position/xy/data": 20, "acquisition/Position/xy/timestamps": 20}
        junk = junk_h5(shape[target], kind)
        h5_replace(path, target, np.stack([junk, junk], axis=1) if target.endswith("/data") else junk)
        field = "units/spike_times[0]" if target == "units/spike_times" else target
        refused(path, corpus, session=NWB_SESSION, field=field, exc=InvalidSession)
    elif fmt == "temporaldata":
        kind = data.draw(H5_JUNK, label="kind")
        target = data.draw(st.sampled_from(["spikes/timestamps", "spikes/unit_index", "cursor/timestamps"]),
                           label="array")
        n = 4 if target.startswith("spikes") else 21
        refused(td_file(tmp_path / "bad.h5", patch=lambda f: _replace(f, target, junk_h5(n, kind))), corpus,
                session=TD_SESSION, field=target, exc=InvalidSession)
    else:
        kind = data.draw(MAT_JUNK, label="kind")
        layout, var = data.draw(st.sampled_from([("stevenson", "spikes"), ("stevenson", "time"),
                                                 ("stevenson", "handVel"), ("dad", "Ytr"), ("dad", "Xtr"),
                                                 ("dad", "Ttr")]), label="variable")
        shape = {"spikes": (4, 30), "time": (30,), "handVel": (2, 30), "Ytr": (30, 4), "Xtr": (30, 2), "Ttr": (30,)}
        field = {"handVel": "hand_vel"}.get(var, var)
        refused(mat_file(tmp_path / "bad.mat", layout, **{var: junk_mat(shape[var], kind)}), corpus, session="bad",
                field=field, exc=InvalidSession, words="belong")


# ---- 8. absurd sampling rates and bin sizes ------------------------------------------------------------------
@PROPS
@given(data=st.data())
def test_absurd_sampling_rates(tmp_path, corpus, data):
    route = data.draw(st.sampled_from(["mat --bin-width", "mat time step", "mat rate quantum", "nwb rate",
                                       "temporaldata rate"]), label="route")
    if route == "mat --bin-width":
        width = data.draw(absurd_bin_widths(), label="bin width")
        layout = data.draw(st.sampled_from(["stevenson", "bins_xy", "dad"]), label="layout")
        refused(mat_file(tmp_path / "bad.mat", layout), corpus, session="bad", field="bin_width",
                words="bin width", opts=IngestOptions(bin_width_s=width))
    elif route == "mat time step":  # the bin width is the median step of `time`
        step = data.draw(absurd_bin_widths(), label="time step")
        with np.errstate(invalid="ignore"):  # 0 * inf
            t = np.arange(30) * step
        refused(mat_file(tmp_path / "bad.mat", time=t), corpus, session="bad",
                field=("time", "bin_width"))
    elif route == "mat rate quantum":  # rates k * q imply bins of 1 / q
        q = data.draw(st.one_of(st.integers(10**6 + 1, 10**12).map(float),
                                st.integers(1001, 10**6).map(lambda k: 1.0 / k)), label="quantum")
        y = np.ones((30, 4)) * q
        y[::2] *= 2
        refused(mat_file(tmp_path / "bad.mat", "dad", Ytr=y), corpus, session="bad", field="bin_width",
                words="implied by the file")
    elif route == "nwb rate":
        rate = data.draw(absurd_rates(), label="rate")
        path = nwb_file(tmp_path / "bad.nwb")
        with h5py.File(path, "a") as f:
            f["processing/behavior/speed/starting_time"].attrs["rate"] = rate
        refused(path, corpus, session=NWB_SESSION, field="processing/behavior/speed/rate", words="sampling rate")
    else:
        rate = data.draw(absurd_rates(), label="rate")

        def regular(f):
            f["cursor"].attrs.update({"object": "RegularTimeSeries", "sampling_rate": rate})
            del f["cursor/timestamps"]

        refused(td_file(tmp_path / "bad.h5", patch=regular), corpus, session=TD_SESSION,
                field="cursor/sampling_rate", words="sampling rate")


# ---- 9. duplicate ids ----------------------------------------------------------------------------------------
@PROPS
@given(data=st.data())
def test_duplicate_unit_ids(tmp_path, corpus, data):
    n = data.draw(st.integers(2, 6), label="units")
    ids = list(data.draw(st.lists(st.integers(0, 10**6), min_size=n - 1, max_size=n - 1, unique=True), label="ids"))
    ids.insert(data.draw(st.integers(0, n - 1), label="at"), ids[data.draw(st.integers(0, n - 2), label="copy of")])
    if data.draw(st.booleans(), label="nwb"):
        src = nwb_file(tmp_path / "bad.nwb", spikes=[np.array([0.1 * (k + 1)]) for k in range(n)], ids=ids)
        session = NWB_SESSION
    else:
        src = td_file(tmp_path / "bad.h5", times=np.arange(n) * 0.1, units=np.arange(n), n_units=n,
                      patch=lambda f: _replace(f, "units/id", np.array([f"u{i}".encode() for i in ids])))
        session = TD_SESSION
    refused(src, corpus, session=session, field="units/id", words="duplicate unit id")


@PROPS
@given(fmt=st.sampled_from(["nwb", "temporaldata", "mat", "mat --session-id"]), taken=st.sampled_from(TAKEN[:2]))
def test_duplicate_session_ids(tmp_path, corpus, fmt, taken):
    """A file whose session id is already in the corpus (from another source) is refused whole."""
    opts = IngestOptions()
    if fmt == "nwb":
        src = nwb_file(tmp_path / "dup.nwb", session=taken)
    elif fmt == "temporaldata":
        src = td_file(tmp_path / "dup.h5", session=taken)
    elif fmt == "mat":
        src = mat_file(tmp_path / f"{taken}.mat")
    else:
        src, opts = mat_file(tmp_path / "dup.mat"), IngestOptions(session_id=taken)
    root, before = corpus
    report = ingest([src], root, lambda _p: opts)
    assert report.results == [] and len(report.failures) == 1
    name, msg = report.failures[0]
    assert name == src.name and src.name in msg and f"session {taken}" in msg and "field session_id" in msg
    assert "already in the corpus" in msg and "--replace" in msg
    assert corpus_state(root) == before


@FEW
@given(units_tr=st.integers(1, 4), extra=st.integers(1, 3), n_bins=st.integers(10, 30))
def test_a_file_of_two_sessions_is_refused_whole(tmp_path, corpus, units_tr, extra, n_bins):
    """A dad file whose parts have different units is two sessions, pair-tr and pair-te; the corpus
    holds a pair-te from another source: neither is written (not pair-tr first, then a failure)."""
    src = mat_file(tmp_path / "pair.mat", "dad", n_bins=n_bins, n_units=units_tr,
                   Yte=np.ones((n_bins, units_tr + extra)) * 5.0, Xte=np.ones((n_bins, 2)))
    assert [s.session_id for s in read_sessions(src, IngestOptions())] == ["pair-tr", "pair-te"]
    root, before = corpus
    report = ingest([src], root, lambda _p: IngestOptions())
    assert report.results == [] and len(report.failures) == 1
    assert "session pair-te" in report.failures[0][1] and "field session_id" in report.failures[0][1]
    assert corpus_state(root) == before


# ---- 10. unknown layouts -------------------------------------------------------------------------------------
NAMES = st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,8}", fullmatch=True)


@PROPS
@given(data=st.data())
def test_unknown_layouts(tmp_path, corpus, data):
    kind = data.draw(st.sampled_from(["mat", "hdf5", "nwb-marked", "temporaldata-marked", "bytes"]), label="kind")
    if kind == "mat":
        names = data.draw(st.lists(NAMES, min_size=1, max_size=5, unique_by=str.lower), label="variables")
        d = {k: np.arange(data.draw(st.integers(1, 6), label="size"), dtype=np.float64) for k in names}
        assume(detect_layout(d) is None)
        src = tmp_path / "odd.mat"
        scipy.io.savemat(src, d)
        refused(src, corpus, exc=UnknownLayout, words="match no known layout")
    elif kind in ("hdf5", "nwb-marked", "temporaldata-marked"):
        names = data.draw(st.lists(NAMES, min_size=1, max_size=5, unique=True), label="members")
        src = tmp_path / "odd.h5"
        with h5py.File(src, "w") as f:
            for k in names:
                if data.draw(st.booleans(), label=f"{k} is a group"):
                    f.create_group(k).attrs["object"] = data.draw(st.sampled_from(["ArrayDict", "Interval", "x"]))
                else:
                    f[k] = np.arange(3)
            if kind == "nwb-marked":
                f.attrs["nwb_version"] = "2.6.0"
            elif kind == "temporaldata-marked":
                f.attrs["object"] = "Data"
        if kind == "hdf5":
            assume(not ("general" in names and "acquisition" in names))
            refused(src, corpus, exc=UnknownLayout, words="neither NWB nor temporaldata")
        elif kind == "nwb-marked":  # claims to be NWB, is not readable as one
            refused(src, corpus, exc=(UnreadableSource, InvalidSession))
        else:
            assume("spikes" not in names or "units" not in names)
            refused(src, corpus, exc=InvalidSession, session="odd", field=("spikes", "units"))
    else:
        blob = data.draw(st.binary(min_size=1, max_size=2000), label="bytes")
        assume(not blob.startswith(b"MATLAB") and b"\x89HDF\r\n\x1a\n" not in blob[:1024])
        src = tmp_path / "odd.nwb"
        src.write_bytes(blob)
        refused(src, corpus, exc=UnknownLayout, words="unrecognised header")


# ---- 11. truncated files -------------------------------------------------------------------------------------
WHOLE = {
    "nwb": lambda p: nwb_file(p.with_suffix(".nwb")),
    "temporaldata": lambda p: td_file(p.with_suffix(".h5")),
    "mat v5": lambda p: mat_file(p.with_suffix(".mat")),
    "mat v5 compressed": lambda p: (scipy.io.savemat(p.with_suffix(".mat"), {
        "handVel": np.ones((2, 30)), "time": np.arange(30) * 0.05, "spikes": np.ones((4, 30))},
        do_compression=True), p.with_suffix(".mat"))[1],
    "mat v7.3": lambda p: mat73_file(p.with_suffix(".mat")),
}


@pytest.mark.parametrize("fmt", list(WHOLE))
def test_truncated_files(tmp_path, corpus, fmt):
    whole = WHOLE[fmt](tmp_path / "whole")
    content = whole.read_bytes()
    read_sessions(whole, IngestOptions())  # the file itself is fine

    @PROPS
    @given(cut=st.one_of(st.integers(0, len(content) - 1), st.integers(max(0, len(content) - 600), len(content) - 1)))
    def cut_at(cut):
        src = tmp_path / f"cut{whole.suffix}"
        src.write_bytes(content[:cut])
        refused(src, corpus, exc=(UnreadableSource, UnknownLayout))

    cut_at()


# ---- the second half: configs, sweep files and command lines ---------------------------------------------------
class TrainingStarted(BaseException):
    """Raised (past main()'s `except Exception`) if a command got as far as pretraining."""


@pytest.fixture
def cli(monkeypatch, capsys):
    """popscale.cli.main in this process; pretraining and sweeps are replaced by a tripwire."""
    import pretrain.run.launch
    import pretrain.scaling.sweep
    from popscale.cli import main

    def tripwire(*_a, **_k):
        raise TrainingStarted("a command that should have been refused started training")

    monkeypatch.setattr(pretrain.run.launch, "pretrain", tripwire)
    monkeypatch.setattr(pretrain.scaling.sweep, "run_sweep", tripwire)

    def run(*argv: str) -> tuple[int, str, str]:
        try:
            code = main(list(argv))
        except SystemExit as e:  # argparse's usage errors
            code = e.code
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def one_error(result, code: int | None = None, names=()) -> str:
    """Exactly one `error:` line naming each of `names`, then `RESULT error=...`, and no traceback."""
    got, out, err = result
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in out + err
    assert out.strip().splitlines()[-1].startswith("RESULT error="), out
    if code is not None:
        assert got == code, (got, lines[0])
    for n in names:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("text,names", [
    ("- a\n- b\n", ["expected a mapping"]),
    ("42\n", ["expected a mapping"]),
    ("train: [1, 2\n", ["not valid YAML"]),
    ("train:\n\tsteps: 3\n", ["not valid YAML"]),
    ("trian: {steps: 3}\n", ["trian", "unknown key"]),
    ("train: {stepz: 3}\n", ["train.stepz", "unknown key"]),
    ("train: {steps: abc}\n", ["train.steps", "expected int"]),
    ("train: {steps: -1}\n", ["train.steps", "at least 1"]),
    ("train: {steps: true}\n", ["train.steps"]),
    ("data: {global_batch: 0}\n", ["data.global_batch", "at least 1"]),
    ("data: {loader: rya}\n", ["data.loader"]),
    ("data: {sessions: [1, 2]}\n", ["data.sessions[0]", "expected a string"]),
    ("data: {readouts: {velocity: hand_vel}}\n", ["data.readouts.velocity", "expected a list"]),
    ("name: 5\n", ["name", "expected a string"]),
    ("train: 5\n", ["train", "expected a mapping"]),
])
def test_a_malformed_config_file_is_one_line(cli, tmp_path, text, names):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(text)
    one_error(cli("pretrain", "--config", str(cfg)), 2, [str(cfg), *names])


@pytest.mark.parametrize("override,names", [
    ("train.steps=abc", ["train.steps", "expected int"]),
    ("train.steps=-1", ["train.steps", "at least 1"]),
    ("train.steps=0", ["train.steps"]),
    ("train.steps=1.5", ["train.steps"]),
    ("train.steps=false", ["train.steps"]),
    ("data.global_batch=0", ["data.global_batch", "at least 1"]),
    ("data.window_s=-1", ["data.window_s"]),
    ("train.optim.lr=.nan", ["train.optim.lr"]),
    ("train.precision=fp8", ["train.precision"]),
    ("cluster.num_workers=0", ["cluster.num_workers"]),
    ("train.steps=[1", ["not valid YAML"]),
    ("train.steps=", ["train.steps", "null"]),
    ("train=", ["train", "null"]),
    ("train.steps", ["key.sub=value"]),
    ("train.steps.x=1", ["train.steps is a value"]),
])
def test_a_malformed_override_is_one_line(cli, override, names):
    one_error(cli("pretrain", "--config", DEMO, "--set", override), 2, [override.split("=")[0], *names])


JUNK = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12)


@PROPS
@given(key=st.sampled_from(["train.steps", "data.global_batch", "train.optim.lr", "data.window_s",
                            "train.eval_every", "cluster.num_workers"]), value=JUNK)
def test_junk_override_values_are_refused_or_valid(key, value):
    """Whatever text follows `key=`, the config either refuses it (naming the override) or holds a
    value of the field's type in its range: never an exception of another kind, never a bool or NaN."""
    from data_service.errors import ConfigError
    from pretrain.run.config import load_config

    try:
        cfg = load_config(DEMO, [f"{key}={value}"])
    except ConfigError as e:
        assert repr(f"{key}={value}") in str(e) or "must look like" in str(e)
        return
    v = cfg
    for part in key.split("."):
        v = getattr(v, part)
    assert type(v) in (int, float) and math.isfinite(v) and v > 0, (value, v)


def refused_by_load_config(path, overrides=()) -> bool:
    from data_service.errors import ConfigError
    from pretrain.run.config import load_config

    try:
        load_config(path, list(overrides))
    except ConfigError:
        return True
    return False


@PROPS
@given(value=st.one_of(JUNK, st.integers(max_value=0).map(str), st.floats().map(repr)))
def test_junk_override_on_the_command_line_is_one_line(cli, value):
    assume(refused_by_load_config(DEMO, [f"train.steps={value}"]))  # (0x1F is a fine number of steps)
    one_error(cli("pretrain", "--config", DEMO, "--set", f"train.steps={value}"), 2, ["train.steps"])


@pytest.mark.parametrize("override", ["train.optim.lr=1" + "0" * 400, "train.steps=1" + "0" * 5000])
def test_huge_numbers_are_one_line(cli, override):
    one_error(cli("pretrain", "--config", DEMO, "--set", override), 2)


@FEW
@given(blob=st.binary(min_size=1, max_size=300))
def test_a_config_or_metadata_file_of_random_bytes_is_one_line(cli, tmp_path, blob):
    cfg = tmp_path / "random.yaml"
    cfg.write_bytes(blob)
    if refused_by_load_config(cfg):
        one_error(cli("pretrain", "--config", str(cfg)), 2, [str(cfg)])
    src = mat_file(tmp_path / "ok.mat")
    from data_service.ingest.common import load_metadata_file

    try:
        load_metadata_file(cfg)
    except CorpusError:
        one_error(cli("ingest", str(src), "--corpus", str(tmp_path / "c"), "--meta", str(cfg)), 2, [str(cfg)])
        assert not (tmp_path / "c").exists()


def sweep_file(tmp_path: Path, doc) -> str:
    path = tmp_path / "sweep.yaml"
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return str(path)


BASE = {"name": "bad", "base": DEMO}


@pytest.mark.parametrize("doc,names", [
    ({**BASE, "grid": {"model": ["poyo-1.3M"], "sessions": None}}, ["grid.sessions"]),  # an axis without values
    ({**BASE, "grid": {"sesions": [2]}}, ["sesions", "known axes"]),  # an axis that does not exist
    ({**BASE, "grid": {"sessions": []}}, ["grid.sessions", "non-empty list"]),
    ({**BASE, "grid": {"model": []}}, ["grid.model"]),
    ({**BASE, "grid": {"sessions": ["a", "b"]}}, ["grid.sessions", "'a'"]),
    ({**BASE, "grid": {"sessions": [2.5]}}, ["grid.sessions"]),
    ({**BASE, "grid": {"steps": [True]}}, ["grid.steps"]),
    ({**BASE, "grid": {"session_fraction": [1.5]}}, ["grid.session_fraction"]),
    ({**BASE, "grid": {"model": [5]}}, ["grid.model"]),
    ({**BASE, "grid": [1, 2]}, ["grid", "expected a mapping"]),
    ({**BASE, "points": [5]}, ["points[0]", "expected a mapping"]),
    ({**BASE, "points": [{"seed": -1}]}, ["points[0].seed"]),
    ({**BASE, "budget": {"steps": 0}}, ["budget.steps"]),
    ({**BASE, "budget": {"kind": "forever"}}, ["budget.kind"]),
    ({**BASE, "max_concurrent": "two"}, ["max_concurrent"]),
    ({**BASE, "name": 5}, ["name", "expected a string"]),
    ({**BASE, "base": "nowhere.yaml"}, ["nowhere.yaml"]),
    ({**BASE, "overrides": ["train.steps=-1"]}, ["train.steps"]),
    ("- model\n", ["expected a mapping"]),
    ("grid: {model: [xs\n", ["not valid YAML"]),
])
def test_a_malformed_sweep_file_is_one_line(cli, tmp_path, doc, names):
    path = sweep_file(tmp_path, doc)
    one_error(cli("sweep", "--config", path), 2, [path, *names])


COUNT_JUNK = st.one_of(st.text(st.characters(codec="ascii", categories=["L"]), min_size=1, max_size=6),
                       st.booleans(), st.integers(max_value=0), st.floats().filter(lambda x: x != int(x) if
                                                                                      math.isfinite(x) else True),
                       st.lists(st.integers(1, 3), max_size=2), st.dictionaries(NAMES, st.integers(), max_size=2))


@PROPS
@given(axis=st.sampled_from(["subjects", "sessions", "steps", "seed", "session_fraction", "model"]), data=st.data())
def test_a_wrongly_typed_sweep_axis_is_one_line(cli, tmp_path, axis, data):
    if axis == "session_fraction":
        value = data.draw(st.one_of(st.floats().filter(lambda x: not 0 < x <= 1), st.text(min_size=1, max_size=4),
                                    st.booleans()), label="value")
    elif axis == "model":
        value = data.draw(st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(),
                                    st.lists(st.integers(), max_size=2)), label="value")
    else:
        value = data.draw(COUNT_JUNK.filter(lambda v: not (axis == "seed" and v == 0 and not isinstance(v, bool))),
                          label="value")
    path = sweep_file(tmp_path, {**BASE, "grid": {axis: [value]}})
    one_error(cli("sweep", "--config", path), 2, [path, f"grid.{axis}"])


@FEW
@given(override=st.tuples(st.sampled_from(["grid.sessions", "budget.steps", "max_concurrent", "eval.sessions",
                                           "grid.model"]), JUNK).map("=".join))
def test_junk_sweep_overrides_are_refused_before_any_run(cli, override):
    from data_service.errors import ConfigError
    from pretrain.scaling.plan import load_sweep

    try:
        load_sweep(TINY_SWEEP, [override])
    except ConfigError:
        pass
    else:
        assume(False)  # a valid override: the command would go on to run the sweep
    one_error(cli("sweep", "--config", TINY_SWEEP, "--set", override), 2)


@pytest.mark.parametrize("argv,names", [
    (["ingest", "x.nwb"], ["--corpus", "required"]),
    (["ingest", "--corpus", "c"], ["sources", "required"]),
    (["evaluate", "--corpus", "c"], ["--model", "required"]),
    (["sweep"], ["--config", "required"]),
    (["verify"], ["corpus", "required"]),
    (["inspect"], ["corpus", "required"]),
    ([], ["required"]),
    (["nosuchcommand"], ["invalid choice"]),
    (["ingest", "x.nwb", "--corpus", "c", "--bin-width", "fast"], ["--bin-width", "invalid float"]),
    (["evaluate", "--model", "m", "--corpus", "c", "--split", "everything"], ["--split", "invalid choice"]),
])
def test_bad_arguments_are_one_line(cli, argv, names):
    one_error(cli(*argv), 2, names)


REQUIRED = {"ingest": ["x.nwb", "--corpus", "c"], "inspect": ["c"], "verify": ["c"], "pretrain": [],
            "sweep": ["--config", "s.yaml"], "evaluate": ["--model", "m", "--corpus", "c"], "synth": ["--corpus", "c"]}


@PROPS
@given(command=st.sampled_from(sorted(REQUIRED)), flag=st.from_regex(r"[a-z]{1,10}", fullmatch=True))
def test_unknown_flags_are_one_line(cli, command, flag):
    one_error(cli(command, *REQUIRED[command], f"--no-such-{flag}"), 2, [f"--no-such-{flag}"])


@pytest.mark.parametrize("argv,names", [
    (["ingest", "SRC", "--corpus", "{tmp}/c", "--bin-width", "0"], ["--bin-width", "not plausible"]),
    (["ingest", "SRC", "--corpus", "{tmp}/c", "--bin-width", "-0.05"], ["--bin-width"]),
    (["ingest", "SRC", "--corpus", "{tmp}/c", "--valid-frac", "1.5"], ["--valid-frac"]),
    (["ingest", "SRC", "--corpus", "{tmp}/c", "--valid-frac", "0.5", "--test-frac", "0.5"], ["leave no training"]),
    (["ingest", "SRC", "--corpus", "{tmp}/c", "--gap", "nan"], ["--gap"]),
])
def test_bad_ingest_values_are_refused_before_the_corpus_is_made(cli, tmp_path, argv, names):
    src = mat_file(tmp_path / "ok.mat")
    argv = [str(src) if a == "SRC" else a.format(tmp=tmp_path) for a in argv]
    one_error(cli(*argv), 2, names)
    assert not (tmp_path / "c").exists()


PATHS = st.from_regex(r"[a-z]{1,8}(/[a-z]{1,8}){0,2}(\.nwb|\.mat|)", fullmatch=True)


@PROPS
@given(command=st.sampled_from(["ingest", "verify", "inspect", "evaluate"]), rel=PATHS)
def test_nonexistent_paths_are_one_line(cli, tmp_path, command, rel):
    missing = str(tmp_path / "nothing-here" / rel)
    argv = {"ingest": ["ingest", missing, "--corpus", str(tmp_path / "c")], "verify": ["verify", missing],
            "inspect": ["inspect", missing],
            "evaluate": ["evaluate", "--model", str(tmp_path / "no-model"), "--corpus", missing]}[command]
    one_error(cli(*argv), 1, [missing])
    assert not (tmp_path / "c").exists() and not (tmp_path / "nothing-here").exists()
